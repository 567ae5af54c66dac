"""Import real checkpoints into the teacher: HF BLIP-2 parts and the Video-LLaMA-2 VL branch.

Two published layouts map onto :class:`~fmri2text.models.teacher.VideoLLaMATeacher` by
explicit key maps (names checked against transformers 5.24's ``modeling_blip_2.py`` and
Video-LLaMA's ``video_llama/models/video_llama.py`` + LAVIS ``Qformer.py``):

HF ``Blip2ForConditionalGeneration`` (safetensors file or model folder, sharded or not)::

    query_tokens                                   (1, 32, 768) -> image_qformer.query_tokens
    qformer.layernorm.{weight,bias}                              -> image_qformer.layernorm.*
    qformer.encoder.layer.N.<rest>                               -> image_qformer.layer.N.<rest>
        <rest>: attention.attention.{query,key,value}.*, attention.output.{dense,LayerNorm}.*,
                crossattention.… (every 2nd layer; key/value (768, 1408)),
                intermediate_query.dense.*, output_query.{dense,LayerNorm}.*
    vision_model.post_layernorm.*                                -> ln_vision.*  (LAVIS ln_vision)
    vision_model.<rest>  (EVA ViT-g: embeddings.*, encoder.layers.N.*) -> visual_encoder.model.<rest>
                         (only when the teacher's backbone is :class:`Blip2VisionBackbone`)
    skipped, listed in the report: language_projection.* (BLIP-2's own LM projection),
    language_model.*, qformer text-branch FFNs (…layer.N.intermediate.*, …layer.N.output.*),
    qformer.embeddings.*

Video-LLaMA-2 (``VL_LLaMA_2_7B_Finetuned.pth``: ``{"model": state_dict, "config": …, …}``)::

    video_query_tokens                       (1, 32, 768)   -> video_qformer.query_tokens
    video_frame_position_embedding.weight    (32, 768)      -> frame_position_embedding.weight
    video_Qformer.bert.embeddings.LayerNorm.*               -> video_qformer.layernorm.*
    video_Qformer.bert.encoder.layer.N.attention.self.{query,key,value}.*
                                                            -> video_qformer.layer.N.attention.attention.*
    video_Qformer.bert.encoder.layer.N.crossattention.self.* -> ….crossattention.attention.*
    video_Qformer.bert.encoder.layer.N.{attention,crossattention}.output.*, intermediate_query.*,
        output_query.*                                      -> same names
    llama_proj.{weight,bias}                 (4096, 768)    -> llama_proj.*
    optional (all or none): Qformer.bert.* / query_tokens / ln_vision.* -> image Q-Former, ln_vision
    skipped: *.position_ids buffers, llama_model.* (rotary buffers), audio_* (AL branch),
    visual_encoder.* (LAVIS EVA naming: take the tower from the HF BLIP-2 checkpoint)

``.pth`` files are read with :func:`fmri2text.models.import_mindvis.read_checkpoint` (torch's
restricted ``weights_only`` unpickler; no code runs). Any key that is neither mapped nor in a
skip rule, any missing teacher tensor and any shape mismatch is a UserError naming the file
and listing the keys; nothing is loaded unless everything matches.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from fmri2text.errors import UserError

#: OpenAI-CLIP normalisation used by BLIP-2's image processor (inputs in [0, 1] RGB).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImportReport:
    """What an import did (write it into the run log)."""

    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)  # our keys that received weights
    skipped: list[str] = field(default_factory=list)  # their keys deliberately not used


# ----------------------------------------------------------------------------- vision tower


class Blip2VisionBackbone(nn.Module):
    """BLIP-2's EVA ViT-g vision tower (transformers ``Blip2VisionModel``) as a frozen backbone.

    ``features`` returns the encoder output *before* ``post_layernorm``: BLIP-2's
    post-layernorm is LAVIS' ``ln_vision``, which the teacher owns (``teacher.ln_vision``).

    Parameters
    ----------
    config:
        A ``Blip2VisionConfig`` (defaults = EVA ViT-g: 1408 wide, 39 layers, patch 14, 224 px).
    """

    def __init__(self, config):
        super().__init__()
        from transformers import Blip2VisionModel

        self.model = Blip2VisionModel(config)
        del self.model.post_layernorm  # lives on as teacher.ln_vision
        self.image_size = int(config.image_size)
        self.width = int(config.hidden_size)  # C
        self.n_patches = (self.image_size // int(config.patch_size)) ** 2 + 1  # P incl. class token
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def features(self, frames: Tensor) -> Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, 1 + (S/14)^2, C) tokens (class token first)."""
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        x = frames.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size),
                                          mode="bicubic", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(dtype)
        h = self.model.embeddings(x)  # (N, 1+P, C)
        return self.model.encoder(inputs_embeds=h).last_hidden_state  # (N, 1+P, C)

    def forward(self, frames: Tensor) -> Tensor:
        return self.features(frames)


