"""Packed tuning rows (model/train/packed.py) against the inference prompts they stand for."""
from __future__ import annotations

import pytest
import torch

from model.data.types import Sample
from model.prompts import PromptBuilder
from model.train.packed import ANSWER, HEAD, build_chunks, packed_loss, user_runs

K = 3


def _samples(items: list[int], k: int = K, user: str = "u") -> list[Sample]:
    """Sliding-window samples of one user: targets items[k:], histories of all earlier items."""
    return [Sample(user, items[t], 100 + t, items[:t], list(range(t))) for t in range(k, len(items))]


def _inference_logprobs(split, builder, titles, history, target) -> torch.Tensor:
    """Per-token log P of the target's response under the full forward of the inference prompt."""
    p = builder.build([titles[i] for i in history[-K:]])
    resp = builder.response_ids(titles[target])
    ids = torch.tensor([p.input_ids + resp])
    with torch.no_grad():
        logits = split.model(input_ids=ids).logits[0].float()
    n = len(p.input_ids)
    lp = torch.log_softmax(logits[n - 1:n - 1 + len(resp)], -1)
    return lp[torch.arange(len(resp)), torch.tensor(resp)]


def _packed_logprobs(split, chunk) -> torch.Tensor:
    from model.train.packed import pad_chunks

    ids, pos, mask = pad_chunks([chunk], split.pad_id)
    with torch.no_grad():
        h = split.upper_states(split.lower_states(ids, pos, mask), pos, mask)
        lp = torch.log_softmax(split.model.lm_head(h[0, chunk.loss_cols]).float(), -1)
    return lp[torch.arange(len(chunk.loss_targets)), torch.tensor(chunk.loss_targets)]


def test_first_target_of_a_chunk_is_exact(tiny_split, tiny_titles):
    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    items = [0, 5, 9, 2, 14, 7]
    chunk = build_chunks(builder, _samples(items), tiny_titles, K, chunk_targets=8)[0]
    got = _packed_logprobs(tiny_split, chunk)
    want = _inference_logprobs(tiny_split, builder, tiny_titles, items[:K], items[K])
    n = len(want)
    assert chunk.loss_targets[:n] == builder.response_ids(tiny_titles[items[K]])
    torch.testing.assert_close(got[:n], want, atol=1e-5, rtol=1e-5)
    # later targets see context items computed over more history: close to, not equal to, inference
    assert chunk.n_targets == len(items) - K


@pytest.mark.parametrize("chunk_targets", [1, 2, 8])
def test_every_target_sees_its_inference_prompt(tiny_split, tiny_titles, chunk_targets):
    """For each target: the keys visible to its tokens, other than the head, are the inference prompt's
    tokens after the head, at the same positions relative to the answer copy; and the head is visible whole."""
    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    items = [0, 5, 9, 2, 14, 7, 3, 11]
    samples = _samples(items)
    chunks = build_chunks(builder, samples, tiny_titles, K, chunk_targets=chunk_targets)
    assert sum(c.n_targets for c in chunks) == len(samples)
    head = builder.head_ids
    for c in chunks:
        mask = c.mask()
        for n, (ans, s) in enumerate(zip(c.answer_cols, c.samples)):
            p = builder.build([tiny_titles[i] for i in s.history[-K:]])
            resp = builder.response_ids(tiny_titles[s.target])
            want = sorted((tok, q - (len(p.input_ids) - 1)) for q, tok in enumerate(p.input_ids) if q >= len(head))
            cols = [q for q in range(len(c)) if c.item[q] == c.item[ans] and c.kind[q] != ANSWER]
            for qcol in [ans] + cols:
                keys = mask[qcol].nonzero()[:, 0].tolist()
                heads = [k for k in keys if c.kind[k] == HEAD]
                assert [c.input_ids[k] for k in heads] == head
                rest = [k for k in keys if c.kind[k] != HEAD and c.item[k] != c.item[ans]]
                got = sorted((c.input_ids[k], c.positions[k] - c.positions[ans]) for k in rest + [ans])
                assert got == want
            # the loss covers exactly the response, each token predicted by the column before it
            own = [c.loss_targets[i] for i, col in enumerate(c.loss_cols) if col == ans or col in cols]
            assert own == resp


def test_runs_split_at_gaps_and_loss_counts_every_target(tiny_split, tiny_titles):
    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    items = [0, 5, 9, 2, 14, 7, 3, 11]
    samples = _samples(items)
    subset = samples[:2] + samples[3:]  # a gap: the 4th sample is missing
    runs = user_runs(subset)
    assert [len(r[1]) for r in runs] == [2, len(samples) - 3]
    chunks = build_chunks(builder, subset, tiny_titles, K, chunk_targets=3)
    loss, n = packed_loss(tiny_split, chunks)
    want = sum(len(builder.response_ids(tiny_titles[s.target])) for s in subset)
    assert n == want and torch.isfinite(loss)
    # cached lower states give the same loss
    cache: dict = {}
    packed_loss(tiny_split, chunks, lower_cache=cache)
    again, _ = packed_loss(tiny_split, chunks, lower_cache=cache)
    torch.testing.assert_close(again, loss)


def test_list_template_needs_one_slot(tiny_tokenizer):
    with pytest.raises(ValueError, match="one slot"):
        PromptBuilder(tiny_tokenizer, template="list", n_slots=2)
    b = PromptBuilder(tiny_tokenizer, template="list")
    p = b.build(["Heat (1995)", "Fargo (1996)"])
    assert tiny_tokenizer.decode(p.input_ids, skip_special_tokens=True) == (
        "Long-term memory: ...\nThe user has watched these movies, oldest first:\nHeat (1995)\nFargo (1996)\n")
    # the slot is the placeholder in the head, after the shared part, before every title
    (slot,) = p.slot_positions
    assert tiny_tokenizer.decode(p.input_ids[:slot + 1], skip_special_tokens=True) == "Long-term memory: ..."
    assert p.n_shared <= slot < len(b.head_ids)
    assert b.build(["Heat (1995)"], with_slot=False).input_ids == b.build(["Heat (1995)"]).input_ids
    assert b.response_ids("Heat (1995)")[-1] == p.input_ids[-1]  # an answer ends with the newline
