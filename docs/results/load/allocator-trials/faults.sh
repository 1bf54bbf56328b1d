#!/bin/bash
# $1 = dir to run the server from; prints req/s and minor faults per second under c=16 recommend-only load
cd $1
export AUTOMR_DATA_DIR=/work/main/runs/ml-100k AUTOMR_ARTEFACTS_DIR=/work/main/runs/ml-100k/quickstart AUTOMR_LOG_LEVEL=warning AUTOMR_PORT=8094
MALLOC_CONF=$2 /work/main/.venv/bin/python -m service.cli serve > /tmp/faults-serve.log 2>&1 &
until curl -sf localhost:8094/readyz >/dev/null; do sleep 2; done
PID=$(pgrep -f "service.cli serve" | head -1)
/work/main/.venv/bin/python /work/main/bench/soak.py --url http://127.0.0.1:8094 --data /work/main/runs/ml-100k --minutes 1.5 --ratio 0 --out /tmp/faults-soak > /tmp/faults-soak.log 2>&1 &
sleep 30; f0=$(awk '{print $10}' /proc/$PID/stat); u0=$(awk '{print $14+$15}' /proc/$PID/stat); sleep 40; f1=$(awk '{print $10}' /proc/$PID/stat); u1=$(awk '{print $14" "$15}' /proc/$PID/stat)
echo "$2 minflt/s $(( (f1 - f0) / 40 )) utime,stime(ticks) $u1 start $u0"
wait %2; grep -o '"req_per_s": [0-9.]*' /tmp/faults-soak.json | head -1
kill %1; wait
