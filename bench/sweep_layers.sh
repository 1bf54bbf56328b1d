#!/usr/bin/env bash
# Layer sensitivity (issue 4, METHOD.md §3): the automr - bigrec gain for several cut layers L, on the
# VALIDATION split (never test). For each L: a quick-budget generator and retriever (`--budget quick`,
# the service's quick start: service/reproduce.py QUICK_BUDGET, item elements), then bigrec and automr
# on one seeded validation subset, then the paired bootstrap.
#
#   bench/sweep_layers.sh [RUNS=runs] [LIMIT=200] [LAYERS="10 20 25"]
# Results: RUNS/ml-100k/sweep/L<L>/{bigrec,automr,compare}.json; artefacts in RUNS/ml-100k/sweep/L<L>/art
# (L=20 reuses RUNS/ml-100k/quickstart when it exists: the same budget). One thread per process.
set -euo pipefail
RUNS=${RUNS:-runs}
LIMIT=${LIMIT:-200}
LAYERS=${LAYERS:-"10 20 25"}
BIN=${BIN:-.venv/bin}
DATA=$RUNS/ml-100k
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for L in $LAYERS; do
  out=$DATA/sweep/L$L
  art=$out/art
  if [ "$L" = 20 ] && [ -f "$DATA/quickstart/retriever/retriever.safetensors" ]; then art=$DATA/quickstart; fi
  mkdir -p "$out"
  start=$(date +%s)
  AUTOMR_CUT_LAYER=$L "$BIN/automr" reproduce --dataset ml-100k --runs "$RUNS" --artefacts "$art" --until retriever \
    --budget quick
  for m in bigrec automr; do
    test -f "$out/$m.json" || "$BIN/automr" evaluate --data "$DATA" --split valid --limit "$LIMIT" --method $m \
      --artefacts "$art" --option cut=$L --option element=item --out "$out/$m.json"
  done
  "$BIN/automr" compare "$out/automr.json" "$out/bigrec.json" --out "$out/compare.json"
  echo "L=$L done in $(( $(date +%s) - start )) s"
done
"$BIN/python" bench/sweep_report.py "$DATA/sweep"
