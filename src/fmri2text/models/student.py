"""The fMRI student: tokenizer → SC-MBM encoder (+ adaptors) → projector → Z (B, L, d_llm),
plus an optional linear path from the window's mean response straight into token space.

The projector turns the encoder's 1+N tokens into exactly L tokens of the LLM width with L
learned queries that cross-attend to the encoder tokens, so Z stands token by token where
the teacher's video tokens X stood.

The linear path (MindEye2's shared-space linear layer, here across subjects) is ridge
regression from the standardised mean response to the flattened teacher tokens, fitted in
closed form on the training subjects (:meth:`LinearPath.load_ridge`) and stored factored
through the leading principal directions of the training responses. The deep path is
residual to it: its last layer starts at zero, so an untrained student *is* the ridge map
and training can only start from there.

The linear path may also hold a semantic head (:meth:`LinearPath.semantic`): ridge from the
same principal components to the sentence embedding (all-MiniLM-L6-v2) of the teacher's
answer — the `ridge` peer's map. It never feeds the LLM; decoding uses it to choose among the
LLM's own sampled answers the one whose meaning agrees with the brain's
(:func:`fmri2text.models.generation.mbr_choice`). Agreement is measured away from the
training answers' mean embedding (the head's intercept, :attr:`LinearPath.semantic_centre`):
every answer and every prediction share that mean, so a plain cosine rewards the typical
answer; the direction from it carries what this trial says that others do not.

Trainable in Stage I (paper): tokenizer, adaptors, projector (and the linear path's
weights); the encoder base is frozen.
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


class LinearPath(nn.Module):
    """Window (B, T, X', Y', Z') or (B, T, V) → (B, L, d_llm), linear in the mean response.

    ``z = gain · ((mean_t x)[index] − mean) / scale · basis · weight + bias``; ``basis`` (F, r)
    holds fixed principal directions of the training responses, ``weight`` (r, L·d) and
    ``bias`` learn. Starts at zero until :meth:`load_ridge` sets the closed-form solution.
    ``gain`` (a buffer, 1 for the plain ridge map) scales the predicted deviation from the
    mean token: ridge shrinks its predictions toward the mean (held-out correlation ~0.55),
    and the frozen LLM reads a shrunk token as the "average clip"; Stage II chooses it on
    validation CE, as latent-to-image decoders rescale predicted latents.

    Parameters
    ----------
    index : (F,) positions of the brain's features in the flattened input volume.
    rank : r, the number of principal directions kept.
    n_tokens, dim : L and d of the output.
    semantic_dim : width of the semantic head (0: none); its weights are fixed buffers.

    A held-out subject's components are aligned to the training ones by
    :mod:`fmri2text.models.alignment` (CORAL from its unlabelled trials), applied as offsets
    of this path's outputs.
    """

    def __init__(self, index: torch.Tensor, rank: int, n_tokens: int, dim: int,
                 semantic_dim: int = 0):
        super().__init__()
        self.semantic_dim = int(semantic_dim)
        if self.semantic_dim:
            self.register_buffer("sem_weight", torch.zeros(rank, self.semantic_dim))
            self.register_buffer("sem_bias", torch.zeros(self.semantic_dim))
        n = int(index.numel())
        self.n_tokens, self.dim = n_tokens, dim
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).reshape(-1))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("basis", torch.zeros(n, rank))
        self.register_buffer("gain", torch.ones(()))
        # the training trials' component standard deviations (models/alignment.py aligns a
        # new subject to them); zeros: unknown (a student saved before them), no alignment
        self.register_buffer("component_std", torch.zeros(rank))
        self.weight = nn.Parameter(torch.zeros(rank, n_tokens * dim))
        self.bias = nn.Parameter(torch.zeros(n_tokens * dim))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def components(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, …) → (B, r): the standardised mean response in the principal directions."""
        v = x.float().mean(dim=1).flatten(1)[:, self.index]  # (B, F)
        return ((v - self.mean) / self.scale) @ self.basis  # (B, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.components(x)  # (B, r)
        z = self.gain * (h @ self.weight.float()) + self.bias.float()  # (B, L*d)
        return z.view(-1, self.n_tokens, self.dim)

    def semantic(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, …) → (B, semantic_dim): the predicted sentence embedding less
        :attr:`semantic_centre` (the training answers' mean), unit length.
        ``offset`` (B, d_s): cross-fitting offsets (Stage I), added before normalising."""
        if not self.semantic_dim:
            raise ValueError("this linear path has no semantic head")
        s = self.components(x) @ self.sem_weight  # (B, d_s): prediction - intercept
        return F.normalize(s if offset is None else s + offset.to(s.dtype), dim=-1)

    @property
    def semantic_centre(self) -> torch.Tensor:
        """(d_s,) the semantic head's intercept: the mean sentence embedding of the training
        answers (the components are centred on the training trials)."""
        if not self.semantic_dim:
            raise ValueError("this linear path has no semantic head")
        return self.sem_bias

    @torch.no_grad()
    def load_semantic(self, ridge) -> None:
        """Copy a fitted ridge map to sentence embeddings whose principal directions are this
        path's (the same features and rank as :meth:`load_ridge`'s map) into the head."""
        if not self.semantic_dim or ridge.weight_.shape != tuple(self.sem_weight.shape):
            raise ValueError(f"ridge map {ridge.weight_.shape} does not fit the semantic head "
                             f"{(self.rank, self.semantic_dim)}")
        basis = torch.as_tensor(ridge.basis_, dtype=torch.float32)
        if not torch.allclose(basis, self.basis, atol=1e-4):
            raise ValueError("the semantic map was fitted in other principal directions")
        self.sem_weight.copy_(torch.as_tensor(ridge.weight_, dtype=torch.float32))
        self.sem_bias.copy_(torch.as_tensor(ridge.intercept_, dtype=torch.float32))

    @torch.no_grad()
    def load_ridge(self, ridge) -> None:
        """Copy a fitted :class:`~fmri2text.evaluation.baselines.RidgeBaseline` (features =
        the mean response over ``index``, targets = flattened tokens) into this path."""
        if ridge.basis_.shape != tuple(self.basis.shape) or ridge.weight_.shape != tuple(self.weight.shape):
            raise ValueError(f"ridge map {ridge.basis_.shape} x {ridge.weight_.shape} does not fit "
                             f"the linear path {tuple(self.basis.shape)} x {tuple(self.weight.shape)}")
        for name, value in (("mean", ridge.mean_), ("scale", ridge.scale_), ("basis", ridge.basis_),
                            ("weight", ridge.weight_), ("bias", ridge.intercept_),
                            ("component_std", ridge.component_std_)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))


def deep_path_share(z: torch.Tensor, linear_tokens: torch.Tensor) -> dict[str, float]:
    """How much of the student's tokens ``z`` (n, L, d) its deep path makes, and how much of
    that depends on the trial, against the linear path's own tokens ``linear_tokens``
    (n, L, d) of the same trials (with the same offsets).

    The deep path's part is ``z - linear_tokens``; its mean over the trials is what it adds
    to every trial alike (a learned soft prompt), the rest is what it reads from each trial's
    brain. ``trial_ratio``: the RMS of that rest over the RMS of the linear path's own
    trial-to-trial variation (0: the deep path adds one fixed shift; None when the linear
    path does not vary, e.g. over one trial).
    """
    deep = (z - linear_tokens).double()
    lin = linear_tokens.double()
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    mean = deep.mean(dim=0, keepdim=True)
    out = {"trials": int(z.shape[0]), "tokens_rms": rms(z.double()), "deep_rms": rms(deep),
           "deep_shared_rms": rms(mean), "deep_trial_rms": rms(deep - mean),
           "linear_trial_rms": rms(lin - lin.mean(dim=0))}
    out["trial_ratio"] = out["deep_trial_rms"] / out["linear_trial_rms"] \
        if out["linear_trial_rms"] > 0 else None
    return out


def deep_gain_text(deep_gain: float) -> str:
    """How a decoder's tokens are made, for logs, reports and model cards ('' for the whole
    student, deep path at weight 1)."""
    if deep_gain == 1:
        return ""
    return ("from the student's linear path alone (deep path off)" if deep_gain == 0
            else f"with the student's deep path at weight {deep_gain:g}")


class Student(nn.Module):
    """fMRI window (B, T, X, Y, Z) or (B, T, V) → Z (B, L, d_llm)."""

    def __init__(self, tokenizer: Tokenizer, encoder: BrainEncoder, projector: Projector,
                 linear: LinearPath | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.projector = projector
        self.linear = linear
        self.adapted: list[str] = []
        if linear is not None:  # the deep path is residual to the linear one: it starts at 0
            nn.init.zeros_(projector.out.weight)
            nn.init.zeros_(projector.out.bias)

    @classmethod
    def from_mae(cls, mae: BrainMAE, d_llm: int, n_tokens: int, cfg: EncoderConfig | None = None,
                 linear: tuple[torch.Tensor, int] | None = None) -> "Student":
        """Reuse a (pretrained) MBM model's tokenizer and encoder; its decoder is dropped.

        ``linear``: (feature index (F,), rank[, semantic width]) of a :class:`LinearPath`,
        or None for none.
        """
        cfg = cfg or EncoderConfig()
        proj = Projector(mae.spec.embed_dim, d_llm, n_tokens, cfg.projector_dim,
                         cfg.projector_heads)
        path = None if linear is None else LinearPath(linear[0], linear[1], n_tokens, d_llm,
                                                      *linear[2:])
        return cls(mae.tokenizer, mae.encoder, proj, path)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, input_shape: tuple[int, ...], d_llm: int,
                    n_tokens: int, linear: tuple[torch.Tensor, int] | None = None) -> "Student":
        """A freshly initialised student (no MBM pretraining)."""
        return cls.from_mae(BrainMAE(spec_from_config(cfg), input_shape), d_llm, n_tokens, cfg,
                            linear)

    def add_adapters(self, rank: int = 8, scale: float = 1.0,
                     patterns: tuple[str, ...] = ENCODER_PATTERNS) -> list[str]:
        """Inject adaptors into the encoder and freeze its base; tokenizer, projector and
        the linear path's weights stay trainable. Returns the adapted module names.
        ``rank`` 0: no adaptors (the ablation), the encoder wholly frozen."""
        if rank == 0:
            self.encoder.requires_grad_(False)
            self.adapted = []
        else:
            self.adapted = inject_adapters(self.encoder, patterns, rank, scale, freeze_base=True)
        for module in (self.tokenizer, self.projector, self.linear):
            for p in module.parameters() if module is not None else ():
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

    def forward(self, x: torch.Tensor, deep_gain: float = 1.0) -> torch.Tensor:
        """(B, T, …) → Z (B, L, d_llm): the deep path times ``deep_gain``, plus the linear path
        when there is one. ``deep_gain`` 0 with a linear path: the linear path alone (the deep
        path is not run); decoding may choose it on validation (``pipeline.decode_deep_gain``)."""
        if deep_gain == 0 and self.linear is not None:
            return self.linear(x)  # (B, L, d_llm)
        z = self.projector(self.encode_tokens(x))  # (B, L, d_llm)
        if deep_gain != 1:
            z = z * deep_gain
        return z if self.linear is None else z + self.linear(x).to(z.dtype)

    def cross_fitted(self, z: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """Z (B, L, d) of trials the linear path was fitted on, as a new subject's would be:
        plus their cross-fitting offsets (Stage I's, the leave-their-subject-out minus the
        in-sample prediction, fitted at gain 1) times the path's gain, since the offsets are
        differences of predicted deviations and the gain scales those. Without the gain, a
        trial at gain g would get (g − 1) × its in-sample deviation + its held-out one: inputs
        cleaner than a new subject's, which favoured large gains on validation."""
        if offset is None:
            return z
        gain = self.linear.gain if self.linear is not None else 1.0
        return z + (gain * offset.to(device=z.device, dtype=torch.float32)).to(z.dtype)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised Z (B, d_llm), e.g. for retrieval."""
        return F.normalize(self(x).mean(dim=1), dim=-1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of every parameter that requires grad (tokenizer, adaptors, projector)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k in names}
