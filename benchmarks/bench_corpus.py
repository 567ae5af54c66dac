"""Throughput and per-worker memory of ``fmri2text corpus build`` (issue 20), in one command.

On the same simulated ``.nii.gz`` runs (HAD timing: TR 2 s, 156 volumes; MNI grid at
``--resolution`` mm), as runs/s and MB/s of compressed input:

(a) the decompression bound: each whole file inflated once (zlib, one process), the least
    any reader of these files must do;
(b) ``prepare``'s one-process rate on one of the datasets (trial responses, float16 store);
(c) ``corpus build`` with 1 and 2 Dask workers (a local cluster started by the build, its
    start-up included), each from an empty corpus folder;
(d) peak RSS per worker (each worker process's ``ru_maxrss`` after its last shard) with the
    corpus at 1x, 2x and 4x the runs: it should stay flat, since a worker holds one run.

Usage::

    python benchmarks/bench_corpus.py [--data DIR] [--datasets 4] [--subjects 3] [--runs 2]
        [--resolution 4.0]

``--datasets`` simulated datasets (seeds 11, 12, ...) are written under ``--data`` unless
present; the grid is the first dataset's prepared mask. Results are printed; copy them to
BENCHMARKS.md with the machine line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fmri2text import machine  # noqa: E402
from fmri2text.config import SimulateConfig, load_config  # noqa: E402
from fmri2text.data.corpus import build_corpus, find_runs  # noqa: E402
from fmri2text.data.store import prepare  # noqa: E402
from fmri2text.simulate.bids_writer import simulate_dataset  # noqa: E402


def _mb(paths) -> float:
    return sum(os.path.getsize(p) for p in paths) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fmri2text-corpus-bench")
    ap.add_argument("--datasets", type=int, default=4)
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--resolution", type=float, default=4.0)
    a = ap.parse_args()
    sim = SimulateConfig(subjects=a.subjects, runs=a.runs, resolution=a.resolution, web_clips=2)
    roots = []
    for i in range(a.datasets):
        root = a.data / f"ds{i + 1}"
        if not (root / "dataset_description.json").is_file():
            simulate_dataset(root, replace(sim, seed=11 + i))
        roots.append(root)
    cfg = load_config(None, ["split.n_heldout=1"])  # prepare needs a training subject
    prepared = a.data / "prepared-ds1"
    shutil.rmtree(prepared, ignore_errors=True)
    bolds = [r.bold for r in find_runs(roots)]
    print(f"machine: {os.cpu_count()} cores, {machine.describe()}; {len(roots)} datasets, "
          f"{len(bolds)} runs, {_mb(bolds):.0f} MB of .nii.gz")
    for p in bolds:  # into the page cache before any timing
        Path(p).read_bytes()

    t = time.perf_counter()
    for p in bolds:
        zlib.decompress(Path(p).read_bytes(), wbits=31)
    dt = time.perf_counter() - t
    print(f"(a) zlib inflate, 1 process     {len(bolds) / dt:6.2f} runs/s  {_mb(bolds) / dt:6.1f} MB/s")

    one = [r.bold for r in find_runs(roots[:1])]
    t = time.perf_counter()
    prepare(roots[0], prepared, cfg, log=lambda _: None)
    dt = time.perf_counter() - t
    print(f"(b) prepare, 1 dataset          {len(one) / dt:6.2f} runs/s  {_mb(one) / dt:6.1f} MB/s")
    grid = prepared / "mask.nii.gz"

    for workers in (1, 2):
        out = a.data / f"corpus-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        c = load_config(None, [f"corpus.workers={workers}"])
        t = time.perf_counter()
        m = build_corpus(roots, out, grid, c, log=lambda _: None)
        dt = time.perf_counter() - t
        print(f"(c) corpus build, {workers} worker(s)   {len(bolds) / dt:6.2f} runs/s  "
              f"{_mb(bolds) / dt:6.1f} MB/s  ({m['n_windows']} windows, "
              f"{sum(s['bytes'] for s in m['shards']) / 1e6:.0f} MB of shards)")

    n_ds = len(roots)
    for share in (n_ds // 4, n_ds // 2, n_ds):
        if share < 1:
            continue
        out = a.data / f"corpus-mem-{share}"
        shutil.rmtree(out, ignore_errors=True)
        m = build_corpus(roots[:share], out, grid, load_config(None, ["corpus.workers=2"]),
                         log=lambda _: None)
        peak = max(t["peak_rss_mb"] for t in m["timings"])
        print(f"(d) {len(m['shards']):3d} runs, 2 workers: peak RSS per worker {peak:7.1f} MB")


if __name__ == "__main__":
    main()
