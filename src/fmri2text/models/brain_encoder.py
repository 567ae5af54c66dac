"""SC-MBM brain encoder: a pre-norm ViT over fMRI tokens, with an MAE decoder for pretraining.

``BrainMAE`` = tokenizer (``tokenizer3d``) → ``BrainEncoder`` (cls token + positional
embedding + ViT blocks) → ``MAEDecoder``. Masked brain modeling (MBM) hides 75 % of the
tokens per sample, encodes the visible ones, decodes all positions with mask tokens and
scores the MSE on the masked tokens only, against the tokenizer's per-token target.

Parameter names follow timm / Mind-Vis (``blocks.N.norm1``, ``blocks.N.mlp.fc1``, ``norm``)
except that attention has separate ``query`` / ``key`` / ``value`` projections (Mind-Vis
fuses them as ``qkv``; the importer splits it) so adaptors can wrap the query alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from fmri2text.config import EncoderConfig
from fmri2text.errors import UserError
from fmri2text.io import write_safetensors
from fmri2text.models.state import check_state
from fmri2text.models.tokenizer3d import Tokenizer, build_tokenizer


@dataclass(frozen=True)
class EncoderSpec:
    """Resolved sizes of tokenizer, encoder and MBM decoder."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    tokenizer_channels: tuple[int, ...]
    surface_patch: int = 256
    target_pool: int = 2
    pos_embed: str = "sincos"
    grad_checkpoint: bool = False
    token_standardize: bool = False  # False for specs saved before it existed


PRESETS: dict[str, dict] = {
    # Mind-Vis reference sizes (SC-MBM): embed 1024, depth 24, heads 16, mlp_ratio 1.0
    "mindvis": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=1.0, decoder_embed_dim=512,
                    decoder_depth=8, decoder_num_heads=16, tokenizer_channels=(16, 32, 64, 128)),
    "small": dict(embed_dim=192, depth=4, num_heads=4, mlp_ratio=1.0, decoder_embed_dim=96,
                  decoder_depth=2, decoder_num_heads=4, tokenizer_channels=(16, 32, 64)),
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.0, decoder_embed_dim=16,
                 decoder_depth=1, decoder_num_heads=2, tokenizer_channels=(4, 8)),
}


