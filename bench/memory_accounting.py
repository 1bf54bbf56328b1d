"""Where the service's memory goes: the runtime, the weights, the index and the table, a batch's working set.

    python bench/memory_accounting.py --data runs/ml-100k --artefacts runs/ml-100k/quickstart \
        --url http://127.0.0.1:8000 --pid $(pgrep -f "service.cli serve")

Part 1 loads, in this process and in the service's order, the runtime (torch, transformers, FAISS,
FastAPI) and then the components (``service.components.load_components``: weights, tuned layers,
catalogue, FAISS index, retriever), printing the RSS after each step beside the sizes of what was
loaded (parameter bytes, index bytes, the item-vector table). Part 2 (with ``--url`` and ``--pid``)
reads a running server's RSS idle, then during ``--bursts`` bursts of ``--batch`` concurrent
``/recommend`` requests (distinct users), sampled every 20 ms: the peak minus the idle RSS is the
working set of one batch. It prints the KV cache that the beams of such a batch hold, computed from
the model's shape, beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

try:
    from bench.procfs import status_bytes
except ImportError:  # run as a script: python bench/memory_accounting.py
    from procfs import status_bytes

MB = 2**20


def rss(pid: str | int = "self") -> float:
    """VmRSS in MB."""
    return status_bytes(pid, "VmRSS") / MB


def load_steps(data: str, artefacts: str) -> list[dict]:
    rows = [{"step": "python", "rss_mb": rss()}]
    import fastapi  # noqa: F401
    import faiss  # noqa: F401
    import torch
    import transformers  # noqa: F401
    rows.append({"step": "runtime: torch, transformers, faiss, fastapi imported", "rss_mb": rss()})
    from service.components import load_components
    from service.settings import Settings

    comps = load_components(Settings(data_dir=Path(data), artefacts_dir=Path(artefacts)))
    p = comps.pipeline
    params = sum(t.numel() * t.element_size() for t in p.lm.model.parameters())
    params += sum(t.numel() * t.element_size() for t in p.lm.model.buffers())
    index = p.index.n_items * p.index.dim * 4
    table = len(p.titles) * p.lm.hidden_size * 2  # the service's float16 item-vector table
    ret = sum(t.numel() * t.element_size() for t in p.retriever.parameters()) if p.retriever is not None else 0
    rows.append({"step": "components loaded (model, tuned layers, catalogue, FAISS index, retriever)", "rss_mb": rss(),
                 "parts_mb": {"weights (parameters + buffers)": params / MB, "FAISS index (float32 vectors)": index / MB,
                              "item-vector table (float16)": table / MB, "retriever": ret / MB}})
    cfg = p.lm.model.config
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    rows.append({"kv_bytes_per_token": kv_per_token * torch.tensor([], dtype=p.lm.dtype).element_size(),
                 "vocab": cfg.vocab_size})
    return rows


async def burst(url: str, users: list[str], pid: int) -> tuple[float, float]:
    """One /recommend per user, all at once; (seconds, the server's peak RSS in MB meanwhile)."""
    import aiohttp

    stop, peak = threading.Event(), [rss(pid)]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        async def one(u: str) -> int:
            async with s.post(url + "/recommend", json={"user_id": u, "k": 10}) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*(one(u) for u in users))
    stop.set()
    t.join()
    assert all(x == 200 for x in statuses), statuses
    return time.perf_counter() - t0, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/ml-100k")
    ap.add_argument("--artefacts", required=True)
    ap.add_argument("--url")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    steps = load_steps(a.data, a.artefacts)
    prev = 0.0
    for row in steps:
        if "rss_mb" in row:
            print(f"{row['rss_mb']:8.0f} MB  (+{row['rss_mb'] - prev:6.0f})  {row['step']}")
            prev = row["rss_mb"]
            for k, v in row.get("parts_mb", {}).items():
                print(f"{'':24}{v:8.1f} MB  {k}")
    result = {"load": steps}
    if a.url and a.pid:
        import csv

        with open(Path(a.data) / "interactions.csv", newline="") as f:
            users = sorted({r["user_id"] for r in csv.DictReader(f)}, key=int)
        idle = rss(a.pid)
        print(f"server idle: {idle:.0f} MB")
        bursts = []
        for b in range(a.bursts):
            before = rss(a.pid)
            took, peak = asyncio.run(burst(a.url, users[b * a.batch:(b + 1) * a.batch], a.pid))
            time.sleep(2)
            bursts.append({"before_mb": before, "peak_mb": peak, "after_2s_mb": rss(a.pid), "seconds": took})
            print(f"burst {b + 1}: {a.batch} requests in {took:.1f} s, RSS {before:.0f} -> peak {peak:.0f} "
                  f"-> {bursts[-1]['after_2s_mb']:.0f} MB 2 s later")
        result["server"] = {"idle_mb": idle, "bursts": bursts}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
