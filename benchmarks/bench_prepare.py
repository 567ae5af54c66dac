"""Throughput of ``fmri2text prepare`` against its bound and its peer, in one command.

Measured on the same ``.nii.gz`` runs, as MB/s of compressed input:

(a) plain decompression of each whole file, on as many threads as prepare uses, three ways:
    zlib (read + one call; also on one thread), ISA-L (read + one call: a new ``bytes`` per
    file) and ISA-L streamed from the file into one reused buffer per thread (no fresh pages:
    first touching ~340 MB of new memory per run costs the kernel as much as the inflate).
    Issue 3's bound is plain gzip decompression (zlib); its target, prepare at >= 70 % of
    it, is printed against zlib on the same threads. The "vs bound" column uses a stricter
    bound of our own, **the fastest of them** (so far always the last): prepare's own
    reader is an ISA-L stream into reused memory;
(b) the peer: nilearn ``NiftiMasker`` (fit with the common mask, transform with cosine
    drift removal + z-scoring, then the same trial-window averaging), same threads;
(c) ``prepare`` (trial table, responses, float16 store, manifest) in a fresh subprocess,
    with its peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``, and its fixed part: the
    time before its first run (pybids import and index, trial table, checks).

The load average is printed before and after: on a shared machine other jobs slow every row.

The files are read once before timing, so every method reads from the page cache.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_prepare.py [--data DIR] [--subjects 4]
        [--runs 3] [--resolution 2.0] [--workers N]

The dataset is written by ``fmri2text.simulate.bids_writer.simulate_dataset`` (MNI grid,
HAD timing: TR 2 s, 156 volumes, int16) unless ``--data`` already holds one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from isal import isal_zlib
from isal.isal_zlib import _GzipReader

CHILD = """
import json, sys, time
from fmri2text.config import load_config
from fmri2text.data.store import prepare
cfg = load_config(None, sys.argv[3:])
marks = {}
def log(m):  # when the first run starts: everything before is fixed cost (pybids, checks)
    if m.startswith("prepare: reading"):
        marks["first_run"] = time.perf_counter() - t
t = time.perf_counter()
prepare(sys.argv[1], sys.argv[2], cfg, log=log)
print(json.dumps({"seconds": time.perf_counter() - t, **marks}))
"""


def make_dataset(root: Path, subjects: int, runs: int, resolution: float) -> None:
    from fmri2text.config import SimulateConfig
    from fmri2text.simulate.bids_writer import simulate_dataset

    cfg = SimulateConfig(subjects=subjects, runs=runs, classes=24, resolution=resolution,
                         web_clips=0)
    t = time.perf_counter()
    simulate_dataset(root, cfg, progress=lambda m: print(f"  [{time.perf_counter() - t:5.0f} s] {m}",
                                                         flush=True))


def decompress(path: Path) -> int:
    """Bytes of uncompressed data in a .nii.gz: read the file, one zlib call."""
    raw = zlib.decompressobj(wbits=47).decompress(path.read_bytes())
    return len(raw)


def decompress_isal(path: Path) -> int:
    """The same with one ISA-L call (a new bytes object per file)."""
    return len(isal_zlib.decompress(path.read_bytes(), wbits=47))


_BUFFERS = threading.local()


def decompress_isal_reused(path: Path) -> int:
    """The same with ISA-L streamed from the file into this thread's reused buffer."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        size = struct.unpack("<I", fh.read(4))[0]  # gzip ISIZE: the size mod 2**32
        fh.seek(0)
        buf = getattr(_BUFFERS, "buf", None)
        if buf is None or len(buf) < size + 1:
            buf = _BUFFERS.buf = np.empty(size + 1, np.uint8)
        view, got, reader = memoryview(buf), 0, _GzipReader(fh, 1 << 20)
        while n := reader.readinto(view[got:]):
            got += n
            if got == len(buf):  # larger than ISIZE said (> 4 GiB): count the rest
                while block := reader.read(1 << 24):
                    got += len(block)
    return got


