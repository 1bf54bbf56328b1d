"""Exact generator scores of the most popular unseen titles, and rankings that mix them with popularity.

    python bench/candidate_scores.py --artefacts runs/ml-100k/gen-48k --samples 300 --candidates 200 --out scores.json

For each seeded validation sample (the evaluator's subset: same seed, same first samples) it scores the
``--candidates`` most popular titles the user has not seen (the training counts of ARTEFACTS/
popularity.json), teacher-forced after the exact bigrec prompt: every title's log-probability under
the model restricted to the catalogue's title trie (each token renormalised over the trie's children
of its prefix, as the beam search does). It then ranks the candidates by
``log P_model + gamma * log(1 + count)`` for several gammas, beside popularity alone (gamma -> inf)
and the model alone (gamma = 0). A target outside the candidates counts as a miss for every ranking,
so popularity's Recall@K for K <= candidates is exactly the popularity baseline's.

This asks whether the generator carries any signal beyond popularity when nothing limits the search:
if no gamma beats popularity here, no beam search over the same model can.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from tqdm import tqdm

from model.data.prepared import PreparedDataset
from model.eval.bootstrap import paired_diff_ci
from model.eval.evaluator import select_subset
from model.pipeline import load_pipeline


def trie_logprob(trie, logp: torch.Tensor, seq: list[int]) -> float:
    """Sum over ``seq`` of each token's log-probability renormalised over the trie children of its
    prefix; ``logp[t]`` is the distribution over the token at position t."""
    node, total = 0, 0.0
    for t, tok in enumerate(seq):
        lo, hi = int(trie.child_ptr[node]), int(trie.child_ptr[node + 1])
        kids = torch.from_numpy(trie.child_tok[lo:hi].astype(np.int64))
        lp = logp[t, kids]
        j = int(np.searchsorted(trie.child_tok[lo:hi], tok))
        total += float(lp[j] - torch.logsumexp(lp, 0))
        node = int(trie.child_node[lo + j])
    return total


@torch.no_grad()
def score_candidates(lm, prompt: list[int], seqs: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """[len(seq), V] log-probabilities at each token of each candidate, after one shared prefill."""
    out = lm.model(input_ids=torch.tensor([prompt]), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    n = len(prompt)
    res = []
    for s in range(0, len(seqs), chunk):
        part = seqs[s:s + chunk]
        c, width = len(part), max(len(q) for q in part)
        ids = torch.zeros(c, width, dtype=torch.long)
        mask = torch.zeros(c, n + width, dtype=torch.long)
        mask[:, :n] = 1
        for i, q in enumerate(part):
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, n:n + len(q)] = 1
        cache = lm.model(input_ids=torch.tensor([prompt]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(c)
        pos = torch.arange(n, n + width).unsqueeze(0).expand(c, -1)
        logits = lm.model(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=pos).logits
        lp = torch.log_softmax(logits.float(), -1)  # [c, width, V]: the token after each position
        for i, q in enumerate(part):
            res.append(torch.cat([first[None], lp[i, :len(q) - 1]], 0))
    return res


def metrics(rank: np.ndarray, ks=(1, 5, 10, 20)) -> dict[str, np.ndarray]:
    """Per-sample recall@k and ndcg@k from 0-based target ranks (-1: a miss)."""
    hit = rank >= 0
    out = {}
    for k in ks:
        inside = hit & (rank < k)
        out[f"recall@{k}"] = inside.astype(float)
        out[f"ndcg@{k}"] = np.where(inside, 1.0 / np.log2(np.maximum(rank, 0) + 2), 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/ml-100k")
    ap.add_argument("--artefacts", required=True)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--limit", type=int, default=500, help="the evaluator's subset; the first --samples of it")
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ds = PreparedDataset.load(a.data)
    titles = ds.catalogue.titles
    pipe = load_pipeline(titles, a.artefacts, k_short=ds.k_short, need_retriever=False)
    lm, builder, trie = pipe.lm, pipe.builder, pipe.recommender("none").trie
    counts = np.asarray(json.load(open(f"{a.artefacts}/popularity.json"))["counts"], dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    valid = ds.split("valid")
    picked = select_subset(len(valid), a.limit, a.seed)[:a.samples]
    rows = []
    for i in tqdm(picked, desc="samples"):
        s = valid[int(i)]
        seen = set(s.history)
        cands = [int(x) for x in order if int(x) not in seen][:a.candidates]
        prompt = builder.build([titles[j] for j in s.short_term(ds.k_short)]).input_ids
        seqs = [builder.response_ids(titles[j]) for j in cands]
        lps = score_candidates(lm, prompt, seqs, a.chunk)
        renorm = [trie_logprob(trie, lp, q) for lp, q in zip(lps, seqs)]
        raw = [float(lp[torch.arange(len(q)), torch.tensor(q)].sum()) for lp, q in zip(lps, seqs)]
        rows.append({"target": s.target, "candidates": cands, "renorm": renorm, "raw": raw})
    json.dump({"artefacts": a.artefacts, "samples": len(rows), "rows": rows}, open(a.out, "w"))
    report(rows, counts)


def report(rows: list[dict], counts: np.ndarray) -> None:
    results = {}
    for name, gamma in [("popularity", None), ("model", 0.0)] + [(f"gamma={g}", g) for g in (0.5, 1, 2, 3, 5, 8)]:
        for field in ("renorm", "raw") if gamma is not None else ("renorm",):
            ranks = []
            for r in rows:
                cands = np.array(r["candidates"])
                pop = np.log1p(counts[cands])
                score = pop if gamma is None else np.array(r[field]) + gamma * pop
                order = cands[np.argsort(-score, kind="stable")]
                where = np.nonzero(order == r["target"])[0]
                ranks.append(int(where[0]) if len(where) else -1)
            results[name if gamma is None else f"{name} {field}"] = metrics(np.array(ranks))
    base = results["popularity"]
    print(f"n = {len(rows)}")
    print("| ranking | R@1 | R@5 | R@10 | R@20 | NDCG@10 | R@10 − pop [95% CI] | NDCG@10 − pop [95% CI] |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, m in results.items():
        cis = []
        for key in ("recall@10", "ndcg@10"):
            ci = paired_diff_ci(m[key], base[key])
            cis.append(f"{ci.diff:+.4f} [{ci.lo:+.4f}, {ci.hi:+.4f}]")
        print(f"| {name} | " + " | ".join(f"{m[k].mean():.4f}" for k in ("recall@1", "recall@5", "recall@10",
                                                                          "recall@20", "ndcg@10")) + " | " + " | ".join(cis) + " |")


if __name__ == "__main__":
    main()
