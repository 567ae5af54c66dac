"""Import Mind-Vis / MinD-Video SC-MBM encoder checkpoints into our :class:`BrainEncoder`.

Their files are ``torch.save`` pickles ``{'model': state_dict, 'config': <Config_MBM_fMRI>,
…}``. They are read with torch's restricted ``weights_only`` unpickler, which only rebuilds
tensors, OrderedDicts and plain containers. Before loading, the pickle's globals are listed
statically (nothing runs): a global whose class name looks like a config class
(``Config…`` / ``…Config``) is mapped to :class:`PickledConfig`, an inert stand-in that just
records the pickled attributes; any other global (``os.system``, ``builtins.eval``, numpy
objects, …) makes the import fail with a UserError before unpickling.

Assumed key layout (timm ViT names as in Mind-Vis' ``MAEforFMRI`` / MinD-Video's encoder):
``cls_token`` (1,1,D), ``pos_embed`` (1,1+N,D), ``patch_embed.proj.{weight,bias}`` (Conv1d),
``blocks.i.norm1.*``, ``blocks.i.attn.qkv.{weight,bias}`` (3D,D)/(3D), ``blocks.i.attn.proj.*``,
``blocks.i.norm2.*``, ``blocks.i.mlp.fc1.*``, ``blocks.i.mlp.fc2.*``, ``norm.*``; MAE decoder
keys ``decoder_*`` and ``mask_token`` are skipped (our decoder predicts a different target).
A leading ``module.`` (DDP) is stripped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fmri2text.errors import UserError
from fmri2text.models.brain_encoder import BrainEncoder

_CONFIG_NAME = re.compile(r"^(Config\w*|\w*Config)$")
_FORBIDDEN_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__",
                      "importlib", "shutil", "socket", "pickle", "runpy", "code", "ctypes"}

# their key (after stripping 'blocks.i.') → our key suffix
_BLOCK_MAP = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_MAP = {"cls_token": "cls_token", "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
_REPLACED_PREFIX = "patch_embed."  # replaced by our tokenizer: the one allowed gap
_SKIPPED_PREFIXES = ("decoder_", "mask_token")


class PickledConfig:
    """Inert stand-in for a pickled config object: only holds the unpickled attributes."""

    pickled_name = "?"

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class ImportReport:
    """What an import did (write it into the run log)."""

    path: str
    loaded: list[str] = field(default_factory=list)  # our keys that received weights
    replaced: list[str] = field(default_factory=list)  # their patch-embedding keys, not used
    skipped: list[str] = field(default_factory=list)  # their MAE-decoder keys, not used
    pos_embed_interpolated: tuple[int, int] | None = None  # (their N, our N)
    config: dict = field(default_factory=dict)
    config_class: str | None = None


def _stand_in(full_name: str) -> type:
    return type(full_name.rpartition(".")[2], (PickledConfig,), {"pickled_name": full_name})


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    """Read a Mind-Vis-style checkpoint without executing code.

    Returns (state_dict, config attributes, config class name or None).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path=path, fix="pass an existing .pth file")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError) as err:  # not a zip-format torch.save file
        unsafe = []
        zip_error = str(err)
    else:
        zip_error = None
    refused = [g for g in unsafe if g.partition(".")[0] in _FORBIDDEN_MODULES
               or not _CONFIG_NAME.match(g.rpartition(".")[2])]
    if refused:
        raise UserError(f"checkpoint refers to code objects that are never loaded: {refused}",
                        path=path, fix="only tensors, containers and a config object are accepted;"
                        " re-save the state dict with torch.save(model.state_dict())")
    stand_ins = [(_stand_in(g), g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError from a corrupt archive, …
        hint = f" (not a zip checkpoint: {zip_error})" if zip_error else ""
        raise UserError(f"cannot read the checkpoint safely: {str(err).splitlines()[0]}{hint}",
                        path=path, fix="pass a torch.save file holding a state dict") from None
    config, config_class = {}, None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        cfg_obj = obj.get("config")
        if isinstance(cfg_obj, PickledConfig):
            config, config_class = cfg_obj.as_dict(), cfg_obj.pickled_name
        elif isinstance(cfg_obj, dict):
            config = dict(cfg_obj)
        state = obj["model"]
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise UserError("checkpoint holds neither {'model': state_dict, …} nor a state dict",
                        path=path, fix="pass a Mind-Vis / MinD-Video encoder checkpoint")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    return state, config, config_class


def interpolate_pos_embed(pos: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(1, 1+M, D) → (1, 1+n_tokens, D): cls position kept, the rest linearly resampled."""
    cls, rest = pos[:, :1], pos[:, 1:]  # (1, 1, D), (1, M, D)
    rest = F.interpolate(rest.transpose(1, 2), size=n_tokens, mode="linear",
                         align_corners=True).transpose(1, 2)
    return torch.cat([cls, rest], dim=1)


def _map_keys(state: dict[str, torch.Tensor], report: ImportReport
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Their keys → our keys (qkv split in three).

    Returns (mapped tensors, our key → their key, unexpected keys).
    """
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected = []
    block_key = re.compile(r"^blocks\.(\d+)\.(.+)$")
    for k, v in state.items():
        m = block_key.match(k)
        if k in _TOP_MAP:
            mapped[_TOP_MAP[k]], source[_TOP_MAP[k]] = v, k
        elif k == "pos_embed":
            mapped["pos_embed"], source["pos_embed"] = v, k
        elif k.startswith(_REPLACED_PREFIX):
            report.replaced.append(k)
        elif k.startswith(_SKIPPED_PREFIXES):
            report.skipped.append(k)
        elif m and m.group(2) in _BLOCK_MAP:
            ours = f"blocks.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
            mapped[ours], source[ours] = v, k
        elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = m.group(2).rpartition(".")[2]
            if v.shape[0] % 3:
                raise UserError(f"checkpoint tensor '{k}' has shape {tuple(v.shape)}: its first "
                                "axis is not 3 × the embedding width", path=report.path,
                                fix="pass an unmodified Mind-Vis encoder checkpoint")
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                ours = f"blocks.{m.group(1)}.attn.{name}.{kind}"
                mapped[ours], source[ours] = part, f"{k} ({name} third)"
        else:
            unexpected.append(k)
    return mapped, source, unexpected


def import_mindvis(path: str | Path, encoder: BrainEncoder) -> ImportReport:
    """Load a Mind-Vis / MinD-Video encoder checkpoint into ``encoder`` (in place).

    Every encoder tensor must come from the checkpoint (shape-checked; ``pos_embed`` is
    interpolated when the token count differs) and every checkpoint key must be used, except
    the patch embedding (replaced by our tokenizer; listed in ``report.replaced``) and the
    MAE decoder (``report.skipped``). Anything else raises a UserError listing the keys.
    """
    path = Path(path)
    state, config, config_class = read_checkpoint(path)
    report = ImportReport(path=str(path), config=config, config_class=config_class)
    mapped, source, unexpected = _map_keys(state, report)
    own = {k: v for k, v in encoder.state_dict().items() if ".adapter." not in f".{k}"}
    missing = sorted(set(own) - set(mapped))
    unexpected += sorted({source[k].split(" (")[0] for k in set(mapped) - set(own)})
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match the encoder: missing {missing[:12]}"
            f"{' …' if len(missing) > 12 else ''} ({len(missing)}), unexpected "
            f"{unexpected[:12]}{' …' if len(unexpected) > 12 else ''} ({len(unexpected)}); "
            f"replaced by our tokenizer: {report.replaced}", path=path,
            fix="build the encoder with the checkpoint's depth and widths (its config: "
                f"{ {k: config.get(k) for k in ('embed_dim', 'depth', 'num_heads', 'mlp_ratio')} })")
    pos = mapped["pos_embed"]
    want = own["pos_embed"].shape
    if pos.dim() == 3 and pos.shape[2] == want[2] and pos.shape[1] != want[1] and pos.shape[1] > 1:
        report.pos_embed_interpolated = (pos.shape[1] - 1, want[1] - 1)
        mapped["pos_embed"] = interpolate_pos_embed(pos, want[1] - 1)
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"checkpoint tensor '{source[k]}' has shape {tuple(v.shape)}, the "
                            f"encoder's '{k}' expects {tuple(own[k].shape)}", path=path,
                            fix="build the encoder with the checkpoint's sizes (e.g. "
                                "encoder.preset=mindvis for Mind-Vis: embed 1024, depth 24)")
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=False)
    report.loaded = sorted(mapped)
    return report
