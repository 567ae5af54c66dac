"""The prepared store: per-trial responses on disk, chunked float16, resumable, checksummed.

``prepare(bids, out, cfg)`` writes::

    out/trials.tsv             trial table + split + ``row`` (index into the store)
    out/mask.nii.gz, mask.npy  the common mask (volume data: NIfTI; always: flat C-order bool)
    out/store/sub-XX/          chunk-0000.npy ... (rows, n_columns_XX) float16, mask.npy,
                               subject.json (key, chunk sizes and sha256)
    out/manifest.json          written last: sources, config hash, chunks, counts, shape

Design:

- **Each input file's data is read once.** A subject's chunks hold its responses over its
  *own* good voxels (:func:`fmri2text.data.fmri.extract_responses` on that subject's trials:
  every run inflated once, by ISA-L into reused memory, rounded to float16 as it is computed).
  The common mask is the AND of the subjects' masks, computed at the end; the reader selects
  its columns when it reads a row. No second pass over the inputs, and a subject's chunks
  depend only on that subject's files and the data config, so adding a subject recomputes
  nothing else. (Headers are read again by the grid check, and 2 x 64 KiB of each file by the
  source fingerprint: about 0.1 % of a HAD run.)
- **Subjects in parallel**: a thread pool of ``min(cores, subjects)`` threads (ISA-L, numpy
  and hashlib release the GIL); each subject reads its runs with the remaining cores. All
  share one :class:`~fmri2text.data.nifti.Scratch` pool of work buffers, so a run reuses the
  pages of a finished one instead of faulting in ~0.6 GB of fresh memory (HAD at 2 mm).
- **Atomic and resumable**: a subject is built in ``store/.tmp-sub-XX-PID/`` and renamed to
  ``store/sub-XX`` when complete; ``manifest.json`` is removed before anything changes and
  written last, so a store with a manifest is always whole. A rerun skips every subject
  whose ``subject.json`` key (its sources' fingerprints, its trial rows, the data config,
  the chunking) matches and whose chunk files have their recorded sizes.
- **Source fingerprint** = size + mtime_ns + sha256 of the first and last 64 KiB (for a
  ``.nii.gz`` the tail holds gzip's CRC32 of the whole uncompressed data). Chunks are
  checked by the sha256 of the whole ``.npy`` file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd

from fmri2text.config import Config, DataConfig
from fmri2text.data.bids import load_trials
from fmri2text.data.fmri import _grid, extract_responses
from fmri2text.data.nifti import Scratch
from fmri2text.data.splits import assign_splits, check_leakage
from fmri2text.errors import UserError
from fmri2text.io import run_lock, write_bytes, write_json, write_text

FORMAT = "fmri2text-store/1"
CHUNK_BYTES = 16 << 20  # target chunk size when data.store_chunk_rows = 0
ENDS_BYTES = 64 << 10  # bytes hashed at each end of a source file
TEXT_COLUMNS = ["subject", "session", "task", "stim_file", "stim_path", "class_name", "group",
                "bold_path", "events_path", "split"]
SOURCE_HASH = "size + mtime_ns + sha256 of the first and last 64 KiB"
CHUNK_HASH = "sha256 of the whole .npy file"


# ----------------------------------------------------------------------------- hashing


def fingerprint(path: str | Path) -> dict:
    """Size, mtime and a hash of both ends of a source file (see the module docstring)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(ENDS_BYTES))
        if st.st_size > ENDS_BYTES:
            f.seek(max(ENDS_BYTES, st.st_size - ENDS_BYTES))
            h.update(f.read())
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256_ends": h.hexdigest()}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_mask_image(path: Path, mask: np.ndarray, shape, affine: np.ndarray) -> None:
    """A flat C-order mask over ``shape`` as a uint8 NIfTI (.nii.gz, same bytes every time)."""
    img = nib.Nifti1Image(np.asarray(mask).reshape(shape).astype(np.uint8), affine)
    write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _data_settings(cfg: DataConfig) -> dict:
    """The data config fields that change a subject's responses (``workers`` does not; the
    store holds unsmoothed windows, so neither does ``smoothing_fwhm``)."""
    d = asdict(cfg)
    d.pop("workers")
    d.pop("smoothing_fwhm")
    return d


