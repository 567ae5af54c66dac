"""Greedy against minimum-Bayes-risk decoding of a finished run's held-out test trials.

Usage: python benchmarks/mbr_decode.py RUN BIDS [SAMPLES] [BATCH] [BETA]

Decodes the student's tokens of every test trial greedily and with ``pipeline.decode_samples
= SAMPLES`` (default 16; BATCH answer rows per batch, default 128 = 8 prompts of 16;
``pipeline.decode_mbr_beta`` = BETA, default 1), scores both per held-out subject against the run's
references with the run's scorer, prints them beside the run's ``ridge`` peer, and the seconds
each took. Nothing in RUN is changed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from fmri2text.api import Decoder
from fmri2text.config import load_config
from fmri2text.data.datasets import load_windows, split_rows
from fmri2text.evaluation.metrics import TextScorer


def main(run: Path, bids: Path, samples: int = 16, batch: int = 128, beta: float = 1.0) -> None:
    cfg = load_config(run / "config.yaml", [])
    windows = load_windows(bids, cfg)
    test = split_rows(windows.trials, "test")
    decoder = Decoder.from_run(run, cfg, feature_mask=windows.feature_mask, grid=windows.grid)
    z = decoder.fmri_tokens(windows.data, test)
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    refs = [[r["video2text"]] for r in rows]
    subjects = np.array([r["subject"] for r in rows])
    instr = [rows[0]["instruction"]] * len(rows)
    texts, seconds = {}, {}
    for name, n in (("greedy", 0), (f"mbr{samples}", samples)):
        decoder.generation.update(samples=n, batch_size=batch, mbr_beta=beta)
        t = time.perf_counter()
        texts[name] = decoder.generate(z, instr)
        seconds[name] = time.perf_counter() - t
    texts["ridge"] = [json.loads(line)["fmri2text"] for line in
                      (run / "controls" / "ridge.jsonl").read_text().splitlines()]
    scorer = TextScorer(cfg.evaluation)
    print(f"{run}: {len(rows)} test trials; seconds " +
          ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print("| subject | method | BERTScore-F1 | BLEU-1 |\n|---|---|---|---|")
    for s in sorted(set(subjects)):
        keep = np.flatnonzero(subjects == s)
        for name, hyps in texts.items():
            m = scorer.score([hyps[i] for i in keep], [refs[i] for i in keep])
            print(f"| {s} | {name} | {m['bertscore_f1']:.2f} | {m['bleu1']:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:5]),
         *(float(a) for a in sys.argv[5:6]))
