"""Eq. 5 labels (model/train/labels.py) and the LabelSet container."""
from __future__ import annotations

import json

import pytest
import torch

from model.data.types import Sample
from model.memory import MemoryEncoder
from model.prompts import PromptBuilder
from model.train import labels
from model.train.labels import LabelSet, annotate, choose_samples

K = 4


def _sample(history: list[int], target: int) -> Sample:
    return Sample("u", target, 1000, list(history), list(range(len(history))))


def _samples() -> list[Sample]:
    h = [3, 1, 4, 15, 9, 2, 6, 5, 8, 10]
    return [
        _sample(h[:7], 16),   # 3 memory elements
        _sample(h[:4], 0),    # no memory: skipped
        _sample(h[:9], 13),   # 5 elements, shares windows with the first
        _sample([0, 1, 0, 1, 0, 1, 0, 1, 0, 2, 3, 4, 5], 14),  # window (0, 1, 0, 1) ends at m = 3, 5 and 7
    ]


def _brute_logprob(split, ids: list[int], n_prompt: int, slot: int | None, vec: torch.Tensor | None) -> float:
    """sum_i log P(y_i | ...) by one full HF forward, replacing layer L's output at ``slot`` by ``vec``."""
    layer = split.model.model.layers[split.cut - 1]

    def hook(_m, _a, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, slot] = vec.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer.register_forward_hook(hook) if vec is not None else None
    try:
        with torch.no_grad():
            logits = split.model(torch.tensor([ids])).logits[0].float()  # [T, V]
    finally:
        if handle is not None:
            handle.remove()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[n_prompt - 1 + i, ids[n_prompt + i]] for i in range(len(ids) - n_prompt)))


