"""Every use of the model goes through a ``ModelRunner``: the LLM is CPU-bound and shared.

``ModelRunner`` runs each call on ONE worker thread, in arrival order: the event loop never blocks,
and two requests never run the model at the same time (the slot replacement is request-safe anyway:
a ``ContextVar``, see ``model/llm.py``). It exposes the two operations the service needs as
coroutines, each on a list so that a batch can be formed:

    await runner.encode(windows)                    -> [n, H] float32 memory element vectors
    await runner.recommend(key, requests, topk)     -> one Recommendation per request

The seam for dynamic batching (a later issue): a ``BatchingRunner`` with the same two coroutines
would queue the calls of concurrent requests for a few milliseconds and send them to the model as
one list (``Recommender.recommend`` and the encoder are batched already), then resolve each caller's
future with its own rows.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from model.pipeline import Pipeline
from model.recommend import Recommendation, Recommender, RecommendRequest


class ModelRunner:
    def __init__(self, pipeline: Pipeline, recommenders: dict[str, Recommender], batch_size: int = 16):
        self.pipeline = pipeline
        self.recommenders = recommenders
        self.encoder = pipeline.memory_encoder(batch_size=batch_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automr-model")
        self.calls = 0  # model calls made (tests, metrics)

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    # ---- the model operations (run on the worker thread) ----------------------------------------

    def _encode(self, windows: Sequence[tuple[int, ...]]) -> np.ndarray:
        self.calls += 1
        if self.pipeline.element == "window":
            vecs = self.encoder.encode_windows(list(windows))  # [n, H]
        else:  # item elements: the window's last item alone
            vecs = self.encoder.encode_items([w[-1] for w in windows])
        return vecs.float().numpy()

    def _recommend(self, key: str, requests: Sequence[RecommendRequest], topk: int) -> list[Recommendation]:
        self.calls += 1
        return self.recommenders[key].recommend(list(requests), topk=topk)

    # ---- the coroutines the service awaits -------------------------------------------------------

    async def encode(self, windows: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[n, H] float32: the memory element of each window (item indices, oldest first)."""
        if not windows:
            return np.zeros((0, self.pipeline.lm.hidden_size), dtype=np.float32)
        return await self._run(self._encode, list(windows))

    async def recommend(self, key: str, requests: Sequence[RecommendRequest], topk: int) -> list[Recommendation]:
        """``Recommender.recommend`` of the recommender named ``key`` (a slot policy or 'full-history')."""
        if key not in self.recommenders:
            raise KeyError(f"no recommender {key!r}; have {sorted(self.recommenders)}")
        return await self._run(self._recommend, key, list(requests), topk)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
