"""Model costs behind the service's batching choices, in one process (BENCHMARKS.md §3.3).

Prints, for the served recommender (greedy, template head cached), best of ``--repeats``:
  prefill     ``Recommender.start`` of B 10-title prompts (random catalogue items), ms per row
  step        one greedy decode step of those B rows (``generation.step``)
  ground      grounding of B catalogue titles without the grounding memo (base-model embedding + L2
              ranking); with ``--draft-requests``, also the validation answers one by one with a
              fresh memo and without (model/grounding_memo.py)
  long        four full-history prompts of unequal length (15-90 titles), prefilled together in one
              padded batch and one by one (``prefill_max_tokens`` 1 forces one by one)
  draft       speculative steps (model/generation/draft.py): ``--draft-requests`` validation contexts (the last K
              items, distinct users), generated step-wise in batches of B, plain and with
              ``--draft-tokens`` drafted tokens per row, drafted from the catalogue alone and from the
              catalogue + the answers seen so far in the run (``NgramDrafter.observe``), and the latter
              with guesses in the decode steps only (not in the prefill): ms per request (prefill +
              decode), forwards per answer token, and how many answers equal the plain ones (bf16
              rounding differs between a one-token and a multi-token forward)

    python bench/bench_model_costs.py --data runs/ml-100k --artefacts runs/ml-100k/quickstart
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from model import generation
from model.generation.draft import NgramDrafter
from model.generation.stop import stop_rule
from model.grounding_memo import GroundingMemo
from model.recommend import Recommender, RecommenderConfig, RecommendRequest
from service.components import load_components
from service.settings import Settings


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--artefacts", type=Path, required=True)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft-requests", type=int, default=48, help="0: skip the speculative-step measurement")
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    settings = Settings(data_dir=args.data, artefacts_dir=args.artefacts)
    pipe = load_components(settings).pipeline
    lm = pipe.lm
    stop_rule(lm)  # as the service does at start-up: not in the first step's time
    rng = random.Random(args.seed)
    n_items = len(pipe.titles)

    def requests(n: int, titles: int) -> list[RecommendRequest]:
        return [RecommendRequest(context=[rng.randrange(n_items) for _ in range(titles)]) for _ in range(n)]

    out: dict = {"dtype": str(lm.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                 "platform": platform.platform(), "batches": {}}
    rec = pipe.recommender("none", max_new_tokens=64, prefill_max_tokens=1 << 30)  # one padded batch
    cold = pipe.recommender("none", ground_memo=False)
    print(f"dtype {out['dtype']}, {out['threads']} threads")
    for b in (int(x) for x in args.batches.split(",")):
        reqs = requests(b, 10)
        tokens = sum(len(p.input_ids) for p in rec.prompts(reqs)) / b
        prefill = best_of(lambda: rec.start(reqs, list(range(b))), args.repeats)

        def steps() -> float:
            batch, _ = rec.start(reqs, list(range(b)))
            t0, k = time.perf_counter(), 0
            while batch.rows == b and k < 6:  # while every row is still decoding
                generation.step(lm, batch)
                k += 1
            return (time.perf_counter() - t0) / max(k, 1)

        step = min(steps() for _ in range(args.repeats))
        titles = [pipe.titles[rng.randrange(n_items)] for _ in range(b)]
        ground = best_of(lambda: cold.ground(reqs, titles, 20), args.repeats)  # a forward for every title
        out["batches"][b] = {"prompt_tokens": tokens, "prefill_ms_per_row": 1e3 * prefill / b,
                             "step_ms": 1e3 * step, "ground_ms": 1e3 * ground}
        print(f"B={b:2d}: prompt {tokens:.0f} tokens | prefill {1e3 * prefill / b:6.1f} ms/row | "
              f"step {1e3 * step:6.1f} ms | ground {1e3 * ground:6.1f} ms")

    long = [RecommendRequest(context=[rng.randrange(n_items) for _ in range(t)]) for t in (90, 30, 60, 15)]
    full = pipe.recommender("none", full_history=True, max_new_tokens=64, prefill_max_tokens=1 << 30)
    alone = pipe.recommender("none", full_history=True, max_new_tokens=64, prefill_max_tokens=1)
    lengths = [len(p.input_ids) for p in full.prompts(long)]
    together = best_of(lambda: full.start(long, list(range(4))), args.repeats)
    one_by_one = best_of(lambda: alone.start(long, list(range(4))), args.repeats)
    out["long"] = {"prompt_tokens": lengths, "together_s": together, "one_by_one_s": one_by_one}
    print(f"full-history prompts of {lengths} tokens: together {together:.2f} s, one by one {one_by_one:.2f} s")
    if args.draft_requests:
        out["draft"] = speculative(pipe, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def speculative(pipe, args) -> dict:
    """Step-wise generation of validation contexts, plain against drafted (``RecommenderConfig.draft_tokens``)."""
    from model.data.prepared import PreparedDataset

    ds = PreparedDataset.load(args.data)
    samples = ds.split("valid")[: args.draft_requests]
    reqs = [RecommendRequest(context=s.history[-ds.k_short:]) for s in samples]
    lm = pipe.lm
    out: dict = {"requests": len(reqs), "draft_tokens": args.draft_tokens, "batches": {}}

    def run(rec, b: int) -> tuple[float, int, list[list[int]]]:
        answers: dict[int, list[int]] = {}
        forwards = 0
        t0 = time.perf_counter()
        for s in range(0, len(reqs), b):
            batch, _ = rec.start(reqs[s:s + b], list(range(s, min(s + b, len(reqs)))))
            while batch.rows:
                forwards += batch.rows  # row-steps (a batch's last step may run no forward)
                answers.update(generation.step(lm, batch))
        return time.perf_counter() - t0, forwards, [answers[i] for i in range(len(reqs))]

    for b in (int(x) for x in args.batches.split(",")):
        plain_s, plain_f, plain = run(pipe.recommender("none", max_new_tokens=32), b)
        tokens = sum(len(a) for a in plain)
        row = {"answer_tokens": tokens, "plain_ms_per_request": 1e3 * plain_s / len(reqs)}
        for name, learn, in_prefill in (("catalogue", 0, True), ("learning", 50_000, True),
                                        ("learning_steps_only", 50_000, False)):
            # a fresh table per run (built untimed, as at start-up): answers learned in one run would
            # make the next run's identical requests look free
            drafter = NgramDrafter.from_prompt_builder(pipe.titles, pipe.builder, max_recent=learn)
            cfg = RecommenderConfig(n_slots=pipe.n_slots, max_new_tokens=32, draft_tokens=args.draft_tokens,
                                    draft_max_rows=b)
            rec = Recommender(pipe.lm, pipe.builder, pipe.titles, pipe.index, config=cfg, drafter=drafter)
            begin = generation.begin  # the recommender calls it through the module
            if not in_prefill:  # guesses in the decode steps only, none in the prefill
                def begin_plain(*a, drafter=None, draft_tokens=0, draft_max_rows=1, **k):
                    prefill = begin(*a, **k)  # a prefill without guesses, then the batch's policy
                    prefill.policy = dict(drafter=drafter, draft_tokens=draft_tokens, draft_max_rows=draft_max_rows)
                    return prefill

                generation.begin = begin_plain
            try:
                spec_s, spec_f, spec = run(rec, b)
            finally:
                generation.begin = begin
            row[name] = {"ms_per_request": 1e3 * spec_s / len(reqs), "forwards_per_token": spec_f / tokens,
                         "same_answers": sum(x == y for x, y in zip(plain, spec))}
        out["batches"][b] = row
        if "ground_memo" not in out:
            out["ground_memo"] = ground_memo_effect(pipe, reqs, [lm.text(a) for a in plain])
        print(f"B={b:2d} speculative: plain {row['plain_ms_per_request']:.0f} ms per request (1 forward per token); "
              + "; ".join(f"{n} {row[n]['ms_per_request']:.0f} ms, {row[n]['forwards_per_token']:.2f} forwards per "
                          f"token, {row[n]['same_answers']}/{len(reqs)} answers equal"
                          for n in ("catalogue", "learning", "learning_steps_only")))
    return out


def ground_memo_effect(pipe, reqs: list[RecommendRequest], answers: list[str]) -> dict:
    """The plain answers of the distinct validation users grounded one at a time (as at c = 1), with
    a fresh grounding memo and without one: ms per answer, and where the memo's embeddings came from."""
    cold = pipe.recommender("none", ground_memo=False)
    warm = pipe.recommender("none", ground_memo=True)
    warm._ground_memo = GroundingMemo(pipe.titles, pipe.index)  # fresh: nothing remembered yet
    times = {}
    for name, rec in (("off", cold), ("memo", warm)):
        t0 = time.perf_counter()
        for r, a in zip(reqs, answers):
            rec.ground([r], [a], 20)
        times[name] = 1e3 * (time.perf_counter() - t0) / len(answers)
    m = warm.ground_memo
    out = {"answers": len(answers), "ms_per_answer_off": times["off"], "ms_per_answer_memo": times["memo"],
           "catalogue": m.catalogue_hits, "recent": m.recent_hits, "embedded": m.embedded}
    print(f"grounding {len(answers)} answers one by one: {times['off']:.1f} ms each without the memo, "
          f"{times['memo']:.1f} ms with a fresh one ({m.catalogue_hits} catalogue titles, {m.recent_hits} "
          f"repeats, {m.embedded} embedded)")
    return out


if __name__ == "__main__":
    main()
