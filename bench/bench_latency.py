"""Latency of the recommend path, in one run on the same prompts (batch 1, the online case).

Prints, per stage, p50/p90/mean over N test samples:
  encode_lower   layers 1..L over the short-term prompt (the query z_t / a memory element)
  bigrec         full recommendation without memory (prefill + generation + grounding)
  automr         the same with a retrieved memory element in the slot, as the service runs it: the
                 memory vectors are read (from the offline cache here, from Redis online) and z_t is
                 taken from the generator's own prefill (needs ARTEFACTS/retriever; skipped otherwise;
                 `--policy semantic` measures the same path with cosine retrieval)
  full-history   every history title in the prompt (up to 100), no slot
and the ratios automr/bigrec and full-history/bigrec, all measured in this one process.

    python bench/bench_latency.py --data runs/ml-100k --n 30
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from model.data.prepared import PreparedDataset
from model.eval.evaluator import get_method


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _summary(xs: list[float]) -> dict:
    return {"p50_ms": 1000 * _pct(xs, 0.5), "p90_ms": 1000 * _pct(xs, 0.9), "mean_ms": 1000 * statistics.mean(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--artefacts", type=Path, default=None)
    ap.add_argument("--n", type=int, default=30, help="test samples (the first N with a full memory)")
    ap.add_argument("--cut", type=int, default=20)
    ap.add_argument("--policy", default="learned", choices=["learned", "semantic", "random"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = PreparedDataset.load(args.data)
    art = args.artefacts or args.data / "artefacts"
    samples = [s for s in ds.split("test") if len(s.history) > ds.k_short + 10][: args.n]
    opts = {"cut": args.cut}
    methods = {"bigrec": "bigrec", "full-history": "full-history"}
    memory_method = {"learned": "automr", "semantic": "semantic", "random": "random"}[args.policy]
    if args.policy != "learned" or (art / "retriever" / "retriever.safetensors").is_file():
        methods["automr"] = memory_method
    rankers = {k: get_method(m, dataset=ds, options=opts, artefact_dir=art / m, progress=False) for k, m in methods.items()}
    lm = rankers["bigrec"].recommender.lm
    builder = rankers["bigrec"].recommender.builder
    if "automr" in rankers:  # memory vectors come from the offline cache: encode them before timing
        rankers["automr"].memory.prefetch(samples)

    times: dict[str, list[float]] = {"encode_lower": [], **{k: [] for k in rankers}}
    prompt_tokens: dict[str, list[int]] = {k: [] for k in rankers}
    new_tokens: dict[str, list[int]] = {k: [] for k in rankers}
    for s in samples[:2]:  # warm-up
        for r in rankers.values():
            r.rank([s], 20)
    for s in samples:
        ids = builder.build([ds.catalogue.titles[i] for i in s.short_term(ds.k_short)]).input_ids
        t0 = time.perf_counter()
        lm.encode_lower([ids])
        times["encode_lower"].append(time.perf_counter() - t0)
        for name, r in rankers.items():
            req = r._request(s)
            req.query = None  # online: z_t from the generator's prefill, no separate lower pass
            prompt_tokens[name].append(len(r.recommender.prompts([req])[0].input_ids))
            t0 = time.perf_counter()
            rec = r.recommender.recommend([req], topk=20)[0]
            times[name].append(time.perf_counter() - t0)
            new_tokens[name].append(len(lm.tokenizer(rec.generated, add_special_tokens=False).input_ids))

    result = {
        "n": len(samples),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()}",
        "stages": {k: _summary(v) for k, v in times.items()},
        "prompt_tokens_mean": {k: statistics.mean(v) for k, v in prompt_tokens.items()},
        "generated_tokens_mean": {k: statistics.mean(v) for k, v in new_tokens.items()},
    }
    p50 = {k: v["p50_ms"] for k, v in result["stages"].items()}
    result["ratios_p50"] = {"full-history/bigrec": p50["full-history"] / p50["bigrec"],
                            "encode_lower/bigrec": p50["encode_lower"] / p50["bigrec"]}
    if "automr" in p50:
        result["ratios_p50"]["automr/bigrec"] = p50["automr"] / p50["bigrec"]
        result["ratios_p50"]["automr/full-history"] = p50["automr"] / p50["full-history"]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{'stage':<14} {'p50 ms':>9} {'p90 ms':>9} {'mean ms':>9} {'prompt tok':>11} {'gen tok':>8}")
    for k, v in result["stages"].items():
        tok, gen = result["prompt_tokens_mean"].get(k), result["generated_tokens_mean"].get(k)
        tok_s = "-" if tok is None else str(round(tok))
        gen_s = "-" if gen is None else f"{gen:.1f}"
        print(f"{k:<14} {v['p50_ms']:>9.1f} {v['p90_ms']:>9.1f} {v['mean_ms']:>9.1f} {tok_s:>11} {gen_s:>8}")
    for k, v in result["ratios_p50"].items():
        print(f"ratio p50 {k}: {v:.3f}")


if __name__ == "__main__":
    main()
