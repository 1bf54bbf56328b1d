#!/usr/bin/env bash
# The load bench against one server per setting, in one run: for each NAME=ENV of CONFIGS (';' between
# configs, ' ' between the variables of one), the service on ART with ENV set, then bench/bench_load.py
# with the arguments after '--' and --json OUT/NAME.json, then SIGTERM. List a setting twice under two
# names (def-1, plain-1, def-2, plain-2) for alternated A/B pairs.
# Usage: bench/load_settings.sh ART OUT "def=;plain=AUTOMR_DRAFT_TOKENS=0" -- --modes automr --requests 48
set -euo pipefail -f   # -f: no globbing of the settings ([] in a JSON list)
ART=$1; OUT=$2; CONFIGS=$3; shift 3
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
IFS=';' read -ra items <<< "$CONFIGS"
for item in "${items[@]}"; do
  name=${item%%=*}; vars=${item#*=}
  # shellcheck disable=SC2086  # one word per variable
  env $vars AUTOMR_DATA_DIR=runs/ml-100k AUTOMR_ARTEFACTS_DIR="$ART" AUTOMR_PORT=8011 AUTOMR_LOG_LEVEL=warning \
    .venv/bin/automr serve > "$OUT/server-$name.log" 2>&1 &
  pid=$!
  echo "== $name: ${vars:-the defaults}"
  .venv/bin/python bench/bench_load.py --url http://127.0.0.1:8011 --data runs/ml-100k --wait-ready 600 "$@" \
    --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 || echo "   bench_load failed: $OUT/$name.txt"
  pkill -TERM -f "service.cli serve" || true
  wait $pid || true
done
