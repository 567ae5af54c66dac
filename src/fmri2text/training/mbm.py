"""Masked brain modeling (MBM) pretraining recipe for the SC-MBM encoder.

setup (split windows, build :class:`BrainMAE`, AdamW with Mind-Vis defaults) → train
(random 75 % masks per sample, masked-token MSE, warm-up + cosine schedule, gradient
clipping) → evaluate on held-out windows against the "predict the training mean" baseline
→ save (``mbm.safetensors`` + ``mbm_metrics.json`` in ``out_dir``).

Labels are never used: any collection of fMRI windows works.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from fmri2text.config import Config, to_dict
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_json
from fmri2text.models.brain_encoder import BrainMAE, save_mae, spec_from_config

WindowSource = np.ndarray | Sequence  # (n, T, X, Y, Z) / (n, T, V) array, or items of that shape


def _window(data: WindowSource, i: int) -> np.ndarray:
    item = data[i]
    if isinstance(item, (tuple, list)):  # (fmri, label, …) datasets: labels unused
        item = item[0]
    if isinstance(item, dict):
        item = item["fmri"]
    return np.asarray(item, dtype=np.float32)


def _batch(data: WindowSource, idx: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([_window(data, int(i)) for i in idx]))


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise UserError(f"MBM pretraining needs at least 2 fMRI windows, got {n}",
                        fix="prepare more runs or subjects")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return order[n_val:], order[:n_val]


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_mbm(model: BrainMAE, data: WindowSource, idx: np.ndarray, mean_target: torch.Tensor,
                 mask_ratio: float, batch_size: int = 8, seed: int = 1234) -> dict[str, float]:
    """Masked-token MSE of the model and of the mean-target baseline on windows ``idx``.

    The same seeded masks are used for both. ``mean_target`` (N, F) is the per-token,
    per-feature mean target over the training windows.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    sums = {"model": 0.0, "mean": 0.0, "zero": 0.0}
    n_masked = 0.0
    for start in range(0, len(idx), batch_size):
        x = _batch(data, idx[start:start + batch_size])
        out = model(x, mask_ratio=mask_ratio, generator=gen)
        m = out["mask"]  # (B, N)
        tgt = out["target"]  # (B, N, F)
        sums["model"] += (((out["pred"] - tgt) ** 2).mean(-1) * m).sum().item()
        sums["mean"] += (((mean_target - tgt) ** 2).mean(-1) * m).sum().item()
        sums["zero"] += ((tgt ** 2).mean(-1) * m).sum().item()
        n_masked += m.sum().item()
    model.train()
    return {f"val_mse_{k}": v / n_masked for k, v in sums.items()}


def _batch_sizes(n: int, size: int) -> list[int]:
    """``n`` items as batches of ``size`` and a last, smaller one."""
    return [min(size, n - a) for a in range(0, n, size)]


def _check(m) -> None:
    if not 0.0 < m.mask_ratio < 1.0 or m.steps < 1 or m.batch_size < 1:
        raise UserError(f"mbm.mask_ratio={m.mask_ratio}, mbm.steps={m.steps}, "
                        f"mbm.batch_size={m.batch_size} out of range",
                        fix="mask_ratio strictly between 0 and 1, steps and batch_size >= 1")