def spec_from_config(cfg: EncoderConfig) -> EncoderSpec:
    """Preset values, overridden by every field of ``cfg`` that is set; validated."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown encoder preset encoder.preset={cfg.preset!r}",
                        fix="use one of: " + ", ".join(PRESETS))
    values = dict(PRESETS[cfg.preset])
    for key in values:
        v = getattr(cfg, key)
        if v is not None and not (isinstance(v, list) and not v):
            values[key] = tuple(v) if isinstance(v, list) else v
    spec = EncoderSpec(**values, surface_patch=cfg.surface_patch, target_pool=cfg.target_pool,
                       pos_embed=cfg.pos_embed, grad_checkpoint=cfg.grad_checkpoint,
                       token_standardize=cfg.token_standardize)
    if spec.pos_embed not in ("sincos", "learned"):
        raise UserError(f"encoder.pos_embed={spec.pos_embed!r} is not known",
                        fix="use sincos or learned")
    for dim, heads, key in ((spec.embed_dim, spec.num_heads, "embed_dim"),
                            (spec.decoder_embed_dim, spec.decoder_num_heads, "decoder_embed_dim")):
        if dim < 1 or heads < 1 or dim % heads:
            raise UserError(f"encoder.{key}={dim} must be a positive multiple of its head count "
                            f"{heads}", fix=f"change encoder.{key} or the number of heads")
    if spec.depth < 1 or spec.decoder_depth < 1 or spec.mlp_ratio <= 0:
        raise UserError(f"encoder depth {spec.depth}, decoder depth {spec.decoder_depth} and "
                        f"mlp_ratio {spec.mlp_ratio} must be positive", fix="fix the encoder config")
    return spec


def sincos_embedding(coords: torch.Tensor, dim: int, scale: float = 64.0) -> torch.Tensor:
    """Fixed sine-cosine embedding of k-dimensional positions.

    coords: (N, k) in [0, 1] → (N, dim); each axis gets an equal even share of ``dim``
    (MAE's 1D formula on ``coords · scale``), leftover columns are zero.
    """
    n, k = coords.shape
    per_axis = (dim // (2 * k)) * 2
    out = torch.zeros(n, dim)
    if per_axis == 0:
        return out
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2))
    for a in range(k):
        angles = coords[:, a].double().unsqueeze(1) * scale * omega  # (N, per_axis/2)
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, per_axis)
        out[:, a * per_axis:(a + 1) * per_axis] = emb.float()
    return out


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value projections (SDPA kernel)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) → (B, h, N, D/h)
            return t.view(b, n, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                           heads(self.value(x)))  # (B, h, N, D/h)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, max(1, int(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpoint: bool) -> torch.Tensor:
    for blk in blocks:
        if grad_checkpoint and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class BrainEncoder(nn.Module):
    """ViT encoder over N tokens of width D; returns (B, 1 + n_visible, D), cls first."""

    def __init__(self, coords: torch.Tensor, spec: EncoderSpec):
        super().__init__()
        d = spec.embed_dim
        self.num_tokens = coords.shape[0]
        self.grad_checkpoint = spec.grad_checkpoint
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        pos = torch.cat([torch.zeros(1, d), sincos_embedding(coords, d)]).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=spec.pos_embed == "learned")  # (1, 1+N, D)
        self.blocks = nn.ModuleList(Block(d, spec.num_heads, spec.mlp_ratio)
                                    for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, D), keep (B, n) indices of visible tokens or None → (B, 1+n, D)."""
        x = tokens + self.pos_embed[:, 1:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(_run_blocks(self.blocks, x, self.grad_checkpoint))


class MAEDecoder(nn.Module):
    """Lightweight MAE decoder: visible latents + mask tokens → (B, N, F) predictions."""

    def __init__(self, coords: torch.Tensor, spec: EncoderSpec, target_dim: int):
        super().__init__()
        dd = spec.decoder_embed_dim
        self.grad_checkpoint = spec.grad_checkpoint
        self.decoder_embed = nn.Linear(spec.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        pos = torch.cat([torch.zeros(1, dd), sincos_embedding(coords, dd)]).unsqueeze(0)
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)  # (1, 1+N, Dd)
        self.decoder_blocks = nn.ModuleList(Block(dd, spec.decoder_num_heads, spec.mlp_ratio)
                                            for _ in range(spec.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, target_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+n, D), restore (B, N) inverse shuffle → (B, N, F)."""
        x = self.decoder_embed(latent)  # (B, 1+n, Dd)
        b, n_tok = restore.shape
        masks = self.mask_token.expand(b, n_tok - (x.shape[1] - 1), -1)
        x_ = torch.cat([x[:, 1:], masks], dim=1)  # (B, N, Dd) in shuffled order
        x_ = torch.gather(x_, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(_run_blocks(self.decoder_blocks, x, self.grad_checkpoint))
        return self.decoder_pred(x[:, 1:])  # (B, N, F)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def random_masking(batch: int, n_tokens: int, mask_ratio: float,
                   generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Per-sample random masking.

    Returns keep (B, n_keep) visible indices, restore (B, N) inverse permutation and
    mask (B, N) with 1 on masked tokens.
    """
    n_keep = max(1, int(round(n_tokens * (1.0 - mask_ratio))))
    noise = torch.rand(batch, n_tokens, generator=generator).to(device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, n_tokens, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, restore)
    return shuffle[:, :n_keep], restore, mask


class BrainMAE(nn.Module):
    """Tokenizer + SC-MBM encoder + MAE decoder for masked brain modeling."""

    def __init__(self, spec: EncoderSpec, input_shape: tuple[int, ...]):
        super().__init__()
        self.spec = spec
        self.input_shape = tuple(int(s) for s in input_shape)
        self.tokenizer: Tokenizer = build_tokenizer(
            self.input_shape, spec.embed_dim, list(spec.tokenizer_channels), spec.surface_patch,
            spec.target_pool, spec.grad_checkpoint, spec.token_standardize)
        coords = self.tokenizer.token_coords()  # (N, k)
        self.encoder = BrainEncoder(coords, spec)
        self.decoder = MAEDecoder(coords, spec, self.tokenizer.target_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unmasked encoding: (B, T, …) → (B, 1+N, D)."""
        return self.encoder(self.tokenizer(x))

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """MBM step. Returns loss (masked-token MSE), pred/target (B, N, F), mask (B, N)."""
        tokens = self.tokenizer(x)  # (B, N, D)
        keep, restore, mask = random_masking(tokens.shape[0], tokens.shape[1], mask_ratio,
                                             generator, tokens.device)
        pred = self.decoder(self.encoder(tokens, keep), restore)
        target = self.tokenizer.target(x)
        per_token = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
        loss = (per_token * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "target": target, "mask": mask}


def save_mae(model: BrainMAE, path: str | Path) -> None:
    """Write weights + spec + input shape as one safetensors file (atomically)."""
    meta = {"spec": json.dumps(dataclasses.asdict(model.spec)),
            "input_shape": json.dumps(list(model.input_shape))}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(path, tensors, meta)


def load_mae(path: str | Path) -> BrainMAE:
    """Rebuild a :class:`BrainMAE` written by :func:`save_mae`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError("MBM checkpoint not found", path=path,
                        fix="run pretrain-mbm first or pass an existing .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        spec_d = json.loads(meta["spec"])
        spec_d["tokenizer_channels"] = tuple(spec_d["tokenizer_channels"])
        model = BrainMAE(EncoderSpec(**spec_d), tuple(json.loads(meta["input_shape"])))
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise UserError(f"not an fmri2text MBM checkpoint ({err})", path=path,
                        fix="pass a file written by pretrain-mbm") from None
    state = load_file(str(path))
    load_state_checked(model, state, path)
    return model


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict(strict) with a UserError naming file, key and shapes on mismatch."""
    check_state(model.state_dict(), state, path, what="checkpoint",
                keys_fix="use a checkpoint written for this encoder configuration",
                shape_fix="build the encoder with the sizes the checkpoint was trained with")
    model.load_state_dict(state)
