"""fMRI tokenizers: whole volumes (3D CNN) or surfaces (1D patches) → a token sequence.

Both tokenizers share one interface, so the encoder never cares which one it is given:

* ``forward(x) -> (B, N, D)`` tokens,
* ``num_tokens`` (N), ``embed_dim`` (D), ``input_shape`` (the shape of one sample),
* ``token_coords() -> (N, k)`` token positions in [0, 1] (for positional embeddings),
* ``target(x) -> (B, N, F)`` the masked-brain-modeling target of each token, ``target_dim`` (F).

Optionally (``standardize``) the tokens leave through a :class:`TokenStandardizer`: every
token feature is standardised across trials (batch statistics in training, running ones at
inference). Without it the trial-invariant part of the tokens (conv biases, the brain-mask
edge, the same anatomy in every window) is ~14x the trial-specific part on the simulated
data, and the student downstream maps every trial to nearly the same Z (BENCHMARKS.md).

MBM target, defined once here: each token owns a *cell* of the input (a block of
``stride³`` voxels for volumes, ``patch`` grayordinates for surfaces). The cell is
average-pooled into ``bins`` sub-blocks per axis (volumes) or ``bins`` segments (surfaces)
for every time point, flattened to F = T · bins³ (volumes) or T · bins (surfaces) values,
then normalised per window: zero mean and unit variance over all its tokens and features.
Unlike MAE's per-patch ``norm_pix_loss`` this keeps the activation level of each token
relative to the others, which is the fMRI signal. Predicting the training mean of this
target scores an MSE of about 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fmri2text.errors import UserError


def _check_shape(x: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
        raise UserError(
            f"{what} input has shape {tuple(x.shape[1:])} per sample (batch {x.shape[0]}), "
            f"but the tokenizer was configured for {tuple(expected)}",
            fix="prepare the data on the grid the encoder was built for (same resolution, "
                "field of view and window T), or rebuild the encoder for this grid")


def _normalise_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, N, F) → same, zero mean / unit variance per window over N and F."""
    mean = t.mean(dim=(1, 2), keepdim=True)
    var = t.var(dim=(1, 2), keepdim=True, unbiased=False)
    return (t - mean) / (var + 1e-6).sqrt()


class TokenStandardizer(nn.BatchNorm1d):
    """(B, N, D) → same, each of the N·D features standardised across the batch.

    BatchNorm without affine parameters over the flattened token features: training uses
    the batch's statistics and updates running ones; evaluation, and a training batch of one
    sample (no spread to measure), use the running ones. The running update is bias-corrected:
    momentum max(``momentum``, 1/(batches seen + 1)), so the statistics are the plain average
    of the first batches instead of staying near their initial 0/1 after a short run.
    """

    def __init__(self, num_tokens: int, dim: int, momentum: float = 0.05):
        super().__init__(num_tokens * dim, affine=False, momentum=momentum)
        self.base_momentum = momentum

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(1)  # (B, N·D)
        if self.training and flat.shape[0] < 2:
            flat = F.batch_norm(flat, self.running_mean, self.running_var, training=False,
                                eps=self.eps)
        else:
            if self.training:
                self.momentum = max(self.base_momentum, 1.0 / (int(self.num_batches_tracked) + 1))
            flat = super().forward(flat)
        return flat.view_as(tokens)


