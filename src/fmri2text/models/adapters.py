"""Nonlinear low-rank adaptors (paper, Fig. 2): y = W x + s · B(GELU(A(LayerNorm(x)))).

``inject_adapters`` replaces every ``nn.Linear`` whose module name matches one of the given
regular expressions by an :class:`AdaptedLinear` that *reuses* the base weight and bias
(same Parameter objects, same state-dict keys ``….weight`` / ``….bias``) and adds an
``adapter`` sub-module (keys ``….adapter.norm.*``, ``….adapter.down.weight``,
``….adapter.up.weight``). B (``up``) starts at zero, so the adapted model equals its base
at initialisation. All parameters that existed before injection are frozen.

It works on any module tree with plain ``nn.Linear`` layers: our ``BrainEncoder``
(``ENCODER_PATTERNS``) and BERT-style Q-Formers, HF ``BertModel`` or BLIP-2's
``Blip2QFormerModel`` or a custom one (``QFORMER_PATTERNS``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from fmri2text.errors import UserError
from fmri2text.io import write_safetensors
from fmri2text.models.state import check_state

#: Our SC-MBM encoder: attention query projections and both MLP linears.
ENCODER_PATTERNS = (r"attn\.query$", r"mlp\.fc1$", r"mlp\.fc2$")
#: BERT / BLIP-2 Q-Former: self- and cross-attention queries, the feed-forward linears
#: (``intermediate[_query].dense`` and the layer's ``output[_query].dense``, not the
#: attention output projection ``attention.output.dense``).
QFORMER_PATTERNS = (r"\.query$", r"intermediate(_query)?\.dense$",
                    r"layer\.\d+\.output(_query)?\.dense$")

ADAPTER_TAG = ".adapter."


class NonlinearAdapter(nn.Module):
    """x (…, in) → s · B(GELU(A(LayerNorm(x)))) (…, out); B zero-initialised."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.norm = nn.LayerNorm(in_features)
        self.down = nn.Linear(in_features, rank, bias=False)  # A
        self.up = nn.Linear(rank, out_features, bias=False)  # B
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.gelu(self.down(self.norm(x))))


class AdaptedLinear(nn.Linear):
    """An ``nn.Linear`` sharing the base layer's parameters, plus a nonlinear adapter."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        nn.Module.__init__(self)  # no fresh weight: reuse the base Parameters
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapter = NonlinearAdapter(base.in_features, base.out_features, rank, scale)
        self.adapter.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter(x)


def inject_adapters(model: nn.Module, patterns: tuple[str, ...] | list[str], rank: int = 8,
                    scale: float = 1.0, freeze_base: bool = True) -> list[str]:
    """Wrap the matching linears of ``model`` in place; return the wrapped module names.

    Parameters
    ----------
    model:
        Any module tree (our encoder, an HF BertModel / Q-Former, …).
    patterns:
        Regular expressions searched (``re.search``) in each ``nn.Linear``'s qualified name.
    rank, scale:
        Adapter rank r and output scale s.
    freeze_base:
        Set ``requires_grad=False`` on every parameter that existed before injection.

    Raises
    ------
    UserError
        When no linear matches (a wrong pattern would otherwise train nothing).
    """
    if rank < 1:
        raise UserError(f"adapter rank must be at least 1, got {rank}",
                        fix="set encoder.adapter_rank to e.g. 8")
    regexes = [re.compile(p) for p in patterns]
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not isinstance(mod, AdaptedLinear)
               and ADAPTER_TAG.strip(".") not in name.split(".")
               and any(r.search(name) for r in regexes)]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise UserError(f"no linear layer matches the adapter patterns {list(patterns)}",
                        fix=f"use patterns matching names such as {linears}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdaptedLinear(mod, rank, scale))
    return [name for name, _ in targets]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model`` (keys containing ``.adapter.``)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if ADAPTER_TAG in f".{k}"}


def save_adapters(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Write the adapter-only state dict of ``model`` as safetensors (atomically)."""
    tensors = adapter_state_dict(model)
    if not tensors:
        raise UserError("the model has no adapters to save",
                        fix="call inject_adapters before saving adapters")
    meta = {"format": "fmri2text-adapters", "extra": json.dumps(metadata or {})}
    write_safetensors(path, tensors, meta)


def load_adapters(model: nn.Module, path: str | Path) -> dict:
    """Load an adapter-only safetensors file into an adapted ``model``; return its metadata.

    Every adapter of the model must be in the file and vice versa, with equal shapes;
    otherwise a UserError names the file, the keys or the key and both shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("adapter file not found", path=path, fix="pass an existing .safetensors file")
    own = adapter_state_dict(model)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise UserError(f"not a readable safetensors file ({err})", path=path,
                        fix="pass a file written by save_adapters") from None
    check_state(own, state, path, what="adapter",
                keys_fix="inject adapters with the same patterns as when the file was saved",
                shape_fix="inject adapters with the rank used when the file was saved")
    model.load_state_dict(state, strict=False)
    return json.loads(meta.get("extra", "{}"))
