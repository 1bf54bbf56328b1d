"""What a tuned generator predicts at the first token of the answer, on seeded validation samples.

    python bench/generator_diagnostics.py --data runs/ml-100k --artefacts runs/ml-100k/gen-48k --samples 60

For each sample (the exact bigrec prompt: the list template, its K titles, the memory placeholder) it
prints, over the catalogue titles' first tokens (the title trie's root): the model's top first token
(renormalised over the root's tokens), the rank of the target's first token there, and the target
title's log-probability (every token, not renormalised). A generator that conditions on the history
puts different first tokens on top for different users and the target's near the top.
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from model.data.prepared import PreparedDataset
from model.pipeline import load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/ml-100k")
    ap.add_argument("--artefacts", required=True)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ds = PreparedDataset.load(a.data)
    pipe = load_pipeline(ds.catalogue.titles, a.artefacts, k_short=ds.k_short, need_retriever=False)
    lm, builder, trie = pipe.lm, pipe.builder, pipe.recommender("none").trie
    root = torch.tensor(trie.child_tok[trie.child_ptr[0]:trie.child_ptr[1]])  # [r] first tokens of titles
    valid = ds.split("valid")
    picked = np.random.default_rng(a.seed).choice(len(valid), min(a.samples, len(valid)), replace=False)
    top_first, ranks, title_lp = collections.Counter(), [], []
    for i in picked:
        s = valid[i]
        prompt = builder.build([ds.catalogue.titles[j] for j in s.short_term(ds.k_short)])
        resp = builder.response_ids(ds.catalogue.titles[s.target])
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([prompt.input_ids + resp])).logits[0].float()
        lp = torch.log_softmax(logits, -1)  # [T, V]
        n = len(prompt.input_ids)
        first = lp[n - 1, root] - torch.logsumexp(lp[n - 1, root], 0)  # [r] renormalised over the root
        top_first[lm.tokenizer.decode([int(root[first.argmax()])])] += 1
        ranks.append(int((first > first[int((root == resp[0]).nonzero()[0, 0])]).sum()))
        title_lp.append(float(lp[torch.arange(n - 1, n - 1 + len(resp)), torch.tensor(resp)].sum()))
    r = np.array(ranks)
    print(json.dumps({
        "artefacts": a.artefacts, "samples": len(picked), "first_tokens": int(len(root)),
        "top_first_token": top_first.most_common(5),
        "target_first_token_rank": {"median": float(np.median(r)), "mean": round(float(r.mean()), 1),
                                    "share_top10": round(float((r < 10).mean()), 3)},
        "target_title_logprob_mean": round(float(np.mean(title_lp)), 2),
    }, indent=1))


if __name__ == "__main__":
    main()
