#!/usr/bin/env bash
# Wall time and peak RSS of `fmri2text demo` (cold: fresh run directory and empty model cache;
# warm: same run directory, dataset and caches reused) and of `fmri2text simulate` alone.
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
measure simulate "$BIN" simulate --out "$OUT/sim"
measure demo_cold "$BIN" demo --out "$OUT/demo"
measure demo_warm "$BIN" demo --out "$OUT/demo"
.venv/bin/python - "$OUT/demo/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
t, c = m["total"], m["controls"]
for k in ("bertscore_f1", "bleu1"):
    print(f"total {k}: decoder {t[k]:.2f}  shuffled {c['shuffled'][k]:.2f}  gap {t[k]-c['shuffled'][k]:+.2f}")
print("timings:", m.get("timings_s"))
PY
