"""Training checkpoints: safetensors + JSON, checksummed, atomic, resumable bit-for-bit.

Layout (torchtune-like, no pickle anywhere)::

    RUN/checkpoints/step-00000100/
        model.safetensors   trainable parameters and persistent buffers (e.g. memory bank)
        state.safetensors   every tensor of the optimizer, scheduler, RNG and data position
        state.json          everything else (step, param groups, RNG, data position, metrics);
                            a tensor there is a reference {"__tensor__": key} into state.safetensors
        config.json         the resolved config of the run
        manifest.json       format, version, step and the sha256 + size of each file above

A checkpoint is written into ``RUN/checkpoints/.tmp-step-…`` and renamed into place, so
``latest_checkpoint`` only ever sees complete ones; the last ``keep_last`` are kept.
:func:`restore` puts model, optimizer, scheduler and the python/numpy/torch RNG states back
so that, on CPU, a resumed run produces the same weights as an uninterrupted one.
:class:`GracefulStop` turns SIGTERM/SIGINT into a flag the training loop polls.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fmri2text.errors import UserError
from fmri2text.io import write_json

CHECKPOINTS_DIR = "checkpoints"
FORMAT = "fmri2text-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointState:
    """A loaded checkpoint (plain data; apply it with :func:`restore`)."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None
    data_position: Any = None
    config: dict | None = None
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- state capture


