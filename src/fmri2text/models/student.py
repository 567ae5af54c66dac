"""The fMRI student: tokenizer → SC-MBM encoder (+ adaptors) → projector → Z (B, L, d_llm).

The projector turns the encoder's 1+N tokens into exactly L tokens of the LLM width with L
learned queries that cross-attend to the encoder tokens, so Z stands token by token where
the teacher's video tokens X stood.

Trainable in Stage I (paper): tokenizer, adaptors, projector; the encoder base is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmri2text.config import EncoderConfig
from fmri2text.errors import UserError
from fmri2text.models.adapters import ENCODER_PATTERNS, inject_adapters
from fmri2text.models.brain_encoder import BrainEncoder, BrainMAE, spec_from_config
from fmri2text.models.tokenizer3d import Tokenizer


class Projector(nn.Module):
    """Encoder tokens (B, M, D_enc) → (B, L, d_llm) via L learned queries.

    One pre-norm cross-attention block (queries attend to the encoder tokens) and a
    feed-forward block at width ``dim``, then a linear map to ``d_llm``.
    """

    def __init__(self, in_dim: int, out_dim: int, n_queries: int, dim: int = 256,
                 num_heads: int = 4):
        super().__init__()
        if n_queries < 1 or dim % num_heads:
            raise UserError(f"projector needs n_queries >= 1 and a width {dim} divisible by its "
                            f"{num_heads} heads", fix="set encoder.projector_dim / projector_heads")
        self.n_queries = n_queries
        self.queries = nn.Parameter(torch.randn(1, n_queries, dim) * 0.02)  # (1, L, dim)
        self.kv_norm = nn.LayerNorm(in_dim)
        self.kv_proj = nn.Linear(in_dim, dim)
        self.q_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, M, D_enc) → (B, L, d_llm)."""
        kv = self.kv_proj(self.kv_norm(tokens))  # (B, M, dim)
        q = self.queries.expand(tokens.shape[0], -1, -1)  # (B, L, dim)
        attn, _ = self.cross_attn(self.q_norm(q), kv, kv, need_weights=False)
        h = q + attn
        h = h + self.ffn(self.ffn_norm(h))
        return self.out(h)  # (B, L, d_llm)


class Student(nn.Module):
    """fMRI window (B, T, X, Y, Z) or (B, T, V) → Z (B, L, d_llm)."""

    def __init__(self, tokenizer: Tokenizer, encoder: BrainEncoder, projector: Projector):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.projector = projector
        self.adapted: list[str] = []

    @classmethod
    def from_mae(cls, mae: BrainMAE, d_llm: int, n_tokens: int, cfg: EncoderConfig | None = None
                 ) -> "Student":
        """Reuse a (pretrained) MBM model's tokenizer and encoder; its decoder is dropped."""
        cfg = cfg or EncoderConfig()
        proj = Projector(mae.spec.embed_dim, d_llm, n_tokens, cfg.projector_dim,
                         cfg.projector_heads)
        return cls(mae.tokenizer, mae.encoder, proj)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, input_shape: tuple[int, ...], d_llm: int,
                    n_tokens: int) -> "Student":
        """A freshly initialised student (no MBM pretraining)."""
        return cls.from_mae(BrainMAE(spec_from_config(cfg), input_shape), d_llm, n_tokens, cfg)

    def add_adapters(self, rank: int = 8, scale: float = 1.0,
                     patterns: tuple[str, ...] = ENCODER_PATTERNS) -> list[str]:
        """Inject adaptors into the encoder and freeze its base; tokenizer and projector
        stay trainable. Returns the adapted module names."""
        self.adapted = inject_adapters(self.encoder, patterns, rank, scale, freeze_base=True)
        for p in self.tokenizer.parameters():
            p.requires_grad_(True)
        for p in self.projector.parameters():
            p.requires_grad_(True)
        return self.adapted

    def train(self, mode: bool = True) -> "Student":
        """Like ``nn.Module.train``, but a frozen tokenizer stays in eval mode, so its token
        standardiser keeps the statistics it was trained with (Stage II)."""
        super().train(mode)
        if not any(p.requires_grad for p in self.tokenizer.parameters()):
            self.tokenizer.eval()
        return self

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, …) → encoder tokens (B, 1+N, D_enc)."""
        return self.encoder(self.tokenizer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, …) → Z (B, L, d_llm)."""
        return self.projector(self.encode_tokens(x))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised Z (B, d_llm), e.g. for retrieval."""
        return F.normalize(self(x).mean(dim=1), dim=-1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of every parameter that requires grad (tokenizer, adaptors, projector)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k in names}
