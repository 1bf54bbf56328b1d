"""KV caches: layers that append in place, the rows of several caches in one, a shared prefix as rows.

HF's ``DynamicLayer`` appends a decode step's keys and values with ``torch.cat([past, new])``: every
step copies the whole cache of every layer, and on a CPU that copy dominates decoding and grows with
the prompt (BENCHMARKS §3.3). ``GrowingLayer`` keeps keys and values in a
buffer with spare room along the sequence and writes new tokens into it; ``keys``/``values`` are views
of the filled part, so HF's attention sees the same tensors (values) as with ``DynamicLayer``.

    cache = growing_cache(model.config)   # a DynamicCache whose layers are GrowingLayers
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with in-place appends: buffers [B, kv_heads, capacity, D]; ``keys`` and
    ``values`` are views [B, kv_heads, n, D] of their first ``n`` positions. When an append does not
    fit, the buffers are reallocated with ``spare`` positions of room beyond it."""

    def __init__(self, spare: int = 64, **kwargs):
        super().__init__(**kwargs)
        if spare < 1:
            raise ValueError(f"spare must be >= 1, got {spare}")
        self.spare = spare
        self._k: torch.Tensor | None = None  # [B, kv_heads, capacity, D]
        self._v: torch.Tensor | None = None
        self._n = 0  # positions filled

    def _view(self) -> None:
        self.keys = self._k[:, :, : self._n]
        self.values = self._v[:, :, : self._n]

    def _set(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        self._k, self._v, self._n = k, v, n
        self._view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        add = key_states.shape[-2]
        n = self._n + add
        if self._k is None or n > self._k.shape[-2] or self._k.shape[0] != key_states.shape[0]:
            if self._k is not None and self._k.shape[0] != key_states.shape[0]:
                raise ValueError(f"cache holds {self._k.shape[0]} rows, the update has {key_states.shape[0]}")
            b, h, _, d = key_states.shape
            k = key_states.new_empty(b, h, n + self.spare, d)
            v = value_states.new_empty(b, h, n + self.spare, value_states.shape[-1])
            if self._n:
                k[:, :, : self._n] = self._k[:, :, : self._n]
                v[:, :, : self._n] = self._v[:, :, : self._n]
            self._k, self._v = k, v
        self._k[:, :, self._n: n] = key_states
        self._v[:, :, self._n: n] = value_states
        self._n = n
        self._view()
        return self.keys, self.values

    @property
    def batch_rows(self) -> int | None:
        """Rows of the buffers (None before the first append)."""
        return None if self._k is None else int(self._k.shape[0])

    def reserve(self, add: int, rows: int, heads: int, dim: int, dtype: torch.dtype, device) -> None:
        """Room for ``add`` more positions in the buffers (allocated for ``rows`` rows when empty), so
        that row views (``rows``) can append in place."""
        n = self._n + add
        if self._k is not None and n <= self._k.shape[-2]:
            return
        if self._k is None:
            k = torch.empty(rows, heads, n + self.spare, dim, dtype=dtype, device=device)
            v = torch.empty_like(k)
            self.lazy_initialization(k, v)
        else:
            k = self._k.new_empty(*self._k.shape[:2], n + self.spare, self._k.shape[-1])
            v = self._v.new_empty(*self._v.shape[:2], n + self.spare, self._v.shape[-1])
            k[:, :, : self._n] = self._k[:, :, : self._n]
            v[:, :, : self._n] = self._v[:, :, : self._n]
        self._set(k, v, self._n)

    def rows(self, a: int, b: int) -> "GrowingLayer":
        """A layer over rows [a, b) of this one's buffers: its appends write into them (``reserve``
        first); ``grew`` then moves this layer's length on."""
        view = GrowingLayer(spare=self.spare)
        view.lazy_initialization(self._k, self._v)
        view._set(self._k[a:b], self._v[a:b], self._n)
        return view

    def grew(self, add: int, views: list["GrowingLayer"]) -> None:
        """Take the ``add`` positions that ``views`` (this layer's ``rows``) appended in place."""
        for view in views:
            if view._n != self._n + add or view._k.untyped_storage().data_ptr() != self._k.untyped_storage().data_ptr():
                raise RuntimeError("a row view did not append in place to its layer's buffers")
        self._n += add
        self._view()

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized or self._k is None:
            return
        self._n = max(self._n + tokens_to_remove, 0)
        self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._n > 0:
            self._set(self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0), self._n)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._n > 0:
            self._set(self._k[indices, ...], self._v[indices, ...], self._n)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._n > 0:
            idx = beam_idx.to(self._k.device)
            self._set(self._k.index_select(0, idx), self._v.index_select(0, idx), self._n)


def growing_cache(config, spare: int = 64) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain dynamic layers append in place (``GrowingLayer``);
    other layer kinds (sliding windows) are kept as HF builds them."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(spare=spare) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def concat_rows(caches: list[DynamicCache], spare: int = 64,
                columns: list[torch.Tensor | None] | None = None) -> DynamicCache:
    """One cache holding the rows of ``caches`` (in order), each left-padded with zeros to the longest
    sequence: the caller masks the padding (``DecodeBatch.merge`` pads the attention masks alike).
    Zeros, not garbage: a masked position's value is multiplied by a zero weight, and NaN * 0 is NaN.
    ``columns[i]``: the sequence positions of cache i to keep, in order (None: all of them)."""
    n_layers = {len(c.layers) for c in caches}
    if len(n_layers) != 1:
        raise ValueError(f"caches with different numbers of layers: {sorted(n_layers)}")
    columns = columns or [None] * len(caches)
    if len(columns) != len(caches):
        raise ValueError(f"{len(columns)} column selections for {len(caches)} caches")
    out = DynamicCache()
    out.layers = []
    for layers in zip(*(c.layers for c in caches)):
        parts = [(layer.keys, layer.values) if cols is None else
                 (layer.keys.index_select(2, cols), layer.values.index_select(2, cols))
                 for layer, cols in zip(layers, columns)]
        t = max(pk.shape[2] for pk, _ in parts)
        rows = sum(pk.shape[0] for pk, _ in parts)
        k0, v0 = layers[0].keys, layers[0].values
        k = k0.new_zeros(rows, k0.shape[1], t + spare, k0.shape[3])
        v = v0.new_zeros(rows, v0.shape[1], t + spare, v0.shape[3])
        at = 0
        for pk, pv in parts:
            n, s = pk.shape[0], pk.shape[2]
            k[at: at + n, :, t - s: t] = pk
            v[at: at + n, :, t - s: t] = pv
            at += n
        merged = GrowingLayer(spare=spare)
        merged.lazy_initialization(k0, v0)
        merged._set(k, v, t)
        out.layers.append(merged)
    return out


def expand_prefix(cache: DynamicCache, prefix: list[tuple[torch.Tensor, torch.Tensor] | None],
                  rows: int) -> DynamicCache:
    """Write one row's prefix KV into ``cache`` for ``rows`` rows: ``prefix[i]`` = layer i's keys and
    values [1, kv_heads, p, d] (None: the layer stays empty). The rows are copies in the cache's own
    buffers, so each row's later tokens append to its own. Returns ``cache``.

    The one way a shared prefix becomes rows: the template head of a prefill (``prefill._head_cache``)
    and the prompt before the slot in Eq. 5's scores (``model/scoring.py``)."""
    for i, kv in enumerate(prefix):
        if kv is not None:
            k, v = kv
            cache.layers[i].update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
    return cache
