#!/usr/bin/env bash
# The load bench's c = 1 and c = 16 cells of two commits, as A/B pairs in one run: the service of commit
# A, then of commit B, PAIRS times, each on the same artefacts, port and machine (bench/bench_load.py,
# automr mode). Each commit runs from its own git worktree with this checkout's venv.
# Usage: bench/ab_load.sh REV_A REV_B ART OUT_DIR [PAIRS=2] [REQUESTS=32]
set -euo pipefail
A=$1; B=$2; ART=$(realpath "$3"); OUT=$(realpath -m "$4"); PAIRS=${5:-2}; REQ=${6:-32}
ROOT=$(git rev-parse --show-toplevel); PY="$ROOT/.venv/bin/python"; DATA="$ROOT/runs/ml-100k"
mkdir -p "$OUT"
for rev in "$A" "$B"; do
  [ -d "$OUT/tree-$rev" ] || git -C "$ROOT" worktree add --detach "$OUT/tree-$rev" "$rev" > /dev/null
done
for pair in $(seq 1 "$PAIRS"); do
  for rev in "$A" "$B"; do
    (cd "$OUT/tree-$rev" && AUTOMR_DATA_DIR="$DATA" AUTOMR_ARTEFACTS_DIR="$ART" AUTOMR_PORT=8012 \
      AUTOMR_LOG_LEVEL=warning "$PY" -m service.cli serve > "$OUT/server-$rev-$pair.log" 2>&1) &
    pid=$!
    "$PY" "$ROOT/bench/bench_load.py" --url http://127.0.0.1:8012 --data "$DATA" --modes automr --concurrency 1,16 \
      --requests "$REQ" --append-concurrency 1 --append-requests 5 --wait-ready 600 \
      --json "$OUT/load-$rev-$pair.json" > "$OUT/load-$rev-$pair.txt" 2>&1 || true
    pkill -TERM -f "service.cli serve" || true
    wait $pid || true
  done
done
"$PY" - "$OUT" "$A" "$B" "$PAIRS" <<'EOF'
import json, sys
out, a, b, pairs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def cell(rev, pair, c):
    d = json.load(open(f"{out}/load-{rev}-{pair}.json"))
    r = d["recommend"]["automr"][str(c)]
    return r["p50_ms"], r["throughput_rps"]
rows = []
for p in range(1, pairs + 1):
    for c in (1, 16):
        (pa, ta), (pb, tb) = cell(a, p, c), cell(b, p, c)
        rows.append({"pair": p, "c": c, "A_p50_ms": pa, "B_p50_ms": pb, "B/A_p50": pb / pa,
                     "A_rps": ta, "B_rps": tb, "B/A_rps": tb / ta})
        print(f"pair {p} c={c:2d}: p50 {pa:7.0f} -> {pb:7.0f} ms ({pb / pa:.3f}x) | {ta:5.2f} -> {tb:5.2f} req/s ({tb / ta:.3f}x)")
json.dump({"A": a, "B": b, "rows": rows}, open(f"{out}/ab.json", "w"), indent=2)
EOF
