"""Throughput of ``fmri2text prepare`` against its bound and its peer, in one command.

Measured on the same ``.nii.gz`` runs, as MB/s of compressed input:

(a) the bound: plain zlib decompression of each file (read + one ``zlib`` call), on one
    thread and on as many threads as prepare uses;
(b) the peer: nilearn ``NiftiMasker`` (fit with the common mask, transform with cosine
    drift removal + z-scoring, then the same trial-window averaging), same threads;
(c) ``prepare`` (trial table, responses, float16 store, manifest) in a fresh subprocess,
    with its peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``.

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
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
from fmri2text.config import load_config
from fmri2text.data.store import prepare
cfg = load_config(None, sys.argv[3:])
t = time.perf_counter()
prepare(sys.argv[1], sys.argv[2], cfg, log=lambda m: None)
print(json.dumps({"seconds": time.perf_counter() - t}))
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
    print(f"{len(files)} runs, {mb_in:.0f} MB .nii.gz, {n} worker thread(s), "
          f"{os.cpu_count()} cores")

    t_a1, sizes = timed(lambda: [decompress(f) for f in files])
    mb_raw = sum(sizes) / 1e6
    with ThreadPoolExecutor(n) as pool:
        t_an, _ = timed(lambda: list(pool.map(decompress, files)))

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
        t_c = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
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

    table = [("(a) zlib, 1 thread", t_a1), (f"(a) zlib, {n} threads (bound)", t_an),
             (f"(b) nilearn NiftiMasker, {n} threads (peer)", t_b), ("(c) fmri2text prepare", t_c)]
    print(f"\n{'method':44s} {'seconds':>8s} {'MB/s in':>8s} {'vs bound':>9s}")
    for name, t in table:
        print(f"{name:44s} {t:8.2f} {mb_in / t:8.1f} {t_an / t:8.0%}")
    print(f"\nprepare: {t_c / t_b:.2f}x the peer's time ({t_b / t_c:.1f}x faster); subprocess wall "
          f"{t_proc:.1f} s incl. interpreter start")
    print(f"prepare peak RSS {rss_mb:.0f} MB; input {mb_in:.0f} MB compressed, {mb_raw:.0f} MB "
          f"uncompressed; store {store_mb:.0f} MB float16 ({len(st)} trials x {st.n_features} voxels)")
    print(f"peer vs store responses: correlation {corr:.4f}")
    if args.json:
        args.json.write_text(json.dumps({
            "runs": len(files), "mb_in": mb_in, "mb_raw": mb_raw, "workers": n,
            "seconds": {name: t for name, t in table}, "prepare_peak_rss_mb": rss_mb,
            "store_mb": store_mb, "peer_correlation": corr}, indent=2))


if __name__ == "__main__":
    main()
