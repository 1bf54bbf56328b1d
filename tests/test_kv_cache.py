"""The in-place KV cache (model/generation/kv_cache.py) against HF's DynamicLayer and the full forward."""
import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from model.generation.kv_cache import GrowingLayer, growing_cache


def _kv(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def _same(a: GrowingLayer, b: DynamicLayer):
    assert a.get_seq_length() == b.get_seq_length()
    torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


def test_growing_layer_matches_dynamic_layer_through_every_operation():
    grow, ref = GrowingLayer(spare=3), DynamicLayer()
    for layer in (grow, ref):
        out = layer.update(*_kv(4, 5, 0))  # a prefill
    torch.testing.assert_close(out[0], grow.keys)
    _same(grow, ref)
    buffers = []
    for step in range(7):  # decode steps: 3 fit in the spare room, the 4th reallocates
        kv = _kv(4, 1, 10 + step)
        ka, va = grow.update(*kv)
        kb, vb = ref.update(*kv)
        torch.testing.assert_close(ka, kb, rtol=0, atol=0)
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
        buffers.append(grow._k.data_ptr())
    assert len(set(buffers)) == 2 and buffers[:3] == [buffers[0]] * 3  # appends in place until full
    idx = torch.tensor([3, 1])
    grow.batch_select_indices(idx), ref.batch_select_indices(idx)
    _same(grow, ref)
    grow.crop(-2), ref.crop(-2)
    _same(grow, ref)
    grow.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    _same(grow, ref)
    beams = torch.tensor([2, 2, 0, 1])
    grow.reorder_cache(beams), ref.reorder_cache(beams)
    _same(grow, ref)
    kv = _kv(4, 2, 99)
    grow.update(*kv), ref.update(*kv)  # appends after every reshaping still land in the right rows
    _same(grow, ref)
    with pytest.raises(ValueError, match="rows"):
        grow.update(*_kv(3, 1, 5))
    grow.reset()
    assert grow.get_seq_length() == 0 and not grow.is_initialized


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_and_dynamic_cache(tiny_lm):
    """Greedy decoding with the growing cache: each step's logits equal the full (uncached) forward
    of the sequence so far, and the tokens equal those of HF's DynamicCache."""
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    runs = {}
    for name, cache in (("growing", growing_cache(tiny_lm.config, spare=2)), ("dynamic", DynamicCache(config=tiny_lm.config))):
        seq = ids.clone()
        out = tiny_lm(input_ids=seq, past_key_values=cache, use_cache=True)
        for _ in range(6):  # more steps than the spare room: the buffer grows mid-decode
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = tiny_lm(input_ids=nxt, past_key_values=cache, use_cache=True)
            full = tiny_lm(input_ids=seq).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-4)
        runs[name] = seq
    assert torch.equal(runs["growing"], runs["dynamic"])
    assert all(isinstance(layer, GrowingLayer) for layer in growing_cache(tiny_lm.config).layers)