def pretrain_mbm(data: WindowSource, cfg: Config, out_dir: str | Path) -> dict:
    """Pretrain tokenizer + encoder by masked brain modeling; return the metrics.

    Parameters
    ----------
    data:
        fMRI windows: an array (n, T, X, Y, Z) or (n, T, V), or any indexable of such
        windows (items may be ``(fmri, …)`` tuples or ``{'fmri': …}`` dicts).
    cfg:
        Uses ``cfg.encoder`` (model sizes) and ``cfg.mbm`` (optimisation).
    out_dir:
        Receives ``mbm.safetensors`` (weights, spec and input shape) and ``mbm_metrics.json``.
    """
    m = cfg.mbm
    _check(m)
    out_dir = ensure_output_dir(out_dir, what="MBM output folder")
    n = len(data)
    train_idx, val_idx = _split(n, m.val_fraction, m.seed)
    first = _window(data, 0)
    if not np.isfinite(first).all():
        raise UserError("fMRI window 0 contains NaN or infinite values",
                        fix="mask or interpolate bad voxels when preparing the data")
    torch.manual_seed(m.seed)
    model = BrainMAE(spec_from_config(cfg.encoder), first.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": m.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=m.lr, betas=(m.beta1, m.beta2))

    # baseline: mean target over training windows (N, F)
    with torch.no_grad():
        tot = None
        for start in range(0, len(train_idx), m.batch_size):
            t = model.tokenizer.target(_batch(data, train_idx[start:start + m.batch_size]))
            tot = t.sum(0) if tot is None else tot + t.sum(0)
        mean_target = tot / len(train_idx)

    rng = np.random.default_rng(m.seed)
    gen = torch.Generator().manual_seed(m.seed)
    history = []
    initial = evaluate_mbm(model, data, val_idx, mean_target, m.mask_ratio, m.batch_size)
    t0 = time.perf_counter()
    model.train()
    for step in range(m.steps):
        lr = _lr_at(step, m.steps, m.warmup_steps, m.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.choice(train_idx, size=min(m.batch_size, len(train_idx)), replace=False)
        loss = model(_batch(data, idx), mask_ratio=m.mask_ratio, generator=gen)["loss"]
        if not torch.isfinite(loss):
            raise UserError(f"MBM loss became {loss.item()} at step {step}",
                            fix="lower mbm.lr or check the fMRI windows for extreme values")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if m.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, m.clip_grad)
        opt.step()
        if step % m.log_every == 0 or step == m.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 6), "lr": lr})
    seconds = time.perf_counter() - t0
    final = evaluate_mbm(model, data, val_idx, mean_target, m.mask_ratio, m.batch_size)
    metrics = {
        "n_train_windows": int(len(train_idx)), "n_val_windows": int(len(val_idx)),
        "input_shape": list(first.shape), "num_tokens": model.tokenizer.num_tokens,
        "target_dim": model.tokenizer.target_dim, "steps": m.steps,
        "seconds": round(seconds, 2), "initial": initial, "final": final,
        "ratio_to_mean_baseline": final["val_mse_model"] / final["val_mse_mean"],
        "history": history,
    }
    save_mae(model, Path(out_dir) / "mbm.safetensors")
    write_json(Path(out_dir) / "mbm_metrics.json", metrics)
    return metrics


