"""Teacher pretraining recipe: captioning loss on the simulator's web clips (never the experiment's).

setup   : list ``<bids>/derivatives/simulation/webclips/*.mp4`` + ``captions.json``, split
          off held-out clips, cache the frozen backbone's features (safetensors), build the
          teacher (frozen backbone + frozen LLM, trainable Q-Formers / positions / projection)
train   : stage 1 (BLIP-2's ITC): the Q-Formers' pooled output vs frozen sentence embeddings
          of the captions, no LLM (``itc_steps``); stage 2: AdamW on the answer-token
          cross-entropy of a clip's caption (its first, or a random one) given a random
          instruction through the frozen LLM, training ``llama_proj`` only (or the
          Q-Formers too: ``train_qformers``), bf16 autocast where the LLM runs in bf16
save    : ``teacher.safetensors`` (trainable weights, config in the metadata) + ``teacher.json``
evaluate: Video2Text of held-out clips vs the LLM with no video tokens, both against the
          true captions -> ``teacher_eval.json`` {"video2text": METRICS, "no_video": METRICS}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmri2text.config import INSTRUCTIONS, Config, TeacherConfig
from fmri2text.errors import UserError
from fmri2text.io import atomic_path, ensure_output_dir, file_hash, write_json
from fmri2text.models import generation
from fmri2text.models import llm as llm_mod
from fmri2text.models.teacher import QUERY_SIDE, VideoLLaMATeacher, resolve_preset, teacher_from_config

if TYPE_CHECKING:
    import pandas as pd

WEBCLIPS = Path("derivatives") / "simulation" / "webclips"
CHECKPOINT = "teacher.safetensors"


@dataclass
class WebClip:
    path: Path
    captions: list[str]


# ----------------------------------------------------------------------------- data


def list_web_clips(bids_root: str | Path) -> list[WebClip]:
    """The captioned web clips of a simulated dataset, in file-name order."""
    folder = Path(bids_root) / WEBCLIPS
    cap_file = folder / "captions.json"
    if not cap_file.is_file():
        raise UserError("no web-clip captions for teacher pretraining", path=cap_file,
                        fix="simulate the dataset with simulate.web_clips > 0 (fmri2text simulate)")
    try:
        caps = json.loads(cap_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"captions file is not valid JSON ({err})", path=cap_file,
                        fix="regenerate it with fmri2text simulate") from None
    if not isinstance(caps, dict) or not caps:
        raise UserError("captions file must map clip file names to lists of captions",
                        path=cap_file, fix='write {"clip.mp4": ["A caption."], …}')
    clips = []
    for name in sorted(caps):
        group = caps[name]
        group = [group] if isinstance(group, str) else group
        if not isinstance(group, list) or not group or not all(
                isinstance(c, str) and c.strip() for c in group):
            raise UserError(f"clip {name!r} has no usable captions: {caps[name]!r}", path=cap_file,
                            fix="give every clip a non-empty list of non-empty captions")
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise UserError(f"clip path {name!r} leaves the web-clip folder", path=cap_file,
                            fix="use plain file names relative to the webclips folder")
        if not path.is_file():
            raise UserError(f"web clip {name!r} listed in captions.json is missing", path=path,
                            fix="regenerate the dataset or remove the entry")
        clips.append(WebClip(path, list(group)))
    return clips


def read_clip_frames(path: Path, n_frames: int, size: int) -> torch.Tensor:
    """``n_frames`` evenly spaced frames of an mp4 as (F, 3, size, size) floats in [0, 1].

    Decoding, sampling and the fewer-frames-than-requested error are the data package's
    (:func:`fmri2text.data.video.read_frames`); the backbone normalises, so none here.
    """
    from fmri2text.data.video import read_frames

    return read_frames(path, n_frames, size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def cached_features(teacher: VideoLLaMATeacher, clips: list[WebClip], tcfg: TeacherConfig,
                    cache: Path, log: Callable = print) -> torch.Tensor:
    """Frozen backbone features of every clip, (N, F, P, C) bf16, cached as safetensors.

    The cache file is keyed by backbone, image size, frame count and every clip's bytes;
    a corrupt cache file is reported (with its path), never silently overwritten.
    """
    # "v2": features since the backbone keeps its pretrained BatchNorm statistics (zoo.py);
    # older cache files hold features of statistics moved by a random probe
    h = hashlib.sha256(f"v2|{tcfg.vision}|{tcfg.image_size}|{tcfg.n_frames}".encode())
    for c in clips:
        h.update(file_hash(c.path).encode())
    path = cache / f"webclip-features-{h.hexdigest()[:16]}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
        except (SafetensorError, KeyError, OSError) as err:
            raise UserError(f"cached feature file is corrupt ({err})", path=path,
                            fix="delete this file; it is rebuilt on the next run") from None
        if feats.shape[:2] != (len(clips), tcfg.n_frames):
            raise UserError(f"cached feature file has shape {tuple(feats.shape)}, expected "
                            f"({len(clips)}, {tcfg.n_frames}, …)", path=path,
                            fix="delete this file; it is rebuilt on the next run")
        return feats
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(clips), 8):
        frames = torch.stack([read_clip_frames(c.path, tcfg.n_frames, tcfg.image_size)
                              for c in clips[i:i + 8]])
        out.append(teacher.frame_features(frames).to(torch.bfloat16))  # (b, F, P, C)
    feats = torch.cat(out)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    log(f"cached backbone features {tuple(feats.shape)} of {len(clips)} clips in "
        f"{time.perf_counter() - t0:.1f} s -> {path}")
    return feats


def split_clips(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, held-out) clip indices; at least one of each when n >= 2."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, int(round(n * heldout_fraction))), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ----------------------------------------------------------------------------- recipe


def contrastive_steps(teacher: VideoLLaMATeacher, feats: torch.Tensor, captions: list[list[str]],
                      tcfg: TeacherConfig, log: Callable = print) -> dict:
    """Stage 1, BLIP-2's image-text contrastive (ITC) objective on the Q-Formers.

    The video Q-Former's output, mean-pooled over queries and mapped by a linear head to
    the sentence-embedding width, is contrasted (symmetric InfoNCE, τ = ``itc_tau``) with
    the frozen MiniLM sentence embedding of a random caption of the same clip, against
    the other clips of the batch. BLIP-2 contrasts with its own text transformer; the
    frozen sentence encoder is the CPU-budget stand-in of the same objective. The head
    is discarded afterwards; the Q-Formers keep what they learnt. Returns the loss curve.
    """
    from fmri2text.losses import ClipLoss
    from fmri2text.models.sentence import SentenceEmbedder

    if tcfg.itc_steps <= 0:
        return {"steps": 0, "seconds": 0.0, "losses": []}
    t0 = time.perf_counter()
    flat: list[str] = []
    by_clip: list[list[int]] = []  # clip -> its rows in flat
    for caps in captions:
        by_clip.append(list(range(len(flat), len(flat) + len(caps))))
        flat.extend(caps)
    text = torch.from_numpy(SentenceEmbedder().encode(flat)).float()  # (n_captions, E)
    rng = random.Random(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    head = torch.nn.Linear(teacher.video_qformer.hidden, text.shape[1])
    itc = ClipLoss(tau=tcfg.itc_tau)
    params = [p for n, p in teacher.named_parameters() if n.startswith(QUERY_SIDE)]
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=tcfg.itc_lr,
                            weight_decay=tcfg.weight_decay)
    batch = min(tcfg.itc_batch_size, len(captions))
    teacher.train()
    losses = []
    for step in range(tcfg.itc_steps):
        idx = rng.sample(range(len(captions)), batch)  # distinct clips: one positive per row
        cap = [rng.choice(by_clip[i]) for i in idx]
        video = head(teacher.video_queries_from_features(feats[idx]).mean(1))  # (b, E)
        loss = itc(video, text[cap])["clip"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == tcfg.itc_steps - 1:
            log(f"teacher ITC step {step + 1}/{tcfg.itc_steps} loss {losses[-1]:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    teacher.eval()
    return {"steps": tcfg.itc_steps, "seconds": time.perf_counter() - t0, "losses": losses}


def train_steps(teacher: VideoLLaMATeacher, feats: torch.Tensor, captions: list[list[str]],
                tcfg: TeacherConfig, log: Callable = print) -> dict:
    """Stage 2, captioning: AdamW on the answer-token cross-entropy through the frozen LLM.

    With ``train_qformers`` false only ``llama_proj`` learns (the Q-Formers keep what the
    contrastive stage taught them), so their output is computed once for every clip and
    each step costs the projection and the LLM only. ``captions="first"`` trains on each
    clip's first caption (one canonical text per clip); ``"all"`` draws one at random.
    Returns timing and the loss curve.
    """
    rng = random.Random(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    if tcfg.train_qformers:
        params = teacher.trainable_parameters()
        queries = None
    else:
        for name, p in teacher.named_parameters():
            if name.startswith(QUERY_SIDE):
                p.requires_grad_(False)
        params = list(teacher.llama_proj.parameters())
        teacher.eval()
        with torch.no_grad():  # (N, L, h), fixed for the whole stage
            queries = torch.cat([teacher.video_queries_from_features(feats[i:i + 32])
                                 for i in range(0, len(feats), 32)])
    targets = [c[:1] for c in captions] if tcfg.captions == "first" else captions
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=max(tcfg.steps, 1),
                                                pct_start=0.1)
    amp = teacher.llm.dtype == torch.bfloat16  # Q-Formers follow the LLM's dtype choice
    teacher.train()
    losses, t0 = [], time.perf_counter()
    for step in range(tcfg.steps):
        idx = [rng.randrange(len(targets)) for _ in range(tcfg.batch_size)]
        answers = [rng.choice(targets[i]) for i in idx]
        instructions = [rng.choice(INSTRUCTIONS) for _ in idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            tokens = (teacher.video_tokens_from_features(feats[idx]) if queries is None
                      else teacher.tokens_from_queries(queries[idx]))  # (b, L, d_llm)
            loss = teacher.loss_from_tokens(tokens, instructions, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == tcfg.steps - 1:
            log(f"teacher step {step + 1}/{tcfg.steps} loss {losses[-1]:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    for name, p in teacher.named_parameters():  # leave the trainable set as it was
        if name.startswith(QUERY_SIDE):
            p.requires_grad_(True)
    teacher.eval()
    return {"steps": tcfg.steps, "seconds": time.perf_counter() - t0, "losses": losses}


def evaluate(teacher: VideoLLaMATeacher, feats: torch.Tensor, captions: list[list[str]],
             cfg: Config) -> dict:
    """Video2Text vs the no-video LLM on held-out clips, both scored against true captions."""
    from fmri2text.evaluation.metrics import TextScorer

    tcfg = cfg.teacher
    instr = [cfg.evaluation.instruction] * len(captions)
    gen = dict(max_new_tokens=tcfg.max_new_tokens, greedy=tcfg.greedy, seed=tcfg.seed,
               batch_size=tcfg.generate_batch_size)
    t0 = time.perf_counter()
    video2text = teacher.answer_from_features(feats, instr, **gen)
    gen_s = time.perf_counter() - t0
    prior = generation.generate(teacher.llm, teacher.tokenizer, None, instr[:1],
                                system=teacher.system, **gen)[0]  # same prompt for every clip
    scorer = TextScorer(cfg.evaluation)
    return {"video2text": scorer.score(video2text, captions),
            "no_video": scorer.score([prior] * len(captions), captions),
            "scorer": scorer.identity(), "n_clips": len(captions),
            "instruction": cfg.evaluation.instruction, "generate_seconds": gen_s,
            "examples": [{"video2text": v, "truth": c[0]} for v, c in zip(video2text[:8], captions)],
            "no_video_answer": prior}


def save_checkpoint(teacher: VideoLLaMATeacher, out_dir: Path, tcfg: TeacherConfig) -> Path:
    """Write the trainable weights (config in the safetensors metadata) atomically."""
    path = out_dir / CHECKPOINT
    with atomic_path(path) as tmp:
        save_file(teacher.trainable_state_dict(), str(tmp),
                  metadata={"teacher_config": json.dumps(dataclasses.asdict(tcfg))})
    return path


def checkpoint_hash(path: str | Path) -> str:
    """Short SHA-256 of a teacher checkpoint (keys annotations to the teacher that made them)."""
    return file_hash(path)


def load_teacher(path: str | Path, tcfg: TeacherConfig, *, llm=None, tokenizer=None) -> VideoLLaMATeacher:
    """Build the configured teacher and load a checkpoint; mismatches are user errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError("teacher checkpoint not found", path=path,
                        fix="train one with fmri2text teacher fit")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"teacher checkpoint is not a readable safetensors file ({err})", path=path,
                        fix="retrain it with fmri2text teacher fit") from None
    teacher = teacher_from_config(tcfg, llm=llm, tokenizer=tokenizer)
    teacher.load_trainable_state_dict(state, source=str(path))
    return teacher.eval()


