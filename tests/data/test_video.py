"""Video decoding with PyAV: uniform sampling, resize/normalise in torch, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmri2text.data.video import (IMAGENET_MEAN, IMAGENET_STD, decode_frames, read_frames,
                                  resize_center_crop, sample_indices)
from fmri2text.errors import UserError


def _write_mp4(path: Path, n_frames=12, h=32, w=48) -> Path:
    """Frame i is flat grey at level 20*i: the sampled frames' order is visible in their means."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n_frames):
            img = np.full((h, w, 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_read_frames_shape_order_and_normalisation(tmp_path: Path):
    clip = _write_mp4(tmp_path / "clip.mp4")
    x = read_frames(clip, n_frames=4, size=16)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    # un-normalise: the sampled frames are 1, 4, 7, 10 of 12 (centres of 4 equal segments)
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    levels = rgb.mean(dim=(1, 2, 3)).numpy() * 255
    np.testing.assert_allclose(levels, [20, 80, 140, 200], atol=6)
    np.testing.assert_array_equal(sample_indices(12, 4), [1, 4, 7, 10])


def test_read_frames_equals_every_frame_decoded_then_sampled(tmp_path: Path):
    """Only the sampled frames are converted to RGB, and [0, 1] output skips normalising:
    both give exactly what converting every frame and normalising with (0, 1) gave."""
    clip = _write_mp4(tmp_path / "clip.mp4", n_frames=11, h=24, w=40)
    every = [f.to_ndarray(format="rgb24") for f in decode_frames(clip)]  # all 11, converted
    picked = np.stack([every[i] for i in sample_indices(len(every), 5)])
    ref = resize_center_crop(torch.from_numpy(picked).permute(0, 3, 1, 2).float().div_(255.0), 16)
    raw = read_frames(clip, n_frames=5, size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.equal(raw, ref) and raw.is_contiguous()
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(read_frames(clip, n_frames=5, size=16), ((ref - m) / s).contiguous())


def test_missing_undecodable_and_short_clips(tmp_path: Path):
    with pytest.raises(UserError, match="not found") as err:
        read_frames(tmp_path / "nope.mp4", 4, 16)
    assert err.value.path == tmp_path / "nope.mp4"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(UserError, match="cannot decode") as err:
        read_frames(bad, 4, 16)
    assert err.value.path == bad
    short = _write_mp4(tmp_path / "short.mp4", n_frames=3)
    with pytest.raises(UserError, match="fewer than"):
        read_frames(short, 8, 16)