def pretrain_mbm_corpus(corpus: str | Path, cfg: Config, out_dir: str | Path, *,
                        resume: bool = False, log=print, progress: bool = True) -> dict:
    """Masked brain modeling streamed from a corpus (:mod:`fmri2text.data.corpus`), in one
    process or many (``torchrun``; the loop of :mod:`fmri2text.training.loop`).

    Whole runs (``mbm.val_fraction`` of the shards) are held out; each rank streams its own
    training shards (:class:`~fmri2text.data.shards.CorpusStream`), one row group in memory,
    and draws its masks from its own generator. Checkpoints (every ``mbm.checkpoint_every``
    steps and on SIGTERM) hold every rank's stream position and mask generator, so
    ``resume`` continues exactly. Writes ``mbm.safetensors`` (loadable as
    ``stage1.mbm_checkpoint``), ``mbm_metrics.json``, ``log.jsonl`` and ``checkpoints/`` in
    ``out_dir``; returns the metrics (the main rank's are complete).
    """
    from fmri2text.data.shards import CorpusStream, read_manifest, split_shards
    from fmri2text.training import loop

    m = cfg.mbm
    _check(m)
    out_dir = ensure_output_dir(out_dir, what="MBM output folder")
    accelerator = loop.make_accelerator()
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    manifest = read_manifest(corpus)
    train_files, val_files = split_shards(manifest, m.val_fraction, m.seed)
    if not val_files:
        raise UserError("the corpus has one shard: nothing to hold out for validation",
                        path=corpus, fix="build the corpus from two or more runs")
    stream = CorpusStream(corpus, train_files, rank=rank, world=world, seed=m.seed)
    val_stream = CorpusStream(corpus, val_files, seed=m.seed)  # the same windows on every rank
    # held in float16, the shards' own values (lossless), read a batch at a time
    val = np.concatenate([val_stream.batch(k).numpy().astype(np.float16) for k in
                          _batch_sizes(min(m.val_windows, sum(val_stream.rows)), m.batch_size)])
    sample = CorpusStream(corpus, train_files, seed=m.seed)  # for the mean-target baseline
    torch.manual_seed(m.seed)  # the same initial weights on every rank
    model = BrainMAE(spec_from_config(cfg.encoder), stream.input_shape)
    with torch.no_grad():  # (N, F) mean target of as many training windows, a batch at a time
        n_mean = min(m.val_windows, sum(sample.rows))
        mean_target = sum(model.tokenizer.target(sample.batch(k)).sum(0)
                          for k in _batch_sizes(n_mean, m.batch_size)) / n_mean
    masks = torch.Generator().manual_seed(m.seed * 1000 + rank)  # each rank its own masks
    settings = loop.LoopSettings(steps=m.steps, lr=m.lr, weight_decay=m.weight_decay,
                                 warmup_steps=m.warmup_steps, grad_clip=m.clip_grad,
                                 checkpoint_every=m.checkpoint_every, keep_last=2,
                                 log_every=m.log_every)
    optimizer = loop.adamw(model, settings)
    for group in optimizer.param_groups:
        group["betas"] = (m.beta1, m.beta2)
    initial = evaluate_mbm(model, val, np.arange(len(val)), mean_target, m.mask_ratio, m.batch_size)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    log(f"pretrain-mbm: {manifest['n_windows']} windows in {len(manifest['shards'])} shards of "
        f"{len(manifest['datasets'])} dataset(s); {len(train_files)} shards to train "
        f"({len(stream.files)} on this rank of {world}), {len(val)} held-out windows; "
        f"input {stream.input_shape}")

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        x = stream.batch(m.batch_size).to(accelerator.device)
        return {"total": wrapped(x, mask_ratio=m.mask_ratio, generator=masks)["loss"]}

    def data_state() -> dict:
        return {**stream.state(), "masks": masks.get_state().tolist()}

    def restore_data(states: list[dict]) -> None:
        if len(states) != world:
            raise UserError(f"the checkpoint holds {len(states)} process(es)' positions, this "
                            f"run has {world}", path=out_dir,
                            fix=f"resume with {len(states)} processes (torchrun --nproc_per_node)")
        stream.load_state(states[rank])
        masks.set_state(torch.tensor(states[rank]["masks"], dtype=torch.uint8))

    result = loop.train_loop(accelerator=accelerator, module=model, optimizer=optimizer,
                             settings=settings, step_fn=step_fn, stage_dir=Path(out_dir),
                             config=to_dict(cfg), resume=resume, log=log, name="pretrain-mbm",
                             progress=progress, data_state=data_state, restore_data=restore_data)
    metrics = {"corpus": str(corpus), "n_shards": len(manifest["shards"]),
               "n_train_shards": len(train_files), "n_val_shards": len(val_files),
               "n_val_windows": int(len(val)), "input_shape": list(stream.input_shape),
               "steps": m.steps, "completed": result["stopped"] is None,
               "steps_done": result["steps_done"], "seconds": result["seconds"],
               "num_processes": world, "weights_synchronised": result["weights_synchronised"],
               "rank_digests": result["rank_digests"], "initial": initial}
    if result["stopped"] is not None or not main:
        return metrics
    final = evaluate_mbm(model, val, np.arange(len(val)), mean_target, m.mask_ratio, m.batch_size)
    metrics.update(final=final, ratio_to_mean_baseline=final["val_mse_model"] / final["val_mse_mean"])
    save_mae(model, Path(out_dir) / "mbm.safetensors")
    write_json(Path(out_dir) / "mbm_metrics.json", metrics)
    log(f"pretrain-mbm: held-out masked MSE {final['val_mse_model']:.3f} vs mean baseline "
        f"{final['val_mse_mean']:.3f} ({result['seconds']:.1f} s, {world} process(es))")
    return metrics


def synthetic_fmri_windows(n: int, grid: tuple[int, ...], window: int = 2, n_components: int = 6,
                           noise: float = 0.3, smooth: float | None = None,
                           seed: int = 0) -> np.ndarray:
    """fMRI-like windows for smoke tests and measurements: (n, T, *grid) float32.

    Each window mixes ``n_components`` shared smooth spatial maps (Gaussian-smoothed noise)
    with random, slowly varying time courses, plus smooth subject-free background and white
    noise, then z-scores each voxel; masked tokens are thus predictable from visible ones.
    ``smooth`` is the Gaussian sigma of the maps in voxels (default: min(grid) / 8).
    """
    rng = np.random.default_rng(seed)
    sigma = smooth if smooth is not None else max(1.0, min(grid) / 8)
    maps = np.stack([gaussian_filter(rng.standard_normal(grid), sigma) for _ in range(n_components)])
    maps /= maps.std(axis=tuple(range(1, maps.ndim)), keepdims=True)  # (K, *grid)
    base = rng.standard_normal((n, 1, n_components))
    drift = 0.3 * rng.standard_normal((n, window, n_components)).cumsum(axis=1)
    amps = base + drift  # (n, T, K)
    x = np.tensordot(amps, maps, axes=([2], [0]))  # (n, T, *grid)
    x += noise * rng.standard_normal(x.shape)
    x = (x - x.mean(axis=0, keepdims=True)) / (x.std(axis=0, keepdims=True) + 1e-6)
    return x.astype(np.float32)
