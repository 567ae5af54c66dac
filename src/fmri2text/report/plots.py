"""Figures of the HTML report, each returned as a self-contained ``data:image/png`` URI.

Every figure is drawn on a bare :class:`matplotlib.figure.Figure` (no pyplot, no global
state, no display needed), rendered to PNG in memory and base64-encoded, so the report
embeds its images and opens offline.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fmri2text.errors import UserError

#: Colours: the decoder, then controls (shuffled, prompt-only, ridge, any other).
DECODER_COLOUR = "#2b6cb0"
TOTAL_COLOUR = "#1a365d"
CONTROL_COLOURS = {"shuffled": "#c53030", "prompt_only": "#dd6b20", "ridge": "#2f855a",
                   "ridge_tokens": "#38a169"}
OTHER_COLOURS = ["#6b46c1", "#b7791f", "#319795", "#718096"]
DPI = 100


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_to_data_uri(fig: Figure, dpi: int = DPI) -> str:
    """Render ``fig`` to PNG in memory and return it as a data URI.

    Layout is set by each figure (``subplots_adjust``): constrained layout and
    ``bbox_inches="tight"`` each cost an extra draw, about doubling the time.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return png_data_uri(buf.getvalue())


def control_colour(name: str, index: int) -> str:
    """Fixed colour of a known control, else one from a small cycle."""
    return CONTROL_COLOURS.get(name, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="y", color="#e2e8f0", linewidth=0.8)
    ax.set_axisbelow(True)


# ----------------------------------------------------------------------------- metric bars


def metric_bars(rows: Mapping[str, Mapping[str, float]], controls: Mapping[str, Mapping[str, float]],
                metrics: Sequence[tuple[str, str]], title: str = "") -> str | None:
    """Bar plot of each metric per subject (and Total), control levels drawn as lines.

    Parameters
    ----------
    rows:
        label (``sub-05`` ..., ``Total``) → METRICS of the decoder.
    controls:
        control name → METRICS of the control in total; each is drawn as a dashed line
        across every panel at its total level.
    metrics:
        (title, key) of the panels; a metric no row has is left out.
    title:
        Figure title.

    Returns
    -------
    The PNG data URI, or None when there is nothing to draw.
    """
    metrics = [(t, k) for t, k in metrics if any(_num(m.get(k)) is not None for m in rows.values())]
    if not rows or not metrics:
        return None
    labels = list(rows)
    ncol = min(4, len(metrics))
    nrow = -(-len(metrics) // ncol)
    height = 2.7 * nrow + 0.9
    fig = Figure(figsize=(3.4 * ncol, height))
    fig.subplots_adjust(left=0.05, right=0.99, top=1 - 0.55 / height, bottom=0.75 / height,
                        wspace=0.25, hspace=0.5)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    x = np.arange(len(labels))  # (S,)
    for ax, (name, key) in zip(axes, metrics):
        values = [_num(rows[s].get(key)) for s in labels]
        heights = [v if v is not None else 0.0 for v in values]
        colours = [TOTAL_COLOUR if s == "Total" else DECODER_COLOUR for s in labels]
        bars = ax.bar(x, heights, color=colours, width=0.7, label="fMRI2Text")
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        for i, (cname, cm) in enumerate(controls.items()):
            level = _num(cm.get(key))
            if level is not None:
                ax.axhline(level, color=control_colour(cname, i), linestyle="--", linewidth=1.4,
                           label=cname.replace("_", "-"))
        ax.set_title(name, fontsize=10)
        ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, fontsize=8, ha="right"
                      if len(labels) > 4 else "center")
        ax.tick_params(axis="y", labelsize=8)
        _style(ax)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    if controls:
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return figure_to_data_uri(fig)


# ----------------------------------------------------------------------------- retrieval


RETRIEVAL_KEYS = (("top-1", "top1"), ("top-5", "top5"), ("2-way", "twoway"))