def check_web_clip_leakage(clips: list[WebClip], trials: "pd.DataFrame",
                           group_pattern: str = "") -> None:
    """Refuse web clips that are, or share a group or the file content with, a test clip.

    Parameters
    ----------
    clips : the web clips about to be trained on.
    trials : the experiment's split trial table (``stim_file``, ``group``, ``split`` and,
        for the content check, ``stim_path``).
    group_pattern : the dataset's group regex (``data.group_pattern``) applied to web-clip
        names; a clip it does not match is its own group (its file stem).
    """
    test = trials[trials["split"] == "test"]
    if test.empty:
        return
    fix = ("teacher pretraining must never see a test clip: remove it from the web clips "
           "(and captions.json), or change split.heldout / split.seed")
    stims = test["stim_file"].astype(str)
    ids = {Path(s).name for s in stims} | {Path(s).stem for s in stims}
    groups = set(test["group"].astype(str))
    group_re = re.compile(group_pattern) if group_pattern else None
    for c in clips:
        m = group_re.search(c.path.name) if group_re else None
        group = (m.groupdict().get("group") or m.group(0)) if m else c.path.stem
        if c.path.name in ids or c.path.stem in ids:
            raise UserError(f"leakage: web clip {c.path.name!r} has the id of a test clip",
                            path=c.path, fix=fix)
        if group in groups:
            raise UserError(f"leakage: web clip {c.path.name!r} belongs to test stimulus group "
                            f"{group!r}", path=c.path, fix=fix)
    if "stim_path" not in test.columns:
        return
    # content: hash only files whose size equals a web clip's (a copy has the same size)
    sizes = {c.path.stat().st_size: [] for c in clips}
    for c in clips:
        sizes[c.path.stat().st_size].append(c)
    test_hashes: dict[str, str] = {}
    for sp in sorted(set(test["stim_path"].astype(str))):
        path = Path(sp)
        if path.is_file() and path.stat().st_size in sizes:
            test_hashes[llm_mod.file_digest(path)] = sp
    for c in (c for group in sizes.values() for c in group):
        if test_hashes and (digest := llm_mod.file_digest(c.path)) in test_hashes:
            raise UserError(f"leakage: web clip {c.path.name!r} has the same content as test clip "
                            f"{test_hashes[digest]!r}", path=c.path, fix=fix)


def copy_teacher_eval(teacher_dir: str | Path, run_dir: str | Path) -> Path:
    """Copy ``teacher_eval.json`` (atomically) from a teacher folder into a run directory.

    Every run directory that uses the teacher keeps this copy; returns the copy's path.
    """
    src = Path(teacher_dir) / "teacher_eval.json"
    if not src.is_file():
        raise UserError("teacher_eval.json is missing beside the teacher checkpoint", path=src,
                        fix="refit the teacher (fmri2text teacher fit), which writes it")
    dst = Path(run_dir) / "teacher_eval.json"
    if dst.resolve() == src.resolve():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def fit_teacher(bids_root: str | Path, out_dir: str | Path, cfg: Config,
                log: Callable = print, experiment_trials: "pd.DataFrame | None" = None) -> dict:
    """Pretrain the teacher on web clips; write checkpoint, ``teacher.json``, ``teacher_eval.json``.

    ``experiment_trials`` (the split trial table), when given, is checked first: a web clip
    whose id, group or file content equals a test clip's is a UserError (DESIGN §6).
    Returns the ``teacher.json`` record (paths, timings, eval summary).
    """
    tcfg = resolve_preset(cfg.teacher)
    clips = list_web_clips(bids_root)
    if experiment_trials is not None:
        check_web_clip_leakage(clips, experiment_trials, cfg.data.group_pattern)
    out_dir = ensure_output_dir(out_dir, what="teacher folder")
    if len(clips) < 2:
        raise UserError(f"only {len(clips)} web clip(s): need at least 2 (train + held out)",
                        path=Path(bids_root) / WEBCLIPS, fix="simulate more web clips")
    train_idx, test_idx = split_clips(len(clips), tcfg.heldout_fraction, tcfg.seed)
    t0 = time.perf_counter()
    teacher = teacher_from_config(tcfg)
    load_s = time.perf_counter() - t0
    feats = cached_features(teacher, clips, tcfg, llm_mod.cache_dir() / "features", log)
    caps = [c.captions for c in clips]
    itc = contrastive_steps(teacher, feats[train_idx], [caps[i] for i in train_idx], tcfg, log)
    fit = train_steps(teacher, feats[train_idx], [caps[i] for i in train_idx], tcfg, log)
    ckpt = save_checkpoint(teacher, out_dir, tcfg)
    ev = evaluate(teacher, feats[test_idx], [caps[i] for i in test_idx], cfg)
    write_json(out_dir / "teacher_eval.json", ev)
    record = {"checkpoint": ckpt.name, "checkpoint_hash": checkpoint_hash(ckpt),
              "n_train_clips": len(train_idx), "n_heldout_clips": len(test_idx),
              "heldout_clips": [clips[i].path.name for i in test_idx],
              "load_seconds": load_s, "itc_seconds": itc["seconds"], "itc_losses": itc["losses"],
              "train_seconds": fit["seconds"],
              "seconds_per_step": fit["seconds"] / max(fit["steps"], 1),
              "final_loss": float(np.mean(fit["losses"][-10:])) if fit["losses"] else None,
              "losses": fit["losses"], "config": dataclasses.asdict(tcfg),
              "eval": {k: ev[k] for k in ("video2text", "no_video")}}
    write_json(out_dir / "teacher.json", record)
    log(f"teacher: video2text BERTScore-F1 {ev['video2text'].get('bertscore_f1', float('nan')):.1f} "
        f"BLEU-1 {ev['video2text'].get('bleu1', float('nan')):.1f} vs no-video "
        f"{ev['no_video'].get('bertscore_f1', float('nan')):.1f} / "
        f"{ev['no_video'].get('bleu1', float('nan')):.1f}")
    return record
