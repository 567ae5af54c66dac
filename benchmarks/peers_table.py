"""Per held-out subject: the decoder beside its peers and controls, from RUN/metrics.json.

Usage: python benchmarks/peers_table.py RUN [RUN ...]   (one block per run; markdown rows)

The p columns: on the decoder's row, the within-subject permutation p against shuffled
pairings; on a control's row, the paired p that the decoder beats that control (metrics.json
``paired``; blank for runs evaluated before it existed).
"""

import json
import sys
from pathlib import Path

KEYS = ("bertscore_f1", "bleu1", "top1", "twoway")
PEERS = ("ridge", "ridge_tokens")


def rows(run: Path) -> list[str]:
    m = json.loads((run / "metrics.json").read_text())
    p = m["permutation"]["subjects"]
    paired = m.get("paired", {}).get("controls", {})
    out = [f"**{run}**", "", "| subject | method | BERTScore-F1 | BLEU-1 | top-1 | 2-way | p (F1) | p (BLEU-1) |",
           "|---|---|---|---|---|---|---|---|"]
    fmt = lambda d, k: f"{d[k]:.2f}" if k in d else "–"  # noqa: E731
    for s, d in m["subjects"].items():
        out.append(f"| {s} | decoder | " + " | ".join(fmt(d, k) for k in KEYS)
                   + f" | {p[s]['bertscore_f1']:.4f} | {p[s]['bleu1']:.4f} |")
        for name in sorted(m["controls_subjects"]):
            c = m["controls_subjects"][name][s]
            q = paired.get(name, {}).get("subjects", {}).get(s, {})
            pq = " | ".join(f"{q[k]['p']:.4f}" if k in q else "" for k in ("bertscore_f1", "bleu1"))
            out.append(f"| {s} | {name} | " + " | ".join(fmt(c, k) for k in KEYS) + f" | {pq} |")
    peers = [c for c in PEERS if c in m["controls_subjects"]]
    beat = all(m["subjects"][s][k] > m["controls_subjects"][c][s][k]
               for s in m["subjects"] for c in peers for k in ("bertscore_f1", "bleu1"))
    out.append(f"\nbeats ridge and ridge_tokens on BERTScore-F1 and BLEU-1 for every subject: {beat}")
    if paired:
        sig = all(paired[c]["subjects"][s][k]["p"] < 0.05
                  for s in m["subjects"] for c in peers for k in ("bertscore_f1", "bleu1"))
        out.append(f"each of those leads with paired p < 0.05: {sig}")
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(rows(Path(arg))), end="\n\n")
