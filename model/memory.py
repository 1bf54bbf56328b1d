"""Memory elements (AutoMR Eq. 2), the query z_t, and a disk cache of encoded elements.

Element kinds (``element=``):

- ``"window"`` (the paper's): the element of past interaction ``m`` is the layer-L state of the last
  token of the prompt built from the ``K`` items ending at ``m`` — the user's short-term context at
  time ``m``. The window is taken from the sample's own history: for the earliest memory positions
  (``m < K-1``) fewer than ``K`` items precede ``m`` in the history, and the window is the available
  ones (a shorter window); earlier interactions outside the 100-item history are not looked up.
- ``"item"`` (cheaper): the layer-L state of the last token of the item's bare title (no template,
  the tokenizer's own special tokens, as BIGRec embeds titles for grounding).

The query ``z_t`` is the layer-L state of the last token of the current short-term prompt. Window
elements and the query are built **the same way**: ``PromptBuilder.build(titles, with_slot=True)``,
i.e. the exact generation prompt including the slot placeholder (whose layer-L state is only
replaced at the output of layer L, so it never changes the last token's layer-L state). Hence

- ``z_t`` and the window elements live in the same space (both are "the query at some time");
- the element of the window ending at ``m`` equals the query that the window was at time ``m+1``:
  a serving path can store each request's ``z_t`` as the memory element it later becomes, and a
  cache of windows serves queries too (same key);
- in production ``z_t`` costs nothing extra: it is the last position of the layer-L prefill that
  the generator runs anyway.

Keys: a window element is keyed by the tuple of its item indices (so identical windows across
samples and users are encoded once), an item element by ``(item,)``. ``MemoryCache`` stores distinct
elements once on disk under a fingerprint of the lower layers + L + the prompt template + element
kind, so changing the model, L or the template invalidates it (a different directory is used).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from model import context
from model.checkpoint import fingerprint
from model.data.types import Sample
from model.generation.kv_cache import expand_prefix
from model.prompts import one_line

ELEMENT_KINDS = ("window", "item")
CACHE_FORMAT = "automr-memory-cache-v1"
Key = tuple[int, ...]  # window: its items oldest first; item element: (item,)


def _as_key(key: Union[int, Sequence[int]]) -> Key:
    return (int(key),) if isinstance(key, int) else tuple(int(x) for x in key)


def keys_to_tensor(keys: Sequence[Key]) -> torch.Tensor:
    """[n, W] int64, each key left-aligned and padded with −1."""
    width = max((len(k) for k in keys), default=1)
    out = torch.full((len(keys), max(width, 1)), -1, dtype=torch.long)
    for i, k in enumerate(keys):
        if len(k):
            out[i, : len(k)] = torch.tensor(k, dtype=torch.long)
    return out


def tensor_to_keys(t: torch.Tensor) -> list[Key]:
    return [tuple(x for x in row if x >= 0) for row in t.tolist()]


# ---- disk cache ---------------------------------------------------------------------------------
class MemoryCache:
    """Distinct encoded elements on disk: ``DIR/<element>-<hash(fingerprint, element)>/part-*.safetensors``
    (``directory=None``: the same, in memory only).

    Each shard holds ``keys`` [n, W] int64 (−1 padded) and ``vectors`` [n, H]; ``meta.json`` holds
    the full fingerprint. ``put`` buffers, ``flush`` appends the buffered elements as a new shard
    (so an interrupted encoding run keeps what it flushed). Vectors are stored in the dtype they
    come in (bf16 model states stay bf16: lossless, 2 bytes per value) unless ``dtype`` is given.
    """

    def __init__(self, directory: str | Path | None, fingerprint: str, element: str, dtype: torch.dtype | None = None):
        if element not in ELEMENT_KINDS:
            raise ValueError(f"unknown memory element kind {element!r}; use one of {ELEMENT_KINDS}")
        self.fingerprint, self.element, self.dtype = fingerprint, element, dtype
        tag = hashlib.sha256(f"{fingerprint}\n{element}".encode()).hexdigest()[:16]
        self.path = Path(directory) / f"{element}-{tag}" if directory is not None else None  # None: in memory only
        self._index: dict[Key, tuple[int, int]] = {}  # key -> (block, row)
        self._blocks: list[torch.Tensor] = []  # [n_b, H] each
        self._pending_keys: list[Key] = []
        self._pending_vecs: list[torch.Tensor] = []
        self._n_shards = 0
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            return
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != self.fingerprint or meta.get("element") != self.element:
            raise ValueError(f"{meta_path}: cache was written for another model/element (fingerprint {meta.get('fingerprint')!r})")
        for shard in sorted(self.path.glob("part-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                keys, vecs = tensor_to_keys(f.get_tensor("keys")), f.get_tensor("vectors")
            self._add_block(keys, vecs)
            self._n_shards += 1

    def _add_block(self, keys: list[Key], vecs: torch.Tensor) -> None:
        b = len(self._blocks)
        self._blocks.append(vecs)
        for r, k in enumerate(keys):
            self._index.setdefault(k, (b, r))

    def __len__(self) -> int:
        return len(self._index) + len(self._pending_keys)

    def __contains__(self, key) -> bool:
        k = _as_key(key)
        return k in self._index or k in self._pending_set()

    def _pending_set(self) -> dict[Key, int]:
        return {k: i for i, k in enumerate(self._pending_keys)}

    def missing(self, keys: Sequence) -> list[Key]:
        """The distinct keys not in the cache, in first-seen order."""
        pend = self._pending_set()
        out, seen = [], set()
        for key in keys:
            k = _as_key(key)
            if k not in self._index and k not in pend and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def put(self, keys: Sequence, vectors: torch.Tensor) -> None:
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"put: {len(keys)} keys but vectors of shape {tuple(vectors.shape)}")
        v = vectors.detach().cpu()
        if self.dtype is not None:
            v = v.to(self.dtype)
        self._pending_keys.extend(_as_key(k) for k in keys)
        self._pending_vecs.append(v)

    def get(self, keys: Sequence) -> torch.Tensor:
        """[n, H] vectors of the keys (KeyError naming the first missing key)."""
        pend = self._pending_set()
        pend_vecs = torch.cat(self._pending_vecs) if self._pending_vecs else None
        rows = []
        for key in keys:
            k = _as_key(key)
            if k in self._index:
                b, r = self._index[k]
                rows.append(self._blocks[b][r])
            elif k in pend:
                rows.append(pend_vecs[pend[k]])
            else:
                raise KeyError(f"memory element {k} is not in the cache {self.path}")
        if not rows:
            H = self._blocks[0].shape[1] if self._blocks else (pend_vecs.shape[1] if pend_vecs is not None else 0)
            return torch.zeros(0, H)
        return torch.stack(rows)

    def flush(self) -> None:
        """Write the buffered elements as a new shard (atomic rename); in-memory caches just keep them."""
        if not self._pending_keys:
            return
        if self.path is None:
            self._add_block(self._pending_keys, torch.cat(self._pending_vecs))
            self._pending_keys, self._pending_vecs = [], []
            return
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / "meta.json"
        vecs = torch.cat(self._pending_vecs).contiguous()
        if not meta_path.is_file():
            meta = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "element": self.element,
                    "hidden_size": int(vecs.shape[1])}
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        shard = self.path / f"part-{self._n_shards:05d}.safetensors"
        tmp = shard.with_name(shard.name + ".tmp")
        save_file({"keys": keys_to_tensor(self._pending_keys), "vectors": vecs}, str(tmp), metadata={"format": CACHE_FORMAT})
        tmp.replace(shard)
        self._n_shards += 1
        self._add_block(self._pending_keys, vecs)
        self._pending_keys, self._pending_vecs = [], []


# ---- layers 1..L with a shared prefix ------------------------------------------------------------
def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    p = 0
    while p < n and all(s[p] == first[p] for s in seqs):
        p += 1
    return p


@torch.no_grad()
def lower_last_states(split_lm, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """[n, H] float32 layer-L state of each sequence's last token, like ``SplitLM.encode_lower``, but
    the common prefix of all sequences runs through layers 1..L once (batch 1) and its KV cache is
    shared. The suffixes are right-padded: under the causal mask a real token never sees the padding
    after it, so no padding mask is needed and positions simply continue from the prefix.

    The layers run through ``SplitLM.run_layers`` (the loop every hand-written forward shares); tests
    compare it with the full forward.
    """
    from transformers import DynamicCache

    if len(seqs) == 0:
        return torch.zeros(0, split_lm.hidden_size)
    if any(len(s) == 0 for s in seqs):
        raise ValueError("a sequence to encode has no tokens")
    cfg, dev, embed = split_lm.config, split_lm.device, split_lm.model.model.embed_tokens
    p = min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1)  # every suffix keeps >= 1 token

    def run(h, pos, cache, n_seen):
        mask = split_lm.causal_mask(h, torch.ones(h.shape[0], n_seen + h.shape[1], dtype=torch.long, device=dev),
                                    pos, cache)
        return split_lm.run_layers(split_lm.lower_layers(), h, mask, pos, cache)

    prefix = None
    if p > 0:
        prefix = DynamicCache(config=cfg)
        ids = torch.tensor([list(seqs[0][:p])], dtype=torch.long, device=dev)
        run(embed(ids), torch.arange(p, device=dev)[None], prefix, 0)

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), split_lm.hidden_size, dtype=torch.float32)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        suf = [list(seqs[i][p:]) for i in idx]
        T = max(len(x) for x in suf)
        ids = torch.full((len(idx), T), split_lm.pad_id, dtype=torch.long)
        for r, x in enumerate(suf):
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        ids = ids.to(dev)
        cache = None
        if prefix is not None:  # the prefix's KV of layers 1..L, one copy per row
            cache = expand_prefix(DynamicCache(config=cfg),
                                  [(layer.keys, layer.values) for layer in prefix.layers[:split_lm.cut]], len(idx))
        pos = (p + torch.arange(T, device=dev))[None].expand(len(idx), -1)
        h = run(embed(ids), pos, cache, p)  # [b, T, H]
        last = torch.tensor([len(x) - 1 for x in suf], device=dev)
        out[idx] = h[torch.arange(len(idx), device=dev), last].float().cpu()
    return out


# ---- encoder ------------------------------------------------------------------------------------
class MemoryEncoder:
    """Builds and encodes memory elements and queries with the generator's lower layers.

    ``titles[i]`` is the title of item ``i`` (``Catalogue.titles``). Every distinct element is encoded
    once: into ``cache`` (a ``MemoryCache`` on disk) when given, else into an in-memory one. In window
    mode queries go through the same cache (same space, same keys); in item mode through
    ``query_cache`` (a window cache) when given, else an in-memory one.
    """

    def __init__(
        self,
        split_lm,
        prompt_builder,
        titles: Sequence[str],
        element: str = "window",
        k_short: int = 10,
        cache: MemoryCache | None = None,
        query_cache: MemoryCache | None = None,
        batch_size: int = 16,
        flush_every: int = 4096,
        progress: bool = False,
        share_prefix: bool = True,
    ):
        if element not in ELEMENT_KINDS:
            raise ValueError(f"unknown memory element kind {element!r}; use one of {ELEMENT_KINDS}")
        if k_short < 1:
            raise ValueError(f"k_short must be >= 1, got {k_short}")
        self.lm, self.builder, self.titles = split_lm, prompt_builder, list(titles)
        self.element, self.k_short = element, k_short
        self.batch_size, self.flush_every, self.progress = batch_size, flush_every, progress
        self.share_prefix = share_prefix
        # Without a disk cache, encoded elements are still memoized in memory (each encoded once).
        self.cache = cache if cache is not None else MemoryCache(None, self.cache_fingerprint(element), element)
        if query_cache is None:
            query_cache = self.cache if element == "window" else MemoryCache(None, self.cache_fingerprint("window"), "window")
        self.query_cache = query_cache
        for name, c, kind in (("cache", self.cache, element), ("query_cache", self.query_cache, "window")):
            if c.element != kind or c.fingerprint != self.cache_fingerprint(kind):
                raise ValueError(f"{name} {c.path} does not belong to this encoder (expected element {kind!r} "
                                 f"and fingerprint {self.cache_fingerprint(kind)!r})")

    # ---- fingerprints --------------------------------------------------------------------------
    def cache_fingerprint(self, element: str | None = None) -> str:
        """What a cache of this encoder's elements must be keyed by: the lower part's fingerprint
        (model, lower weights, L, dtype, tokenizer) + the prompt template's signature for windows."""
        element = element or self.element
        fp = fingerprint(self.lm)
        if element == "window":
            return f"{fp}|window|prompt:{self.builder.signature()}"
        return f"{fp}|item|bare-title"

    # ---- keys ----------------------------------------------------------------------------------
    def element_keys(self, sample: Sample) -> list[Key]:
        """One key per memory position (oldest first); empty when the history has only K items."""
        hist, k = sample.history, self.k_short
        return [context.element_key(hist, m, k, self.element) for m in range(context.n_memory(len(hist), k))]

    elements_for_sample = element_keys

    def query_key(self, sample: Sample) -> Key:
        return tuple(context.short_term(sample.history, self.k_short))

    # ---- raw encoding (no cache) ---------------------------------------------------------------
    def _window_ids(self, window: Sequence[int]) -> list[int]:
        return self.builder.build([self.titles[i] for i in window], with_slot=True).input_ids

    def _item_ids(self, title: str) -> list[int]:
        # the bare title with the tokenizer's own special tokens, as BIGRec embeds titles
        return list(self.lm.tokenizer(one_line(title)).input_ids)

    def encode_windows(self, windows: Sequence[Sequence[int]]) -> torch.Tensor:
        """[n, H] layer-L last-token states of the prompts of the given windows (item index tuples).

        Every window prompt starts with the same template head (~72 of ~212 tokens for SmolLM2 and
        ML-100K titles): with ``share_prefix`` it runs through layers 1..L once and its KV cache is
        shared by all windows (``lower_last_states``); otherwise ``SplitLM.encode_lower``.
        """
        if not windows:
            return torch.zeros(0, self.lm.hidden_size)
        seqs = [self._window_ids(w) for w in windows]
        if self.share_prefix:
            return lower_last_states(self.lm, seqs, batch_size=self.batch_size)
        return self.lm.encode_lower(seqs, batch_size=self.batch_size)

    def encode_items(self, items: Sequence[int]) -> torch.Tensor:
        """[n, H] layer-L last-token states of the bare titles of the given items."""
        if not items:
            return torch.zeros(0, self.lm.hidden_size)
        return self.lm.encode_lower([self._item_ids(self.titles[i]) for i in items], batch_size=self.batch_size)

    def _encode_raw(self, keys: Sequence[Key], kind: str) -> torch.Tensor:
        return self.encode_windows(keys) if kind == "window" else self.encode_items([k[0] for k in keys])

    # ---- cached encoding -----------------------------------------------------------------------
    def _encode(self, keys: Sequence, kind: str, cache: MemoryCache) -> torch.Tensor:
        keys = [_as_key(k) for k in keys]
        todo = cache.missing(keys)
        step = max(self.flush_every, 1)
        for s in tqdm(range(0, len(todo), step), desc=f"encode {kind}s", disable=not self.progress or not todo):
            chunk = todo[s : s + step]
            cache.put(chunk, self._encode_raw(chunk, kind))
            cache.flush()
        if not keys:
            return torch.zeros(0, self.lm.hidden_size)
        return cache.get(keys)

    def encode(self, keys: Sequence) -> torch.Tensor:
        """[n, H] element vectors of the keys (through the cache when there is one)."""
        return self._encode(keys, self.element, self.cache)

    def memory_for_sample(self, sample: Sample) -> tuple[list[Key], torch.Tensor]:
        """The sample's memory ``M_{u,t}``: keys and vectors [M, H], oldest first."""
        keys = self.element_keys(sample)
        return keys, self.encode(keys)

    def queries(self, samples: Sequence[Sample]) -> torch.Tensor:
        """z_t of each sample [N, H]."""
        return self._encode([self.query_key(s) for s in samples], "window", self.query_cache)

    def query_for_sample(self, sample: Sample) -> torch.Tensor:
        """z_t [H]: layer-L last-token state of the sample's short-term prompt (with slot)."""
        return self.queries([sample])[0]

    def prefetch(self, samples: Sequence[Sample]) -> None:
        """Encode (into the caches) every element and query the samples need, batched."""
        keys = [k for s in samples for k in self.element_keys(s)]
        if self.query_cache is self.cache:
            keys += [self.query_key(s) for s in samples]  # one batched pass for both
        self.encode(keys)
        self.queries(samples)
