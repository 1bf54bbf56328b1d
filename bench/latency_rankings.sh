#!/usr/bin/env bash
# Latency of the served rankings in one run: the service on ART with beam ranking (the default), then
# with greedy decoding + L2 (AUTOMR_CONSTRAINED=false AUTOMR_NUM_BEAMS=1); automr and bigrec at
# concurrency 1 and 16 each (bench/bench_load.py). Usage: bench/latency_rankings.sh ART OUT_DIR [REQUESTS]
set -euo pipefail
ART=$1; OUT=$2; REQ=${3:-20}
exec "$(dirname "$0")/load_settings.sh" "$ART" "$OUT" "beams=;greedy=AUTOMR_CONSTRAINED=false AUTOMR_NUM_BEAMS=1" -- \
  --modes automr,bigrec --concurrency 1,16 --requests "$REQ" --append-concurrency 1 --append-requests 5
