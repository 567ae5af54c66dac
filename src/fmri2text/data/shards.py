"""A built corpus (:mod:`fmri2text.data.corpus`) read back: its manifest, its checksums, the
shards held out for validation, and the stream of windows one rank of a job trains on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fmri2text.data.corpus import MANIFEST, MASK, SHARDS
from fmri2text.errors import UserError


def read_manifest(corpus: str | Path) -> dict:
    """The manifest of a complete corpus (UserError naming the file otherwise)."""
    path = Path(corpus) / MANIFEST
    if not path.is_file():
        raise UserError("no corpus manifest (the build is missing or unfinished)", path=path,
                        fix="run fmri2text corpus build (it resumes an unfinished build)")
    return json.loads(path.read_text(encoding="utf-8"))


def verify(corpus: str | Path) -> list[str]:
    """Shards whose file is missing or whose sha256 differs from the manifest's."""
    from fmri2text.data.store import sha256_file

    folder = Path(corpus) / SHARDS
    return [s["file"] for s in read_manifest(corpus)["shards"]
            if not (folder / s["file"]).is_file() or sha256_file(folder / s["file"]) != s["sha256"]]


def split_shards(manifest: dict, val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Shard files for training and for validation (``val_fraction`` of the shards, at least
    one when there are two or more; seeded): whole runs are held out, never parts of one."""
    files = [s["file"] for s in manifest["shards"]]
    if not files:
        raise UserError("the corpus has no shards", fix="build it from datasets with BOLD runs")
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction))) if len(files) > 1 else 0
    val = sorted(files[i] for i in order[:n_val])
    return [f for f in files if f not in val], val


class CorpusStream:
    """The windows of some shards for one rank of ``world``, as volumes, batch by batch.

    Rank ``r`` reads the shards ``files[r::world]``, each epoch in a seeded order, each
    shard in its row order, one Parquet row group in memory at a time: memory does not grow
    with the corpus. :meth:`state` is the exact position (epoch, shard, row); a stream given
    it by :meth:`load_state` continues with the same windows (checkpoint it with the model).

    Windows come out as (B, T, X', Y', Z') float32 volumes cropped to the mask's bounding
    box, as :class:`~fmri2text.data.datasets.TrialWindows` gives Stage I.
    """

    def __init__(self, corpus: str | Path, files: list[str] | None = None, *, rank: int = 0,
                 world: int = 1, seed: int = 0):
        import nibabel as nib

        from fmri2text.data.datasets import VolumeCrop

        self.root = Path(corpus)
        manifest = read_manifest(self.root)
        rows = {s["file"]: s["n_windows"] for s in manifest["shards"]}
        files = sorted(rows) if files is None else list(files)
        unknown = [f for f in files if f not in rows]
        if unknown:
            raise UserError(f"shards not in the corpus manifest: {unknown[:3]}",
                            path=self.root / MANIFEST, fix="use shard files the manifest lists")
        self.files = files[rank::world]
        if not self.files:
            raise UserError(f"rank {rank} of {world} gets no shard ({len(files)} in all)",
                            fix="use at most as many processes as shards")
        self.rows = [rows[f] for f in self.files]
        self.window_shape = tuple(manifest["window_shape"])  # (T, V)
        mask = np.asanyarray(nib.load(str(self.root / MASK)).dataobj) != 0
        self.crop = VolumeCrop(mask.reshape(-1), mask.shape)
        self.input_shape = (self.window_shape[0], *self.crop.shape)
        self.seed = seed
        self.epoch, self.k, self.row = 0, 0, 0
        self._cached: tuple[int, int, np.ndarray] | None = None  # (shard, first row, (n, T*V))

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def state(self) -> dict:
        return {"epoch": self.epoch, "k": self.k, "row": self.row, "files": list(self.files)}

    def load_state(self, state: dict) -> None:
        if state["files"] != self.files:
            raise UserError("the checkpoint's corpus position is for other shards",
                            fix="resume with the corpus, process count and rank it was made with")
        self.epoch, self.k, self.row = int(state["epoch"]), int(state["k"]), int(state["row"])

    def _group(self, shard: int, row: int) -> tuple[np.ndarray, int]:
        """Row group holding ``row`` of shard ``shard`` as (n, T*V) float16, and its first row;
        the shard's file is opened only when the row leaves the group in memory."""
        cached = self._cached
        if (cached is not None and cached[0] == shard
                and cached[1] <= row < cached[1] + len(cached[2])):
            return cached[2], cached[1]
        import pyarrow.parquet as pq

        f = pq.ParquetFile(self.root / SHARDS / self.files[shard])
        first = 0
        for g in range(f.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if row < first + n:
                col = f.read_row_group(g, columns=["x"]).column("x").combine_chunks()
                self._cached = (shard, first, np.asarray(col.flatten()).reshape(n, -1))
                return self._cached[2], first
            first += n
        raise IndexError(f"row {row} beyond shard {self.files[shard]}")

    def batch(self, n: int) -> torch.Tensor:
        """The next ``n`` windows (n, T, X', Y', Z') float32, crossing shards and epochs."""
        out = []
        while len(out) < n:
            shard = int(self._order(self.epoch)[self.k])
            values, first = self._group(shard, self.row)
            take = min(n - len(out), first + len(values) - self.row)
            out.extend(values[self.row - first:self.row - first + take])
            self.row += take
            if self.row == self.rows[shard]:
                self.row, self.k = 0, self.k + 1
                if self.k == len(self.files):
                    self.k, self.epoch = 0, self.epoch + 1
        x = torch.from_numpy(np.stack(out).astype(np.float32)).view(n, *self.window_shape)
        return self.crop(x)  # (n, T, X', Y', Z')