def trainable_state_dict(model: nn.Module, include_buffers: bool = True) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` (frozen base weights are not saved) and, by default,
    the persistent buffers (memory bank, norm statistics), detached, by state-dict name."""
    out = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if include_buffers:
        persistent = set(model.state_dict(keep_vars=True))
        out.update({name: b.detach() for name, b in model.named_buffers() if name in persistent})
    return out


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy (legacy global) and torch CPU/CUDA RNG states of this process."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- JSON + tensors


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn ``obj`` into JSON data; tensors go to ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{key}/k{i}", tensors), _encode(v, f"{key}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} at '{key}' in a checkpoint "
                    "(tensors, arrays, numbers, strings, lists, tuples and dicts only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies where needed; safetensors refuses tensors sharing storage."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- save / find / load


def checkpoint_root(run_dir: str | Path) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest step first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder with the highest step in ``RUN/checkpoints``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    rng_state: dict | None = None, data_position: Any = None,
                    config: dict | None = None, metrics: dict | None = None,
                    keep_last: int | None = 3) -> Path:
    """Write ``RUN/checkpoints/step-{step:08d}`` atomically and return its path.

    Parameters
    ----------
    run_dir : run directory; checkpoints go to its ``checkpoints/`` folder.
    step : optimizer steps done so far.
    model_state : name → tensor, usually :func:`trainable_state_dict` (trainable only).
    optimizer, scheduler : objects with ``state_dict()``; saved without pickle.
    rng_state : from :func:`capture_rng_state`; None captures this process's state now.
    data_position : JSON-like data (may hold tensors) that tells the loader where to resume.
    config : the resolved config as a dict (``config.to_dict``).
    metrics : extra numbers to keep with the checkpoint (losses, …).
    keep_last : keep this many most recent checkpoints (None: all).

    Only one process of a multi-process run should call this (the RNG saved is its own).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 or None, got {keep_last}")
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(step):08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "step": int(step),
            "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors) if optimizer else None,
            "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors) if scheduler else None,
            "rng": _encode(rng_state if rng_state is not None else capture_rng_state(), "rng", tensors),
            "data_position": _encode(data_position, "data_position", tensors),
            "metrics": _encode(metrics or {}, "metrics", tensors),
        }
        save_file(_unshare(model_state), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(_unshare(tensors), str(tmp / STATE_TENSORS_FILE), metadata={"format": "pt"})
        (tmp / STATE_FILE).write_text(json.dumps(state, allow_nan=False), encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(json.dumps(_encode(config, "config", {}), indent=2,
                                                  allow_nan=False), encoding="utf-8")
        files = {}
        for fname in (MODEL_FILE, STATE_TENSORS_FILE, STATE_FILE, CONFIG_FILE):
            with open(tmp / fname, "rb") as f:
                os.fsync(f.fileno())
            files[fname] = {"sha256": _sha256(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        write_json(tmp / MANIFEST_FILE, {"format": FORMAT, "version": VERSION, "step": int(step),
                                         "torch": torch.__version__, "files": files})
        final = root / name
        if final.exists():  # re-saving a step: move the old one aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=root))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last, current=final)
    return final


def _prune(root: Path, keep_last: int | None, current: Path) -> None:
    """Delete checkpoints beyond the last ``keep_last`` and leftovers of interrupted saves."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-step-", ".old-step-")):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is None:
        return
    found = list_checkpoints(root.parent)
    for p in found[:-keep_last]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read checkpoint file: {err}", path=path,
                        fix="the checkpoint is damaged; delete its folder and resume from an "
                            "earlier one") from None


def load_checkpoint(path: str | Path) -> CheckpointState:
    """Read and verify a checkpoint folder (``RUN/checkpoints/step-…``).

    Every file is checked against the sha256 in ``manifest.json``; a missing, truncated or
    altered file raises :class:`UserError` naming it. Nothing is unpickled.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError("checkpoint folder not found", path=path,
                        fix="pass a folder such as RUN/checkpoints/step-00000100 "
                            "(latest_checkpoint(RUN) finds the newest)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"not a complete checkpoint: {MANIFEST_FILE} is missing", path=path,
                        fix="pass a folder written by save_checkpoint, or an earlier checkpoint")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise UserError(f"not an {FORMAT} manifest", path=manifest_path,
                        fix="pass a folder written by save_checkpoint")
    if manifest.get("version") != VERSION:
        raise UserError(f"checkpoint format version {manifest.get('version')!r} is not supported "
                        f"(this fmri2text reads version {VERSION})", path=manifest_path,
                        fix="resume with the fmri2text version that wrote it")
    for fname in (MODEL_FILE, STATE_TENSORS_FILE, STATE_FILE, CONFIG_FILE):
        fpath = path / fname
        expected = manifest["files"].get(fname, {}).get("sha256")
        if not fpath.is_file():
            raise UserError("checkpoint file is missing", path=fpath,
                            fix="the checkpoint is incomplete; resume from an earlier one")
        actual = _sha256(fpath)
        if actual != expected:
            raise UserError(f"checkpoint file is corrupt: sha256 {actual[:16]}… does not match "
                            f"the manifest's {str(expected)[:16]}…", path=fpath,
                            fix="delete this checkpoint folder and resume from an earlier one")
    try:
        model = load_file(str(path / MODEL_FILE))
        tensors = load_file(str(path / STATE_TENSORS_FILE))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read safetensors: {err}", path=path,
                        fix="delete this checkpoint folder and resume from an earlier one") from None
    state = _read_json(path / STATE_FILE)
    try:
        decoded = {k: _decode(v, tensors) for k, v in state.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"inconsistent checkpoint state: {err!r}", path=path / STATE_FILE,
                        fix="delete this checkpoint folder and resume from an earlier one") from None
    return CheckpointState(path=path, step=int(decoded["step"]), model=model,
                           optimizer=decoded.get("optimizer"), scheduler=decoded.get("scheduler"),
                           rng=decoded.get("rng"), data_position=decoded.get("data_position"),
                           config=_decode(_read_json(path / CONFIG_FILE), {}),
                           metrics=decoded.get("metrics") or {})


def _model_mismatches(model: nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Differences in names and shapes between a checkpoint and ``model``."""
    current = model.state_dict()
    problems = []
    for name, t in saved.items():
        if name not in current:
            problems.append(f"'{name}' is in the checkpoint but not in the model")
        elif tuple(current[name].shape) != tuple(t.shape):
            problems.append(f"'{name}' has shape {tuple(t.shape)} in the checkpoint but "
                            f"{tuple(current[name].shape)} in the model")
    for name in trainable_state_dict(model, include_buffers=False):
        if name not in saved:
            problems.append(f"trainable '{name}' is in the model but not in the checkpoint")
    return problems


def restore(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any,
            state: CheckpointState, *, rng: bool = True) -> None:
    """Load weights, optimizer, scheduler and (by default) RNG states from ``state``.

    Build the model, optimizer and scheduler exactly as for a fresh run, then call this.
    A checkpoint written with another model (names or shapes differ) or optimizer (groups
    differ) raises :class:`UserError` naming the file and the differences.
    """
    problems = _model_mismatches(model, state.model)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"checkpoint does not match the model: {shown}",
                        path=state.path / MODEL_FILE,
                        fix="resume with the config that wrote this checkpoint (its config.json) "
                            "or start a new run directory")
    model.load_state_dict(state.model, strict=False)
    for what, obj, saved in (("optimizer", optimizer, state.optimizer),
                             ("scheduler", scheduler, state.scheduler)):
        if obj is None:
            continue
        if saved is None:
            raise UserError(f"checkpoint has no {what} state", path=state.path / STATE_FILE,
                            fix=f"resume without a {what}, or from a checkpoint that saved one")
        try:
            obj.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise UserError(f"{what} state does not match the current {what}: {err}",
                            path=state.path / STATE_FILE,
                            fix="resume with the config that wrote this checkpoint "
                                "(its config.json) or start a new run directory") from None
    if rng and state.rng is not None:
        restore_rng_state(state.rng)


# ----------------------------------------------------------------------------- signals


class GracefulStop:
    """Context manager: SIGTERM/SIGINT set :attr:`requested` instead of killing the process.

    The training loop checks ``stop.requested`` after each step, saves a checkpoint and
    returns. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. Previous
    handlers are restored on exit. Outside the main thread it installs nothing.
    (In a multi-process run, reduce the flag across ranks so all stop at the same step.)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
