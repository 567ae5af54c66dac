"""A pretraining corpus for masked brain modeling, from many BIDS datasets, built on Dask.

``build_corpus(roots, out, grid, cfg)`` writes::

    out/shards/<dataset>_<run>.parquet   windows of one BOLD run: float16 (T x V) each,
                                         with dataset, subject, session, task, run, start
    out/shards/<dataset>_<run>.json      the shard's record (key, sha256, windows, the machine
                                         that computed it), written after its Parquet file:
                                         a shard with one is whole
    out/mask.nii.gz                      the grid and its mask (readers crop with it)
    out/manifest.json                    written last: grid, settings, shards with checksums,
                                         skipped runs with the reason

:mod:`fmri2text.data.shards` reads it back: the manifest, checksums, the held-out shards
and :class:`~fmri2text.data.shards.CorpusStream` for one rank of a distributed job (its own
shards, one row group in memory at a time, in a seeded order, resumable).

What a window is: every BOLD run (``sub-*/[ses-*/]func/*_bold.nii[.gz]``, no events or
stimuli) is put on the corpus grid (resampled when its grid differs: nilearn, continuous
interpolation), its voxels inside the grid's mask kept, cleaned as ``prepare`` cleans trials
(cosine drift up to ``data.high_pass``, z-scored per voxel when ``data.standardize``), cut
into windows of ``data.window`` volumes every ``corpus.stride`` volumes, and smoothed as
:func:`~fmri2text.data.datasets.load_windows` smooths (``data.smoothing_fwhm``): the windows
Stage I reads from a prepared store of the same grid, so the encoder pretrained on them
loads into Stage I (``stage1.mbm_checkpoint``).

Design:

- **One task per run** on a Dask cluster: a local one of ``corpus.workers`` processes by
  default, or the scheduler at ``corpus.scheduler``. A task reads one run and writes its
  shard, so a worker holds one run at a time whatever the corpus size, and a shard's bytes
  depend only on its run, the grid and the settings: any number of workers writes the same
  files. On the same kind of CPU: numpy's and scipy's kernels round differently on AVX2
  and AVX-512, so each shard records the machine that computed it
  (:func:`fmri2text.machine.describe`), kept in the manifest.
- **Atomic and resumable**: a shard is written to a temporary name and renamed, then its
  record; ``manifest.json`` is removed first and written last. A rerun keeps every shard
  whose record's key (source fingerprint, grid, settings) matches and whose file has the
  recorded size, and computes only the rest.
- **Bad runs are skipped**, not fatal: the reason (naming the file) is logged and listed in
  the manifest's ``skipped``; the run is tried again on the next build.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fmri2text.config import Config
from fmri2text.errors import UserError
from fmri2text.io import ensure_output_dir, write_json

MANIFEST = "manifest.json"
SHARDS = "shards"
MASK = "mask.nii.gz"  # the grid and its mask, for readers
#: bump when a shard's content changes for the same inputs and settings
CORPUS_VERSION = 1
_BOLD = re.compile(r"_bold\.nii(\.gz)?$")
Log = Callable[[str], None]


@dataclass(frozen=True)
class CorpusRun:
    """One BOLD run of one dataset and the shard it becomes."""

    dataset: str  # the dataset's folder name, numbered when two roots share one
    bold: str  # absolute path
    subject: str
    session: str
    task: str
    run: str

    @property
    def shard(self) -> str:
        stem = _BOLD.sub("", Path(self.bold).name)
        return f"{self.dataset}_{stem}"


def find_runs(roots: list[Path]) -> list[CorpusRun]:
    """Every BOLD run under the dataset roots, sorted by dataset then file name."""
    names = [Path(r).resolve().name for r in roots]
    runs = []
    for i, root in enumerate(roots):
        root = Path(root)
        if not root.is_dir():
            raise UserError("dataset folder not found", path=root,
                            fix="pass the root of a BIDS dataset (it holds sub-*/ folders)")
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}{i + 1}"
        found = sorted(p for p in root.glob("sub-*/**/func/*") if _BOLD.search(p.name))
        if not found:
            raise UserError("no BOLD runs (sub-*/[ses-*/]func/*_bold.nii[.gz]) in the dataset",
                            path=root, fix="pass the root of a BIDS dataset with functional runs")
        for p in found:
            ent = dict(re.findall(r"(sub|ses|task|run)-([A-Za-z0-9]+)", p.name))
            runs.append(CorpusRun(name, str(p.resolve()), ent.get("sub", ""), ent.get("ses", ""),
                                  ent.get("task", ""), ent.get("run", "")))
    return runs


@dataclass(frozen=True)
class CorpusGrid:
    """The corpus grid: a 3-D image's shape and affine, its nonzero voxels the mask."""

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    mask: np.ndarray  # (X*Y*Z,) bool, C order

    @classmethod
    def from_image(cls, path: str | Path) -> "CorpusGrid":
        import nibabel as nib

        path = Path(path)
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as err:  # noqa: BLE001 - any unreadable image is the user's to fix
            raise UserError(f"cannot read the grid image ({type(err).__name__}: {err})",
                            path=path, fix="pass a 3-D NIfTI mask, e.g. RUN/prepared/mask.nii.gz") from None
        if data.ndim != 3 or not (data != 0).any():
            raise UserError(f"the grid image must be 3-D with a nonzero mask, got shape "
                            f"{data.shape}", path=path,
                            fix="pass a 3-D NIfTI mask, e.g. RUN/prepared/mask.nii.gz")
        return cls(tuple(int(s) for s in data.shape),
                   tuple(tuple(float(v) for v in row) for row in img.affine),
                   np.asarray(data != 0).reshape(-1))

    def describe(self) -> dict:
        import hashlib

        return {"shape": list(self.shape), "affine": [list(r) for r in self.affine],
                "n_voxels": int(self.mask.sum()),
                "mask_sha256": hashlib.sha256(np.packbits(self.mask).tobytes()).hexdigest()}


