"""The training loop shared by the Stage I and Stage II recipes.

One loop for one CPU process, ``torchrun`` CPU processes, one GPU or many GPUs (accelerate
does the process setup and DDP wrapping): warm-up + cosine learning rate from the step
number (so no scheduler state), gradient clipping, checkpoints every ``checkpoint_every``
steps and on SIGTERM/SIGINT (flag all-reduced so every rank stops at the same step),
``--resume`` from the latest checkpoint (weights, optimizer, RNG, data position = step),
``log.jsonl`` rows of every loss term, TensorBoard scalars and a rich progress bar.

The recipe supplies ``step_fn(step) -> {"total": loss, term: value, …}`` (forward through the
accelerate-prepared module) and optionally ``after_step(step)`` (e.g. DANCE's memory bank)
and ``validate() -> float`` (lower is better): then the weights are scored before training
and every ``val_every`` steps, the best are kept in ``best.safetensors`` (so a resumed run
chooses as an uninterrupted one) and restored at the end; with ``val_patience`` > 0, training
stops once that many passes in a row have not beaten the best (its weights are kept as always).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fmri2text.errors import UserError
from fmri2text.io import write_jsonl
from fmri2text.training.checkpoint import (GracefulStop, latest_checkpoint, load_checkpoint,
                                           restore, save_checkpoint, trainable_state_dict)

Log = Callable[[str], None]
MIXED_PRECISION = ("auto", "bf16", "no")


@dataclass
class LoopSettings:
    """Optimisation and bookkeeping settings common to both stages (from Stage1/2Config)."""

    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    checkpoint_every: int
    keep_last: int
    log_every: int
    val_every: int = 0
    val_patience: int = 0

    @classmethod
    def from_config(cls, stage_cfg, section: str) -> "LoopSettings":
        """Copy the shared fields of a stage config; range-check them (UserError names the key)."""
        s = cls(**{k: getattr(stage_cfg, k) for k in cls.__dataclass_fields__})
        checks = [(s.steps >= 1, "steps", "at least 1"), (s.lr > 0, "lr", "positive"),
                  (s.weight_decay >= 0, "weight_decay", "zero or positive"),
                  (s.warmup_steps >= 0, "warmup_steps", "zero or positive"),
                  (s.grad_clip >= 0, "grad_clip", "zero (off) or positive"),
                  (s.checkpoint_every >= 1, "checkpoint_every", "at least 1"),
                  (s.keep_last >= 1, "keep_last", "at least 1"),
                  (s.log_every >= 1, "log_every", "at least 1"),
                  (s.val_every >= 0, "val_every", "zero (off) or positive"),
                  (s.val_patience >= 0, "val_patience", "zero (off) or positive")]
        for ok, key, allowed in checks:
            if not ok:
                raise UserError(f"config value {section}.{key}={getattr(s, key)!r} is out of range",
                                fix=f"{section}.{key} must be {allowed}")
        return s


def lr_at(step: int, s: LoopSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_mixed_precision(setting: str, section: str, llm_dtype: torch.dtype | None = None) -> str:
    """"bf16" or "no". ``auto``: bf16 when the LLM runs in bf16 (Stage II) or, without an LLM,
    on a CUDA GPU (fp32 on every CPU: :func:`fmri2text.models.llm.preferred_dtype`)."""
    if setting not in MIXED_PRECISION:
        raise UserError(f"config value {section}.mixed_precision={setting!r} is not known",
                        fix="use one of " + ", ".join(MIXED_PRECISION))
    if setting != "auto":
        return setting
    if llm_dtype is not None:
        return "bf16" if llm_dtype == torch.bfloat16 else "no"
    from fmri2text.models.llm import preferred_dtype

    return "bf16" if preferred_dtype() == torch.bfloat16 else "no"


def make_accelerator():
    """An ``Accelerator`` for this process: CPU (1 or torchrun processes) or GPU(s).

    Mixed precision is not set here (the process-wide accelerate state would then pin one
    setting for every later recipe); the recipes use :func:`autocast` instead.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def autocast(accelerator, mixed_precision: str):
    """bf16 autocast on the accelerator's device when ``mixed_precision == "bf16"``."""
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16,
                          enabled=mixed_precision == "bf16")


