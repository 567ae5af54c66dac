#!/usr/bin/env bash
# Wall time and peak RSS of `fmri2text demo` (the whole pipeline, `run --simulate`) cold (fresh
# run directory, empty model cache) and warm (same run directory and caches: every step is
# skipped), and of `fmri2text simulate` alone; then the demo's table against its controls.
# Usage: bash benchmarks/bench_demo.sh [OUTDIR]   (results printed; copy them to BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d /tmp/fmri2text-bench.XXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 FMRI2TEXT_CACHE="$OUT/cache"
BIN=.venv/bin/fmri2text
measure() {  # name, command...
  local name=$1; shift
  /usr/bin/time -v "$@" >"$OUT/$name.log" 2>"$OUT/$name.time" || { cat "$OUT/$name.time"; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$OUT/$name.time" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$OUT/$name.time" | awk '{print $NF}')
  printf '%-10s wall %-10s peak RSS %6.2f GB\n' "$name" "$wall" "$(awk -v r="$rss" 'BEGIN{print r/1048576}')"
}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB, $(uname -m); $(date -u +%F)"
echo "cpu: $(.venv/bin/python -c 'from fmri2text import machine; print(machine.describe())')"
measure simulate "$BIN" simulate --out "$OUT/sim"
measure demo_cold "$BIN" demo --out "$OUT/demo"
measure demo_warm "$BIN" demo --out "$OUT/demo"
.venv/bin/python - "$OUT/demo" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
m = json.loads((run / "metrics.json").read_text())
rows = {**m["subjects"], "total": m["total"]}
perm = {**m["permutation"]["subjects"], "total": m["p_values"]}
for s, row in rows.items():
    for k in ("bertscore_f1", "bleu1"):
        ctl = {c: (m["controls"][c] if s == "total" else m["controls_subjects"][c][s])[k]
               for c in m["controls"]}
        print(f"{s:7s} {k:12s} decoder {row[k]:6.2f}  "
              + "  ".join(f"{c} {v:6.2f}" for c, v in ctl.items()) + f"  p {perm[s][k]:.4f}")
steps = json.loads((run / "steps.json").read_text())
print("step seconds:", {k: v["seconds"] for k, v in steps.items()})
PY
