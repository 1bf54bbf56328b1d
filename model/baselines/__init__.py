"""Conventional recommenders used as baselines: item popularity and SASRec.

Importing this package registers them with the evaluator as ``popularity`` and ``sasrec``.
"""
from __future__ import annotations

from model.baselines.popularity import PopularityRanker, popularity_counts
from model.baselines.sasrec import SASRec, SASRecConfig, SASRecRanker, SASRecTrainConfig, build_sasrec, train_sasrec
from model.eval.evaluator import MethodContext, register_method


def build_popularity(ctx: MethodContext) -> PopularityRanker:
    """Options: ``count`` = "targets" (default) or "interactions" (see model.baselines.popularity)."""
    unknown = set(ctx.options) - {"count"}
    if unknown:
        raise ValueError(f"unknown popularity option(s) {sorted(unknown)}; known: ['count']")
    return PopularityRanker.fit(ctx.dataset.split("train"), len(ctx.dataset.catalogue), ctx.options.get("count", "targets"))


register_method("popularity", build_popularity)
register_method("sasrec", build_sasrec)

__all__ = [
    "PopularityRanker", "popularity_counts", "SASRec", "SASRecConfig", "SASRecRanker", "SASRecTrainConfig",
    "train_sasrec", "build_popularity", "build_sasrec",
]
