"""Memory elements, queries and the element cache (model/memory.py) on the tiny model."""
from __future__ import annotations

import pytest
import torch

from model.data.types import Sample
from model.llm import SplitLM
from model.memory import MemoryCache, MemoryEncoder
from model.prompts import PromptBuilder
from tests.conftest import build_tiny_lm

K = 4


def _sample(history: list[int], target: int = 17) -> Sample:
    return Sample("u", target, 1000, list(history), list(range(len(history))))


def _layer_state(split: SplitLM, ids: list[int]) -> torch.Tensor:
    """Independent reference: full HF forward, hidden_states[L] (output of layer L), last token."""
    with torch.no_grad():
        out = split.model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[split.cut][0, -1].float()


class CountingEncoder(MemoryEncoder):
    """The real encoder, recording every key that it runs through the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoded = []

    def _encode_raw(self, keys, kind):
        self.encoded += list(keys)
        return super()._encode_raw(keys, kind)


def test_window_and_item_keys(tiny_split, tiny_tokenizer, tiny_titles):
    enc = MemoryEncoder(tiny_split, PromptBuilder(tiny_tokenizer), tiny_titles, "window", k_short=K)
    h = [3, 1, 4, 15, 9, 2, 6, 5, 8]  # 9 items, K = 4 -> 5 memory positions
    assert enc.element_keys(_sample(h)) == [(3,), (3, 1), (3, 1, 4), (3, 1, 4, 15), (1, 4, 15, 9)]
    assert enc.query_key(_sample(h)) == (2, 6, 5, 8)
    assert enc.element_keys(_sample(h[:K])) == []  # no memory
    items = MemoryEncoder(tiny_split, PromptBuilder(tiny_tokenizer), tiny_titles, "item", k_short=K)
    assert items.element_keys(_sample(h)) == [(3,), (1,), (4,), (15,), (9,)]


def test_window_elements_and_query_are_layer_L_last_token_states(tiny_split, tiny_tokenizer, tiny_titles):
    builder = PromptBuilder(tiny_tokenizer)
    enc = MemoryEncoder(tiny_split, builder, tiny_titles, "window", k_short=K)
    h = [3, 1, 4, 15, 9, 2, 6, 5]
    keys, mem = enc.memory_for_sample(_sample(h))
    assert mem.shape == (4, 64)
    for k, v in zip(keys, mem):
        ids = builder.build([tiny_titles[i] for i in k], with_slot=True).input_ids
        assert torch.allclose(v, _layer_state(tiny_split, ids), atol=1e-4)
    z = enc.query_for_sample(_sample(h))
    ids = builder.build([tiny_titles[i] for i in h[-K:]], with_slot=True).input_ids
    assert torch.allclose(z, _layer_state(tiny_split, ids), atol=1e-4)
    # the query of an earlier sample is exactly the element that its window later becomes
    later = _sample(h + [11, 12, 13, 0, 7])
    k_later, m_later = enc.memory_for_sample(later)
    j = k_later.index(tuple(h[-K:]))
    assert torch.allclose(m_later[j], z, atol=1e-6)


def test_shared_prefix_encoding_equals_encode_lower(tiny_split, tiny_tokenizer, tiny_titles):
    builder = PromptBuilder(tiny_tokenizer)
    windows = [(3,), (3, 1, 4, 15), (17, 0), (5, 6, 7, 8), (2, 2, 2, 2), (9, 10, 11)]
    shared = MemoryEncoder(tiny_split, builder, tiny_titles, "window", K, batch_size=4).encode_windows(windows)
    plain = MemoryEncoder(tiny_split, builder, tiny_titles, "window", K, share_prefix=False).encode_windows(windows)
    assert shared.shape == (6, 64)
    assert torch.allclose(shared, plain, atol=1e-4)
    assert not torch.allclose(shared[0], shared[1], atol=1e-2)  # rows are not mixed up


def test_item_elements_are_bare_title_states(tiny_split, tiny_tokenizer, tiny_titles):
    enc = MemoryEncoder(tiny_split, PromptBuilder(tiny_tokenizer), tiny_titles, "item", k_short=K)
    vec = enc.encode([(5,), (0,)])
    for i, v in zip((5, 0), vec):
        ids = tiny_tokenizer(tiny_titles[i]).input_ids
        assert ids[0] == tiny_tokenizer.bos_token_id
        assert torch.allclose(v, _layer_state(tiny_split, ids), atol=1e-4)


def test_identical_windows_encoded_once_and_cache_reloads(tiny_split, tiny_tokenizer, tiny_titles, tmp_path):
    builder = PromptBuilder(tiny_tokenizer)
    fp = MemoryEncoder(tiny_split, builder, tiny_titles, "window", K).cache_fingerprint()
    cache = MemoryCache(tmp_path, fp, "window")
    enc = lm = CountingEncoder(tiny_split, builder, tiny_titles, "window", K, cache=cache)
    h = [3, 1, 4, 15, 9, 2, 6, 5, 8, 10]
    samples = [_sample(h[:n]) for n in (7, 8, 9, 10)]  # one user's successive samples share windows
    enc.prefetch(samples)
    distinct = {k for s in samples for k in enc.element_keys(s)} | {enc.query_key(s) for s in samples}
    assert len(lm.encoded) == len(distinct) == len(set(lm.encoded))
    # the query of the 7-item sample is the window (1,4,15,9)... which samples 8..10 hold as element
    assert enc.query_key(samples[0]) in distinct and len(cache) == len(distinct)
    before = {k: enc.encode([k])[0] for k in distinct}
    n = len(lm.encoded)
    for s in samples:  # everything is cached now
        enc.memory_for_sample(s), enc.query_for_sample(s)
    assert len(lm.encoded) == n

    # a new process: the cache on disk serves every element, nothing is re-encoded
    enc2 = lm2 = CountingEncoder(tiny_split, builder, tiny_titles, "window", K, cache=MemoryCache(tmp_path, fp, "window"))
    for k, v in before.items():
        assert torch.equal(enc2.encode([k])[0], v)
    assert lm2.encoded == []


def test_cache_invalidated_when_L_or_model_changes(tiny_lm, tiny_tokenizer, tiny_titles, tmp_path):
    builder = PromptBuilder(tiny_tokenizer)
    h = [3, 1, 4, 15, 9, 2, 6]
    split2 = SplitLM.from_model(tiny_lm, tiny_tokenizer, cut=2)
    enc2 = MemoryEncoder(split2, builder, tiny_titles, "window", K,
                         cache=MemoryCache(tmp_path, MemoryEncoder(split2, builder, tiny_titles, "window", K).cache_fingerprint(), "window"))
    _, m2 = enc2.memory_for_sample(_sample(h))
    enc2.cache.flush()

    def fresh(split):
        fp = MemoryEncoder(split, builder, tiny_titles, "window", K).cache_fingerprint()
        enc = CountingEncoder(split, builder, tiny_titles, "window", K, cache=MemoryCache(tmp_path, fp, "window"))
        return enc, enc

    # same model, same L: served from disk
    lm_same, enc_same = fresh(SplitLM.from_model(tiny_lm, tiny_tokenizer, cut=2))
    assert torch.equal(enc_same.memory_for_sample(_sample(h))[1], m2) and lm_same.encoded == []
    # another L: a different cache, everything recomputed, and the vectors differ
    lm3, enc3 = fresh(SplitLM.from_model(tiny_lm, tiny_tokenizer, cut=3))
    assert len(enc3.cache) == 0
    _, m3 = enc3.memory_for_sample(_sample(h))
    assert len(lm3.encoded) == 3 and not torch.allclose(m3, m2)
    # another model (other weights), same L: recomputed too
    lm_b, enc_b = fresh(SplitLM.from_model(build_tiny_lm(len(tiny_tokenizer), seed=1), tiny_tokenizer, cut=2))
    assert len(enc_b.cache) == 0
    enc_b.memory_for_sample(_sample(h))
    assert len(lm_b.encoded) == 3
    # a cache opened for another model is refused by the encoder
    with pytest.raises(ValueError, match="does not belong"):
        MemoryEncoder(split2, builder, tiny_titles, "window", K, cache=enc3.cache)
    # another prompt template (two slots) is another window space too
    other = MemoryEncoder(split2, PromptBuilder(tiny_tokenizer, n_slots=2), tiny_titles, "window", K)
    assert other.cache_fingerprint() != enc2.cache_fingerprint()


def test_cache_roundtrip_keys_and_dtype(tmp_path):
    c = MemoryCache(tmp_path, "fp", "window", dtype=torch.bfloat16)
    v = torch.randn(3, 8)
    c.put([(1, 2, 3), (4,), (5, 6)], v)
    assert c.missing([(4,), (7,), (7,), (1, 2, 3)]) == [(7,)]
    c.flush()
    c2 = MemoryCache(tmp_path, "fp", "window")
    got = c2.get([(5, 6), (1, 2, 3)])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, v.to(torch.bfloat16)[[2, 0]])
    with pytest.raises(KeyError, match=r"\(9,\)"):
        c2.get([(9,)])
    assert len(MemoryCache(tmp_path, "other-fp", "window")) == 0
    with pytest.raises(ValueError, match="element kind"):
        MemoryCache(tmp_path, "fp", "windows")
