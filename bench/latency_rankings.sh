#!/usr/bin/env bash
# Latency of the served rankings in one run: the service on ART with beam ranking (the default), then
# with greedy decoding + L2 (AUTOMR_CONSTRAINED=false AUTOMR_NUM_BEAMS=1); automr and bigrec at
# concurrency 1 and 16 each (bench/bench_load.py). Usage: bench/latency_rankings.sh ART OUT_DIR [REQUESTS]
set -euo pipefail
ART=$1; OUT=$2; REQ=${3:-20}
mkdir -p "$OUT"
for ranking in beams greedy; do
  if [ "$ranking" = greedy ]; then export AUTOMR_CONSTRAINED=false AUTOMR_NUM_BEAMS=1; else unset AUTOMR_CONSTRAINED AUTOMR_NUM_BEAMS; fi
  AUTOMR_DATA_DIR=runs/ml-100k AUTOMR_ARTEFACTS_DIR="$ART" AUTOMR_PORT=8011 AUTOMR_LOG_LEVEL=warning \
    .venv/bin/automr serve > "$OUT/server-$ranking.log" 2>&1 &
  pid=$!
  .venv/bin/python bench/bench_load.py --url http://127.0.0.1:8011 --data runs/ml-100k --modes automr,bigrec \
    --concurrency 1,16 --requests "$REQ" --append-concurrency 1 --append-requests 5 --wait-ready 600 --json "$OUT/load-$ranking.json" \
    > "$OUT/load-$ranking.txt" 2>&1 || true
  kill -TERM $pid; wait $pid || true
done