def blip2_vision_config(checkpoint: str | Path, image_size: int = 224):
    """The ``Blip2VisionConfig`` of a BLIP-2 checkpoint folder (its config.json), else EVA ViT-g."""
    from transformers import Blip2VisionConfig

    path = Path(checkpoint).expanduser()
    cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    values: dict = {}
    if cfg_file.is_file():
        try:
            values = dict(json.loads(cfg_file.read_text(encoding="utf-8")).get("vision_config") or {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise UserError(f"BLIP-2 config.json is not readable JSON ({err})", path=cfg_file,
                            fix="restore the checkpoint folder's config.json") from None
    values.pop("model_type", None)
    values.setdefault("image_size", image_size)
    return Blip2VisionConfig(**values)


def build_blip2_vision(checkpoint: str | Path, image_size: int = 224) -> Blip2VisionBackbone:
    """A frozen, randomly initialised EVA ViT-g sized by ``checkpoint``; weights come from
    :func:`import_blip2`."""
    backbone = Blip2VisionBackbone(blip2_vision_config(checkpoint, image_size))
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


# ----------------------------------------------------------------------------- reading


class _Source:
    """Lazy tensor access to a checkpoint: only mapped tensors are ever read."""

    def __init__(self, path: Path):
        self.path = path
        self._eager: dict[str, Tensor] | None = None
        self._files: dict[str, Path] = {}
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
                    raise UserError(f"safetensors index is not valid ({err})", path=index,
                                    fix="restore the checkpoint folder") from None
                self._files = {k: path / v for k, v in weight_map.items()}
            elif single.is_file():
                self._files = {k: single for k in self._keys_of(single)}
            else:
                raise UserError("checkpoint folder has no model.safetensors[.index.json]", path=path,
                                fix="pass a transformers model folder or a .safetensors/.pth file")
        elif path.suffix == ".safetensors":
            self._files = {k: path for k in self._keys_of(path)}
        else:
            from fmri2text.models.import_mindvis import read_checkpoint

            self._eager, _, _ = read_checkpoint(path)

    def _keys_of(self, file: Path) -> list[str]:
        from safetensors import SafetensorError, safe_open

        if not file.is_file():
            raise UserError("checkpoint shard not found", path=file, fix="restore the checkpoint folder")
        try:
            with safe_open(str(file), framework="pt") as fh:
                return list(fh.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"not a readable safetensors file ({err})", path=file,
                            fix="re-download or re-save the checkpoint") from None

    def keys(self) -> list[str]:
        return list(self._eager) if self._eager is not None else list(self._files)

    def get(self, key: str) -> Tensor:
        if self._eager is not None:
            return self._eager[key]
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as fh:
            return fh.get_tensor(key)


def _resolve(path: str | Path, what: str, setting: str) -> Path:
    p = Path(path).expanduser()
    if not str(path) or not p.exists():
        raise UserError(f"{what} not found", path=p,
                        fix=f"download it and set {setting} to its path")
    return p


# ----------------------------------------------------------------------------- key maps


def _lavis_layer_rest(rest: str) -> str | None:
    """LAVIS BertLayer suffix -> ours (HF Blip2QFormerLayer names); None for text-branch FFNs."""
    if rest.startswith(("intermediate.", "output.")):
        return None
    return rest.replace("attention.self.", "attention.attention.", 1)


def _map_lavis_qformer(key: str, theirs: str, ours: str) -> str | None:
    """``<theirs>bert.…`` (LAVIS BertModel) -> ``<ours>…``; None when skipped."""
    rest = key[len(theirs):]
    if rest.startswith("embeddings.LayerNorm."):
        return f"{ours}layernorm.{rest.rpartition('.')[2]}"
    m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", rest)
    if m:
        sub = _lavis_layer_rest(m.group(2))
        return None if sub is None else f"{ours}layer.{m.group(1)}.{sub}"
    return None if rest.startswith("embeddings.") else "?"


def blip2_key(key: str, with_vision: bool) -> str | None:
    """HF BLIP-2 key -> teacher key; None = skipped; '?' = unexpected."""
    if key == "query_tokens":
        return "image_qformer.query_tokens"
    if key.startswith("qformer."):
        rest = key[len("qformer."):]
        if rest.startswith("layernorm."):
            return "image_qformer." + rest
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", rest)
        if m:
            if m.group(2).startswith(("intermediate.", "output.")):
                return None  # text-branch FFN (use_qformer_text_input), unused by queries
            return f"image_qformer.layer.{m.group(1)}.{m.group(2)}"
        return None if rest.startswith("embeddings.") else "?"
    if key.startswith("vision_model.post_layernorm."):
        return "ln_vision." + key.rpartition(".")[2]
    if key.startswith("vision_model."):
        return "visual_encoder.model." + key[len("vision_model."):] if with_vision else None
    if key.startswith(("language_projection.", "language_model.")):
        return None
    return "?"


def videollama_key(key: str) -> str | None:
    """Video-LLaMA(-2) key -> teacher key; None = skipped; '?' = unexpected."""
    top = {"video_query_tokens": "video_qformer.query_tokens",
           "video_frame_position_embedding.weight": "frame_position_embedding.weight",
           "llama_proj.weight": "llama_proj.weight", "llama_proj.bias": "llama_proj.bias",
           "query_tokens": "image_qformer.query_tokens",
           "ln_vision.weight": "ln_vision.weight", "ln_vision.bias": "ln_vision.bias"}
    if key in top:
        return top[key]
    if key.endswith("position_ids") or key.startswith(("llama_model.", "audio_", "visual_encoder.")):
        return None
    if key.startswith("video_Qformer.bert."):
        return _map_lavis_qformer(key, "video_Qformer.bert.", "video_qformer.")
    if key.startswith("Qformer.bert."):
        return _map_lavis_qformer(key, "Qformer.bert.", "image_qformer.")
    return "?"


# ----------------------------------------------------------------------------- loading


def _listing(name: str, keys: list[str]) -> str:
    return f"{name} ({len(keys)}): {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"


def _load(teacher: nn.Module, path: Path, kind: str, mapper: Callable[[str], str | None],
          required: Callable[[str], bool], optional_groups: dict[str, Callable[[str], bool]],
          fix: str) -> ImportReport:
    """Map, check (missing / unexpected / shapes) and load; nothing is loaded on any error."""
    src = _Source(path)
    report = ImportReport(path=str(path), kind=kind)
    own = teacher.state_dict()
    mapped: dict[str, str] = {}  # ours -> theirs
    unexpected = []
    for k in src.keys():
        ours = mapper(k)
        if ours is None:
            report.skipped.append(k)
        elif ours == "?" or ours not in own:
            unexpected.append(k)
        else:
            mapped[ours] = k
    want = {k for k in own if required(k)}
    for name, member in optional_groups.items():  # all or none
        group = {k for k in own if member(k)}
        if group & set(mapped):
            want |= group
    missing = sorted(want - set(mapped))
    tensors = {ours: src.get(theirs) for ours, theirs in mapped.items()}
    shapes = sorted(f"{mapped[k]} {tuple(v.shape)} -> {k} {tuple(own[k].shape)}"
                    for k, v in tensors.items() if tuple(v.shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [_listing(n, ks) for n, ks in (("missing", missing), ("unexpected", sorted(unexpected)),
                                               ("wrong shape", shapes)) if ks]
        raise UserError(f"{kind} checkpoint does not match the teacher: " + "; ".join(parts),
                        path=path, fix=fix)
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))  # state_dict tensors share storage with parameters
    report.loaded = sorted(tensors)
    return report


def import_blip2(path: str | Path, teacher: nn.Module) -> ImportReport:
    """Load HF BLIP-2 weights: image Q-Former, query tokens, ``ln_vision`` and (when the
    teacher's backbone is :class:`Blip2VisionBackbone`) the EVA ViT-g tower, in place."""
    path = _resolve(path, "BLIP-2 checkpoint", "teacher.blip2_checkpoint")
    with_vision = isinstance(teacher.visual_encoder, Blip2VisionBackbone)
    required = (lambda k: k.startswith(("image_qformer.", "ln_vision."))
                or (with_vision and k.startswith("visual_encoder.")))
    return _load(teacher, path, "BLIP-2", lambda k: blip2_key(k, with_vision), required, {},
                 fix="build the teacher with the checkpoint's sizes (teacher.preset=videollama2-7b: "
                     "EVA ViT-g, 32 queries, 12 layers, cross-attention every 2nd layer)")


def import_videollama(path: str | Path, teacher: nn.Module) -> ImportReport:
    """Load a Video-LLaMA(-2) vision-language branch: video Q-Former, its query tokens, frame
    position embeddings and ``llama_proj`` (plus the image Q-Former if the file holds it)."""
    path = _resolve(path, "Video-LLaMA checkpoint", "teacher.videollama_checkpoint")
    required = lambda k: k.startswith(("video_qformer.", "frame_position_embedding.", "llama_proj."))  # noqa: E731
    image = lambda k: k.startswith(("image_qformer.", "ln_vision."))  # noqa: E731
    return _load(teacher, path, "Video-LLaMA", videollama_key, required, {"image": image},
                 fix="use a vision-language (VL_…) Video-LLaMA checkpoint and build the teacher "
                     "with its sizes (teacher.preset=videollama2-7b with the matching teacher.llm)")
