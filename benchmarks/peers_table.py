"""Per held-out subject: the decoder beside its peers and controls, from RUN/metrics.json.

Usage: python benchmarks/peers_table.py RUN [RUN ...]   (one block per run; markdown rows)
"""

import json
import sys
from pathlib import Path

KEYS = ("bertscore_f1", "bleu1", "top1", "twoway")


def rows(run: Path) -> list[str]:
    m = json.loads((run / "metrics.json").read_text())
    p = m["permutation"]["subjects"]
    out = [f"**{run}**", "", "| subject | method | BERTScore-F1 | BLEU-1 | top-1 | 2-way | p (F1) | p (BLEU-1) |",
           "|---|---|---|---|---|---|---|---|"]
    fmt = lambda d, k: f"{d[k]:.2f}" if k in d else "–"  # noqa: E731
    for s, d in m["subjects"].items():
        out.append(f"| {s} | decoder | " + " | ".join(fmt(d, k) for k in KEYS)
                   + f" | {p[s]['bertscore_f1']:.4f} | {p[s]['bleu1']:.4f} |")
        for name in sorted(m["controls_subjects"]):
            c = m["controls_subjects"][name][s]
            out.append(f"| {s} | {name} | " + " | ".join(fmt(c, k) for k in KEYS) + " | | |")
    beat = all(m["subjects"][s][k] > m["controls_subjects"][c][s][k]
               for s in m["subjects"] for c in ("ridge", "ridge_tokens")
               if c in m["controls_subjects"] for k in ("bertscore_f1", "bleu1"))
    out.append(f"\nbeats ridge and ridge_tokens on BERTScore-F1 and BLEU-1 for every subject: {beat}")
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(rows(Path(arg))), end="\n\n")