def adamw(module: nn.Module, s: LoopSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and scalars."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen",
                        fix="check the adaptor and projector settings of the encoder config")
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 (16 hex) of the trainable tensors and buffers: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(trainable_state_dict(module).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_log(path: Path, before: int) -> list[dict]:
    """Rows of an existing ``log.jsonl`` with step < ``before`` (kept when resuming)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", before) < before:
            rows.append(row)
    return rows


class _Feedback:
    """Rich progress bar with the loss terms and ETA, plus TensorBoard scalars (main rank)."""

    def __init__(self, stage_dir: Path, name: str, total: int, start: int, enabled: bool,
                 progress: bool, log: Log):
        self.progress = self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start or None)
        except ImportError:
            log("TensorBoard scalars off: pip install tensorboard to write them")
        if progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[terms]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(name, total=total, completed=start, terms="")

    def step(self, row: dict, write: bool) -> None:
        if self.progress is not None:
            terms = " ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("step", "lr"))
            self.progress.update(self.task, advance=1, terms=terms)
        if self.writer is not None and write:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(f"{k}", v, row["step"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


def train_loop(*, accelerator, module: nn.Module, optimizer: torch.optim.Optimizer,
               settings: LoopSettings, step_fn: Callable[[int], dict[str, torch.Tensor]],
               stage_dir: Path, config: dict, resume: bool, log: Log, name: str,
               after_step: Callable[[int], None] | None = None, progress: bool = True,
               validate: Callable[[], float] | None = None,
               first_score: float | None = None,
               data_state: Callable[[], dict] | None = None,
               restore_data: Callable[[list], None] | None = None) -> dict:
    """Run steps ``start..settings.steps-1`` of a recipe; return a summary.

    Parameters
    ----------
    module : the *unwrapped* module holding every trainable tensor and persistent buffer
        (what is checkpointed); ``step_fn`` runs the accelerate-prepared wrapper of it.
    step_fn : computes the loss terms of step ``step`` (``"total"`` is back-propagated).
    stage_dir : ``RUN/stageN``: ``checkpoints/``, ``log.jsonl``, ``tensorboard/``.
    resume : continue from the latest checkpoint in ``stage_dir`` (error if there is none).
    first_score : ``validate()`` of the weights before the first step when the recipe has
        already computed it (not recomputed).
    data_state, restore_data : a rank's data stream position (a JSON-able dict), gathered
        from every rank into each checkpoint's ``data_position["stream"]`` (a list by rank),
        and that list given back on ``--resume``: for data read as a stream rather than
        indexed by the step number.

    Returns
    -------
    {"start_step", "steps_done", "stopped" (signal name or None), "seconds", "log": rows,
     "rank_digests": weights digest of every rank, "weights_synchronised": bool,
     "validation": {"scores": [[step, score], …], "best_step"} or None}
    """
    main = accelerator.is_main_process
    start = 0
    if resume:
        ck = latest_checkpoint(stage_dir)
        if ck is None:
            raise UserError("--resume was given but there is no checkpoint to resume from",
                            path=stage_dir / "checkpoints", fix="run without --resume to start")
        state = load_checkpoint(ck)
        restore(module, optimizer, None, state)
        start = int(state.step)
        if restore_data is not None:
            restore_data(state.data_position.get("stream") or [])
        log(f"{name}: resumed from {ck} at step {start}")
    log_path = stage_dir / "log.jsonl"
    rows = _read_log(log_path, start) if resume else []
    params = [p for p in module.parameters() if p.requires_grad]
    feedback = _Feedback(stage_dir, name, settings.steps, start, main, progress, log)
    stopped = None
    t0 = time.perf_counter()
    step = start
    selector = _BestStep(stage_dir, module, validate, settings.val_every, resume, main, log, name)
    selector.check(start, force=not resume, score=first_score)
    # a resumed run that had already stopped early trains no further
    end = start if selector.patience_spent(settings.val_patience) else settings.steps
    try:
        with GracefulStop() as stop:
            for step in range(start, end):
                lr = lr_at(step, settings)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                terms = step_fn(step)
                loss = terms["total"]
                if not torch.isfinite(loss.detach()):
                    raise UserError(f"{name} loss became {loss.item()} at step {step}",
                                    fix=f"lower {name}.lr or check the inputs for extreme values")
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                if after_step is not None:
                    after_step(step)
                # every rank logs the mean over ranks of each term
                values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
                values = accelerator.reduce(values.to(accelerator.device), "mean").cpu()
                row = {"step": step, **{k: round(float(v), 6) for k, v in zip(terms, values)},
                       "lr": lr}
                rows.append(row)
                write = (step + 1) % settings.log_every == 0 or step + 1 == settings.steps
                feedback.step(row, write)
                flag = torch.tensor([float(stop.requested)], device=accelerator.device)
                stop_now = float(accelerator.reduce(flag, "sum").item()) > 0
                done = step + 1
                if main and (write or stop_now):
                    write_jsonl(log_path, rows)
                selector.check(done, force=done == settings.steps)
                if done % settings.checkpoint_every == 0 or stop_now:
                    streams = None if data_state is None else [data_state()]  # one per rank
                    if streams is not None and accelerator.num_processes > 1:
                        streams = accelerator.gather_for_metrics(streams, use_gather_object=True)
                    if main:
                        position = {"batch": done}
                        if streams is not None:
                            position["stream"] = streams
                        save_checkpoint(stage_dir, done, model_state=trainable_state_dict(module),
                                        optimizer=optimizer, data_position=position,
                                        config=config, metrics=row, keep_last=settings.keep_last)
                    accelerator.wait_for_everyone()
                if stop_now:
                    stopped = stop.signal_name or "signal"
                    log(f"{name}: stopped by {stopped} after step {done}; checkpoint saved, "
                        "rerun with --resume to continue")
                    break
                if done < settings.steps and selector.patience_spent(settings.val_patience):
                    log(f"{name}: stopped after step {done}: {settings.val_patience} validation "
                        f"pass(es) without beating step {selector.best[1]} (val_patience)")
                    break
    finally:
        feedback.close()
    if main:
        write_jsonl(log_path, rows)
    if stopped is None:
        selector.restore_best()
    if accelerator.num_processes > 1:
        # batch statistics (the token standardiser's) follow each rank's own batches after
        # DDP's last buffer broadcast: take rank 0's, as the checkpoints do
        for buf in module.buffers():
            torch.distributed.broadcast(buf.data, src=0)
    digests = accelerator.gather_for_metrics([weights_digest(module)], use_gather_object=True) \
        if accelerator.num_processes > 1 else [weights_digest(module)]
    return {"start_step": start, "steps_done": (step + 1) if end > start else start,
            "stopped": stopped, "seconds": round(time.perf_counter() - t0, 2), "log": rows,
            "rank_digests": list(digests), "weights_synchronised": len(set(digests)) == 1,
            "num_processes": accelerator.num_processes, "validation": selector.summary()}


class _BestStep:
    """Validation-based choice of the step to keep (see the module docstring).

    Every rank validates the same weights on the same rows, so every rank keeps the same
    step; rank 0 writes ``best.safetensors`` / ``best.json``, which a resumed run reads back.
    """

    def __init__(self, stage_dir: Path, module: nn.Module, validate, every: int, resume: bool,
                 main: bool, log: Log, name: str):
        self.validate, self.every, self.module, self.main, self.log, self.name = (
            validate if every > 0 else None, every, module, main, log, name)
        self.file, self.record = Path(stage_dir) / "best.safetensors", Path(stage_dir) / "best.json"
        self.scores: list[list[float]] = []
        self.best: tuple[float, int] | None = None
        self.state: dict[str, torch.Tensor] | None = None
        if self.validate is not None and resume and self.record.is_file():
            from safetensors.torch import load_file

            saved = json.loads(self.record.read_text(encoding="utf-8"))
            self.scores, self.best = saved["scores"], (saved["best_score"], saved["best_step"])
            self.state = load_file(str(self.file))

    def check(self, step: int, force: bool = False, score: float | None = None) -> None:
        if self.validate is None or not (force or step % self.every == 0):
            return
        if self.scores and self.scores[-1][0] == step:
            return
        score = float(self.validate() if score is None else score)
        self.scores.append([step, score])
        if self.best is None or score < self.best[0]:
            self.best = (score, step)
            self.state = {k: v.detach().clone() for k, v in trainable_state_dict(self.module).items()}
            if self.main:
                from safetensors.torch import save_file

                from fmri2text.io import atomic_path

                with atomic_path(self.file) as tmp:
                    save_file({k: v.contiguous() for k, v in self.state.items()}, str(tmp))
        if self.main:
            from fmri2text.io import write_json

            write_json(self.record, {"scores": self.scores, "best_score": self.best[0],
                                     "best_step": self.best[1]})
        self.log(f"{self.name}: validation {score:.4f} at step {step} (best {self.best[0]:.4f} "
                 f"at step {self.best[1]})")

    def patience_spent(self, patience: int) -> bool:
        """Whether the last ``patience`` (> 0) validation passes all came after the best."""
        if self.best is None or patience <= 0:
            return False
        return sum(step > self.best[1] for step, _ in self.scores) >= patience

    def restore_best(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state, strict=False)

    def summary(self) -> dict | None:
        if self.best is None:
            return None
        return {"scores": self.scores, "best_step": self.best[1], "best_score": self.best[0]}
