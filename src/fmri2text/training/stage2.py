"""Stage II recipe: instruction tuning through the frozen LLM with DANCE domain adaptation.

setup           : the Stage I student (``RUN/stage1/student.safetensors``), the frozen LLM,
                  the teacher's (instruction, answer) of the training clips; trainable: the
                  bridge (adaptors + projector) and DANCE's classifier g; tokenizer and
                  encoder base frozen explicitly
train           : ``λ·CE + (1−λ)·DA`` (``losses.StageTwoLoss``): CE of the teacher's answer
                  given [Z ; instruction] (chat template, answer tokens only); DA on the
                  held-out subjects' ``adapt`` fMRI only (never their clips or texts), memory
                  bank all-gathered across ranks before its update
save_checkpoint : ``RUN/stage2/student.safetensors``, ``RUN/stage2/metrics.json``
evaluate        : held-out CE on the held-out subjects' ``test`` trials (teacher answers used
                  only here) before/after; target-feature statistics (probe entropy, proxy
                  A-distance) — with and without DA at the same seed when ``compare_da``
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import nn

from fmri2text.config import Config, dump_config, to_dict
from fmri2text.data.datasets import (ClipTargets, FmriWindows, ResumableBatchSampler, TrialWindows,
                                     class_codes, load_windows, split_rows)
from fmri2text.data.splits import validation_rows
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_json, write_text
from fmri2text.losses import StageTwoLoss, stage_two_loss_from_config
from fmri2text.models import llm as llm_mod
from fmri2text.models.student import Student
from fmri2text.training import loop
from fmri2text.training.stage1 import (CROSSFIT_FILE, STUDENT_FILE, alignment_of,
                                       load_crossfit, load_eval_targets, load_student,
                                       load_targets, pooled_z, save_student)

Log = Callable[[str], None]

STUDENT = Path("stage2") / STUDENT_FILE
#: config keys that must match between the Stage II run and the decoding config
STAGE2_KEYS = ("data", "split", "loss", "stage2", "teacher.llm", "teacher.video_queries",
               "teacher.system_prompt")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _pick(flat: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}


def check_student(run: Path, cfg: Config) -> Path:
    """Refuse a Stage II student trained with another config (naming the file and the keys).

    Compares the encoder recorded in the student file and the Stage II run's
    ``config.yaml`` (data, split, loss, stage2, the LLM) with ``cfg``.
    """
    from safetensors import safe_open

    path = Path(run) / STUDENT
    if not path.is_file():
        raise UserError("no trained Stage II student in the run", path=path,
                        fix="train it first: fmri2text train stage2 (or fmri2text run)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        saved = {"encoder": json.loads(meta["encoder"])}
        n_tokens = int(meta["n_tokens"])
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"not an fmri2text student file ({type(err).__name__}: {err})", path=path,
                        fix="retrain it with fmri2text train stage2") from None
    current = _flatten(to_dict(cfg))
    diffs = [(k, v, current.get(k)) for k, v in _flatten(saved).items() if current.get(k) != v]
    from fmri2text.models.teacher import resolve_preset

    queries = resolve_preset(cfg.teacher).video_queries
    if n_tokens != queries:
        diffs.append(("teacher.video_queries", n_tokens, queries))
    cfg_file = path.parent / "config.yaml"
    if cfg_file.is_file():
        try:
            trained = _flatten(yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError, AttributeError):
            trained = {}
        diffs += [(k, v, current.get(k)) for k, v in _pick(trained, STAGE2_KEYS).items()
                  if current.get(k) != v and (k, v, current.get(k)) not in diffs]
    if diffs:
        shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs[:4])
        raise UserError(f"the student checkpoint was trained with another config ({shown}"
                        f"{'; …' if len(diffs) > 4 else ''})", path=path,
                        fix=f"decode with the config it was trained with (--config {cfg_file}), "
                            "or retrain with this one (fmri2text run skips what is unchanged)")
    return path


def freeze_for_stage2(student: Student, train_tokenizer: bool = False,
                      train_linear: bool = False) -> None:
    """Freeze everything but the bridge: adaptors and projector (optionally the linear
    path's weights and the tokenizer)."""
    bridge = ("projector.", "linear.") if train_linear else ("projector.",)
    for name, p in student.named_parameters():
        p.requires_grad_(".adapter." in f".{name}" or name.startswith(bridge))
    for p in student.tokenizer.parameters():
        p.requires_grad_(train_tokenizer)
    student.train()  # a frozen tokenizer drops to eval mode (its standardiser statistics stay)


class BridgeModel(nn.Module):
    """Student + Stage II loss (DANCE's g and memory bank inside) over a frozen LLM.

    The LLM is held outside the module tree (not a DDP-managed submodule, never saved).
    """

    def __init__(self, student: Student, loss: StageTwoLoss, llm: nn.Module, tokenizer,
                 system: str | None):
        super().__init__()
        self.student = student
        self.loss = loss
        self._frozen = (llm, tokenizer)  # a tuple is not registered as a submodule
        self.system = system
        self.last_target: tuple[torch.Tensor, torch.Tensor] | None = None

    def answer_logits(self, z: torch.Tensor, instructions: list[str], answers: list[str]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, V) and labels (B, K) over the answer span only (every answer ends
        at the last column); CE over them equals the full one."""
        llm, tok = self._frozen
        embeds, mask, labels = llm_mod.build_prompt_embeds(llm, tok, z, instructions, answers,
                                                           system=self.system)
        prefix = llm_mod.prefix_length(tok, self.system)  # run once, shared by the rows
        hidden = llm_mod.hidden_after_prefix(llm, embeds, mask, prefix)  # (B, T - prefix, d)
        first = int((labels != -100).float().argmax(dim=1).min())  # first answer column
        start = max(first - 1, prefix)  # column start predicts the first answer token
        return llm.lm_head(hidden[:, start - prefix:]), labels[:, start:]  # (B, K, V), (B, K)

    def forward(self, src_fmri: torch.Tensor, instructions: list[str], answers: list[str],
                src_labels: torch.Tensor | None = None, tgt_fmri: torch.Tensor | None = None,
                tgt_index: torch.Tensor | None = None, src_offset: torch.Tensor | None = None,
                tgt_offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms {ce, [source_ce, nc, es, da], total} of one step; ``src_offset``
        (B, L, d): the linear path's cross-fitting offsets of the source trials;
        ``tgt_offset`` (Bt, L, d): the target trials' subject alignment (stage1.alignment_of)."""
        z = self.student.cross_fitted(self.student(src_fmri), src_offset)  # (B, L, d)
        logits, labels = self.answer_logits(z, instructions, answers)
        if self.loss.dance is None:
            return self.loss(logits, labels)
        tgt = self.student.cross_fitted(self.student(tgt_fmri), tgt_offset).mean(dim=1)  # (Bt, d)
        self.last_target = (tgt.detach().float(), tgt_index)
        return self.loss(logits, labels, z.mean(dim=1), src_labels, tgt, tgt_index)


@torch.no_grad()
def heldout_ce(model: BridgeModel, data: TrialWindows, targets: ClipTargets, batch_size: int,
               max_trials: int = 0, offsets: torch.Tensor | None = None) -> float:
    """Mean answer-token CE of the teacher's answers on ``data`` given its fMRI (evaluation).

    ``max_trials`` > 0: that many trials, evenly spaced over ``data`` (whose trials are in
    subject order, so every subject is in); 0: all. ``offsets`` (len(data), L, d): the
    linear path's cross-fitting offsets (validation trials), or None (held-out subjects).
    """
    model.student.eval()
    n = len(data) if max_trials <= 0 else min(max_trials, len(data))
    chosen = np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64)) if n else []
    total, count = 0.0, 0
    for s in range(0, len(chosen), batch_size):
        pos = chosen[s:s + batch_size]
        instr, ans = targets.text_of(data.clips[pos])
        z = model.student(data.fmri(pos))
        if offsets is not None:
            z = model.student.cross_fitted(z, offsets[pos])
        logits, labels = model.answer_logits(z, instr, ans)
        lab = labels[:, 1:]
        keep = lab != -100
        ce = nn.functional.cross_entropy(logits[:, :-1][keep].float(), lab[keep], reduction="sum")
        total, count = total + float(ce), count + int(keep.sum())
    model.student.train()
    return total / max(count, 1)