def retrieval_bars(rows: Mapping[str, Mapping[str, float]]) -> str | None:
    """Grouped bars of top-1, top-5 and 2-way identification per subject, chance as lines.

    Parameters
    ----------
    rows:
        label → dict with any of ``top1 top5 twoway`` and ``<key>_chance`` (all %).
    """
    keys = [(t, k) for t, k in RETRIEVAL_KEYS if any(_num(m.get(k)) is not None for m in rows.values())]
    if not rows or not keys:
        return None
    labels = list(rows)
    fig = Figure(figsize=(max(6.0, 0.6 * len(labels) * len(keys) + 2), 3.6))
    fig.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.12)
    ax = fig.subplots()
    width = 0.8 / len(keys)
    x = np.arange(len(labels))  # (S,)
    palette = ["#2b6cb0", "#63b3ed", "#805ad5"]
    for j, (name, key) in enumerate(keys):
        xs = x - 0.4 + width * (j + 0.5)
        values = [_num(rows[s].get(key)) for s in labels]
        ax.bar(xs, [v or 0.0 for v in values], width=width * 0.95, color=palette[j], label=name)
        for i, s in enumerate(labels):  # chance level of this metric, per group
            chance = _num(rows[s].get(f"{key}_chance"))
            if chance is not None:
                ax.hlines(chance, xs[i] - width / 2, xs[i] + width / 2, colors="black",
                          linestyles=":", linewidth=1.6,
                          label="chance" if (i == 0 and j == 0) else None)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("% correct", fontsize=9)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, frameon=False, ncol=len(keys) + 1, loc="upper left")
    ax.set_title("Retrieval: fMRI embedding → clip, by cosine", fontsize=10)
    _style(ax)
    return figure_to_data_uri(fig)


# ----------------------------------------------------------------------------- training


TERM_COLOURS = ["#63b3ed", "#dd6b20", "#2f855a", "#c53030", "#6b46c1", "#b7791f", "#319795"]
SKIP_LOG_KEYS = {"step", "epoch", "lr", "time", "seconds", "wall_s", "elapsed", "tokens"}


