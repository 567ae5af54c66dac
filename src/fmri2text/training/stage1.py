"""Stage I recipe: align the student's fMRI tokens Z with the teacher's video tokens X.

setup           : trial windows (training subjects' ``train`` trials), the teacher's video
                  tokens of their clips, the student (optionally from ``mbm.safetensors``) with
                  adaptors; trainable: tokenizer, adaptors, projector (encoder base frozen)
train           : ``β·CLIP + (1−β)·L2L1`` (``losses.AlignmentLoss``) in the shared loop
                  (checkpoints, resume, SIGTERM, log.jsonl, TensorBoard, progress)
save_checkpoint : ``RUN/stage1/student.safetensors`` (full student, its build recipe in the
                  metadata) and ``RUN/stage1/metrics.json``
evaluate        : fMRI→video retrieval on the held-out subjects' ``test`` trials (cosine of
                  pooled Z vs pooled X over all test clips; X of test clips is used only
                  here), before and after training, with chance levels
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fmri2text.config import Config, EncoderConfig, dump_config, to_dict
from fmri2text.data.datasets import (ClipTargets, FmriWindows, ResumableBatchSampler, TrialWindows,
                                     load_windows, split_rows)
from fmri2text.data.splits import validation_rows
from fmri2text.errors import UserError
from fmri2text.io import atomic_path, ensure_output_dir, write_json, write_safetensors, write_text
from fmri2text.losses import AlignmentLoss, alignment_loss_from_config
from fmri2text.models.brain_encoder import (BrainMAE, EncoderSpec, load_mae, load_state_checked,
                                            spec_from_config)
from fmri2text.models.student import Student
from fmri2text.training import loop

Log = Callable[[str], None]
STUDENT_FILE = "student.safetensors"
CROSSFIT_FILE = "crossfit.safetensors"  # the linear path's cross-fitting offsets (Stage II reads them)


# ----------------------------------------------------------------------------- student files


def save_student(student: Student, path: Path, *, spec: EncoderSpec, input_shape: tuple[int, ...],
                 d_llm: int, n_tokens: int, enc: EncoderConfig, extra: dict | None = None) -> None:
    """Write every student tensor plus what :func:`load_student` needs to rebuild it."""
    linear = None if student.linear is None else [int(student.linear.index.numel()),
                                                   student.linear.rank, student.linear.semantic_dim]
    meta = {"format": "fmri2text-student", "input_shape": json.dumps(list(input_shape)),
            "d_llm": str(d_llm), "n_tokens": str(n_tokens), "linear": json.dumps(linear),
            "spec": json.dumps(dataclasses.asdict(spec)),
            "encoder": json.dumps(dataclasses.asdict(enc)),
            "adapted": json.dumps(student.adapted), "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    write_safetensors(path, tensors, meta)


def save_crossfit(path: Path, offsets: torch.Tensor, rows: np.ndarray,
                  semantic: torch.Tensor | None = None) -> None:
    """Write the cross-fitting offsets (n, L, d) — and the semantic head's (n, d_s) — with
    the trial-table rows they belong to."""
    tensors = {"offsets": offsets.contiguous(), "rows": torch.as_tensor(rows, dtype=torch.long)}
    if semantic is not None:
        tensors["semantic"] = semantic.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_crossfit(path: Path, rows: np.ndarray, key: str = "offsets") -> torch.Tensor | None:
    """The offsets (len(rows), L, d) of trial-table ``rows`` from :func:`save_crossfit`'s
    file (``key='semantic'``: the semantic head's, (len(rows), d_s)); None when the file or
    the key is absent (a student without a linear path or a semantic head)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        return None
    saved = load_file(str(path))
    if key not in saved:
        return None
    where = {int(r): i for i, r in enumerate(saved["rows"].tolist())}
    missing = [int(r) for r in rows if int(r) not in where]
    if missing:
        raise UserError(f"the Stage I cross-fitting offsets have no row for {len(missing)} "
                        "training trial(s)", path=path,
                        fix="rerun fmri2text train stage1 on this data and split")
    return saved[key][torch.as_tensor([where[int(r)] for r in rows], dtype=torch.long)]


def load_student(path: str | Path) -> tuple[Student, dict]:
    """Rebuild the student written by :func:`save_student`; returns (student, metadata)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError("Stage I student not found", path=path,
                        fix="run fmri2text train stage1 first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "fmri2text-student":
            raise KeyError("format")
        enc = EncoderConfig(**json.loads(meta["encoder"]))
        spec_d = json.loads(meta["spec"])
        spec_d["tokenizer_channels"] = tuple(spec_d["tokenizer_channels"])
        input_shape = tuple(json.loads(meta["input_shape"]))
        d_llm, n_tokens = int(meta["d_llm"]), int(meta["n_tokens"])
        linear = json.loads(meta.get("linear", "null"))
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise UserError(f"not an fmri2text student file ({err})", path=path,
                        fix="pass the student.safetensors written by fmri2text train stage1") from None
    lin = None if linear is None else (torch.zeros(int(linear[0]), dtype=torch.long),
                                       *[int(v) for v in linear[1:]])  # rank[, semantic width]
    student = Student.from_mae(BrainMAE(EncoderSpec(**spec_d), input_shape), d_llm, n_tokens, enc,
                               lin)
    student.add_adapters(enc.adapter_rank, enc.adapter_scale)
    state = load_file(str(path))
    if student.linear is not None:  # saved before the alignment statistics: none (zeros)
        state.setdefault("linear.component_std", torch.zeros(student.linear.rank))
    load_state_checked(student, state, path)
    info = {"input_shape": input_shape, "d_llm": d_llm, "n_tokens": n_tokens,
            "extra": json.loads(meta.get("extra", "{}"))}
    return student, info


def mbm_path(run_dir: Path, setting: str) -> Path | None:
    """The MBM checkpoint to start from: ``auto`` looks in the run directory."""
    if setting == "":
        return None
    if setting != "auto":
        p = Path(setting)
        if not p.is_file():
            raise UserError("MBM checkpoint not found", path=p,
                            fix="set stage1.mbm_checkpoint to an existing file, auto or ''")
        return p
    for p in (run_dir / "mbm" / "mbm.safetensors", run_dir / "mbm.safetensors"):
        if p.is_file():
            return p
    return None


def build_student(cfg: Config, input_shape: tuple[int, ...], d_llm: int, n_tokens: int,
                  mbm: Path | None, linear=None) -> tuple[Student, EncoderSpec]:
    """A student with adaptors (and its encoder spec); the encoder from the MBM checkpoint
    when given; with ``linear`` (:func:`fit_linear_path`'s :class:`LinearFit`), the linear
    path starts at that closed-form map (and its semantic head holds the semantic map)."""
    torch.manual_seed(cfg.stage1.seed)
    if mbm is not None:
        mae = load_mae(mbm)
        if tuple(mae.input_shape) != tuple(input_shape):
            raise UserError(f"the MBM checkpoint was trained on windows of shape "
                            f"{tuple(mae.input_shape)}, the data gives {tuple(input_shape)}",
                            path=mbm, fix="rerun pretrain-mbm on this data, or set "
                                          "stage1.mbm_checkpoint='' to start from scratch")
        spec = mae.spec
    else:
        spec = spec_from_config(cfg.encoder)
        mae = BrainMAE(spec, input_shape)
    sem = None if linear is None else linear.semantic
    path = None if linear is None else (linear.index, int(linear.ridge.weight_.shape[0]),
                                        0 if sem is None else int(sem.weight_.shape[1]))
    student = Student.from_mae(mae, d_llm, n_tokens, cfg.encoder, path)
    if linear is not None:
        student.linear.load_ridge(linear.ridge)
        if sem is not None:
            student.linear.load_semantic(sem)
    student.add_adapters(cfg.encoder.adapter_rank, cfg.encoder.adapter_scale)
    return student, spec


class LinearFit(NamedTuple):
    """:func:`fit_linear_path`'s result."""

    ridge: Any  # RidgeBaseline: mean response -> flattened tokens
    index: torch.Tensor  # (F,) the features' positions in the student's input
    offsets: torch.Tensor  # (n, L, d) cross-fitting offsets of the tokens
    semantic: Any = None  # RidgeBaseline: the same components -> sentence embedding, or None
    semantic_offsets: torch.Tensor | None = None  # (n, d_s) its cross-fitting offsets


def fit_linear_path(cfg: Config, train: TrialWindows, x_train: torch.Tensor,
                    texts: list[str] | None = None) -> LinearFit | None:
    """Closed-form ridge from the training trials' mean response to their flattened video
    tokens (penalty chosen by cross-validation across training subjects), the feature
    index of the student's input, and the trials' cross-fitting offsets
    (:func:`crossfit_offsets`, (n, L, d)); None when ``encoder.linear_rank`` is 0.

    With ``texts`` (each trial's teacher answer) and ``encoder.semantic_head``, also the
    semantic head's map: ridge from the same features, through the same principal
    directions, to the answers' sentence embeddings, with its own penalty and offsets.

    ``train`` holds every labelled trial of the training subjects, validation trials too:
    the stages add the offsets, so what they fit and validate on is each trial's prediction
    by the map fitted without its subject, never an in-sample one.
    """
    from fmri2text.evaluation.baselines import RidgeBaseline

    if cfg.encoder.linear_rank <= 0:
        return None
    feats = train.windows.data[train.rows].mean(axis=1)  # (n, F)
    y = x_train.reshape(len(feats), -1).numpy()  # (n, L*d)
    ridge = RidgeBaseline(cfg.baseline).fit(feats, ["."] * len(feats), Y=y, groups=train.subjects,
                                            max_rank=cfg.encoder.linear_rank)
    index = train.crop.index if train.crop is not None else torch.arange(feats.shape[1])
    offsets = crossfit_offsets(cfg, feats, y, train.subjects, ridge)
    sem = sem_offsets = None
    if texts is not None and cfg.encoder.semantic_head:
        sem = RidgeBaseline(cfg.baseline)
        e = sem.embed(texts)  # (n, d_s) unit-norm sentence embeddings
        sem.fit(feats, texts, Y=e, groups=train.subjects, max_rank=cfg.encoder.linear_rank)
        sem_offsets = crossfit_offsets(cfg, feats, e, train.subjects, sem)
    return LinearFit(ridge, index, offsets.view(x_train.shape), sem, sem_offsets)


def crossfit_offsets(cfg: Config, feats: np.ndarray, y: np.ndarray, subjects: np.ndarray,
                     ridge) -> torch.Tensor:
    """(n, L*d): each trial's prediction by the map fitted without its subject, minus its
    prediction by ``ridge`` (fitted on all of ``feats``/``y``).

    The closed-form map fits its own training trials better than it will fit a new
    subject's (demo data: token correlation 0.82 in-sample, 0.55 held-out), so the stages
    that train on top of it add these offsets to the training and validation trials' Z:
    the deep path and the LLM bridge then learn, and are validated, on inputs as noisy as a
    held-out subject's (cross-fitting, as in stacking). Zero with fewer than two training
    subjects. With ``encoder.align_subjects`` the held-out subject's components are first
    aligned to the fold's training components from its own trials, unlabelled
    (:mod:`fmri2text.models.alignment`), as a held-out subject's are at test.
    """
    from fmri2text.evaluation.baselines import RidgeBaseline
    from fmri2text.models.alignment import coral_shift

    out = np.zeros_like(y, dtype=np.float32)
    groups = np.unique(subjects)
    if len(groups) < 2:
        return torch.from_numpy(out)
    full = ridge.predict_embeddings(feats)  # (n, L*d) in-sample
    fixed = dataclasses.replace(cfg.baseline, alphas=[ridge.alpha_], cv_folds=1)
    for g in groups:
        held = subjects == g
        fold = RidgeBaseline(fixed).fit(feats[~held], ["."] * int((~held).sum()), Y=y[~held],
                                        max_rank=cfg.encoder.linear_rank)
        h = fold.components(feats[held])  # (n_g, r)
        if cfg.encoder.align_subjects:
            h = h + coral_shift(h, h, fold.component_std_, cfg.encoder.align_shrinkage)
        out[held] = h @ fold.weight_ + fold.intercept_ - full[held]
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- targets


def load_targets(run_dir: Path, folder: str) -> ClipTargets:
    """The teacher's annotations of the run (``RUN/<folder>``), chosen by the teacher hash."""
    record = run_dir / "teacher" / "teacher.json"
    teacher_hash = None
    if record.is_file():
        try:
            teacher_hash = json.loads(record.read_text(encoding="utf-8")).get("checkpoint_hash")
        except json.JSONDecodeError:
            teacher_hash = None
    return ClipTargets.from_store(run_dir / folder, teacher_hash)


def load_eval_targets(run_dir: Path, train_targets: ClipTargets) -> ClipTargets:
    """Targets that score the held-out *test* trials (never trained on).

    ``RUN/eval_annotations`` when the pipeline wrote it (the test clips' teacher tokens and
    answers, kept apart from every training input), else the training store itself.
    """
    from fmri2text.steps import EVAL_ANNOTATIONS

    if (run_dir / EVAL_ANNOTATIONS).is_dir():
        return load_targets(run_dir, EVAL_ANNOTATIONS)
    return train_targets


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def pooled_z(student: Student, data: TrialWindows, batch_size: int = 32,
             positions: np.ndarray | None = None, offsets: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Pooled, normalised Z (n, d) of dataset ``positions`` (default: all); ``offsets``
    (len(data), L, d): per-trial offsets of the linear path (:func:`alignment_of`)."""
    student.eval()
    pos = np.arange(len(data)) if positions is None else np.asarray(positions)
    out = []
    for s in range(0, len(pos), batch_size):
        x = data.fmri(pos[s:s + batch_size])
        if offsets is None:
            out.append(student.embedding(x))
        else:
            z = student.cross_fitted(student(x), offsets[pos[s:s + batch_size]])
            out.append(torch.nn.functional.normalize(z.mean(dim=1), dim=-1))
    student.train()
    return torch.cat(out).float()  # (n, d)


@torch.no_grad()
def alignment_of(student: Student, data: TrialWindows, adapt: TrialWindows, enc: EncoderConfig,
                 batch_size: int = 32) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-trial offsets aligning each held-out subject of ``data`` to the training subjects
    by its unlabelled ``adapt`` trials (:func:`fmri2text.models.alignment.subject_offsets`):
    tokens (len(data), L, d) and semantic (len(data), d_s) or None; (None, None) without a
    linear path or with ``encoder.align_subjects`` off."""
    from fmri2text.models.alignment import subject_offsets

    linear = student.linear
    if linear is None or not enc.align_subjects or len(data) == 0:
        return None, None

    def components(d: TrialWindows) -> torch.Tensor:  # (len(d), r)
        out = [linear.components(d.fmri(np.arange(s, min(s + batch_size, len(d)))))
               for s in range(0, len(d), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, linear.rank)

    return subject_offsets(linear, components(data), data.subjects, components(adapt),
                           adapt.subjects, enc.align_shrinkage)


def retrieval(student: Student, data: TrialWindows, targets: ClipTargets,
              batch_size: int = 32, offsets: torch.Tensor | None = None) -> dict:
    """fMRI→video identification among all clips of ``data``: top-1/top-5 and chance
    (fractions), scored by :func:`fmri2text.evaluation.metrics.retrieval_metrics`.

    Each trial's pooled Z (with ``offsets``, :func:`alignment_of`'s) is compared (cosine)
    with the pooled X of every distinct clip of the set; clips whose tokens tie count at their
    expected rank (identical tokens: chance).
    """
    from fmri2text.evaluation.metrics import retrieval_metrics

    clips = sorted(set(data.clips))
    cand = targets.tokens_of(clips).mean(dim=1).numpy()  # (K, d)
    z = pooled_z(student, data, batch_size, offsets=offsets).numpy()  # (n, d)
    truth = np.array([clips.index(c) for c in data.clips])  # (n,)
    m = retrieval_metrics(z, cand, truth)
    per_subject = {f"sub-{s}": retrieval_metrics(z[data.subjects == s], cand,
                                                 truth[data.subjects == s])["top1"] / 100
                   for s in sorted(set(data.subjects))}
    return {"top1": m["top1"] / 100, "top5": m["top5"] / 100,
            "chance_top1": m["top1_chance"] / 100, "chance_top5": m["top5_chance"] / 100,
            "n_trials": len(data), "n_candidates": m["n_candidates"],
            "n_distinct_candidates": m["n_distinct_candidates"], "top1_by_subject": per_subject}


# ----------------------------------------------------------------------------- recipe


class AlignModel(nn.Module):
    """Student + Stage I loss as one module (what DDP wraps): (fmri, X) → loss terms."""

    def __init__(self, student: Student, loss: AlignmentLoss):
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(self, fmri: torch.Tensor, x: torch.Tensor, offset: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """fmri (B, T, X, Y, Z); x (B, L, d); offset (B, L, d) cross-fitting offsets of the
        linear path (:func:`crossfit_offsets`) or None → {clip, l2, l1, l2l1, total}."""
        return self.loss(self.student.cross_fitted(self.student(fmri), offset), x)


def train_stage1(bids: str | Path, out_dir: str | Path, cfg: Config, resume: bool = False,
                 log: Log = print, *, targets: ClipTargets | None = None,
                 windows: FmriWindows | None = None, progress: bool = True) -> dict:
    """Train Stage I into ``out_dir/stage1``; return the metrics (also in metrics.json).

    Parameters
    ----------
    bids : BIDS dataset root (read through :func:`load_windows` unless ``windows`` is given).
    out_dir : the run directory RUN (teacher annotations in ``RUN/<stage1.annotations>``,
        optional ``mbm.safetensors``); writes ``RUN/stage1/``.
    targets : the teacher's video tokens per clip (default: read the annotation store).
    resume : continue from the latest checkpoint of ``RUN/stage1``.
    """
    s1 = cfg.stage1
    settings = loop.LoopSettings.from_config(s1, "stage1")
    if s1.batch_size < 2:
        raise UserError(f"config value stage1.batch_size={s1.batch_size} is out of range",
                        fix="stage1.batch_size must be at least 2 (CLIP contrasts a batch)")
    # the data first: a bad dataset is refused before anything is written
    windows = windows if windows is not None else load_windows(bids, cfg)
    run_dir = ensure_output_dir(out_dir, what="run directory")
    stage_dir = ensure_output_dir(run_dir / "stage1", what="Stage I folder")
    accelerator = loop.make_accelerator()
    main = accelerator.is_main_process
    log = log if main else (lambda _: None)
    mp = loop.resolve_mixed_precision(s1.mixed_precision, "stage1")

    targets = targets if targets is not None else load_targets(run_dir, s1.annotations)
    fit_rows, val_rows = validation_rows(windows.trials, split_rows(windows.trials, "train"),
                                         cfg.split.val_fraction, cfg.split.seed)
    train = TrialWindows(windows, fit_rows)
    val = TrialWindows(windows, val_rows)
    test = TrialWindows(windows, split_rows(windows.trials, "test"))
    x_train = targets.tokens_of(train.clips)  # (n_train, L, d); raises if a clip is missing
    mbm = mbm_path(run_dir, s1.mbm_checkpoint)
    labelled = TrialWindows(windows, np.r_[train.rows, val.rows])  # fit rows, then validation
    linear = fit_linear_path(cfg, labelled, torch.cat([x_train, targets.tokens_of(val.clips)]),
                             targets.text_of(labelled.clips)[1])
    student, spec = build_student(cfg, train.input_shape, targets.d_llm, targets.n_tokens, mbm,
                                  linear)
    if student.linear is not None and not s1.train_linear:  # the closed-form map stays as fitted
        student.linear.requires_grad_(False)
    offsets = val_offsets = None
    if linear is not None:  # (n_train + n_val, L, d)
        offsets, val_offsets = linear.offsets[:len(train)], linear.offsets[len(train):]
        if main:
            save_crossfit(stage_dir / CROSSFIT_FILE, linear.offsets, labelled.rows,
                          linear.semantic_offsets)
    model = AlignModel(student, alignment_loss_from_config(cfg.loss))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"stage1: {len(train)} train trials (+{len(val)} to validate), {len(test)} held-out "
        f"test trials, input "
        f"{train.input_shape}, L={targets.n_tokens}, d={targets.d_llm}, {n_trainable:,} trainable "
        f"parameters, MBM init {mbm or 'none'}, {accelerator.num_processes} process(es), "
        f"mixed precision {mp}")
    if main:
        write_text(stage_dir / "config.yaml", dump_config(cfg))

    eval_targets = load_eval_targets(run_dir, targets)
    test_ok = len(test) > 0 and not eval_targets.missing(test.clips)
    adapt = TrialWindows(windows, split_rows(windows.trials, "adapt"))
    test_offsets, _ = alignment_of(student, test, adapt, cfg.encoder, s1.eval_batch_size)
    before = retrieval(student, test, eval_targets, s1.eval_batch_size, test_offsets) \
        if (test_ok and main) else None
    if before:
        log(f"stage1: untrained retrieval top-1 {before['top1']:.3f} "
            f"(chance {before['chance_top1']:.3f})")

    optimizer = loop.adamw(model, settings)
    # model and optimizer together: DeepSpeed/FSDP configs shard or wrap both
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    sampler = ResumableBatchSampler(len(train), s1.batch_size, s1.seed,
                                    rank=accelerator.process_index,
                                    world=accelerator.num_processes)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        idx = sampler.batch(step)
        fmri = train.fmri(idx).to(accelerator.device)  # (B, T, X, Y, Z)
        x = x_train[idx].to(accelerator.device)  # (B, L, d)
        off = None if offsets is None else offsets[idx].to(accelerator.device)
        with loop.autocast(accelerator, mp):
            return wrapped(fmri, x, off)

    x_val = targets.tokens_of(val.clips) if len(val) else None  # (n_val, L, d)

    @torch.no_grad()
    def validate() -> float:
        """Stage I's loss on the validation trials (their clips never fitted on)."""
        model.eval()
        total, pos = 0.0, np.arange(len(val))
        for s in range(0, len(val), s1.eval_batch_size):
            b = pos[s:s + s1.eval_batch_size]
            off = None if val_offsets is None else val_offsets[b]
            total += float(model(val.fmri(b), x_val[b], off)["total"]) * len(b)
        model.train()
        return total / len(val)

    result = loop.train_loop(accelerator=accelerator, module=model, optimizer=optimizer,
                             settings=settings, step_fn=step_fn, stage_dir=stage_dir,
                             config=to_dict(cfg), resume=resume, log=log, name="stage1",
                             progress=progress, validate=validate if len(val) >= 2 else None)
    metrics = {"stage": "stage1", "completed": result["stopped"] is None,
               "steps": settings.steps, "steps_done": result["steps_done"],
               "resumed_from": result["start_step"], "seconds": result["seconds"],
               "samples_per_second": round((result["steps_done"] - result["start_step"])
                                           * s1.batch_size * accelerator.num_processes
                                           / max(result["seconds"], 1e-9), 2),
               "num_processes": result["num_processes"], "mixed_precision": mp,
               "weights_synchronised": result["weights_synchronised"],
               "rank_digests": result["rank_digests"], "mbm_init": str(mbm) if mbm else None,
               "n_train_trials": len(train), "n_test_trials": len(test),
               "loss": {k: v for k, v in result["log"][-1].items() if k != "step"}
               if result["log"] else None,
               "loss_config": dataclasses.asdict(cfg.loss), "retrieval_before": before,
               "n_val_trials": len(val), "validation": result["validation"]}
    if result["stopped"] is not None:
        return metrics
    if main:
        metrics["retrieval_after"] = retrieval(student, test, eval_targets, s1.eval_batch_size,
                                               test_offsets) \
            if test_ok else None
        if not test_ok:
            metrics["note"] = "no held-out test trials with teacher tokens: retrieval not measured"
        else:
            log(f"stage1: trained retrieval top-1 {metrics['retrieval_after']['top1']:.3f} "
                f"(untrained {before['top1']:.3f}, chance {before['chance_top1']:.3f})")
        save_student(student, stage_dir / STUDENT_FILE, spec=spec, input_shape=train.input_shape,
                     d_llm=targets.d_llm, n_tokens=targets.n_tokens, enc=cfg.encoder,
                     extra={"crop": train.crop.to_dict() if train.crop else None,
                            "grid": list(windows.grid) if windows.grid else None})
        write_json(stage_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics
