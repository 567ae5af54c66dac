#!/usr/bin/env bash
# The decoder against its linear peers with one component taken out at a time, on the same
# data, teacher and annotations (issue 18's ablation table).
# Usage: bash benchmarks/ablation.sh RUN OUT [variant ...]
#   RUN: a finished `fmri2text run` / `demo` directory (its bids/, or BIDS=DIR in the
#        environment when the dataset lives elsewhere; prepared/,
#        teacher/, annotations/, eval_annotations/ are reused; nothing in RUN is changed)
#   OUT: where each variant's run directory goes (OUT/<variant>)
#   variants (default all): full no_linear no_deep mbm_init no_dance no_adaptors no_alignment
# Prints benchmarks/peers_table.py's rows for each variant.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$(realpath "$1"); OUT=$2; shift 2
VARIANTS=("${@:-full no_linear no_deep mbm_init no_dance no_adaptors no_alignment}")
BIDS=${BIDS:-$RUN/bids}
export HF_HUB_OFFLINE=1
declare -A OVERRIDES=(
  [full]=""
  [no_linear]="encoder.linear_rank=0 stage1.steps=250"   # the paper's student alone
  [no_deep]="stage1.steps=1 stage1.val_every=1 stage2.lr=1e-12"  # linear path + gain only
  [mbm_init]="stage1.mbm_checkpoint=auto"
  [no_dance]="loss.domain_adaptation=false"
  [no_adaptors]="encoder.adapter_rank=0"
  [no_alignment]="encoder.align_subjects=false"  # held-out subjects not aligned (CORAL)
)
for v in ${VARIANTS[@]}; do
  dir=$OUT/$v
  rm -rf "$dir"; mkdir -p "$dir"
  cp -r "$RUN"/{prepared,teacher,annotations,eval_annotations,config.yaml} "$dir"/
  .venv/bin/python - "$RUN/steps.json" "$dir/steps.json" <<'PY'
import json, sys
steps = json.load(open(sys.argv[1]))
json.dump({k: v for k, v in steps.items() if k in ("prepare", "teacher", "annotate")},
          open(sys.argv[2], "w"), indent=1)
PY
  # shellcheck disable=SC2086
  /usr/bin/time -v .venv/bin/fmri2text run --bids "$BIDS" --out "$dir" ${OVERRIDES[$v]} \
      >"$dir.log" 2>"$dir.time" || { tail -20 "$dir.log"; exit 1; }
  echo "== $v ($(grep 'Elapsed (wall' "$dir.time" | awk '{print $NF}'))"
  .venv/bin/python benchmarks/peers_table.py "$dir"
done
