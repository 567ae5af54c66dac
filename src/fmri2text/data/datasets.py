"""Torch datasets of trial windows for the student, the teacher's targets, and resumable batching.

* :func:`load_windows` is the one place the training recipes read fMRI: the trial table with
  its split, and every trial's window (n, T, F). (It reads the BIDS dataset with
  ``extract_responses``; the prepared store can replace it behind the same return type.)
* :class:`VolumeCrop` unmasks (…, F) feature vectors into the bounding box of the brain mask,
  (…, X, Y, Z), the grid the 3D tokenizer reads; voxels outside the mask are 0.
* :class:`TrialWindows` is a ``Dataset`` of ``{fmri (T, X, Y, Z), index, row, subject,
  class_id, split, clip}`` items; surfaces (CIFTI) give ``fmri`` (T, V).
* :class:`ResumableBatchSampler` draws seeded batches whose position is one integer (the
  batch number), so a checkpoint stores it and a resumed run sees the same batches.
* :class:`ClipTargets` holds the teacher's video tokens X (L, d), instructions and answers
  per clip, read from the annotation store (``training/annotate.py``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from fmri2text.config import Config, DataConfig
from fmri2text.errors import UserError

SPLITS = ("train", "adapt", "test")


# ----------------------------------------------------------------------------- reading


@dataclass
class FmriWindows:
    """Every trial's fMRI window and where its features sit on the grid.

    Attributes
    ----------
    trials : the trial table (row order of ``data``) with a ``split`` column.
    data : (n_trials, T, F) float32, z-scored within each run.
    feature_mask : (n_grid,) bool, C order over ``grid``.
    grid : (X, Y, Z) of the mask image, or None for surface (CIFTI) data.
    """

    trials: pd.DataFrame
    data: np.ndarray
    feature_mask: np.ndarray
    grid: tuple[int, int, int] | None


def window_responses(trials: pd.DataFrame, data: DataConfig):
    """Every trial's window (n, T, F) as the student reads it, from the rows of ``trials``.

    The one place where the data config becomes student input: :func:`load_windows` (training,
    ``fmri2text decode``) and :class:`fmri2text.api.Decoder` (one run) both call it.

    Parameters
    ----------
    trials : pandas.DataFrame
        Trial-table rows (``bold_path``, ``onset``, ``tr``, optionally ``duration`` and
        ``events_path``), as :func:`fmri2text.data.bids.load_trials` writes them.
    data : DataConfig
        The preprocessing settings; ``aggregate`` is ignored (windows are stacked).

    Returns
    -------
    fmri2text.data.fmri.Responses
        ``data`` is (n, T, F) float32 (single-trial betas: T = 1), ``feature_mask`` the
        voxels good in every run of ``trials``.
    """
    from fmri2text.data.fmri import extract_responses

    # volume windows for the 3D tokenizer; single-trial betas have no window axis
    aggregate = "stack" if data.response == "window" else "mean"
    responses = extract_responses(trials, dataclasses.replace(data, aggregate=aggregate))
    x = responses.data
    if x.ndim == 2:  # (n, F): betas, seen as a window of one volume
        x = x[:, None, :]
    return dataclasses.replace(responses, data=np.ascontiguousarray(x, dtype=np.float32),
                               feature_mask=np.asarray(responses.feature_mask, bool))


def smooth_windows(data: np.ndarray, feature_mask: np.ndarray, grid: tuple[int, int, int] | None,
                   affine: np.ndarray | None, fwhm: float, chunk: int = 64) -> np.ndarray:
    """Gaussian spatial smoothing of every window volume, within the brain mask.

    The FWHM is in mm (sigma = FWHM / sqrt(8 ln 2) per axis, in voxels of ``affine``, as in
    nilearn's ``smooth_img``); the smoothed map is divided by the smoothed mask, so voxels at
    the brain's edge are averages of brain voxels, not pulled toward the zeros outside.
    Smoothing keeps what subjects share (the coarse topography) over each subject's fine
    detail: Stage I's held-out 2-way identification rose from 65 % to 79 % at 9 mm (BENCHMARKS).

    Parameters
    ----------
    data : (n, T, F) float32 over ``feature_mask`` (C order over ``grid``).
    grid, affine : the volume grid and its voxel-to-world matrix; None for surface data,
        which is returned unchanged (as is everything when ``fwhm`` is 0).

    Returns
    -------
    (n, T, F) float32, a new array.
    """
    if fwhm <= 0 or grid is None:
        return data
    from nibabel.affines import voxel_sizes
    from scipy.ndimage import gaussian_filter

    sigma = fwhm / np.sqrt(8 * np.log(2)) / voxel_sizes(np.asarray(affine))  # (3,) voxels
    crop = VolumeCrop(feature_mask, grid)  # outside the box every voxel is outside the mask
    index = crop.index.numpy()
    weight = np.zeros(int(np.prod(crop.shape)), np.float32)
    weight[index] = 1.0
    weight = gaussian_filter(weight.reshape(crop.shape), sigma, mode="constant").reshape(-1)[index]
    out = np.empty_like(data, dtype=np.float32)
    for s in range(0, len(data), chunk):
        vol = crop(torch.from_numpy(np.ascontiguousarray(data[s:s + chunk], np.float32))).numpy()
        vol = gaussian_filter(vol, (0, 0, *sigma), mode="constant")  # (c, T, X', Y', Z')
        out[s:s + chunk] = vol.reshape(*vol.shape[:2], -1)[..., index] / weight
    return out


def load_windows(bids: str | Path, cfg: Config) -> FmriWindows:
    """Trials of ``bids`` with splits (leakage checked) and their (T, F) windows, smoothed
    by ``data.smoothing_fwhm`` within the common mask."""
    from fmri2text.data.bids import load_trials
    from fmri2text.data.splits import assign_splits, check_leakage

    trials = assign_splits(load_trials(Path(bids), cfg.data), cfg.split)
    check_leakage(trials)
    responses = window_responses(trials, cfg.data)
    img = responses.mask_img
    grid = None if img is None else tuple(int(s) for s in img.shape[:3])
    data = smooth_windows(responses.data, responses.feature_mask, grid,
                          None if img is None else img.affine, cfg.data.smoothing_fwhm)
    return FmriWindows(trials.reset_index(drop=True), data, responses.feature_mask, grid)


# ----------------------------------------------------------------------------- unmasking


class VolumeCrop:
    """Feature vectors (…, F) → volumes (…, X, Y, Z) cropped to the mask's bounding box.

    Parameters
    ----------
    feature_mask : (n_grid,) bool in C order over ``grid``; F = its number of True entries.
    grid : (X, Y, Z) of the full image.
    """

    def __init__(self, feature_mask: np.ndarray, grid: tuple[int, int, int]):
        mask = np.asarray(feature_mask, bool).reshape(grid)  # (X, Y, Z)
        if not mask.any():
            raise UserError("the brain mask is empty: no voxel to train on",
                            fix="check the BOLD data (all voxels were masked as bad)")
        nz = np.nonzero(mask)
        self.lo = tuple(int(a.min()) for a in nz)
        self.hi = tuple(int(a.max()) + 1 for a in nz)
        self.shape = tuple(h - l for l, h in zip(self.lo, self.hi))  # (X', Y', Z')
        crop = mask[tuple(slice(l, h) for l, h in zip(self.lo, self.hi))]
        self.index = torch.from_numpy(np.flatnonzero(crop))  # (F,) positions in the flat crop
        self.n_features = int(mask.sum())

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """(…, F) → (…, X', Y', Z') with zeros outside the mask."""
        if values.shape[-1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {values.shape[-1]}")
        out = values.new_zeros(*values.shape[:-1], int(np.prod(self.shape)))  # (…, X'Y'Z')
        out[..., self.index] = values
        return out.view(*values.shape[:-1], *self.shape)

    def to_dict(self) -> dict:
        return {"lo": list(self.lo), "hi": list(self.hi)}


# ----------------------------------------------------------------------------- dataset


class TrialWindows(Dataset):
    """The windows of selected trials as tensors for the student.

    Parameters
    ----------
    windows : from :func:`load_windows`.
    rows : trial-table rows in this dataset (e.g. the training subjects' train trials).
    class_codes : class_id → contiguous class index (0..C−1); unknown classes get −1.

    Items are dicts: ``fmri`` (T, X', Y', Z') float32 (or (T, V) for surfaces), ``index``
    (position in this dataset), ``row`` (trial-table row), ``subject`` (str), ``class_id``
    (int, −1 when unknown), ``split`` (str), ``clip`` (stim_file).
    """

    def __init__(self, windows: FmriWindows, rows: np.ndarray, class_codes: dict[int, int] | None = None):
        self.windows = windows
        self.rows = np.asarray(rows, dtype=np.int64)
        self.crop = VolumeCrop(windows.feature_mask, windows.grid) if windows.grid else None
        t = windows.trials
        codes = class_codes or {}
        self.subjects = t["subject"].astype(str).to_numpy()[self.rows]
        self.clips = t["stim_file"].astype(str).to_numpy()[self.rows]
        self.splits = t["split"].astype(str).to_numpy()[self.rows]
        raw_classes = pd.to_numeric(t["class_id"], errors="coerce").fillna(-1).astype(int).to_numpy()
        self.classes = np.array([codes.get(int(c), -1) for c in raw_classes[self.rows]], dtype=np.int64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one ``fmri`` item: (T, X', Y', Z') or (T, V)."""
        T = self.windows.data.shape[1]
        return (T, *self.crop.shape) if self.crop else (T, self.windows.data.shape[2])

    def __len__(self) -> int:
        return len(self.rows)

    def fmri(self, positions) -> torch.Tensor:
        """Windows of dataset positions (B,) as (B, T, X', Y', Z') (or (B, T, V))."""
        x = torch.from_numpy(self.windows.data[self.rows[np.asarray(positions)]])  # (B, T, F)
        return self.crop(x) if self.crop else x

    def __getitem__(self, i: int) -> dict:
        return {"fmri": self.fmri([i])[0], "index": int(i), "row": int(self.rows[i]),
                "subject": str(self.subjects[i]), "class_id": int(self.classes[i]),
                "split": str(self.splits[i]), "clip": str(self.clips[i])}


def split_rows(trials: pd.DataFrame, split: str) -> np.ndarray:
    """Rows of the trial table in ``split`` (train | adapt | test)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.flatnonzero((trials["split"] == split).to_numpy())


def class_codes(trials: pd.DataFrame, rows: np.ndarray) -> dict[int, int]:
    """class_id → 0..C−1 over the classes of ``rows`` (sorted); NaN classes are skipped."""
    ids = pd.to_numeric(trials["class_id"].iloc[rows], errors="coerce").dropna().astype(int)
    return {int(c): k for k, c in enumerate(sorted(set(ids)))}


# ----------------------------------------------------------------------------- batching


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded batches over ``n`` items, position = batch number; shards across ranks.

    Global batch k covers positions [k·B·W, (k+1)·B·W) of an endless stream made of
    seeded permutations of range(n) (epoch e uses seed + e); rank r takes its B items.
    So batches depend only on (seed, k, rank, world), and resuming at batch k continues
    the stream exactly.

    Parameters
    ----------
    n : dataset size.  batch_size : per rank.  seed : base seed.
    start, stop : first and one-past-last batch number yielded.
    rank, world : this process and the number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, stop: int = 1,
                 rank: int = 0, world: int = 1):
        if n < 1 or batch_size < 1:
            raise UserError(f"cannot batch {n} items in batches of {batch_size}",
                            fix="check the split (are there trials in it?) and the batch size")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).numpy()}
        return self._perms[epoch]

    def batch(self, k: int) -> list[int]:
        """Item indices of this rank's share of global batch ``k``."""
        first = (k * self.world + self.rank) * self.batch_size
        pos = np.arange(first, first + self.batch_size)
        return [int(self._perm(int(p // self.n))[p % self.n]) for p in pos]

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            yield self.batch(k)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ----------------------------------------------------------------------------- teacher targets


@dataclass
class ClipTargets:
    """The teacher's outputs per clip: video tokens X, the instruction drawn, its answer.

    Attributes
    ----------
    clips : clip keys (stim_file), one per row.
    tokens : (n_clips, L, d_llm) float32.
    instructions, answers : one string per clip.
    """

    clips: list[str]
    tokens: torch.Tensor
    instructions: list[str]
    answers: list[str]

    def __post_init__(self):
        self._row = {c: i for i, c in enumerate(self.clips)}

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def d_llm(self) -> int:
        return int(self.tokens.shape[2])

    def missing(self, clips) -> list[str]:
        return sorted({c for c in clips if c not in self._row})

    def rows(self, clips) -> torch.Tensor:
        """Row of each clip (B,), raising UserError when one has no annotation."""
        missing = self.missing(clips)
        if missing:
            raise UserError(f"{len(missing)} clip(s) have no teacher annotation, e.g. {missing[:3]}",
                            fix="annotate these clips with the teacher (fmri2text annotate) "
                                "before training")
        return torch.as_tensor([self._row[c] for c in clips], dtype=torch.long)

    def tokens_of(self, clips) -> torch.Tensor:
        """(B, L, d) video tokens of ``clips``."""
        return self.tokens[self.rows(clips)]

    def text_of(self, clips) -> tuple[list[str], list[str]]:
        """(instructions, answers) of ``clips``."""
        r = self.rows(clips).tolist()
        return [self.instructions[i] for i in r], [self.answers[i] for i in r]

    @classmethod
    def from_store(cls, folder: str | Path, teacher_hash: str | None = None) -> "ClipTargets":
        """Read ``folder/annotations-<hash>.{json,safetensors}`` written by the annotate step.

        With several stores in the folder, ``teacher_hash`` picks one (the recipes pass the
        hash in ``RUN/teacher/teacher.json`` when it exists). A clip annotated with several
        instructions keeps its first row.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        found = sorted(folder.glob("annotations-*.json")) if folder.is_dir() else []
        if teacher_hash:
            found = [p for p in found if p.stem == f"annotations-{teacher_hash}"] or found
        if not found:
            raise UserError("no teacher annotations found", path=folder,
                            fix="run the teacher and annotate steps first (fmri2text teacher fit; "
                                "fmri2text annotate) or set stage1.annotations")
        if len(found) > 1:
            raise UserError(f"{len(found)} annotation stores and no teacher hash to choose one: "
                            f"{[p.name for p in found]}", path=folder,
                            fix="keep only the store of the current teacher, or write "
                                "RUN/teacher/teacher.json with its checkpoint_hash")
        index_path = found[0]
        st_path = index_path.with_suffix(".safetensors")
        try:
            rows = json.loads(index_path.read_text(encoding="utf-8"))["rows"]
            tokens = load_file(str(st_path))["tokens"].float()
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as err:
            raise UserError(f"cannot read the annotation store ({err})", path=st_path,
                            fix="delete it and rerun the annotate step") from None
        first: dict[str, dict] = {}
        for r in rows:
            first.setdefault(str(r["clip"]), r)
        keep = list(first.values())
        idx = torch.as_tensor([int(r["row"]) for r in keep], dtype=torch.long)
        return cls([str(r["clip"]) for r in keep], tokens[idx].contiguous(),
                   [str(r["instruction"]) for r in keep], [str(r["answer"]) for r in keep])


# ----------------------------------------------------------------------------- synthetic data


def synthetic_experiment(n_subjects: int = 4, n_heldout: int = 2, n_classes: int = 4,
                         clips_per_class: int = 4, grid: tuple[int, int, int] = (6, 6, 5),
                         window: int = 2, d_llm: int = 32, n_tokens: int = 4, noise: float = 0.5,
                         seed: int = 0) -> tuple[FmriWindows, ClipTargets]:
    """A small fMRI experiment with a known answer, for tests and benchmarks.

    Every training subject sees every clip once; each held-out subject too, its clips split
    by clip into ``adapt`` (even clip numbers) and ``test`` (odd). A trial's window is its
    class's spatial pattern (plus a per-subject perturbation and a weaker per-clip one) plus
    noise; the teacher's tokens of a clip are its class's tokens plus a per-clip offset.
    Answers are "a <class word> clip".
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(grid, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    n_feat = int(mask.sum())
    class_maps = rng.standard_normal((n_classes, window, n_feat))
    clip_maps = 0.5 * rng.standard_normal((n_classes * clips_per_class, window, n_feat))
    class_tok = rng.standard_normal((n_classes, n_tokens, d_llm))
    words = ["red", "green", "blue", "small", "large", "left", "right", "up"]
    records, data = [], []
    for s in range(n_subjects):
        sub_map = 0.3 * rng.standard_normal((window, n_feat))
        heldout = s >= n_subjects - n_heldout
        for c in range(n_classes * clips_per_class):
            k = c // clips_per_class
            split = ("adapt" if c % 2 == 0 else "test") if heldout else "train"
            records.append({"subject": f"{s + 1:02d}", "run": 1, "onset": float(c),
                            "stim_file": f"clips/c{c:03d}.mp4", "class_id": k + 1,
                            "class_name": words[k % len(words)], "split": split})
            data.append(class_maps[k] + clip_maps[c] + sub_map
                        + noise * rng.standard_normal((window, n_feat)))
    trials = pd.DataFrame.from_records(records)
    windows = FmriWindows(trials, np.asarray(data, dtype=np.float32), mask.ravel(), grid)
    clips = [f"clips/c{c:03d}.mp4" for c in range(n_classes * clips_per_class)]
    tokens = np.stack([class_tok[c // clips_per_class] + 0.3 * rng.standard_normal((n_tokens, d_llm))
                       for c in range(len(clips))])
    answers = [f"a {words[(c // clips_per_class) % len(words)]} clip" for c in range(len(clips))]
    targets = ClipTargets(clips, torch.as_tensor(tokens, dtype=torch.float32),
                          ["Describe the video."] * len(clips), answers)
    return windows, targets