def training_curves(logs: Mapping[str, Sequence[Mapping]]) -> str | None:
    """One panel per stage: every numeric loss term of its log against the step.

    Parameters
    ----------
    logs:
        stage title → log rows ``{step, <term>: value, ...}``; stages without rows are
        left out. Keys like ``lr``, ``epoch`` and timings are not plotted.
    """
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    fig = Figure(figsize=(5.2 * len(logs), 3.3))
    fig.subplots_adjust(left=0.08 / len(logs), right=0.98, top=0.9, bottom=0.15, wspace=0.2)
    axes = np.atleast_1d(fig.subplots(1, len(logs), squeeze=False)).ravel()
    for ax, (stage, rows) in zip(axes, logs.items()):
        terms = [k for k in dict.fromkeys(k for r in rows for k in r)
                 if k not in SKIP_LOG_KEYS and any(_num(r.get(k)) is not None for r in rows)]
        others = iter(TERM_COLOURS * (1 + len(terms) // len(TERM_COLOURS)))
        for term in terms:
            pts = [(_num(r.get("step", n)), _num(r.get(term))) for n, r in enumerate(rows)]
            pts = [(s, v) for s, v in pts if s is not None and v is not None]  # (P, 2)
            if pts:
                steps, vals = zip(*pts)
                ax.plot(steps, vals, label=term, linewidth=1.5 if term == "loss" else 1.1,
                        color=TOTAL_COLOUR if term == "loss" else next(others))
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        if terms:
            ax.legend(fontsize=7, frameon=False)
        _style(ax)
    return figure_to_data_uri(fig)


# ----------------------------------------------------------------------------- frames


def frame_strip(frames: np.ndarray) -> str:
    """One PNG strip of frames side by side.

    Parameters
    ----------
    frames:
        (F, H, W, 3) uint8 RGB frames of equal size.
    """
    from PIL import Image

    frames = np.asarray(frames, dtype=np.uint8)
    gap = np.full((frames.shape[1], 3, 3), 255, dtype=np.uint8)  # (H, 3, 3) white separator
    parts = []
    for i, frame in enumerate(frames):
        parts += [frame] if i == 0 else [gap, frame]
    strip = np.concatenate(parts, axis=1)  # (H, F*W + gaps, 3)
    buf = io.BytesIO()
    Image.fromarray(strip, mode="RGB").save(buf, format="PNG", optimize=True)
    return png_data_uri(buf.getvalue())


def read_clip_frames(path: Path, n_frames: int = 4, height: int = 96,
                     max_decode: int = 600) -> np.ndarray:
    """``n_frames`` evenly spaced frames of a video, decoded with PyAV, as uint8 RGB.

    Parameters
    ----------
    path:
        The clip (mp4 or anything FFmpeg reads).
    height:
        Output height in pixels; the width keeps the aspect ratio (rounded to even).
    max_decode:
        At most this many frames are decoded (frames are picked among them).

    Returns
    -------
    (F, height, W, 3) uint8, F = min(n_frames, frames in the clip).

    Raises
    ------
    UserError
        When the file cannot be decoded or has no video frames.
    """
    import av

    decoded = []  # list of av.VideoFrame
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError("the clip has no video stream", path=path,
                                fix="replace it with a readable video (mp4)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                decoded.append(frame)
                if len(decoded) >= max_decode:
                    break
    except (av.error.FFmpegError, OSError) as err:
        raise UserError(f"the clip cannot be decoded ({err})", path=path,
                        fix="replace it with a readable video (mp4)") from None
    if not decoded:
        raise UserError("the clip has no frames", path=path, fix="replace it with a readable video")
    pick = np.linspace(0, len(decoded) - 1, min(n_frames, len(decoded))).round().astype(int)
    first = decoded[0]
    width = max(2, int(round(first.width * height / max(first.height, 1) / 2)) * 2)
    return np.stack([decoded[i].to_ndarray(format="rgb24", width=width, height=height)
                     for i in pick])  # (F, height, width, 3)


# ----------------------------------------------------------------------------- brain map


#: MNI z (mm) of the axial slices: cerebellum to vertex, all through the brain.
AXIAL_CUTS_MM = (-36, -18, 0, 16, 32, 48, 64)


def brain_map_figures(path: Path) -> list[tuple[str, str]]:
    """The brain map drawn with nilearn on the MNI152 template: orthogonal and axial views.

    Parameters
    ----------
    path:
        A 3D NIfTI (or 4D with one volume) in MNI space, e.g. decoder weight magnitude.

    Returns
    -------
    [(caption, data URI), ...]

    Raises
    ------
    UserError
        When the file is not a readable 3D NIfTI or holds no finite non-zero value.
    """
    import nibabel as nib
    from nilearn import datasets, plotting

    fix = "write a 3D NIfTI in MNI space (e.g. decoder weight magnitude), or delete the file"
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise UserError(f"the brain map cannot be read ({err})", path=path, fix=fix) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"the brain map must be 3D, got shape {data.shape}", path=path, fix=fix)
    data = np.where(np.isfinite(data), data, 0.0)  # (X, Y, Z)
    nonzero = np.abs(data[data != 0])
    if nonzero.size == 0:
        raise UserError("the brain map is all zero (or not finite)", path=path, fix=fix)
    img = nib.Nifti1Image(data, img.affine)
    threshold = float(np.percentile(nonzero, 80))  # show the top 20 % of non-zero voxels
    vmax = float(np.percentile(nonzero, 99.5)) or float(nonzero.max())
    template = datasets.load_mni152_template(resolution=2)
    out = []
    for caption, kwargs, size in (
        ("orthogonal views", {"display_mode": "ortho", "cut_coords": None}, (9.5, 3.4)),
        ("axial slices", {"display_mode": "z", "cut_coords": AXIAL_CUTS_MM}, (12.0, 2.4)),
    ):
        fig = Figure(figsize=size, facecolor="white")
        plotting.plot_stat_map(img, bg_img=template, figure=fig, threshold=threshold, vmax=vmax,
                               colorbar=True, cmap="inferno" if data.min() >= 0 else "RdBu_r",
                               black_bg=False, annotate=True, draw_cross=False, **kwargs)
        out.append((caption, figure_to_data_uri(fig)))
    return out


def _num(value) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None
    value = float(value)
    return value if np.isfinite(value) else None
