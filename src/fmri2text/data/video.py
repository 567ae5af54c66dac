"""Video clips to frame tensors: PyAV decoding, uniform frame sampling, resize in torch.

No torchvision (it does not import beside this torch build): frames are decoded to RGB
with PyAV, the shorter side is resized to ``size`` with antialiased bilinear interpolation
(``torch.nn.functional.interpolate``), the centre ``size × size`` square is kept, and the
result is normalised with the ImageNet mean/std unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmri2text.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_frames(path: str | Path) -> list:
    """Every frame of the first video stream, decoded (``av.VideoFrame``, not yet converted)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise UserError("video file not found", path=path,
                        fix="check stim_file in the events file and the stimuli/ folder")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError("file has no video stream", path=path, fix="pass an mp4 video")
            return list(container.decode(container.streams.video[0]))
    except UserError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise UserError(f"cannot decode the video: {err}", path=path,
                        fix="re-encode the clip (e.g. H.264 mp4) or replace the file") from None


def sample_indices(n_available: int, n_frames: int) -> np.ndarray:
    """``n_frames`` indices spread uniformly: the centre frame of each of n equal segments."""
    return np.floor((np.arange(n_frames) + 0.5) * n_available / n_frames).astype(np.int64)


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(F, 3, H, W) float → (F, 3, size, size): shorter side to ``size``, then centre crop."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False,
                        antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return out[..., top:top + size, left:left + size]


def read_frames(path: str | Path, n_frames: int, size: int,
                mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """F frames of a clip, sampled uniformly over its length, resized and normalised.

    Parameters
    ----------
    path:
        An mp4 (any container/codec FFmpeg reads).
    n_frames:
        F, the number of frames to return.
    size:
        Output side in pixels (square).
    mean, std:
        Per-channel normalisation of [0, 1] RGB values (ImageNet by default).

    Returns
    -------
    torch.Tensor
        (F, 3, size, size) float32.
    """
    if n_frames < 1 or size < 1:
        raise UserError(f"n_frames={n_frames} and size={size} must both be at least 1",
                        fix="ask for one or more frames of at least 1 pixel")
    frames = decode_frames(path)
    if len(frames) < n_frames:
        raise UserError(f"the clip has {len(frames)} frames, fewer than the {n_frames} requested",
                        path=path, fix="use a longer clip or request fewer frames")
    # only the sampled frames are converted to RGB (the conversion costs more than decoding)
    picked = np.stack([frames[i].to_ndarray(format="rgb24")
                       for i in sample_indices(len(frames), n_frames)])  # (F, H, W, 3)
    x = torch.from_numpy(picked).permute(0, 3, 1, 2).float().div_(255.0)  # (F, 3, H, W)
    x = resize_center_crop(x, size)
    if tuple(mean) == (0.0, 0.0, 0.0) and tuple(std) == (1.0, 1.0, 1.0):
        return x.contiguous()  # [0, 1] asked for (the teacher's backbone normalises itself)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()
