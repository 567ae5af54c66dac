"""Training losses as modules that return named scalar terms (open_clip style).

Every ``forward`` returns a ``dict[str, Tensor]`` of 0-d tensors; the composite losses add a
``"total"`` (or ``"da"``) term that the recipe back-propagates, and every term can be logged.

Stage I (DESIGN §2, paper eqs. 1–2)
    :class:`ClipLoss`, :class:`L2L1Loss`, :class:`AlignmentLoss` = β·CLIP + (1−β)·L2L1.
Stage II (paper eqs. 3–6)
    :class:`AnswerCrossEntropy` (answer tokens only) and DANCE domain adaptation
    (Saito et al. 2020): :class:`CosineClassifier` g, :class:`MemoryBank`,
    :class:`NeighborhoodClustering`, :class:`EntropySeparation`, :class:`DanceLoss`;
    :class:`StageTwoLoss` = λ·CE + (1−λ)·DA.

Shapes: B batch, L tokens, D width, S sequence, V vocabulary, C classes, N target samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmri2text.config import LossConfig
from fmri2text.errors import UserError

IGNORE_INDEX = -100
NC_MASK_MODES = ("exclude", "min_similarity")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last axis.

    Entries of ``-inf`` (excluded columns) have probability 0 and contribute 0 (0·log 0 = 0),
    with finite gradients. (The DANCE code uses ``log(p + 1e-5)``; this is the exact value.)

    Parameters
    ----------
    logits : Tensor (..., K)

    Returns
    -------
    Tensor (...)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., K)
    # mask -inf before the product, or its backward computes 0 * -inf = nan
    logp_safe = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp_safe.exp() * logp_safe).sum(dim=-1)


def _pool(t: torch.Tensor) -> torch.Tensor:
    """(B, L, D) → (B, D) by the mean over tokens; (B, D) is returned as is."""
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    raise ValueError(f"expected (B, D) or (B, L, D) embeddings, got shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------- Stage I


class ClipLoss(nn.Module):
    """Symmetric InfoNCE on the cosine similarity of pooled fMRI and video embeddings.

    ``clip = (CE(S, I) + CE(Sᵀ, I)) / 2`` with ``S_ij = cos(z_i, x_j) / τ``: pair i is the
    one positive of row i and of column i. This is the mean of the two directions as in
    CLIP/open_clip; the paper's eq. (1) writes their sum (2× this), a factor that β absorbs.

    Parameters
    ----------
    tau : float
        Temperature (paper: 0.05).
    learnable : bool
        Learn τ; stored as ``log(1/τ)`` (open_clip's ``logit_scale``), initialised at
        ``tau`` and clamped to τ ≥ 0.01 (logit scale ≤ 100).
    """

    def __init__(self, tau: float = 0.05, learnable: bool = False):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        log_scale = torch.tensor(math.log(1.0 / tau))
        if learnable:
            self.logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("logit_scale", log_scale)

    @property
    def tau(self) -> float:
        """The current temperature."""
        return float(1.0 / self.logit_scale.detach().clamp(max=math.log(100.0)).exp())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """z: fMRI embeddings (B, L, D) or (B, D); x: video embeddings of the same shape."""
        zn = F.normalize(_pool(z).float(), dim=-1)  # (B, D)
        xn = F.normalize(_pool(x).float(), dim=-1)  # (B, D)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * zn @ xn.T  # (B, B): row i = fMRI i against every video
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return {"clip": loss}


class L2L1Loss(nn.Module):
    """Weighted squared-L2 and L1 token reconstruction (paper's L2−L1 equation).

    ``l2l1 = mean_{n,l} (1−α)·‖z_n^l − x_n^l‖² + α·‖z_n^l − x_n^l‖₁`` (norms over D).

    Returns ``{"l2": mean ‖·‖², "l1": mean ‖·‖₁, "l2l1": weighted sum}``.
    """

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """z, x: (B, L, D) (or (B, D), one token each)."""
        if z.shape != x.shape:
            raise ValueError(f"z and x differ in shape: {tuple(z.shape)} vs {tuple(x.shape)}")
        diff = z.float() - x.float()  # (B, L, D)
        l2 = diff.pow(2).sum(dim=-1).mean()  # mean over (B, L) of ‖·‖²
        l1 = diff.abs().sum(dim=-1).mean()  # mean over (B, L) of ‖·‖₁
        return {"l2": l2, "l1": l1, "l2l1": (1.0 - self.alpha) * l2 + self.alpha * l1}


class AlignmentLoss(nn.Module):
    """Stage I: ``total = β·clip + (1−β)·l2l1``; returns clip, l2, l1, l2l1 and total."""

    def __init__(self, beta: float = 0.5, alpha: float = 0.5, tau: float = 0.05,
                 learn_tau: bool = False):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.clip = ClipLoss(tau, learnable=learn_tau)
        self.l2l1 = L2L1Loss(alpha)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """z: fMRI tokens (B, L, D); x: the teacher's video tokens (B, L, D)."""
        terms = {**self.clip(z, x), **self.l2l1(z, x)}
        terms["total"] = self.beta * terms["clip"] + (1.0 - self.beta) * terms["l2l1"]
        return terms


# ----------------------------------------------------------------------------- Stage II: CE


class AnswerCrossEntropy(nn.Module):
    """Next-token cross-entropy on answer tokens only (paper eq. 3).

    Position t of ``logits`` predicts token t+1 of ``labels`` (the usual causal shift);
    labels equal to −100 (prefix: fMRI tokens, instruction, template, padding) are ignored.
    The mean is over all answer tokens of the batch. A batch without answer tokens gives
    0 (with a graph, so ``backward`` still works) instead of NaN.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """logits: (B, S, V); labels: (B, S) token ids or −100."""
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                             "must agree on (B, S)")
        shift_logits = logits[:, :-1, :].float()  # (B, S-1, V)
        shift_labels = labels[:, 1:]  # (B, S-1)
        if not bool((shift_labels != IGNORE_INDEX).any()):
            return {"ce": shift_logits.sum() * 0.0}
        ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return {"ce": ce}


# ----------------------------------------------------------------------------- Stage II: DANCE


class CosineClassifier(nn.Module):
    """The classifier g: cosine logits ``normalize(x) · normalize(w_c) / T`` (no bias).

    The rows of ``weight`` are the C class prototypes. ``forward`` normalises them on the
    fly; :meth:`renormalize_` also rescales the stored rows to unit norm in place, as the
    DANCE code does before every step (keeps optimiser updates on the sphere's scale).
    """

    def __init__(self, dim: int, n_classes: int, temperature: float = 0.05):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.weight = nn.Parameter(F.normalize(torch.randn(n_classes, dim), dim=1))  # (C, d)

    def prototypes(self) -> torch.Tensor:
        """Unit-norm class prototypes (C, d), differentiable in ``weight``."""
        return F.normalize(self.weight, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, d) → cosine logits (B, C) divided by the temperature."""
        return F.normalize(features.float(), dim=1) @ self.prototypes().float().T / self.temperature

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Set every weight row to unit L2 norm (in place)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))


class MemoryBank(nn.Module):
    """L2-normalised features of the N target samples, updated by index with momentum.

    ``bank[i] ← normalize(m·bank[i] + (1−m)·normalize(f))``; the first write to a row
    replaces the random initial vector (DANCE's first update; DANCE's default m is 0).
    Rows start as random unit vectors (from torch's global RNG) or are set by
    :meth:`fill` after a first pass over the target data. Buffers (``features``,
    ``filled``) are saved with the model state, so a resumed run sees the same bank.
    """

    def __init__(self, n_target: int, dim: int, momentum: float = 0.0):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("features", F.normalize(torch.randn(n_target, dim), dim=1))  # (N, d)
        self.register_buffer("filled", torch.zeros(n_target, dtype=torch.bool))  # (N,)

    @torch.no_grad()
    def fill(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """Replace rows ``indices`` (B,) by the normalised ``features`` (B, d)."""
        self.features[indices] = F.normalize(features.detach().float(), dim=1)
        self.filled[indices] = True

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """Momentum update of rows ``indices`` (B,) with ``features`` (B, d); call after the step."""
        new = F.normalize(features.detach().float(), dim=1)  # (B, d)
        m = torch.where(self.filled[indices], self.momentum, 0.0).unsqueeze(1)  # (B, 1)
        self.features[indices] = F.normalize(m * self.features[indices] + (1 - m) * new, dim=1)
        self.filled[indices] = True


class NeighborhoodClustering(nn.Module):
    """DANCE neighbourhood clustering (paper eq. 4): entropy of target-to-neighbour similarities.

    For target features f (B, d) (normalised here) with bank rows ``indices`` (B,):
    ``logits = [f·Pᵀ ; f·Mᵀ ; f·fᵀ] / τ`` of shape (B, C + N + B) with P the class
    prototypes (C, d) and M the memory bank (N, d). Masked: the bank columns of *all* the
    batch's indices (their fresh features are in the batch block) and the batch block's
    diagonal (a sample is not its own neighbour). Loss = mean over the batch of
    H(softmax(logits)).

    ``mask="exclude"`` drops masked columns (logit −inf, probability 0), as in the paper's
    ``Σ_{j≠i}``; ``mask="min_similarity"`` sets them to −1/τ (cosine −1), as the public
    DANCE code does — with τ = 0.05 that is ~exclusion, with the paper's τ = 0.5 the masked
    columns keep some probability.
    """

    def __init__(self, tau: float = 0.5, mask: str = "exclude"):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if mask not in NC_MASK_MODES:
            raise ValueError(f"mask must be one of {NC_MASK_MODES}, got {mask!r}")
        self.tau = tau
        self.mask = mask

    def logits(self, features: torch.Tensor, indices: torch.Tensor, prototypes: torch.Tensor,
               memory: torch.Tensor) -> torch.Tensor:
        """The masked similarity logits (B, C + N + B)."""
        f = F.normalize(features.float(), dim=1)  # (B, d)
        b, n = f.shape[0], memory.shape[0]
        to_protos = f @ F.normalize(prototypes.float(), dim=1).T  # (B, C)
        to_memory = f @ memory.detach().float().T  # (B, N), no gradient into the bank
        to_batch = f @ f.T  # (B, B)
        fill = float("-inf") if self.mask == "exclude" else -1.0
        memory_mask = torch.zeros(b, n, dtype=torch.bool, device=f.device)
        memory_mask[:, indices] = True  # (B, N): every row loses the batch's bank columns
        batch_mask = torch.eye(b, dtype=torch.bool, device=f.device)  # (B, B)
        to_memory = to_memory.masked_fill(memory_mask, fill)
        to_batch = to_batch.masked_fill(batch_mask, fill)
        return torch.cat([to_protos, to_memory, to_batch], dim=1) / self.tau

    def forward(self, features: torch.Tensor, indices: torch.Tensor, prototypes: torch.Tensor,
                memory: torch.Tensor) -> torch.Tensor:
        """Mean entropy (0-d) for features (B, d), indices (B,), prototypes (C, d), memory (N, d)."""
        return entropy_from_logits(self.logits(features, indices, prototypes, memory)).mean()


class EntropySeparation(nn.Module):
    """DANCE entropy separation on the class distribution p = softmax(g(f)).

    ``es = −mean_i clamp(|H(p_i) − ρ|, min=m)`` with ρ = ln(C)/2 (DESIGN §2 and the public
    DANCE code). The paper's eq. (5) instead sets the term to 0 when |H − ρ| ≤ m; the two
    differ by the constant m on those samples, so their gradients are identical (zero
    there; −sign(H − ρ)·∇H elsewhere): confident samples get more confident, uncertain
    ones more uncertain.
    """

    def __init__(self, n_classes: int, margin: float = 0.5):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        self.rho = math.log(n_classes) / 2.0
        self.margin = margin

    def forward(self, class_logits: torch.Tensor) -> torch.Tensor:
        """class_logits (B, C) → 0-d loss."""
        h = entropy_from_logits(class_logits)  # (B,)
        return -torch.clamp((h - self.rho).abs(), min=self.margin).mean()


class DanceLoss(nn.Module):
    """DANCE domain adaptation: ``da = CE(g(f_s), y_s) + η·(NC + ES)`` on target features.

    Owns the classifier g (trainable: add its parameters to the optimiser) and the memory
    bank (buffers). Call :meth:`update_memory` with the target batch after each optimiser
    step, and ``classifier.renormalize_()`` before it, as in DANCE.

    Returns ``{"source_ce", "nc", "es", "da"}``.
    """

    def __init__(self, dim: int, n_classes: int, n_target: int, *, tau: float = 0.5,
                 classifier_temperature: float = 0.05, eta: float = 0.05, margin: float = 0.5,
                 momentum: float = 0.0, mask: str = "exclude"):
        super().__init__()
        self.eta = eta
        self.classifier = CosineClassifier(dim, n_classes, classifier_temperature)
        self.memory = MemoryBank(n_target, dim, momentum)
        self.nc = NeighborhoodClustering(tau, mask)
        self.es = EntropySeparation(n_classes, margin)

    def forward(self, source_features: torch.Tensor, source_labels: torch.Tensor,
                target_features: torch.Tensor, target_indices: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """source_features (Bs, d), source_labels (Bs,) in [0, C); target_features (Bt, d),
        target_indices (Bt,) rows of the memory bank."""
        source_ce = F.cross_entropy(self.classifier(source_features), source_labels)
        nc = self.nc(target_features, target_indices, self.classifier.prototypes(),
                     self.memory.features)
        es = self.es(self.classifier(target_features))
        return {"source_ce": source_ce, "nc": nc, "es": es,
                "da": source_ce + self.eta * (nc + es)}

    def update_memory(self, target_features: torch.Tensor, target_indices: torch.Tensor) -> None:
        """Momentum-update the bank rows of this target batch (no gradient)."""
        self.memory.update(target_features, target_indices)


class StageTwoLoss(nn.Module):
    """Stage II: ``total = λ·ce + (1−λ)·da`` (paper eq. 6).

    With ``dance=None`` (domain adaptation off) da is 0, so the total is λ·ce: the same CE
    weight as with DA, which makes "with vs without DA" differ only by the DA term.
    """

    def __init__(self, lambda_: float = 0.5, dance: DanceLoss | None = None):
        super().__init__()
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        self.lambda_ = lambda_
        self.ce = AnswerCrossEntropy()
        self.dance = dance

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                source_features: torch.Tensor | None = None,
                source_labels: torch.Tensor | None = None,
                target_features: torch.Tensor | None = None,
                target_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """logits (B, S, V), labels (B, S); DANCE inputs as in :meth:`DanceLoss.forward`."""
        terms = self.ce(logits, labels)
        da = torch.zeros((), device=logits.device)
        if self.dance is not None:
            if source_features is None or source_labels is None or target_features is None \
                    or target_indices is None:
                raise ValueError("domain adaptation is on: pass source_features, "
                                 "source_labels, target_features and target_indices")
            terms.update(self.dance(source_features, source_labels, target_features,
                                    target_indices))
            da = terms["da"]
        terms["total"] = self.lambda_ * terms["ce"] + (1.0 - self.lambda_) * da
        return terms


# ----------------------------------------------------------------------------- from config


def check_loss_config(cfg: LossConfig, source: str = "config") -> None:
    """Range-check ``cfg`` (the ``loss`` section); a bad value raises UserError naming it."""
    checks = [
        (0.0 <= cfg.alpha <= 1.0, "alpha", cfg.alpha, "in [0, 1]"),
        (0.0 <= cfg.beta <= 1.0, "beta", cfg.beta, "in [0, 1]"),
        (0.0 <= cfg.lambda_ <= 1.0, "lambda_", cfg.lambda_, "in [0, 1]"),
        (cfg.tau_clip > 0, "tau_clip", cfg.tau_clip, "positive (paper: 0.05)"),
        (cfg.dance_tau > 0, "dance_tau", cfg.dance_tau, "positive (paper: 0.5, DANCE: 0.05)"),
        (cfg.classifier_temperature > 0, "classifier_temperature", cfg.classifier_temperature,
         "positive (DANCE: 0.05)"),
        (cfg.eta >= 0, "eta", cfg.eta, "zero or positive (DANCE: 0.05)"),
        (cfg.margin >= 0, "margin", cfg.margin, "zero or positive (DANCE: 0.5)"),
        (0.0 <= cfg.memory_momentum < 1.0, "memory_momentum", cfg.memory_momentum, "in [0, 1)"),
        (cfg.nc_mask in NC_MASK_MODES, "nc_mask", cfg.nc_mask, "one of " + ", ".join(NC_MASK_MODES)),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise UserError(f"config value loss.{key}={value!r} is out of range", path=source,
                            fix=f"loss.{key} must be {allowed}")


def alignment_loss_from_config(cfg: LossConfig) -> AlignmentLoss:
    """The Stage I loss with the config's β, α, τ and learn_tau."""
    check_loss_config(cfg)
    return AlignmentLoss(beta=cfg.beta, alpha=cfg.alpha, tau=cfg.tau_clip, learn_tau=cfg.learn_tau)


def stage_two_loss_from_config(cfg: LossConfig, *, dim: int, n_classes: int,
                               n_target: int) -> StageTwoLoss:
    """The Stage II loss; DANCE over features of width ``dim``, C source classes and the
    N target (adapt) samples, or CE only when ``cfg.domain_adaptation`` is false."""
    check_loss_config(cfg)
    dance = None
    if cfg.domain_adaptation:
        dance = DanceLoss(dim, n_classes, n_target, tau=cfg.dance_tau,
                          classifier_temperature=cfg.classifier_temperature, eta=cfg.eta,
                          margin=cfg.margin, momentum=cfg.memory_momentum, mask=cfg.nc_mask)
    return StageTwoLoss(cfg.lambda_, dance)