def choose_gain(model: BridgeModel, val: TrialWindows, targets: ClipTargets, batch_size: int,
                offsets: torch.Tensor | None, gains: list[float], log: Log) -> dict | None:
    """Set the linear path's gain to the candidate with the lowest validation CE (each
    validation trial's Z cross-fitted as a held-out subject's would be); return the CE of
    every candidate tried and the choice, or None without a linear path or validation trials.

    Gains are tried in increasing order until the CE rises: on the simulated worlds it falls
    to one minimum and rises after it (BENCHMARKS: 1.0 on the demo, 1.75 and 1.5 on seeds 7
    and 11), so the gains past the first rise would not be chosen, and each costs a
    validation pass through the LLM.
    """
    path = model.student.linear
    if path is None or len(val) < 2 or not gains:
        return None
    if min(gains) <= 0:
        raise UserError(f"stage2.linear_gains={gains} must be positive",
                        fix="e.g. stage2.linear_gains=[1.0,1.25,1.5,1.75,2.0]")
    ces: dict[float, float] = {}
    for g in sorted(set(float(g) for g in gains)):
        path.gain.fill_(g)
        ces[g] = heldout_ce(model, val, targets, batch_size, offsets=offsets)
        if len(ces) > 1 and ces[g] > list(ces.values())[-2]:
            break
    best = min(ces, key=ces.get)
    path.gain.fill_(best)
    log(f"stage2: linear path gain {best} (validation CE " + ", ".join(
        f"{g}: {c:.3f}" for g, c in ces.items()) + ")")
    return {"validation_ce": ces, "chosen": best}


