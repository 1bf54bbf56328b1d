"""The LLM methods of the evaluator: bigrec, bigrec-greedy, full-history, automr, random, semantic.

All share one generator, one prompt slot and one grounding index; they differ only in what fills the
slot (``model/recommend.py``). Options (``automr evaluate --option key=value``):

    model=PATH         base model (HF dir or .gguf); default: the embedded SmolLM2 GGUF
    cut=20             L
    dtype=auto         bfloat16 | float32 | auto (bfloat16 on CPUs with native bf16, else float32)
    generator=DIR      tuned upper layers; default ARTEFACTS/generator (base model when absent)
    retriever=DIR      default ARTEFACTS/retriever (automr only)
    element=           memory element kind: window | item (default: the retriever's, else window)
    n_slots=1          top-k elements into k slots
    batch_size=16      requests per generation batch
    constrained=false  beam search restricted to real titles (num_beams beams; see model/recommend.py)
    exclude_history=true   drop the sample's history items from the ranking (false keeps them)
    max_new_tokens, num_beams, head_cache, prefill_max_tokens, draft_tokens, draft_max_rows, ground_memo
                       ``RecommenderConfig`` fields. ``automr evaluate`` and ``automr reproduce`` default
                       them to the service's settings of the same names (``Settings.generation``,
                       docs/SERVICE.md): greedy answers are decoded by the service's step-wise path
                       with its drafting and grounded through its memo (the same answers in float32;
                       bfloat16 rounds differently with other shapes, as batching does). Called
                       directly, absent ones take ``RecommenderConfig``'s defaults.
                       head_cache=false prefills whole prompts (bfloat16 rounds differently, BENCHMARKS §8)
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from model import context
from model.data.types import Sample
from model.eval.evaluator import MethodContext, register_method
from model.pipeline import load_pipeline
from model.recommend import Recommender, RecommendRequest


# options that are RecommenderConfig fields (absent: RecommenderConfig's default)
GENERATION_OPTIONS = {"max_new_tokens": int, "num_beams": int, "batch_size": int, "constrained": bool,
                      "renormalize": bool, "popularity_gamma": float, "popularity_mix": float,
                      "head_cache": bool, "prefill_max_tokens": int, "draft_tokens": int, "draft_max_rows": int,
                      "ground_memo": bool}


def sample_seed(sample: Sample, seed: int) -> int:
    """A per-sample seed that does not depend on batch composition (random policy)."""
    return zlib.crc32(f"{seed}:{sample.user_id}:{sample.timestamp}:{sample.target}".encode())


class LLMRanker:
    """A ``Ranker`` over the shared recommend function."""

    def __init__(self, name: str, recommender: Recommender, k_short: int, memory_encoder=None, seed: int = 0,
                 exclude_history: bool = True, version: str = ""):
        self.name, self.exclude_history, self.version = name, exclude_history, version
        self.recommender, self.k_short, self.memory, self.seed = recommender, k_short, memory_encoder, seed
        self.trace: list[dict] = []  # per sample: generated title and selected memory (for the reports)

    def _request(self, s: Sample) -> RecommendRequest:
        req = RecommendRequest(
            context=context.prompt_items(s.history, self.k_short, self.recommender.config.full_history),
            exclude=set(s.history) if self.exclude_history else set(),
            seed=sample_seed(s, self.seed),
        )
        if self.memory is not None and len(s.history) > self.k_short:
            _, req.memory = self.memory.memory_for_sample(s)
            req.query = self.memory.query_for_sample(s)
        return req

    def info(self) -> dict:
        """What the result JSON records: the generator and slot settings, and the per-sample trace."""
        rec = self.recommender
        return {
            "policy": rec.config.policy, "full_history": rec.config.full_history, "n_slots": rec.config.n_slots,
            "num_beams": rec.config.num_beams, "constrained": rec.config.constrained,
            "renormalize": rec.config.renormalize, "popularity_gamma": rec.config.popularity_gamma,
            "popularity_mix": rec.config.popularity_mix,
            "max_new_tokens": rec.config.max_new_tokens, "head_cache": rec.config.head_cache,
            "draft_tokens": rec.config.draft_tokens, "draft_max_rows": rec.config.draft_max_rows,
            "ground_memo": rec.config.ground_memo,
            "cut": rec.lm.cut, "dtype": str(rec.lm.dtype),
            "element": self.memory.element if self.memory is not None else None,
            "model_version": self.version, "trace": self.trace,
        }

    def rank(self, samples: Sequence[Sample], topk: int) -> np.ndarray:
        if self.memory is not None:
            self.memory.prefetch(samples)
        recs = self.recommender.recommend([self._request(s) for s in samples], topk=topk)
        out = np.full((len(samples), topk), -1, dtype=np.int64)
        for i, r in enumerate(recs):
            out[i, : len(r.items)] = r.items[:topk]
            n_mem = context.n_memory(len(samples[i].history), self.k_short)
            self.trace.append({
                "generated": r.generated,
                # how far back the selected element lies: 1 = the newest memory element
                "memory_age": [n_mem - m for m in r.memory_indices],
            })
        return out


def _factory(name: str, policy: str, full_history: bool = False, fixed: dict | None = None):
    def build(ctx: MethodContext) -> LLMRanker:
        opt, ds = ctx.options, ctx.dataset
        root = Path(ctx.artefact_dir).parent if ctx.artefact_dir else Path(ds.root) / "artefacts"
        pipe = load_pipeline(
            ds.catalogue.titles, root, domain=ds.domain, k_short=ds.k_short, model=opt.get("model"),
            cut=int(opt.get("cut", 20)), dtype=opt.get("dtype", "auto"), generator_dir=opt.get("generator"),
            retriever_dir=opt.get("retriever"), need_retriever=policy == "learned",
            element=opt.get("element"), n_slots=int(opt.get("n_slots", 1)), progress=ctx.progress,
        )
        gen = {key: kind(opt[key]) for key, kind in GENERATION_OPTIONS.items() if key in opt}
        rec = pipe.recommender(policy, full_history, **{**gen, **(fixed or {})})
        memory = pipe.cached_memory_encoder(root / "memory", progress=ctx.progress) if policy != "none" else None
        return LLMRanker(name, rec, ds.k_short, memory, seed=ctx.seed,
                         exclude_history=bool(opt.get("exclude_history", True)), version=pipe.version())

    return build


register_method("bigrec", _factory("bigrec", "none"))
# BIGRec as its paper defines it: one greedy title, L2 grounding (whatever the served ranking is)
register_method("bigrec-greedy", _factory("bigrec-greedy", "none", fixed=dict(constrained=False, num_beams=1)))
register_method("full-history", _factory("full-history", "none", full_history=True))
register_method("automr", _factory("automr", "learned"))
register_method("random", _factory("random", "random"))
register_method("semantic", _factory("semantic", "semantic"))
