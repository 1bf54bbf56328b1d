"""A forward run whole on two intra-op threads against the same forward in two row parts
(``model/row_split.py``), alone and beside another CPU job, in one process (BENCHMARKS §7.1).

For each shape (rows x new positions, over a KV cache of ``past`` positions): the median ms of
``--repeats`` forwards of the base model's layers, whole (``lm.row_split = None``, 2 intra-op
threads) and in 2 row parts; then the same beside ``--busy`` busy loops in one process session of
their own (as another two-thread job runs), when ``--beside`` is given.

    python bench/row_split.py --out docs/results/latency/row-split.json --beside
"""
from __future__ import annotations

import argparse
import json
import signal
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_load import machine  # noqa: E402
from model.artefacts import default_model_path  # noqa: E402
from model.generation.forward import forward  # noqa: E402
from model.generation.kv_cache import growing_cache  # noqa: E402
from model.llm import SplitLM  # noqa: E402
from model.row_split import RowSplit  # noqa: E402

# (rows, new positions, cached positions): decoding steps of beams, prefills of several prompts
SHAPES = [(2, 1, 150), (20, 1, 150), (80, 1, 150), (160, 1, 150), (320, 1, 150), (2, 200, 0), (8, 200, 0),
          (16, 200, 0)]


def time_forward(lm, rows: int, new: int, past: int, repeats: int) -> float:
    """Median ms of a forward of ``rows`` x ``new`` tokens after ``past`` cached positions (zero keys
    and values: the cost depends on the shapes only)."""
    g = torch.Generator().manual_seed(0)
    cfg = lm.config
    kv = (rows, cfg.num_key_value_heads, past, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    zeros, times = torch.zeros(kv, dtype=lm.dtype), []
    for _ in range(repeats):
        cache = growing_cache(cfg, spare=new + 1)
        if past:
            for layer in cache.layers:
                layer.update(zeros, zeros)
        ids = torch.randint(100, 1000, (rows, new), generator=g)
        mask = torch.ones(rows, past + new, dtype=torch.long)
        pos = torch.arange(past, past + new).expand(rows, new)
        with torch.no_grad():
            t0 = time.perf_counter()
            forward(lm, ids, mask, pos, cache)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(lm, split: RowSplit, repeats: int) -> list[dict]:
    out = []
    for rows, new, past in SHAPES:
        lm.row_split = None
        whole = time_forward(lm, rows, new, past, repeats)
        lm.row_split = split
        parts = time_forward(lm, rows, new, past, repeats)
        lm.row_split = None
        row = {"rows": rows, "new": new, "past": past, "whole_ms": round(whole, 1), "parts_ms": round(parts, 1),
               "parts_over_whole": round(parts / whole, 3)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--beside", action="store_true", help="again beside --busy busy loops (one job)")
    ap.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    lm = SplitLM.load(default_model_path(), cut=20)
    split = RowSplit(2, min_tokens=1)
    result = {"machine": machine(), "command": sys.argv, "threads": torch.get_num_threads(),
              "alone": measure(lm, split, a.repeats)}
    if a.beside:
        loops = " & ".join([f"{sys.executable} -c 'while True: pass'"] * a.busy) + " & wait"
        busy = subprocess.Popen(["sh", "-c", loops], start_new_session=True)
        try:
            time.sleep(1)
            result["beside"] = measure(lm, split, a.repeats)
        finally:
            os.killpg(busy.pid, signal.SIGKILL)
            busy.wait()
    split.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