class VolumeTokenizer(nn.Module):
    """Spatio-temporal 3D CNN: (B, T, X, Y, Z) → super-voxel tokens (B, N, D).

    Time is the channel axis. Every stage is a stride-2 3×3×3 convolution, GroupNorm and
    GELU, so the first layer already works at half resolution and no wide layer ever sees
    the full-resolution volume; a linear layer maps the last stage's channels to D.

    Parameters
    ----------
    input_shape:
        (T, X, Y, Z) of one sample, e.g. (4, 100, 100, 72) for a HAD-native window.
    embed_dim:
        Token width D.
    channels:
        Output channels of each stride-2 stage; N = prod(ceil(X / 2^len(channels)), …).
    target_bins:
        Sub-blocks per axis of each token's cell in the MBM target (must divide 2^stages).
    grad_checkpoint:
        Recompute stage activations in backward instead of storing them.
    standardize:
        Pass the tokens through a :class:`TokenStandardizer`.
    """

    def __init__(self, input_shape: tuple[int, int, int, int], embed_dim: int,
                 channels: list[int] | tuple[int, ...], target_bins: int = 2,
                 grad_checkpoint: bool = False, standardize: bool = False):
        super().__init__()
        if len(input_shape) != 4 or min(input_shape) < 1:
            raise UserError(f"a volume tokenizer needs input shape (T, X, Y, Z), got {input_shape}",
                            fix="pass the window length and the 3D grid of the prepared data")
        if not channels:
            raise UserError("the volume tokenizer needs at least one stage",
                            fix="set encoder.tokenizer_channels to e.g. [16, 32, 64]")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.embed_dim = embed_dim
        self.stride = 2 ** len(channels)
        if target_bins < 1 or self.stride % target_bins:
            raise UserError(f"encoder.target_pool={target_bins} must divide the token cell size "
                            f"{self.stride}", fix=f"use a divisor of {self.stride}, e.g. 2")
        self.target_bins = target_bins
        self.grad_checkpoint = grad_checkpoint
        stages = []
        c_in = self.input_shape[0]
        for c_out in channels:
            stages.append(nn.Sequential(
                nn.Conv3d(c_in, c_out, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.GELU()))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Linear(c_in, embed_dim)
        # token grid: each stage maps n → ceil(n / 2)
        grid = list(self.input_shape[1:])
        for _ in channels:
            grid = [(g + 1) // 2 for g in grid]
        self.grid = tuple(grid)
        self.num_tokens = math.prod(self.grid)
        self.target_dim = self.input_shape[0] * target_bins ** 3
        self.standardize = TokenStandardizer(self.num_tokens, embed_dim) if standardize else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, X, Y, Z) → (B, N, D), N = gx·gy·gz in C order."""
        _check_shape(x, self.input_shape, "volume")
        h = x
        for stage in self.stages:  # (B, C, X/2^k, Y/2^k, Z/2^k)
            if self.grad_checkpoint and torch.is_grad_enabled():
                h = checkpoint(stage, h, use_reentrant=False)
            else:
                h = stage(h)
        h = h.flatten(2).transpose(1, 2)  # (B, N, C_last)
        tokens = self.proj(h)  # (B, N, D)
        return tokens if self.standardize is None else self.standardize(tokens)

    def token_coords(self) -> torch.Tensor:
        """(N, 3) token cell centres, each axis scaled to [0, 1]."""
        axes = [torch.linspace(0.0, 1.0, g) if g > 1 else torch.zeros(1) for g in self.grid]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, X, Y, Z) → (B, N, T·bins³) per-window normalised MBM target."""
        _check_shape(x, self.input_shape, "volume")
        b, t = x.shape[:2]
        s, p = self.stride, self.target_bins
        pad = []
        for size, g in zip(reversed(self.input_shape[1:]), reversed(self.grid)):
            pad += [0, g * s - size]  # zero-pad each axis up to grid · stride
        xp = F.pad(x, pad)  # (B, T, gx·s, gy·s, gz·s)
        pooled = F.avg_pool3d(xp, kernel_size=s // p)  # (B, T, gx·p, gy·p, gz·p)
        gx, gy, gz = self.grid
        cells = pooled.reshape(b, t, gx, p, gy, p, gz, p)
        cells = cells.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gx, gy, gz, T, p, p, p)
        return _normalise_tokens(cells.reshape(b, self.num_tokens, self.target_dim))


class SurfaceTokenizer(nn.Module):
    """1D patch tokenizer for surface / CIFTI data: (B, T, V) → (B, N, D).

    Grayordinates are cut into consecutive patches of ``patch`` values (the last patch
    zero-padded), each patch (T·patch values, time as channels) linearly embedded to D,
    like Mind-Vis' ``PatchEmbed1D``.

    Parameters
    ----------
    input_shape:
        (T, V) of one sample; V comes from the CIFTI header (e.g. 91,282), never hard-coded.
    embed_dim:
        Token width D.
    patch:
        Grayordinates per token.
    target_bins:
        Segments per patch in the MBM target (must divide ``patch``).
    standardize:
        Pass the tokens through a :class:`TokenStandardizer`.
    """

    def __init__(self, input_shape: tuple[int, int], embed_dim: int, patch: int = 256,
                 target_bins: int = 8, grad_checkpoint: bool = False, standardize: bool = False):
        super().__init__()
        if len(input_shape) != 2 or min(input_shape) < 1:
            raise UserError(f"a surface tokenizer needs input shape (T, V), got {input_shape}",
                            fix="pass the window length and the number of grayordinates")
        if patch < 1 or target_bins < 1 or patch % target_bins:
            raise UserError(f"surface patch {patch} must be a positive multiple of the target "
                            f"bins {target_bins}", fix="set encoder.surface_patch to e.g. 256")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.embed_dim = embed_dim
        self.patch = patch
        self.target_bins = target_bins
        t, v = self.input_shape
        self.num_tokens = -(-v // patch)
        self.grid = (self.num_tokens,)
        self.target_dim = t * target_bins
        self.proj = nn.Conv1d(t, embed_dim, kernel_size=patch, stride=patch)
        self.standardize = TokenStandardizer(self.num_tokens, embed_dim) if standardize else None

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [0, self.num_tokens * self.patch - self.input_shape[1]])  # (B, T, N·P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, V) → (B, N, D)."""
        _check_shape(x, self.input_shape, "surface")
        tokens = self.proj(self._pad(x)).transpose(1, 2)  # (B, N, D)
        return tokens if self.standardize is None else self.standardize(tokens)

    def token_coords(self) -> torch.Tensor:
        """(N, 1) patch positions along the grayordinate axis, in [0, 1]."""
        return torch.linspace(0.0, 1.0, self.num_tokens).unsqueeze(-1)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, V) → (B, N, T·bins) per-window normalised MBM target."""
        _check_shape(x, self.input_shape, "surface")
        b, t = x.shape[:2]
        pooled = F.avg_pool1d(self._pad(x), kernel_size=self.patch // self.target_bins)
        cells = pooled.reshape(b, t, self.num_tokens, self.target_bins).permute(0, 2, 1, 3)
        return _normalise_tokens(cells.reshape(b, self.num_tokens, self.target_dim))


Tokenizer = VolumeTokenizer | SurfaceTokenizer


def build_tokenizer(input_shape: tuple[int, ...], embed_dim: int, channels: list[int],
                    surface_patch: int = 256, target_pool: int = 2,
                    grad_checkpoint: bool = False, standardize: bool = False) -> Tokenizer:
    """A volume tokenizer for (T, X, Y, Z) inputs, a surface one for (T, V) inputs."""
    if len(input_shape) == 4:
        return VolumeTokenizer(input_shape, embed_dim, channels, target_bins=target_pool,
                               grad_checkpoint=grad_checkpoint, standardize=standardize)
    if len(input_shape) == 2:
        bins = min(surface_patch, target_pool ** 3)
        while surface_patch % bins:
            bins -= 1
        return SurfaceTokenizer(input_shape, embed_dim, patch=surface_patch, target_bins=bins,
                                standardize=standardize)
    raise UserError(f"fMRI samples must be (T, X, Y, Z) volumes or (T, V) surfaces, got shape "
                    f"{tuple(input_shape)}", fix="check the prepared data's window layout")