def test_labels_equal_brute_force(tiny_split, tiny_tokenizer, tiny_titles):
    builder = PromptBuilder(tiny_tokenizer)
    enc = MemoryEncoder(tiny_split, builder, tiny_titles, "window", k_short=K)
    samples = _samples()
    labels = annotate(enc, samples, batch_elements=2, chunk_size=2, progress=False)
    assert labels.sample_index.tolist() == [0, 2, 3]
    assert labels.counts().tolist() == [3, 5, 9]
    for row, si in enumerate(labels.sample_index.tolist()):
        s = samples[si]
        prompt = builder.build([tiny_titles[i] for i in s.short_term(K)], with_slot=True)
        ids = prompt.input_ids + builder.response_ids(tiny_titles[s.target])
        n = len(prompt.input_ids)
        (slot,) = prompt.slot_positions
        base = _brute_logprob(tiny_split, ids, n, None, None)
        assert float(labels.baseline[row]) == pytest.approx(base, abs=1e-4)
        keys = enc.element_keys(s)
        for j, k in enumerate(keys):
            # the element is recomputed from scratch: layer-L last-token state of its window prompt
            wids = builder.build([tiny_titles[i] for i in k], with_slot=True).input_ids
            with torch.no_grad():
                z_m = tiny_split.model(torch.tensor([wids]), output_hidden_states=True).hidden_states[tiny_split.cut][0, -1]
            want = _brute_logprob(tiny_split, ids, n, slot, z_m) - base
            got = float(labels.sample_deltas(row)[j])
            assert got == pytest.approx(want, abs=2e-4), (si, k)
            assert torch.allclose(labels.sample_memory(row)[j].float(), z_m, atol=1e-4)
        # z_t is the layer-L last-token state of the sample's own prompt
        with torch.no_grad():
            z_t = tiny_split.model(torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states[tiny_split.cut][0, -1]
        assert torch.allclose(labels.query[row], z_t, atol=1e-4)
    # labels are not all zero: the slot matters (else the test could not tell elements apart)
    assert float(labels.delta.abs().max()) > 1e-3
    # repeated windows get one δ (computed once), windows shared by samples 0 and 2 are stored once
    d3, keys3 = labels.sample_deltas(2), enc.element_keys(samples[3])
    assert [keys3[m] for m in (3, 5, 7)] == [(0, 1, 0, 1)] * 3 and d3[3] == d3[5] == d3[7]
    assert labels.elements.shape[0] == len({k for si in (0, 2, 3) for k in enc.element_keys(samples[si])})


def test_annotate_resumes_and_refuses_other_settings(tiny_split, tiny_tokenizer, tiny_titles, tmp_path, monkeypatch):
    builder = PromptBuilder(tiny_tokenizer)
    enc = MemoryEncoder(tiny_split, builder, tiny_titles, "window", k_short=K)
    samples = _samples()
    full = annotate(enc, samples, out_dir=tmp_path / "lab", chunk_size=1, progress=False)
    chunks = sorted((tmp_path / "lab").glob("labels-*.safetensors"))
    assert len(chunks) == 3
    chunks[1].unlink()  # as if interrupted during the second chunk

    calls = []
    real = labels.target_logprob

    def counting(lm, prompt, target, vecs, chunk_size=32):
        calls.append(prompt.input_ids)
        return real(lm, prompt, target, vecs, chunk_size=chunk_size)

    monkeypatch.setattr(labels, "target_logprob", counting)
    again = annotate(enc, samples, out_dir=tmp_path / "lab", chunk_size=1, progress=False)
    assert len(calls) == 2  # only the missing chunk's sample: baseline + its elements
    assert torch.equal(again.delta, full.delta) and torch.equal(again.offsets, full.offsets)
    loaded = LabelSet.load(tmp_path / "lab")
    assert torch.equal(loaded.delta, full.delta)
    assert loaded.meta["element"] == "window"
    with pytest.raises(ValueError, match="chunk_size"):
        annotate(enc, samples, out_dir=tmp_path / "lab", chunk_size=2, progress=False)


def test_budget_is_a_seeded_subset_of_samples_with_memory():
    samples = [_sample(list(range(n)), 0) for n in [4, 5, 6, 4, 7, 8, 9, 4, 10, 11]]
    eligible = [1, 2, 4, 5, 6, 8, 9]
    assert choose_samples(samples, K, None) == eligible
    a = choose_samples(samples, K, 3, seed=1)
    assert a == choose_samples(samples, K, 3, seed=1) == sorted(a)
    assert len(a) == 3 and set(a) <= set(eligible)
    assert {tuple(choose_samples(samples, K, 3, seed=s)) for s in range(10)} != {tuple(a)}


def test_budget_per_user_takes_runs_of_consecutive_samples():
    # 4 users × 6 samples, interleaved in the list; timestamps increase within a user
    samples = [Sample(f"u{u}", 0, 100 * t + u, list(range(K + 1 + t)), list(range(K + 1 + t)))
               for t in range(6) for u in range(4)]
    rows = choose_samples(samples, K, 7, seed=3, per_user=3)
    assert rows == choose_samples(samples, K, 7, seed=3, per_user=3) and len(rows) == 7
    by_user = {}
    for i in rows:
        by_user.setdefault(samples[i].user_id, []).append(samples[i].timestamp // 100)
    assert sorted(len(v) for v in by_user.values()) == [1, 3, 3]  # two full runs, then the rest
    for ts in by_user.values():
        assert ts == list(range(ts[0], ts[0] + len(ts)))  # consecutive in time


def _toy() -> LabelSet:
    q = [torch.full((2,), float(i)) for i in range(3)]
    mems = [torch.tensor([[1.0, 0], [2, 0]]), torch.zeros(0, 2), torch.tensor([[3.0, 3], [4, 4], [5, 5]])]
    ds = [torch.tensor([0.5, -0.5]), torch.zeros(0), torch.tensor([1.0, 2.0, 3.0])]
    return LabelSet.from_lists(q, mems, ds)


def test_labelset_padded_subset_and_roundtrip(tmp_path):
    ls = _toy()
    z, mem, mask, d = ls.padded([2, 0, 1])
    assert mask.tolist() == [[True, True, True], [True, True, False], [False, False, False]]
    assert mem[1, 1].tolist() == [2.0, 0.0] and mem[0, 2].tolist() == [5.0, 5.0]
    assert d.tolist() == [[1.0, 2.0, 3.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]
    assert z[:, 0].tolist() == [2.0, 0.0, 1.0]
    ne = ls.nonempty()
    assert ne.counts().tolist() == [2, 3] and ne.sample_deltas(1).tolist() == [1.0, 2.0, 3.0]
    ls.meta = {"note": "x"}
    ls.save(tmp_path / "a.safetensors")
    back = LabelSet.load(tmp_path / "a.safetensors")
    for f in ("query", "elements", "element_index", "offsets", "delta"):
        assert torch.equal(getattr(back, f), getattr(ls, f)), f
    assert back.meta == {"note": "x"}
    with pytest.raises(ValueError, match="offsets"):
        LabelSet(ls.query, ls.elements, ls.element_index, ls.offsets[:-1], ls.delta)


def test_concat_dedupes_elements_by_key():
    def part(keys, vecs, idx, offsets, delta):
        from model.memory import keys_to_tensor
        return LabelSet(torch.zeros(len(offsets) - 1, 2), torch.tensor(vecs), torch.tensor(idx),
                        torch.tensor(offsets), torch.tensor(delta), element_keys=keys_to_tensor(keys))

    a = part([(1, 2), (3,)], [[1.0, 2], [3, 3]], [0, 1, 0], [0, 2, 3], [0.1, 0.2, 0.3])
    b = part([(3,), (7, 8, 9)], [[3.0, 3], [7, 8]], [1, 0], [0, 2], [0.4, 0.5])
    c = LabelSet.concat([a, b])
    assert c.elements.shape[0] == 3  # (3,) stored once
    assert c.offsets.tolist() == [0, 2, 3, 5]
    assert c.sample_memory(2).tolist() == [[7.0, 8.0], [3.0, 3.0]]
    assert c.sample_memory(0).tolist() == [[1.0, 2.0], [3.0, 3.0]]
    assert c.delta.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