def feature_statistics(source: torch.Tensor, source_labels: np.ndarray, target: torch.Tensor,
                       seed: int = 0) -> dict:
    """How far target features are from source features, by linear probes (sklearn).

    ``probe_entropy``: mean entropy (nats) of a source-class logistic probe on the target;
    ``a_distance``: proxy A-distance 2(1 − 2ε) of a source-vs-target logistic classifier
    (ε its 5-fold cross-validated error on balanced sets, floored at 0 when it does no better
    than chance): 0 = indistinguishable, 2 = separable. Features are standardised first.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    src, tgt = source.numpy(), target.numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(src, source_labels)
    p = probe.predict_proba(tgt).clip(1e-12, 1.0)
    entropy = float(-(p * np.log(p)).sum(axis=1).mean())
    rng = np.random.default_rng(seed)
    m = min(len(src), len(tgt))
    xs = np.concatenate([src[rng.choice(len(src), m, replace=False)],
                         tgt[rng.choice(len(tgt), m, replace=False)]])
    ys = np.r_[np.zeros(m), np.ones(m)]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    acc = cross_val_score(clf, xs, ys, cv=min(5, m)).mean()
    return {"probe_entropy": entropy, "a_distance": float(max(0.0, 2.0 * (2.0 * acc - 1.0))),
            "domain_accuracy": float(acc), "max_entropy": float(np.log(len(probe.classes_)))}


def _variant(name: str, cfg: Config, run_dir: Path, stage_dir: Path, windows: FmriWindows,
             targets: ClipTargets, llm, tokenizer, resume: bool, log: Log, progress: bool) -> dict:
    """Train one Stage II variant into ``stage_dir``; return its metrics (main rank)."""
    s2 = cfg.stage2
    settings = loop.LoopSettings.from_config(s2, "stage2")
    accelerator = loop.make_accelerator()
    main = accelerator.is_main_process
    mp = loop.resolve_mixed_precision(s2.mixed_precision, "stage2",
                                      llm.get_input_embeddings().weight.dtype)
    trials = windows.trials
    fit_rows, val_rows = validation_rows(trials, split_rows(trials, "train"),
                                         cfg.split.val_fraction, cfg.split.seed)
    codes = class_codes(trials, fit_rows)
    src = TrialWindows(windows, fit_rows, codes)
    val = TrialWindows(windows, val_rows)
    adapt = TrialWindows(windows, split_rows(trials, "adapt"))
    test = TrialWindows(windows, split_rows(trials, "test"))
    da = cfg.loss.domain_adaptation
    if da and (len(adapt) == 0 or len(codes) < 2):
        raise UserError(f"domain adaptation needs held-out adapt trials ({len(adapt)}) and at "
                        f"least 2 training classes ({len(codes)})",
                        fix="check split.adapt_fraction and the class labels, or set "
                            "loss.domain_adaptation=false")
    if da and (src.classes < 0).any():
        raise UserError("some training trials have no class label; DANCE's classifier needs them",
                        fix="check data.class_source, or set loss.domain_adaptation=false")
    src_instr, src_ans = targets.text_of(src.clips)  # raises when a clip is not annotated

    student, info = load_student(run_dir / "stage1" / STUDENT_FILE)
    both = load_crossfit(run_dir / "stage1" / CROSSFIT_FILE, np.r_[src.rows, val.rows])
    # (n_src, L, d) and (n_val, L, d), or None without a linear path
    offsets, val_offsets = (None, None) if both is None else (both[:len(src)], both[len(src):])
    if tuple(info["input_shape"]) != tuple(src.input_shape):
        raise UserError(f"the Stage I student reads windows of shape {info['input_shape']}, the "
                        f"data gives {src.input_shape}", path=run_dir / "stage1" / STUDENT_FILE,
                        fix="rerun stage1 on this data and config")
    if info["d_llm"] != llm.get_input_embeddings().weight.shape[1]:
        raise UserError(f"the Stage I student outputs width {info['d_llm']}, the LLM is "
                        f"{llm.get_input_embeddings().weight.shape[1]} wide",
                        path=run_dir / "stage1" / STUDENT_FILE,
                        fix="use the LLM of the teacher that produced the Stage I targets")
    freeze_for_stage2(student, s2.train_tokenizer, s2.train_linear)
    eval_bs = cfg.stage1.eval_batch_size
    # held-out subjects aligned by their unlabelled adapt trials, as decoding aligns them
    adapt_offsets, _ = alignment_of(student, adapt, adapt, cfg.encoder, eval_bs)
    test_offsets, _ = alignment_of(student, test, adapt, cfg.encoder, eval_bs)
    torch.manual_seed(s2.seed)
    loss = stage_two_loss_from_config(cfg.loss, dim=info["d_llm"], n_classes=max(len(codes), 2),
                                      n_target=max(len(adapt), 1))
    model = BridgeModel(student, loss, llm, tokenizer, cfg.teacher.system_prompt or None)
    eval_targets = load_eval_targets(run_dir, targets)  # test clips: scored, never trained on
    test_ok = len(test) > 0 and not eval_targets.missing(test.clips)
    gains = choose_gain(model, val, targets, eval_bs, val_offsets, s2.linear_gains, log) \
        if not resume else None
    before = heldout_ce(model, test, eval_targets, eval_bs, s2.eval_max_trials,
                        offsets=test_offsets) if test_ok and main else None
    if da and not resume:  # DANCE: the memory bank starts from the target features
        feats = pooled_z(student, adapt, eval_bs, offsets=adapt_offsets)
        loss.dance.memory.fill(feats, torch.arange(len(adapt)))
    optimizer = loop.adamw(model, settings)
    # model and optimizer together: DeepSpeed/FSDP configs shard or wrap both
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    src_batches = ResumableBatchSampler(len(src), s2.batch_size, s2.seed, rank=rank, world=world)
    tgt_batches = ResumableBatchSampler(max(len(adapt), 1), s2.target_batch_size, s2.seed + 1,
                                        rank=rank, world=world)
    dev = accelerator.device
    log(f"stage2[{name}]: {len(src)} source trials ({len(codes)} classes), {len(adapt)} adapt, "
        f"{len(test)} test; DA {'on' if da else 'off'}; "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable; mixed "
        f"precision {mp}")

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        if da:
            loss.dance.classifier.renormalize_()
        i = src_batches.batch(step)
        kw = {}
        if da:
            j = tgt_batches.batch(step)
            kw = {"src_labels": torch.as_tensor(src.classes[i], device=dev),
                  "tgt_fmri": adapt.fmri(j).to(dev), "tgt_index": torch.as_tensor(j, device=dev)}
            if adapt_offsets is not None:
                kw["tgt_offset"] = adapt_offsets[j].to(dev)
        if offsets is not None:
            kw["src_offset"] = offsets[i].to(dev)
        with loop.autocast(accelerator, mp):
            return wrapped(src.fmri(i).to(dev), [src_instr[k] for k in i], [src_ans[k] for k in i], **kw)

    def after_step(step: int) -> None:
        if da and model.last_target is not None:
            feats, idx = model.last_target
            if world > 1:  # every rank's bank sees every rank's batch
                feats, idx = accelerator.gather(feats), accelerator.gather(idx)
            loss.dance.update_memory(feats.cpu(), idx.cpu())

    result = loop.train_loop(accelerator=accelerator, module=model, optimizer=optimizer,
                             settings=settings, step_fn=step_fn, after_step=after_step,
                             stage_dir=stage_dir, config=to_dict(cfg), resume=resume, log=log,
                             name=f"stage2[{name}]", progress=progress,
                             validate=(lambda: heldout_ce(model, val, targets, eval_bs,
                                                          offsets=val_offsets))
                             if len(val) >= 2 else None,
                             # the weights before any step are the chosen gain's, already scored
                             first_score=gains["validation_ce"][gains["chosen"]] if gains else None)
    metrics = {"variant": name, "domain_adaptation": da, "completed": result["stopped"] is None,
               "steps_done": result["steps_done"], "resumed_from": result["start_step"],
               "seconds": result["seconds"], "mixed_precision": mp,
               "num_processes": result["num_processes"],
               "weights_synchronised": result["weights_synchronised"],
               "loss": {k: v for k, v in result["log"][-1].items() if k != "step"}
               if result["log"] else None, "heldout_ce_before": before,
               "n_val_trials": len(val), "validation": result["validation"],
               "linear_gain": gains}
    if result["stopped"] is not None or not main:
        return metrics
    if test_ok:
        metrics["heldout_ce_after"] = heldout_ce(model, test, eval_targets, eval_bs,
                                                 s2.eval_max_trials, offsets=test_offsets)
        log(f"stage2[{name}]: held-out CE {before:.3f} -> {metrics['heldout_ce_after']:.3f}")
    if s2.compare_da:  # the two variants' target-feature statistics make the DA effect
        src_sel = np.random.default_rng(s2.seed).permutation(len(src))[:max(len(adapt), len(test), 64)]
        f_src = pooled_z(student, src, eval_bs, src_sel)
        metrics["features"] = {
            part: feature_statistics(f_src, src.classes[src_sel],
                                     pooled_z(student, d, eval_bs, offsets=off), s2.seed)
            for part, d, off in (("adapt", adapt, adapt_offsets), ("test", test, test_offsets))
            if len(d) >= 2}
    save_student(student, stage_dir / STUDENT_FILE, spec=_spec_of(run_dir),
                 input_shape=tuple(info["input_shape"]), d_llm=info["d_llm"],
                 n_tokens=info["n_tokens"], enc=cfg.encoder, extra=info["extra"])
    return metrics


def _spec_of(run_dir: Path):
    """The encoder spec recorded with the Stage I student."""
    import json

    from safetensors import safe_open

    from fmri2text.models.brain_encoder import EncoderSpec

    with safe_open(str(run_dir / "stage1" / STUDENT_FILE), framework="pt") as f:
        d = json.loads(f.metadata()["spec"])
    d["tokenizer_channels"] = tuple(d["tokenizer_channels"])
    return EncoderSpec(**d)


def train_stage2(bids: str | Path, out_dir: str | Path, cfg: Config, resume: bool = False,
                 log: Log = print, *, targets: ClipTargets | None = None,
                 windows: FmriWindows | None = None, llm=None, tokenizer=None,
                 progress: bool = True) -> dict:
    """Train Stage II into ``out_dir/stage2``; return the metrics (also in metrics.json).

    Parameters
    ----------
    bids, out_dir, targets, windows, resume : as in :func:`~fmri2text.training.stage1.train_stage1`.
    llm, tokenizer : the frozen LLM (default: ``load_llm(cfg.teacher.llm, cfg.teacher.llm_dtype)``).

    With ``stage2.compare_da`` the other DA setting is trained too, same seed, into
    ``RUN/stage2/without_da`` (or ``with_da``); metrics.json then holds both and their
    difference in target-feature statistics. The main variant's weights are the output.
    """
    # the data first: a bad dataset is refused before anything is written
    windows = windows if windows is not None else load_windows(bids, cfg)
    run_dir = ensure_output_dir(out_dir, what="run directory")
    stage_dir = ensure_output_dir(run_dir / "stage2", what="Stage II folder")
    accelerator = loop.make_accelerator()
    main = accelerator.is_main_process
    log = log if main else (lambda _: None)
    if llm is None:
        llm, tokenizer = llm_mod.load_llm(cfg.teacher.llm, cfg.teacher.llm_dtype)
    targets = targets if targets is not None else load_targets(run_dir, cfg.stage1.annotations)
    if main:
        write_text(stage_dir / "config.yaml", dump_config(cfg))
    da = cfg.loss.domain_adaptation
    name = "with_da" if da else "without_da"
    metrics = {"stage": "stage2", "loss_config": dataclasses.asdict(cfg.loss),
               name: _variant(name, cfg, run_dir, stage_dir, windows, targets, llm, tokenizer,
                              resume, log, progress)}
    metrics["main"] = name
    if cfg.stage2.compare_da and metrics[name]["completed"]:
        other = "without_da" if da else "with_da"
        ocfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, domain_adaptation=not da))
        metrics[other] = _variant(other, ocfg, run_dir,
                                  ensure_output_dir(stage_dir / other, what="Stage II ablation folder"),
                                  windows, targets, llm, tokenizer, resume and
                                  (stage_dir / other / "checkpoints").is_dir(), log, progress)
        w, wo = metrics.get("with_da", {}), metrics.get("without_da", {})
        if "features" in w and "features" in wo:
            metrics["da_effect"] = {part: {k: w["features"][part][k] - wo["features"][part][k]
                                           for k in ("probe_entropy", "a_distance")}
                                    for part in w["features"] if part in wo["features"]}
    if main and metrics[name]["completed"]:
        write_json(stage_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics
