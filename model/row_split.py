"""A large forward's rows in parts, each part on a thread of its own with one intra-op thread.

torch's intra-op threads meet at a barrier after every op, hundreds of times per forward. Alone on
its CPUs that costs little; beside another CPU job every barrier waits for whichever thread the
scheduler has just preempted, and two threads run far below a fair share of the CPUs (BENCHMARKS
§7.1). The rows of a batch are independent, so a large forward can run as P row parts on P threads
of one intra-op thread each instead: they meet once per run of layers, not once per op, and each
takes whatever share of its CPU it gets. Below ``min_tokens`` fed tokens (rows x new positions) the
Python dispatch of P threads, which share the GIL, costs more than the barriers, and the forward runs
whole on the caller's thread.

    lm.row_split = RowSplit(workers=2)     # SplitLM.run_layers splits from here on
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from transformers import DynamicCache


class RowSplit:
    """``workers`` threads of one intra-op thread each; ``wall_s`` sums the wall time of the parts'
    runs (the caller's thread waits meanwhile, so its CPU time during them is not its own work)."""

    def __init__(self, workers: int, min_tokens: int = 128):
        if workers < 2:
            raise ValueError(f"a row split needs at least 2 workers, got {workers}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.workers, self.min_tokens = workers, min_tokens
        # forwards split only while active: the service turns it on while another job takes the CPUs
        # (the thread governor's call); alone its forwards run whole, as the evaluator's do
        self.active = True
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="automr-rows")
        self.wall_s = 0.0
        # the forwards run whole on the caller's thread: their wall and that thread's CPU seconds (the
        # CPU share its intra-op threads get, for the thread governor, free of the row parts' waits)
        self.whole_wall_s = self.whole_cpu_s = 0.0
        # OpenMP's thread count is per thread: torch gives a thread the global count at the thread's first
        # parallel op. So the global count is 1 while each worker runs its first one, and goes back after.
        # A worker must never start a team of 2: libgomp spins far less at every barrier of every team
        # once it manages more threads than there are CPUs, and the whole forwards of the model thread
        # alone would pay for these idle teams
        before, ready = torch.get_num_threads(), threading.Barrier(workers)

        def one_thread(_) -> None:
            torch.zeros(1 << 16).add_(1)
            torch.set_num_threads(1)
            ready.wait()  # every worker thread starts here (an idle one would take a second task)

        torch.set_num_threads(1)
        try:
            list(self._pool.map(one_thread, range(workers)))
        finally:
            torch.set_num_threads(before)

    def parts(self, rows: int, tokens: int) -> list[tuple[int, int]] | None:
        """Row ranges [a, b) of a forward of ``rows`` rows x ``tokens`` new positions, as even as can
        be; None when it runs whole (not active, too small, or no gradient-free context to run it in)."""
        if not self.active or rows < 2 or rows * tokens < self.min_tokens or torch.is_grad_enabled():
            return None
        n = min(self.workers, rows)
        cuts = [rows * i // n for i in range(n + 1)]
        return list(zip(cuts[:-1], cuts[1:]))

    def run(self, fn: Callable[[int, int, int], Any], parts: list[tuple[int, int]]) -> list[Any]:
        """``fn(i, a, b)`` for each part i, in the pool; the results in order."""
        t0 = time.perf_counter()

        def call(i: int, a: int, b: int) -> Any:
            with torch.no_grad():  # grad mode is per thread: the caller's (off, see ``parts``) does not carry
                return fn(i, a, b)

        try:
            futures = [self._pool.submit(call, i, a, b) for i, (a, b) in enumerate(parts)]
            return [f.result() for f in futures]
        finally:
            self.wall_s += time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def rows_of(x: Any, a: int, b: int, n: int) -> Any:
    """Rows [a, b) of ``x`` when it holds one row per batch row (its first dimension is ``n``); a
    tensor that broadcasts over the batch (first dimension 1), None, or a tuple of such, as it is."""
    if isinstance(x, tuple):
        return tuple(rows_of(t, a, b, n) for t in x)
    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n:
        return x[a:b]
    return x


def splittable(x: Any, n: int) -> bool:
    """Can ``rows_of`` cut ``x`` (a mask, position embeddings) into row parts of an ``n``-row batch?"""
    if isinstance(x, tuple):
        return all(splittable(t, n) for t in x)
    return x is None or (isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] in (1, n)))


def row_views(cache: DynamicCache, layer_ids: list[int], parts: list[tuple[int, int]], add: int,
              config, dtype: torch.dtype, device) -> list[DynamicCache] | None:
    """One cache per row part [a, b) of ``cache``, for a run of layers ``layer_ids`` that appends
    ``add`` positions: those layers get the room first, and each part's appends land in its rows of
    the same buffers (``grew_rows`` afterwards). None when a layer does not append in place."""
    layers = [cache.layers[i] if i < len(cache.layers) else None for i in layer_ids]
    if not all(hasattr(layer, "rows") for layer in layers):  # kv_cache.GrowingLayer
        return None
    rows = parts[-1][1]
    if any(layer.batch_rows not in (None, rows) for layer in layers):
        return None
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in layers:
        layer.reserve(add, rows, heads, dim, dtype, device)
    views = []
    for a, b in parts:
        view = DynamicCache()
        view.layers = list(cache.layers)  # layers outside the run are not touched
        for i, layer in zip(layer_ids, layers):
            view.layers[i] = layer.rows(a, b)
        views.append(view)
    return views


def grew_rows(cache: DynamicCache, layer_ids: list[int], views: list[DynamicCache], add: int) -> None:
    """After a run over ``row_views``: ``cache``'s layers take the positions their views appended."""
    for i in layer_ids:
        cache.layers[i].grew(add, [view.layers[i] for view in views])


def run_layers_split(split: RowSplit, run: Callable, layers, h: torch.Tensor, mask: Any, pos: torch.Tensor,
                     cache: DynamicCache | None, pe: Any, config) -> torch.Tensor:
    """``run(layers, h, mask, pos, cache, pe)`` over row parts of ``h`` [B, T, H] on ``split``'s
    threads, the KV of each part appended in place to its rows of ``cache``: the states [B, T, H] in
    row order. A forward too small to split, or whose mask or cache cannot be cut, runs whole here."""
    n, t = h.shape[0], h.shape[1]
    parts = split.parts(n, t)
    if parts is not None and not (splittable(mask, n) and splittable(pe, n) and splittable(pos, n)):
        parts = None
    views = ids = None
    if parts is not None and cache is not None:
        ids = [layer.self_attn.layer_idx for layer in layers]
        views = row_views(cache, ids, parts, t, config, h.dtype, h.device)
        parts = parts if views is not None else None
    if parts is None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return run(layers, h, mask, pos, cache, pe)
        finally:
            split.whole_wall_s += time.perf_counter() - t0
            split.whole_cpu_s += time.thread_time() - c0
    out = split.run(lambda i, a, b: run(layers, h[a:b], rows_of(mask, a, b, n), rows_of(pos, a, b, n),
                                        None if views is None else views[i], rows_of(pe, a, b, n)), parts)
    if views is not None:
        grew_rows(cache, ids, views, t)
    return torch.cat(out)