def settings_of(cfg: Config) -> dict:
    """What a shard's content depends on besides its run and the grid."""
    d, c = cfg.data, cfg.corpus
    return {"version": CORPUS_VERSION, "window": d.window, "stride": c.stride or d.window,
            "high_pass": d.high_pass, "standardize": d.standardize,
            "smoothing_fwhm": d.smoothing_fwhm, "row_group": c.row_group}


@functools.cache
def _scratch():
    """This process's read buffers, reused run after run (see Scratch)."""
    from fmri2text.data.nifti import Scratch

    return Scratch()


def _run_series(run: CorpusRun, grid: CorpusGrid) -> tuple[np.ndarray, float]:
    """(T, V) float32 of the run's voxels inside the grid's mask, and its TR.

    The data are read as ``prepare`` reads them (:func:`~fmri2text.data.nifti.read_series`:
    ``.nii.gz`` inflated once by ISA-L into this worker's reused buffers); nibabel reads
    only the header here.
    """
    import nibabel as nib

    from fmri2text.data.nifti import read_series
    from fmri2text.data.preprocessing import _repetition_time

    try:
        img = nib.load(run.bold)
        shape = img.shape
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read the image ({type(err).__name__}: {err})", path=run.bold,
                        fix="re-download or re-create this file") from None
    if len(shape) != 4:
        raise UserError(f"not a 4-D BOLD series (shape {shape})", path=run.bold,
                        fix="pass 4-D functional runs")
    zooms = img.header.get_zooms()
    tr = _repetition_time(Path(run.bold), None, float(zooms[3]) if float(zooms[3]) > 0 else None)
    same = tuple(shape[:3]) == grid.shape and np.allclose(img.affine, np.asarray(grid.affine),
                                                           atol=1e-4)
    scratch = _scratch()
    data, _, pooled = read_series(run.bold, scratch)  # (T, X*Y*Z), voxels in Fortran order
    try:
        if same:  # the mask's voxels (C order) picked from the Fortran-order columns
            cols = np.ravel_multi_index(np.unravel_index(np.flatnonzero(grid.mask), grid.shape),
                                        grid.shape, order="F")
            series = np.take(data, cols, axis=1).astype(np.float32, copy=False)  # (T, V)
        else:
            from nilearn.image import resample_img

            volumes = np.asarray(data.T.reshape(*shape, order="F"), dtype=np.float32)
            img = resample_img(nib.Nifti1Image(volumes, img.affine, img.header),
                               target_affine=np.asarray(grid.affine), target_shape=grid.shape,
                               interpolation="continuous", force_resample=True, copy_header=True)
            del volumes
            series = np.asarray(img.dataobj, dtype=np.float32).reshape(-1, shape[3])[grid.mask].T
    finally:
        scratch.give(pooled)
    if not np.isfinite(series).all():
        raise UserError("the series has NaN or infinite values inside the grid's mask",
                        path=run.bold, fix="re-create this file, or use a mask that excludes them")
    return np.ascontiguousarray(series), tr