def _confound_files(bold_path: str) -> list[str]:
    """fMRIPrep confound tables beside a BOLD file (same naming as fmri._confounds)."""
    p = Path(bold_path)
    stem = p.name.split("_space-")[0].split("_desc-")[0].split("_bold")[0]
    return [str(c) for kind in ("timeseries", "regressors")
            if (c := p.with_name(f"{stem}_desc-confounds_{kind}.tsv")).is_file()]


def _sources(trials: pd.DataFrame, cfg: DataConfig) -> list[str]:
    files = sorted(set(trials["bold_path"]) | set(trials["events_path"]))
    if cfg.confounds:
        files += sorted({c for b in trials["bold_path"].unique() for c in _confound_files(b)})
    return files


# ----------------------------------------------------------------------------- writing


def _subject_key(sub_trials: pd.DataFrame, prints: dict[str, dict], cfg: DataConfig) -> str:
    """Everything a subject's chunks depend on, hashed."""
    files = _sources(sub_trials, cfg)
    rows = sub_trials[["bold_path", "onset", "tr"]].to_numpy().tolist()
    return _sha256_json({"format": FORMAT, "data": _data_settings(cfg), "rows": rows,
                         "sources": [prints[f] for f in files]})


def _is_complete(folder: Path, key: str, verify: bool) -> bool:
    """True when ``folder`` holds a finished subject built from the same inputs."""
    try:
        info = json.loads((folder / "subject.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("key") != key or not (folder / "mask.npy").is_file():
        return False
    for c in info["chunks"]:
        path = folder / c["file"]
        if not path.is_file() or path.stat().st_size != c["bytes"]:
            return False
        if verify and sha256_file(path) != c["sha256"]:
            return False
    return True


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_npy(path: Path, arr: np.ndarray) -> tuple[int, str]:
    """Write ``arr`` as ``np.save`` does (format 1.0, C order) but from the array's memory,
    hashing it on the way: no copies; returns (bytes, sha256)."""
    arr = np.ascontiguousarray(arr)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    data = arr.reshape(-1).view(np.uint8)  # the array's bytes, not a copy
    digest = hashlib.sha256(head.getbuffer())
    digest.update(data)
    with open(path, "wb") as f:
        f.write(head.getbuffer())
        f.write(data)
    return head.tell() + data.nbytes, digest.hexdigest()


def _has_nonfinite16(x: np.ndarray) -> bool:
    """Whether a float16 array holds an inf or NaN: an all-ones exponent (3x numpy's isfinite)."""
    return x.size > 0 and int(np.bitwise_and(x.view(np.uint16), 0x7C00).max()) == 0x7C00


def _build_subject(sub: str, sub_trials: pd.DataFrame, cfg: DataConfig, workers: int,
                   store: Path, key: str, scratch: Scratch) -> dict:
    """Extract one subject's responses and write them as ``store/sub-XX`` (atomic rename)."""
    resp = extract_responses(sub_trials, replace(cfg, workers=workers), scratch, np.float16)
    x = resp.data  # (n_rows, [window,] n_columns) float16, columns = this subject's good voxels
    n_rows, n_cols = x.shape[0], x.shape[-1]
    row_bytes = 2 * int(np.prod(x.shape[1:]))
    rows_per_chunk = cfg.store_chunk_rows or max(1, CHUNK_BYTES // row_bytes)
    tmp = store / f".tmp-sub-{sub}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    chunks = []
    for i, start in enumerate(range(0, n_rows, rows_per_chunk)):
        half = x[start:start + rows_per_chunk]  # (rows, [window,] n_columns)
        if _has_nonfinite16(half):
            raise UserError(f"sub-{sub}: responses exceed the float16 range (|x| > 65504)",
                            path=sub_trials["bold_path"].iat[0],
                            fix="keep data.standardize=true (z-scored responses fit float16)")
        name = f"chunk-{i:04d}.npy"
        nbytes, digest = _write_npy(tmp / name, half)
        chunks.append({"file": name, "rows": len(half), "bytes": nbytes, "sha256": digest})
    mask = _npy_bytes(resp.feature_mask)
    (tmp / "mask.npy").write_bytes(mask)
    info = {"subject": sub, "key": key, "n_rows": n_rows, "n_columns": n_cols,
            "row_shape": list(x.shape[1:-1]),  # [] for aggregate=mean, [window] for stack
            "rows_per_chunk": rows_per_chunk, "dtype": "float16", "chunks": chunks,
            "mask_sha256": hashlib.sha256(mask).hexdigest(), "feature_space": resp.feature_space,
            "affine": None if resp.mask_img is None else resp.mask_img.affine.tolist(),
            "grid_shape": None if resp.mask_img is None else list(resp.mask_img.shape),
            "n_bad_nonfinite": resp.n_bad_nonfinite, "n_bad_constant": resp.n_bad_constant}
    write_json(tmp / "subject.json", info)
    scratch.give(x)  # written: the next subject reuses the pages
    final, old = store / f"sub-{sub}", store / f".old-sub-{sub}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)  # the subject appears complete, or not at all
    shutil.rmtree(old, ignore_errors=True)
    return info


def _trials_text(table: pd.DataFrame) -> str:
    """The trial table as TSV text, list-valued captions JSON-encoded, missing = n/a."""
    t = table.copy()
    if "captions" in t.columns:
        t["captions"] = [json.dumps(list(c), ensure_ascii=False) for c in t["captions"]]
    return t.to_csv(sep="\t", index=False, na_rep="n/a")


def read_trials(path: str | Path) -> pd.DataFrame:
    """``trials.tsv`` back as the trial table (captions as lists, labels as strings)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("trial table not found", path=path, fix="run fmri2text prepare first")
    head = pd.read_csv(path, sep="\t", nrows=0).columns
    t = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                    dtype={c: str for c in TEXT_COLUMNS if c in head})
    if "captions" in t.columns:
        t["captions"] = [json.loads(c) if isinstance(c, str) and c else [] for c in t["captions"]]
    return t


def _run_subjects(todo: list, trials: pd.DataFrame, cfg: DataConfig, store: Path,
                  log: Callable[[str], None]) -> None:
    """Build the subjects in ``todo`` [(label, key)], several at a time; first error wins."""
    cores = cfg.workers or len(os.sched_getaffinity(0)) or 1
    n_par = max(1, min(cores, len(todo)))
    inner = max(1, cores // n_par)
    rows = trials.groupby("subject", sort=False).indices
    t0 = time.perf_counter()
    scratch = Scratch()  # work buffers of all subjects: a run reuses a finished run's pages
    with ThreadPoolExecutor(max_workers=n_par, thread_name_prefix="prepare") as pool:
        futures = {pool.submit(_build_subject, sub, trials.iloc[rows[sub]], cfg, inner, store, key,
                               scratch): sub
                   for sub, key in todo}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    info = fut.result()  # re-raises the subject's error
                    log(f"prepare: sub-{futures[fut]} written: {info['n_rows']} trials x "
                        f"{info['n_columns']} voxels in {len(info['chunks'])} chunk(s) "
                        f"({time.perf_counter() - t0:.1f} s)")
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # running subjects finish and are kept
            raise


def prepare(bids: str | Path, out: str | Path, cfg: Config, log: Callable[[str], None] = print,
            verify: bool = False) -> Path:
    """Read a BIDS dataset into ``out``: trials.tsv, the chunked store, mask and manifest.

    Parameters
    ----------
    bids:
        Root of the BIDS dataset (read with :func:`fmri2text.data.bids.load_trials`).
    out:
        Output folder (created). An earlier prepare there is resumed or brought up to date.
    cfg:
        ``cfg.data`` (layout, response window, chunking, workers) and ``cfg.split``.
    log:
        Called with one-line progress messages.
    verify:
        Also check the sha256 of every existing chunk before keeping it (else: sizes only).

    Returns
    -------
    Path
        ``out``. Subjects whose inputs and data config are unchanged are not recomputed.
    """
    bids, out = Path(bids), Path(out)
    if not bids.is_dir():
        raise UserError("dataset folder not found", path=bids,
                        fix="pass --bids the root of a BIDS dataset (the folder holding sub-*/)")
    all_trials = load_trials(bids, cfg.data)  # (N rows): every trial, sorted by subject
    all_trials["row"] = np.arange(len(all_trials))  # store row of each trial
    table = assign_splits(all_trials, cfg.split)  # may drop rows (overlap: drop)
    check_leakage(table)
    _grid(all_trials)  # one grid for every run (headers only), before any heavy work
    files = _sources(all_trials, cfg.data)
    if cfg.data.captions and (bids / cfg.data.captions).is_file():
        files.append(str(bids / cfg.data.captions))
    prints = {f: fingerprint(f) for f in files}
    settings = {"data": _data_settings(cfg.data), "split": asdict(cfg.split)}
    tsv = _trials_text(table)
    inputs = _sha256_json({"format": FORMAT, "settings": settings, "sources": list(prints.values()),
                           "trials_sha256": hashlib.sha256(tsv.encode()).hexdigest()})

    with run_lock(out, "prepare"):  # the same folder lock as every other writing command
        return _prepare_locked(out, all_trials, table, tsv, cfg, prints, settings, inputs, log,
                               verify)


def _prepare_locked(out: Path, all_trials: pd.DataFrame, table: pd.DataFrame, tsv: str, cfg: Config,
                    prints: dict, settings: dict, inputs: str, log: Callable[[str], None],
                    verify: bool) -> Path:
    """The body of :func:`prepare`, run while holding the folder's lock."""
    store, manifest_path = out / "store", out / "manifest.json"
    subjects = list(dict.fromkeys(all_trials["subject"]))
    rows = all_trials.groupby("subject", sort=False).indices
    keys = {s: _subject_key(all_trials.iloc[rows[s]], prints, cfg.data) for s in subjects}
    complete = {s for s in subjects if _is_complete(store / f"sub-{s}", keys[s], verify)}
    finished = all((out / f).is_file() for f in ("manifest.json", "trials.tsv", "mask.npy"))
    if finished and len(complete) == len(subjects):
        try:
            same = json.loads(manifest_path.read_text(encoding="utf-8")).get("inputs_sha256") == inputs
        except ValueError:
            same = False
        if same:
            log(f"prepare: up to date, nothing recomputed ({len(subjects)} subjects)")
            return out
    manifest_path.unlink(missing_ok=True)  # from here on the folder is not a finished store
    store.mkdir(parents=True, exist_ok=True)
    for p in store.iterdir():  # leftovers of an interrupted run; subjects no longer present
        if p.name.startswith((".tmp-", ".old-")) or (p.is_dir() and p.name[4:] not in subjects):
            shutil.rmtree(p, ignore_errors=True)
    for s in subjects:
        if s in complete:
            log(f"prepare: sub-{s} unchanged, kept")
    todo = [(s, keys[s]) for s in subjects if s not in complete]
    if todo:
        runs = all_trials.loc[all_trials["subject"].isin([s for s, _ in todo]), "bold_path"]
        log(f"prepare: reading {runs.nunique()} run(s) of {len(todo)} subject(s)")
        _run_subjects(todo, all_trials, cfg.data, store, log)

    infos = {s: json.loads((store / f"sub-{s}" / "subject.json").read_text(encoding="utf-8"))
             for s in subjects}
    masks = {s: np.load(store / f"sub-{s}" / "mask.npy", allow_pickle=False) for s in subjects}
    common = np.logical_and.reduce(list(masks.values()))  # (n_grid,) bool, C order
    if not common.any():
        raise UserError("no voxel is good in every subject (the brain masks do not overlap)",
                        path=store, fix="check that all subjects are in the same space")
    write_bytes(out / "mask.npy", _npy_bytes(common))
    first = infos[subjects[0]]
    if first["affine"] is not None:
        write_mask_image(out / "mask.nii.gz", common, first["grid_shape"],
                         np.asarray(first["affine"]))
    write_text(out / "trials.tsv", tsv)

    entries, start = {}, 0
    for s in subjects:
        info = infos[s]
        entries[s] = {"first_row": start, "n_rows": info["n_rows"], "n_columns": info["n_columns"],
                      "folder": f"store/sub-{s}", "mask_sha256": info["mask_sha256"],
                      "n_bad_nonfinite": info["n_bad_nonfinite"],
                      "n_bad_constant": info["n_bad_constant"], "chunks": info["chunks"]}
        # the trial table is sorted by subject: each subject's rows are contiguous, in store order
        assert rows[s][0] == start and rows[s][-1] == start + info["n_rows"] - 1
        start += info["n_rows"]
    counts = {"subjects": len(subjects), "runs": int(all_trials["bold_path"].nunique()),
              "store_rows": start, "trials": len(table),
              "splits": {k: int(v) for k, v in table["split"].value_counts().sort_index().items()},
              "n_dropped_overlap": int(table.attrs.get("n_dropped_overlap", 0))}
    manifest = {
        "format": FORMAT, "dtype": "float16",
        "shape": [start, *first["row_shape"], int(common.sum())],
        "n_features": int(common.sum()), "feature_space": first["feature_space"],
        "grid_shape": first["grid_shape"], "counts": counts,
        "config_sha256": _sha256_json(settings), "config": settings,
        "inputs_sha256": inputs, "source_hash": SOURCE_HASH, "chunk_hash": CHUNK_HASH,
        "mask_sha256": hashlib.sha256(_npy_bytes(common)).hexdigest(),
        "sources": list(prints.values()), "subjects": entries}
    write_json(manifest_path, manifest)  # last: the store is complete
    log(f"prepare: {start} trials x {manifest['n_features']} features, {len(subjects)} subjects "
        f"({len(todo)} computed) -> {out}")
    return out


# ----------------------------------------------------------------------------- reading


class PreparedStore:
    """Random access to a prepared store: ``get(rows)`` reads only those rows.

    Parameters
    ----------
    out:
        The folder written by :func:`prepare`.
    verify:
        Check each chunk's sha256 the first time this process opens it (reads that chunk
        once); a corrupt or missing chunk raises :class:`UserError` naming the file.
    max_open:
        Memory maps kept open at once (least recently used are closed).
    """

    def __init__(self, out: str | Path, verify: bool = True, max_open: int = 64):
        self.root = Path(out)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise UserError("no manifest.json: not a finished prepared store", path=path,
                            fix="run (or rerun, it resumes) fmri2text prepare --bids DIR --out "
                                f"{self.root}")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"store format {self.manifest.get('format')!r}, expected {FORMAT!r}",
                            path=path, fix="rerun fmri2text prepare with this version")
        self.verify, self.max_open = verify, max_open
        self.n_features = int(self.manifest["n_features"])
        self.shape = tuple(self.manifest["shape"])  # (store rows, [window,] n_features)
        self._lead = self.shape[1:-1]  # () for aggregate=mean, (window,) for stack
        common = self._load_mask(self.root / "mask.npy", self.manifest["mask_sha256"])
        self._chunks: list[tuple[Path, int, int, str]] = []  # (file, rows, subject, sha256)
        starts, self._cols, self._widths = [], [], []
        for i, (sub, e) in enumerate(self.manifest["subjects"].items()):
            folder = self.root / e["folder"]
            own = self._load_mask(folder / "mask.npy", e["mask_sha256"])  # (n_grid,) bool
            cols = np.flatnonzero(common[own])  # this subject's columns in the common mask
            self._cols.append(None if len(cols) == e["n_columns"] else cols)
            self._widths.append(int(e["n_columns"]))
            row = e["first_row"]
            for c in e["chunks"]:
                starts.append(row)
                self._chunks.append((folder / c["file"], c["rows"], i, c["sha256"]))
                row += c["rows"]
        self._starts = np.asarray(starts, dtype=np.int64)  # (n_chunks,) first store row
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._verified: set[int] = set()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._trials: pd.DataFrame | None = None

    @staticmethod
    def _load_mask(path: Path, digest: str) -> np.ndarray:
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if hashlib.sha256(data).hexdigest() != digest:
            raise UserError("mask file is missing or corrupt (sha256 mismatch)", path=path,
                            fix="rerun fmri2text prepare on this folder to rebuild it")
        return np.load(io.BytesIO(data), allow_pickle=False)

    @property
    def trials(self) -> pd.DataFrame:
        """The trial table of ``trials.tsv``; its ``row`` column indexes :meth:`get`."""
        if self._trials is None:
            self._trials = read_trials(self.root / "trials.tsv")
        return self._trials

    def __len__(self) -> int:
        return self.shape[0]

    def _chunk(self, i: int) -> np.ndarray:
        """Memory map of chunk ``i`` (rows, [window,] n_columns) float16, checked once per process."""
        with self._lock:
            if os.getpid() != self._pid:  # forked worker: its own maps and checks
                self._open.clear()
                self._verified = set()
                self._pid = os.getpid()
            if i in self._open:
                self._open.move_to_end(i)
                return self._open[i]
            path, rows, sub, digest = self._chunks[i]
            fix = (f"delete {path.parent} and rerun fmri2text prepare on {self.root} "
                   "(unchanged subjects are kept)")
            if not path.is_file():
                raise UserError("store chunk is missing", path=path, fix=fix)
            if self.verify and i not in self._verified:
                if sha256_file(path) != digest:
                    raise UserError("store chunk is corrupt (sha256 differs from the manifest)",
                                    path=path, fix=fix)
                self._verified.add(i)
            try:
                mm = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as err:
                raise UserError(f"store chunk is not a valid .npy file: {err}", path=path, fix=fix) from None
            want = (rows, *self._lead, self._widths[sub])
            if mm.dtype != np.float16 or mm.shape != want:
                raise UserError(f"store chunk has shape {mm.shape} {mm.dtype}, expected {want} "
                                "float16", path=path, fix=fix)
            self._open[i] = mm
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
            return mm

    def get(self, rows) -> np.ndarray:
        """Responses of store rows ``rows``, in that order, as float32.

        Returns (len(rows), n_features), or (len(rows), window, n_features) for a store
        prepared with ``data.aggregate=stack``.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # (B,)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"store rows must be in [0, {self.shape[0]}), got "
                             f"{rows.min()}..{rows.max()}")
        out = np.empty((rows.size, *self._lead, self.n_features), dtype=np.float32)  # (B, [W,] F)
        chunk = np.searchsorted(self._starts, rows, side="right") - 1  # (B,)
        for i in np.unique(chunk):
            sel = np.flatnonzero(chunk == i)
            block = self._chunk(int(i))[rows[sel] - self._starts[i]]  # (b, [W,] n_columns) f16
            cols = self._cols[self._chunks[i][2]]
            out[sel] = block if cols is None else block[..., cols]
        return out
