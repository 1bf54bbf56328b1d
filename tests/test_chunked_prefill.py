"""Chunked prefill (``generation.begin`` / ``advance``): a prefill fed in chunks between decoding steps
must give what one forward gives (float32 tiny model): the same next-token scores, memory pick, z_t,
kept guess and greedy tokens; chunks other than the last stop before the first slot."""
from __future__ import annotations

import pytest
import torch

from model.generation import advance, begin, complete, step
from model.llm import SplitLM
from model.prompts import PromptBuilder
from tests.generation_helpers import start

H = 64


class FirstTokens:
    """A drafter that always guesses ``tokens`` for the start of an answer."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def draft(self, tokens, k):
        return list(self.tokens[len(tokens):len(tokens) + k]) if list(self.tokens[:len(tokens)]) == list(tokens) else []


def _prompts(split: SplitLM, titles, sizes, with_slot=True):
    b = PromptBuilder(split.tokenizer)
    return [b.build(titles[:k], with_slot=with_slot) for k in sizes]


def _run(split: SplitLM, prefill, max_tokens, select=None, vectors=None):
    """Advance to the end in chunks of ``max_tokens``, then complete with the slot vectors that
    ``select(z_t)`` picks (or ``vectors``); (batch, [columns fed per forward])."""
    fed = []
    hook = split.model.model.embed_tokens.register_forward_hook(lambda m, a, o: fed.append(a[0].shape[1]))
    try:
        while (z := advance(split, prefill, max_tokens)) is None:
            pass
        use = None
        if select is not None:
            vectors, use = select(z)
        batch = complete(split, prefill, vectors, use)
    finally:
        hook.remove()
    return batch, fed


def _decode(split: SplitLM, batch) -> dict:
    out = {}
    while batch.rows:
        out.update(step(split, batch))
    return out


def _picker(split: SplitLM, seen: list):
    """A memory pick that records z_t and picks a vector made from it (so a wrong z_t shows)."""
    torch.manual_seed(7)
    mem = torch.randn(8, H) * 4

    def select(z):  # z [b, H]
        seen.append(z.clone())
        pick = (z @ mem.T).argmax(-1)  # [b]
        return mem[pick][:, None, :], torch.ones(len(z), dtype=torch.bool)

    return select


@pytest.mark.parametrize("reuse_head", [True, False])
@pytest.mark.parametrize("max_tokens", [1, 4, 13, 40])
def test_chunks_give_what_one_forward_gives(tiny_split, tiny_titles, reuse_head, max_tokens):
    prompts = _prompts(tiny_split, tiny_titles, (2, 9, 5, 1))
    zs_whole, zs_chunk = [], []
    common = dict(max_new_tokens=10, stop_at_newline=False, reuse_head=reuse_head)
    whole, _ = _run(tiny_split, begin(tiny_split, prompts, **common), None, _picker(tiny_split, zs_whole))
    logits, mask, last = whole.logits.clone(), whole.mask.clone(), whole.last.clone()
    prefill = begin(tiny_split, prompts, **common)
    batch, fed = _run(tiny_split, prefill, max_tokens, _picker(tiny_split, zs_chunk))
    torch.testing.assert_close(batch.logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zs_chunk[0], zs_whole[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(batch.mask, mask) and torch.equal(batch.last, last)
    assert _decode(tiny_split, batch) == _decode(tiny_split, whole)
    # every chunk but the last fits the budget and ends before the first slot
    cols = max(1, max_tokens // len(prompts))
    assert all(f == cols for f in fed[:-1]) and len(fed) > 1
    assert prefill.at == prefill.ids.shape[1] and prefill.fed
    first_slot = prefill.final_from
    assert (prefill.ids.shape[1] - fed[-1]) <= first_slot
    head = prompts[0].n_shared if reuse_head else 0
    assert sum(fed) == prefill.ids.shape[1] - head


def test_chunks_with_a_start_guess_and_without_slots(tiny_split, tiny_titles):
    """Full-history prompts (no slot line) chunk up to their last token; the drafted guess goes with
    the last chunk and is kept as far as it is right, as in one forward."""
    prompts = _prompts(tiny_split, tiny_titles, (7, 3), with_slot=False)
    plain = _decode(tiny_split, start(tiny_split, prompts, max_new_tokens=10, stop_at_newline=False))
    policy = dict(drafter=FirstTokens(plain[0][:4]), draft_tokens=4, draft_max_rows=2, max_new_tokens=10,
                  stop_at_newline=False)
    whole = start(tiny_split, prompts, **policy)
    prefill = begin(tiny_split, prompts, **policy)
    assert prefill.final_from == prefill.prompt_len and len(prefill.draft) == 4
    batch, fed = _run(tiny_split, prefill, 6)
    assert fed[:-1] == [3] * (len(fed) - 1) and fed[-1] <= 3 + 4
    assert batch.tokens == whole.tokens and batch.tokens[0] == plain[0][:4]  # row 0 kept the right guess
    torch.testing.assert_close(batch.logits, whole.logits, rtol=1e-4, atol=1e-4)
    assert _decode(tiny_split, batch) == _decode(tiny_split, whole) == plain


def test_slot_vectors_and_a_batch_joining_mid_decode(tiny_split, tiny_titles):
    """A chunked prefill's rows merge into a running batch and get the tokens they get alone."""
    prompts = _prompts(tiny_split, tiny_titles, (4, 8, 2))
    torch.manual_seed(2)
    vecs = torch.randn(3, 1, H) * 4
    alone = {i: _decode(tiny_split, start(tiny_split, [p], [i], slot_vectors=vecs[i:i + 1], max_new_tokens=9,
                                                     stop_at_newline=False))[i] for i, p in enumerate(prompts)}
    running = start(tiny_split, prompts[:1], [0], slot_vectors=vecs[:1], max_new_tokens=9, stop_at_newline=False)
    prefill = begin(tiny_split, prompts[1:], [1, 2], max_new_tokens=9, stop_at_newline=False)
    got = {}
    while advance(tiny_split, prefill, 4) is None:  # a step of the running row between chunks
        got.update(step(tiny_split, running))
    running.merge(complete(tiny_split, prefill, vecs[1:]))
    got.update(_decode(tiny_split, running))
    assert got == alone


def test_advance_checks_its_input(tiny_split, tiny_titles):
    prefill = begin(tiny_split, _prompts(tiny_split, tiny_titles, (3,)), max_new_tokens=4)
    with pytest.raises(ValueError, match="complete follows"):
        complete(tiny_split, prefill)
    with pytest.raises(ValueError, match="max_tokens"):
        advance(tiny_split, prefill, 0)
    assert advance(tiny_split, prefill) is not None
    with pytest.raises(ValueError, match="already run"):
        advance(tiny_split, prefill)
    assert complete(tiny_split, prefill).rows == 1
    with pytest.raises(ValueError, match="complete follows"):
        complete(tiny_split, prefill)