def run_windows(run: CorpusRun, grid: CorpusGrid, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """The run's windows (n, T, V) float16 and their first volumes (n,)."""
    from fmri2text.data.datasets import smooth_windows
    from fmri2text.data.fmri import _cleaned, drift_regressors

    x, tr = _run_series(run, grid)
    n_t, T = x.shape[0], settings["window"]
    if n_t < T:
        raise UserError(f"{n_t} volumes, fewer than one window of {T}", path=run.bold,
                        fix=f"drop this run, or set data.window below {n_t}")
    q = np.linalg.qr(drift_regressors(n_t, tr, settings["high_pass"]))[0].astype(np.float32)
    x = _cleaned(x, q, settings["standardize"])  # (T_run, V)
    starts = np.arange(0, n_t - T + 1, settings["stride"])
    windows = np.stack([x[s:s + T] for s in starts])  # (n, T, V)
    windows = smooth_windows(windows, grid.mask, grid.shape, np.asarray(grid.affine),
                             settings["smoothing_fwhm"])
    return windows.astype(np.float16), starts


def _key(run: CorpusRun, grid: dict, settings: dict) -> str:
    from fmri2text.data.store import _sha256_json, fingerprint

    source = {k: v for k, v in fingerprint(run.bold).items() if k != "path"}
    return _sha256_json({"run": asdict(run), "source": source, "grid": grid, "settings": settings})


def build_shard(run: CorpusRun, grid: CorpusGrid, settings: dict, folder: str) -> dict:
    """One run → its shard file and record (a Dask task). A bad run gives
    ``{"shard", "source", "skipped": reason}`` instead of raising."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from threadpoolctl import threadpool_limits

    from fmri2text import machine
    from fmri2text.data.store import sha256_file
    from fmri2text.io import atomic_path

    folder = Path(folder)
    key = _key(run, grid.describe(), settings)
    parquet, record_path = folder / f"{run.shard}.parquet", folder / f"{run.shard}.json"
    if record_path.is_file() and parquet.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        if record.get("key") == key and record.get("bytes") == parquet.stat().st_size:
            return {**record, "reused": True}
    t0 = time.perf_counter()
    try:
        # one BLAS thread, as in a Dask process worker (whose nanny sets it): the cleaning's
        # matrix products round alike in a threaded worker too, so the bytes do not depend
        # on how the worker was started
        with threadpool_limits(1):
            windows, starts = run_windows(run, grid, settings)
    except UserError as err:
        return {"shard": run.shard, "source": run.bold, "skipped": str(err)}
    n, T, V = windows.shape
    flat = pa.array(windows.reshape(-1), type=pa.float16())
    columns = {"dataset": pa.array([run.dataset] * n), "subject": pa.array([run.subject] * n),
               "session": pa.array([run.session] * n), "task": pa.array([run.task] * n),
               "run": pa.array([run.run] * n), "start": pa.array(starts.astype(np.int32)),
               "x": pa.FixedSizeListArray.from_arrays(flat, T * V)}
    meta = {"fmri2text.window_shape": json.dumps([T, V])}
    table = pa.table(columns).replace_schema_metadata(meta)
    with atomic_path(parquet) as tmp:
        # float16 noise: no dictionary (it only costs time), zstd at level 1 (higher levels
        # take 2x the time for the same size; BENCHMARKS, issue 20)
        pq.write_table(table, str(tmp), row_group_size=settings["row_group"], compression="zstd",
                       compression_level=1, use_dictionary=False)
    record = {"shard": run.shard, "file": parquet.name, "key": key, "source": run.bold,
              "dataset": run.dataset, "subject": run.subject, "session": run.session,
              "task": run.task, "run": run.run, "n_windows": int(n),
              "bytes": parquet.stat().st_size, "sha256": sha256_file(parquet),
              "machine": machine.describe(),  # shards are deterministic per CPU kind
              "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_rss_mb()}
    write_json(record_path, record)
    return {**record, "reused": False}


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _client(workers: int, scheduler: str):
    """A Dask client: the scheduler at ``scheduler``, else a local cluster of ``workers``
    single-threaded processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


#: the distributions whose versions decide a shard's bytes (and Dask's own)
SHARD_PACKAGES = ("fmri2text", "numpy", "scipy", "nibabel", "nilearn", "isal", "pyarrow", "dask",
                  "distributed")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in SHARD_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def _check_workers(client, paths: list[str]) -> None:
    """Every worker of a given scheduler sees ``paths`` (runs and output are read and written
    where the client names them: storage that all of them mount) and has this client's
    versions of :data:`SHARD_PACKAGES`; a UserError naming the worker otherwise."""
    import os

    mine = _versions()
    try:
        report = client.run(lambda: ({p: os.path.exists(p) for p in paths}, _versions()))
    except Exception as err:  # noqa: BLE001  (e.g. fmri2text not installed there)
        raise UserError(f"cannot run on the Dask workers ({type(err).__name__}: {err})",
                        fix="install fmri2text on every worker (scripts/setup.sh)") from None
    for worker, (seen, theirs) in sorted(report.items()):
        for p, ok in seen.items():
            if not ok:
                raise UserError(f"Dask worker {worker} cannot see this path", path=p,
                                fix="put the datasets and --out on storage every worker mounts "
                                    "at the same path, or build on a local cluster (--workers)")
        differ = {k: (mine[k], theirs.get(k)) for k in mine if theirs.get(k) != mine[k]}
        if differ:
            listed = ", ".join(f"{k} {a} here, {b} there" for k, (a, b) in differ.items())
            raise UserError(f"Dask worker {worker} runs other package versions ({listed})",
                            fix="install the same versions on every worker (scripts/setup.sh)")


def build_corpus(roots: list[str | Path], out: str | Path, grid: str | Path, cfg: Config,
                 log: Log = print) -> dict:
    """Build (or complete) the corpus in ``out`` from the BOLD runs of ``roots`` on the grid
    of the 3-D image ``grid``; return the manifest (see the module docstring)."""
    from distributed import as_completed

    from fmri2text.data.store import write_mask_image

    c = cfg.corpus
    runs = find_runs([Path(r) for r in roots])
    corpus_grid = CorpusGrid.from_image(grid)
    settings = settings_of(cfg)
    out = ensure_output_dir(out, what="corpus folder")
    folder = ensure_output_dir(out / SHARDS, what="shard folder")
    (out / MANIFEST).unlink(missing_ok=True)  # whole again only when rewritten below
    t0 = time.perf_counter()
    client, cluster = _client(c.workers, c.scheduler)
    log(f"corpus: {len(runs)} run(s) of {len({r.dataset for r in runs})} dataset(s) on "
        f"{len(client.scheduler_info()['workers'])} Dask worker(s)")
    results: dict[str, dict] = {}
    try:
        if c.scheduler:
            _check_workers(client, [r.bold for r in runs] + [str(folder)])
        grid_data = client.scatter(corpus_grid, broadcast=True)  # once, not with every task
        futures = client.map(build_shard, runs, grid=grid_data, settings=settings,
                             folder=str(folder), pure=False)
        for future in as_completed(futures):
            r = future.result()
            results[r["shard"]] = r
            if "skipped" in r:
                log(f"corpus: skipped {r['source']}: {r['skipped']}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    shards = [results[r.shard] for r in runs if "skipped" not in results[r.shard]]
    computed = sum(not s.pop("reused") for s in shards)
    manifest = {"version": CORPUS_VERSION, "grid": corpus_grid.describe(), "settings": settings,
                "datasets": sorted({r.dataset for r in runs}),
                "n_windows": sum(s["n_windows"] for s in shards),
                "window_shape": [settings["window"], int(corpus_grid.mask.sum())],
                "shards": [{k: v for k, v in s.items() if k not in ("seconds", "peak_rss_mb")}
                           for s in shards],
                "skipped": [{"source": results[r.shard]["source"],
                             "reason": results[r.shard]["skipped"]}
                            for r in runs if "skipped" in results[r.shard]]}
    write_mask_image(out / MASK, corpus_grid.mask, corpus_grid.shape,
                     np.asarray(corpus_grid.affine))
    write_json(out / MANIFEST, manifest)
    seconds = time.perf_counter() - t0
    log(f"corpus: {len(shards)} shard(s), {manifest['n_windows']} windows ({computed} computed, "
        f"{len(shards) - computed} kept), {len(manifest['skipped'])} run(s) skipped, "
        f"{seconds:.1f} s -> {out}")
    return {**manifest, "computed": computed, "seconds": seconds,
            "timings": [{"shard": s["shard"], "seconds": results[s["shard"]].get("seconds"),
                         "peak_rss_mb": results[s["shard"]].get("peak_rss_mb")} for s in shards]}
