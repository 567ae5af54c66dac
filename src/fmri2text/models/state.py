"""Checking a loaded state dict against a model before anything is copied into it."""

from __future__ import annotations

from pathlib import Path

import torch

from fmri2text.errors import UserError


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | Path,
                *, what: str, keys_fix: str, shape_fix: str) -> None:
    """Raise a UserError naming ``path`` when ``state`` does not fit ``own`` exactly.

    Parameters
    ----------
    own:
        The model's tensors (its state dict, or the part of it being loaded).
    state:
        The tensors read from ``path``.
    what:
        How messages name the file's content, e.g. ``"checkpoint"`` or ``"adapter"``.
    keys_fix, shape_fix:
        The fix suggested for missing/unexpected keys and for a wrong shape.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{what} keys do not match the model: missing {missing[:10]}, "
                        f"unexpected {unexpected[:10]}", path=path, fix=keys_fix)
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{what} tensor '{k}' has shape {tuple(v.shape)}, the model "
                            f"expects {tuple(own[k].shape)}", path=path, fix=shape_fix)
