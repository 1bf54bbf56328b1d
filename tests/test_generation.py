"""Logits-level checks of the generation engine (``model/generation/``) on the tiny float32 Llama: the
next-token scores of a row after its batch merged with others, and after drafted positions were
rejected, equal those of the same row decoded alone with plain steps, step by step."""
from __future__ import annotations

import torch

from model.generation import step
from model.prompts import PromptBuilder
from tests.generation_helpers import start

H = 64


def _prompts(split, titles, sizes):
    b = PromptBuilder(split.tokenizer)
    return [b.build(titles[:k]) for k in sizes]


def _plain_logits(split, prompt, vec, n: int) -> list[torch.Tensor]:
    """The row's next-token scores before each of its first ``n`` tokens, decoded alone, no drafts."""
    batch = start(split, [prompt], slot_vectors=vec, max_new_tokens=n + 1, stop_at_newline=False)
    out = []
    for _ in range(n):
        out.append(batch.logits[0].clone())
        step(split, batch)
    return out


def test_logits_after_a_merge_equal_the_rows_alone(tiny_split, tiny_titles):
    prompts = _prompts(tiny_split, tiny_titles, (2, 9, 5))
    torch.manual_seed(3)
    vecs = torch.randn(3, 1, H) * 4
    alone = [_plain_logits(tiny_split, p, vecs[i:i + 1], 8) for i, p in enumerate(prompts)]
    batch = start(tiny_split, prompts[:2], [0, 1], slot_vectors=vecs[:2], max_new_tokens=9, stop_at_newline=False)
    seen = {0: 0, 1: 0, 2: 0}  # tokens taken per row
    for n in range(6):
        if n == 2:  # a row of another prompt length joins two steps in (its cache is left-padded)
            batch.merge(start(tiny_split, prompts[2:], [2], slot_vectors=vecs[2:], max_new_tokens=9,
                              stop_at_newline=False))
        for j, tag in enumerate(batch.tags):
            torch.testing.assert_close(batch.logits[j], alone[tag][seen[tag]], rtol=1e-4, atol=1e-4)
        step(tiny_split, batch)
        for tag in batch.tags:
            seen[tag] += 1
    assert seen[2] == 4 and batch.rows == 3


class Guesses:
    """A drafter that guesses ``right`` tokens of the plain answer, then ``wrong`` ones."""

    def __init__(self, answer: list[int], right: int, wrong: int):
        self.answer, self.right, self.wrong = answer, right, wrong

    def draft(self, tokens, k):
        n = len(tokens)
        good = self.answer[n:n + self.right]
        bad = [(t + 1) % 100 for t in self.answer[n + len(good):n + len(good) + self.wrong]]
        return (good + bad)[:k]


def test_logits_after_rejected_draft_positions_equal_plain_steps(tiny_split, tiny_titles):
    (prompt,) = _prompts(tiny_split, tiny_titles, (4,))
    torch.manual_seed(5)
    vec = torch.randn(1, 1, H) * 4
    plain = _plain_logits(tiny_split, prompt, vec, 10)
    answer = [int(x.argmax()) for x in plain]
    batch = start(tiny_split, [prompt], [0], slot_vectors=vec, max_new_tokens=11, stop_at_newline=False)
    batch.drafter, batch.draft_tokens, batch.draft_max_rows = Guesses(answer, right=2, wrong=3), 5, 1
    holes = 0
    while batch.rows and len(batch.tokens[0]) < 9:
        before = batch.mask.shape[1]
        step(tiny_split, batch)  # takes the pending token, keeps 2 guesses, rejects 3: masked holes
        holes += int((batch.mask[0, before:] == 0).sum())
        n = len(batch.tokens[0])
        assert batch.tokens[0] == answer[:n]
        torch.testing.assert_close(batch.logits[0], plain[n], rtol=1e-4, atol=1e-4)
    assert holes >= 3  # positions were rejected, and the scores after them are the plain ones