def nilearn_run(path: str, onsets: np.ndarray, tr: float, mask, hrf_delay: float,
                window: int) -> np.ndarray:
    """The peer on one run: (n_trials, n_voxels) window means of the cleaned time series."""
    from nilearn.maskers import NiftiMasker

    from fmri2text.data.bids import window_start

    masker = NiftiMasker(mask_img=mask, standardize="zscore_sample", detrend=True,
                         high_pass=0.01, t_r=tr, clean_args={"filter": "cosine"})
    x = masker.fit_transform(path)  # (T, V) float32
    start = window_start(onsets, tr, hrf_delay)
    return np.stack([x[s:s + window].mean(axis=0) for s in start])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fmri2text-bench-prepare")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--resolution", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    if not any(args.data.glob("sub-*/ses-*/func/*_bold.nii.gz")):
        print(f"simulating {args.subjects} subjects x {args.runs} runs at {args.resolution} mm "
              f"into {args.data}")
        make_dataset(args.data, args.subjects, args.runs, args.resolution)
    files = sorted(args.data.glob("sub-*/ses-*/func/*_bold.nii.gz"))
    mb_in = sum(f.stat().st_size for f in files) / 1e6
    for f in files:  # warm the page cache: every method below reads from memory
        f.read_bytes()
    n = args.workers
    load_before = os.getloadavg()[0]
    print(f"{len(files)} runs, {mb_in:.0f} MB .nii.gz, {n} worker thread(s), "
          f"{os.cpu_count()} cores, load average {load_before:.2f}")

    t_a1, sizes = timed(lambda: [decompress(f) for f in files])
    mb_raw = sum(sizes) / 1e6
    bounds = {}
    for name, fn in ((f"(a) zlib, {n} threads", decompress),
                     (f"(a) ISA-L, one call, {n} threads", decompress_isal),
                     (f"(a) ISA-L into reused memory, {n} threads", decompress_isal_reused)):
        with ThreadPoolExecutor(n) as pool:
            bounds[name], out = timed(lambda: list(pool.map(fn, files)))
        if out != sizes:
            sys.exit(f"{name} decompressed {sum(out)} bytes, zlib {sum(sizes)}")
    t_an = min(bounds.values())  # the bound: the fastest decompression of the same files

    overrides = [f"data.workers={n}", "split.n_heldout=1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, str(args.data), str(out), *overrides],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        t_proc = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"prepare failed:\n{r.stderr}")
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        child = json.loads(r.stdout.strip().splitlines()[-1])
        t_c, t_fixed = child["seconds"], child.get("first_run", float("nan"))
        if rss_mb <= before / 1024:
            print("note: peak RSS of the child not above earlier children's; value is a lower bound")

        from fmri2text.data.store import PreparedStore

        st = PreparedStore(out)
        trials = st.trials
        store_mb = sum(c["bytes"] for e in st.manifest["subjects"].values() for c in e["chunks"]) / 1e6
        import nibabel as nib

        mask = nib.load(out / "mask.nii.gz")
        mask = nib.Nifti1Image(np.asarray(mask.dataobj), mask.affine)  # in memory
        runs = list(trials.groupby("bold_path", sort=True))

        def peer(item):
            path, sub = item
            return sub["row"].to_numpy(), nilearn_run(path, sub["onset"].to_numpy(), float(sub["tr"].iat[0]),
                                                       mask, 4.0, 2)
        with ThreadPoolExecutor(n) as pool:
            t_b, results = timed(lambda: list(pool.map(peer, runs)))
        # agreement of the peer with the store (both: cosine drift + per-run z-scoring)
        rows = np.concatenate([r for r, _ in results])
        ours = st.get(rows)
        theirs = np.concatenate([v for _, v in results])
        corr = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])

    table = [("(a) zlib, 1 thread", t_a1)]
    table += [(name + (" (bound)" if t == t_an else ""), t) for name, t in bounds.items()]
    table += [(f"(b) nilearn NiftiMasker, {n} threads (peer)", t_b), ("(c) fmri2text prepare", t_c)]
    print(f"\n{'method':48s} {'seconds':>8s} {'MB/s in':>8s} {'vs bound':>9s}")
    for name, t in table:
        print(f"{name:48s} {t:8.2f} {mb_in / t:8.1f} {t_an / t:8.0%}")
    print("prepare vs each decompression: " + ", ".join(
        f"{name.split(', ')[0][4:]} {t / t_c:.0%}" for name, t in bounds.items()))
    t_zlib = bounds[f"(a) zlib, {n} threads"]
    print(f"target (>= 70 % of the bound): {t_zlib / t_c:.0%} of plain gzip decompression (zlib, "
          f"issue 3's (a)) -> {'met' if t_zlib / t_c >= 0.7 else 'NOT met'}; {t_an / t_c:.0%} of the "
          f"fastest decompression -> {'met' if t_an / t_c >= 0.7 else 'NOT met'}")
    print(f"\nprepare: {t_fixed:.2f} s before the first run (pybids import and index, trial table, "
          f"checks), then {t_c - t_fixed:.2f} s for the runs: {t_an / (t_c - t_fixed):.0%} of the bound "
          f"without the fixed part")
    print(f"prepare: {t_c / t_b:.2f}x the peer's time ({t_b / t_c:.1f}x faster); subprocess wall "
          f"{t_proc:.1f} s incl. interpreter start")
    print(f"prepare peak RSS {rss_mb:.0f} MB; input {mb_in:.0f} MB compressed, {mb_raw:.0f} MB "
          f"uncompressed; store {store_mb:.0f} MB float16 ({len(st)} trials x {st.n_features} voxels)")
    print(f"peer vs store responses: correlation {corr:.4f}")
    load_after = os.getloadavg()[0]
    print(f"load average {load_before:.2f} before, {load_after:.2f} after "
          f"(this machine has {os.cpu_count()} cores; other jobs slow every row)")
    if args.json:
        args.json.write_text(json.dumps({
            "runs": len(files), "mb_in": mb_in, "mb_raw": mb_raw, "workers": n,
            "seconds": {name: t for name, t in table}, "prepare_peak_rss_mb": rss_mb,
            "prepare_vs_bound": t_an / t_c, "prepare_fixed_seconds": t_fixed,
            "store_mb": store_mb, "peer_correlation": corr,
            "load_average": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
    main()
