"""The catalogue draft table (model/generation/draft.py) and speculative decoding steps (``model/generation/speculative.py``).

Speculative steps must give exactly the greedy tokens of plain steps (float32 tiny model), whatever
the drafts: right ones save forwards, wrong ones cost nothing but the forward's extra positions.
"""
from __future__ import annotations

import pytest
import torch

from model.generation.draft import MAX_VOCAB, NgramDrafter
from model.generation import step
from model.llm import SplitLM
from tests.generation_helpers import start, stop_tables
from model.prompts import PromptBuilder

H = 64


# ---- the table ------------------------------------------------------------------------------------


def test_most_frequent_next_token_by_longest_context():
    d = NgramDrafter([[1, 2, 3, 9], [1, 2, 3, 9], [1, 2, 4, 9], [7, 2, 5, 9]])
    assert d.draft([], 1) == [1]  # the answers' most frequent first token
    assert d.draft([1, 2], 1) == [3]  # (1, 2) -> 3 twice, 4 once
    assert d.draft([7, 2], 1) == [5]  # the 2-token context beats the 1-token one ((2,) -> 3)
    assert d.draft([8, 8, 2], 1) == [3]  # unseen 3- and 2-token contexts: the last token alone
    assert d.draft([1, 2], 5) == [3, 9]  # chained guesses stop where no context continues (after 9)
    assert d.draft([6], 4) == []  # nothing known


def test_ties_go_to_the_smaller_token_and_k_limits():
    d = NgramDrafter([[5, 8], [5, 6], [5, 7, 1, 2, 3, 4]])
    assert d.draft([5], 1) == [6]  # 6, 7, 8 once each
    assert d.draft([], 3) == [5, 6]
    assert d.draft([5, 7], 2) == [1, 2] and d.draft([5, 7], 0) == []


def test_start_of_answer_is_a_context_of_its_own():
    # token 4 starts an answer once and follows 3 twice elsewhere: at the start only the former counts
    d = NgramDrafter([[4, 1], [3, 4, 2], [3, 4, 2]])
    assert d.draft([4], 1) == [1]
    assert d.draft([3, 4], 1) == [2]


def test_token_range_is_checked():
    with pytest.raises(ValueError, match="token ids"):
        NgramDrafter([[1, MAX_VOCAB]])
    assert NgramDrafter([[1, 2]]).draft([1, MAX_VOCAB + 5], 3) == []
    assert len(NgramDrafter([])) == 0 and NgramDrafter([]).draft([1], 3) == []


def test_observed_answers_draft_before_the_catalogue_latest_first_and_bounded():
    d = NgramDrafter([[1, 2, 3, 9]], max_recent=1000)
    assert d.draft([1, 2], 2) == [3, 9]
    d.observe([1, 2, 5, 6, 9])  # the model answered otherwise: its habit is drafted now
    assert d.draft([1, 2], 3) == [5, 6, 9] and d.draft([], 1) == [1]
    d.observe([1, 2, 7])
    assert d.draft([1, 2], 1) == [7]  # the latest answer wins
    assert d.draft([4, 4, 9], 1) == []  # an eos-like end has no continuation
    small = NgramDrafter([[1, 2, 3]], max_recent=3)  # 3 orders x 1 position: one answer token's contexts
    small.observe([8, 8, 8, 8])
    assert len(small._recent) == 3
    assert small.draft([8, 8, 8], 1) == [8]
    off = NgramDrafter([[1, 2, 3]], max_recent=0)
    off.observe([1, 2, 5])
    assert off.draft([1, 2], 1) == [3]
    with pytest.raises(ValueError, match="max_recent"):
        NgramDrafter([], max_recent=-1)


def test_from_titles_drafts_the_rest_of_a_catalogue_title(tiny_tokenizer, tiny_titles):
    b = PromptBuilder(tiny_tokenizer)
    d = NgramDrafter.from_titles(tiny_titles, b.response_ids)
    seq = b.response_ids(tiny_titles[3])  # '"Title"' + eos
    for cut in range(1, len(seq)):
        guess = d.draft(seq[:cut], len(seq))
        assert guess and guess[0] in {s[i] for s in map(b.response_ids, tiny_titles)
                                      for i in range(1, len(s)) if s[:i][-1:] == seq[cut - 1:cut]}
    assert d.nbytes == 12 * len(d)


# ---- speculative steps ----------------------------------------------------------------------------


class FixedDrafter:
    """Drafts from a dict: row tokens so far (tuple) -> guess; counts its calls."""

    def __init__(self, answers: list[list[int]] | None = None, wrong: int | None = None):
        self.answers, self.wrong, self.calls = answers or [], wrong, 0

    def draft(self, tokens, k):
        self.calls += 1
        if self.wrong is not None:
            return [self.wrong] * k
        for a in self.answers:  # the known answer this row is on, if any
            if list(a[:len(tokens)]) == list(tokens):
                return list(a[len(tokens):len(tokens) + k])
        return []


def _decode(split: SplitLM, batch, joins=None) -> tuple[dict, int]:
    """Step ``batch`` to the end (merging ``joins[step]`` batches before a step); (tag -> tokens, forwards)."""
    forwards = []
    hook = split.model.model.embed_tokens.register_forward_hook(lambda m, a, o: forwards.append(a[0].shape))
    got, n = {}, 0
    try:
        while batch.rows or (joins and any(s >= n for s in joins)):
            for other in (joins or {}).get(n, []):
                batch.merge(other)
            for tag, tokens in step(split, batch):
                got[tag] = tokens
            n += 1
    finally:
        hook.remove()
    return got, len(forwards)


def _prompts(split, titles, sizes):
    b = PromptBuilder(split.tokenizer)
    return [b.build(titles[:k]) for k in sizes]


def _start(split, prompts, tags, vecs, budget, drafter=None, draft_tokens=0, max_rows=4, lines=False):
    batch = start(split, prompts, tags, slot_vectors=vecs, max_new_tokens=budget, stop_at_newline=lines)
    batch.drafter, batch.draft_tokens, batch.draft_max_rows = drafter, draft_tokens, max_rows
    return batch


@pytest.fixture
def setup(tiny_split, tiny_titles):
    prompts = _prompts(tiny_split, tiny_titles, (2, 9, 5, 1))
    torch.manual_seed(3)
    vecs = torch.randn(len(prompts), 1, H) * 4
    plain, plain_forwards = _decode(tiny_split, _start(tiny_split, prompts, list(range(4)), vecs, 12))
    return tiny_split, prompts, vecs, plain, plain_forwards


def test_right_drafts_give_the_greedy_tokens_in_fewer_forwards(setup):
    split, prompts, vecs, plain, plain_forwards = setup
    drafter = FixedDrafter([plain[i] for i in range(4)])
    got, forwards = _decode(split, _start(split, prompts, list(range(4)), vecs, 12, drafter, 4))
    assert got == plain
    assert forwards <= plain_forwards // 2 and drafter.calls > 0


def test_wrong_drafts_change_nothing(setup):
    split, prompts, vecs, plain, plain_forwards = setup
    wrong = next(t for t in range(50, 100) if all(t not in toks for toks in plain.values()))
    got, forwards = _decode(split, _start(split, prompts, list(range(4)), vecs, 12, FixedDrafter(wrong=wrong), 5))
    assert got == plain and forwards == plain_forwards


@pytest.mark.parametrize("max_rows", [1, 2])
def test_drafting_waits_until_few_rows_decode(setup, max_rows):
    split, prompts, vecs, plain, _ = setup
    budgets = [3, 12, 5, 9]  # rows leave at different steps
    drafter = FixedDrafter([plain[i] for i in range(4)])
    batch = _start(split, prompts, list(range(4)), vecs, 12, drafter, 4, max_rows=max_rows)
    batch.max_new = list(budgets)
    step(split, batch)
    assert drafter.calls == 0  # 4 rows > max_rows: a plain step
    got, _ = _decode(split, batch)
    assert drafter.calls > 0
    assert got == {i: plain[i][:budgets[i]] for i in range(4)}


def test_budget_and_answer_line_stop_inside_a_draft(setup):
    split, prompts, vecs, plain, _ = setup
    drafter = FixedDrafter([plain[i] for i in range(4)])
    short, _ = _decode(split, _start(split, prompts, list(range(4)), vecs, 3))  # the budget ends the row
    got, _ = _decode(split, _start(split, prompts, list(range(4)), vecs, 3, drafter, 8))
    assert got == short and all(len(t) <= 3 for t in got.values())
    # a token that rows reach at different points ends the answer line: the row stops right after it
    row, at = next((r, p) for r in range(4) for p in range(2, 6) if plain[r][p] not in plain[r][:p])
    stop = plain[row][at]
    newline, lead, content = (torch.zeros(split.model.config.vocab_size, dtype=torch.bool) for _ in range(3))
    newline[stop] = lead[stop] = True
    with stop_tables(split, newline, lead, content):
        ref, _ = _decode(split, _start(split, prompts, list(range(4)), vecs, 12, lines=True))
        got, _ = _decode(split, _start(split, prompts, list(range(4)), vecs, 12, drafter, 8, lines=True))
    assert got == ref and got[row][-1] == stop and len(got[row]) == at + 1


def test_finished_rows_are_shown_to_a_learning_drafter(setup):
    split, prompts, vecs, plain, _ = setup
    seen = []

    class Learning(FixedDrafter):
        def observe(self, tokens):
            seen.append(list(tokens))

    got, _ = _decode(split, _start(split, prompts, list(range(4)), vecs, 12, Learning(), 4, max_rows=1))
    assert got == plain and sorted(seen) == sorted(plain.values())


def test_rows_joining_a_drafting_batch_get_their_own_tokens(setup):
    """Rejected draft positions stay in the cache as masked holes; a batch merged in later is padded
    to the holed length and every row still gets its plain greedy tokens."""
    split, prompts, vecs, plain, _ = setup
    half = FixedDrafter([p[:3] + [7, 7, 7] for p in plain.values()])  # right for 2 tokens, then wrong
    batch = _start(split, prompts[:1], [0], vecs[:1], 12, half, 6)
    joins = {2: [_start(split, prompts[1:3], [1, 2], vecs[1:3], 12)],
             4: [_start(split, prompts[3:], [3], vecs[3:], 12)]}
    got, _ = _decode(split, batch, joins)
    assert got == plain
    assert half.calls > 0


def test_merge_drops_positions_no_row_attends_to(setup):
    """Rejected guesses leave masked holes; a merge copies only the positions some row attends to, so
    the batch's sequence axis does not keep growing, and the rows' tokens stay the plain ones."""
    split, prompts, vecs, plain, _ = setup
    wrong = next(t for t in range(50, 100) if all(t not in toks for toks in plain.values()))
    batch = _start(split, prompts[:1], [0], vecs[:1], 12, FixedDrafter(wrong=wrong), 5)
    got = {}
    for _ in range(3):
        got.update(step(split, batch))
    holes = int((batch.mask == 0).all(0).sum())
    assert holes == 3 * 5  # each step fed 1 + 5 tokens and kept the first
    before = batch.mask.shape[1]
    batch.merge(_start(split, prompts[1:2], [1], vecs[1:2], 12))
    assert batch.mask.shape[1] == max(before - holes, len(prompts[1].input_ids))
    assert all(layer.get_seq_length() == batch.mask.shape[1] for layer in batch.cache.layers)
    rest, _ = _decode(split, batch)
    assert {**got, **rest} == {0: plain[0], 1: plain[1]}


def test_recommender_start_sets_the_policy_and_service_answers_are_unchanged(tiny_split, tiny_titles):
    from model.grounding import CatalogueIndex
    from model.recommend import Recommender, RecommenderConfig, RecommendRequest

    b = PromptBuilder(tiny_split.tokenizer)
    index = CatalogueIndex.build(tiny_titles, lambda t: tiny_split.embed_final(list(t)).numpy(), progress=False)
    reqs = [RecommendRequest(context=list(range(k))) for k in (2, 5, 7)]
    outs = {}
    for k in (0, 6):
        rec = Recommender(tiny_split, b, tiny_titles, index, config=RecommenderConfig(max_new_tokens=10, draft_tokens=k))
        batch, _ = rec.start(reqs, [0, 1, 2])
        assert (batch.drafter is not None) == bool(k) and batch.draft_tokens == k
        outs[k], _ = _decode(tiny_split, batch)
    assert outs[0] == outs[6]


# ---- drafts inside the prefill ---------------------------------------------------------------------


def _start_guessing(split, prompts, tags, guess, **kw):
    """A prefill whose last chunk feeds ``guess`` (a drafter that knows only it); plain steps after."""
    batch = start(split, prompts, tags, drafter=FixedDrafter([guess]), draft_tokens=len(guess),
                        draft_max_rows=len(prompts), **kw)
    batch.drafter = None
    return batch


def _forwards(split, fn):
    seen = []
    hook = split.model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    try:
        return fn(), len(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("row", [0, 1, 2, 3])
def test_a_right_start_guess_in_the_prefill_saves_steps(setup, row):
    """The prefill feeds the guessed answer start after the prompt: a right guess is kept (no step
    spent on it), the tokens stay the greedy ones, the rows' positions and holes stay consistent for
    the steps after it, and a guess of the whole answer leaves its last token to the first step."""
    split, prompts, vecs, plain, plain_forwards = setup
    for guess in (plain[row][:4], plain[row], plain[row] + [7, 7]):
        batch, prefill = _forwards(split, lambda: _start_guessing(split, [prompts[row]], [row], guess,
                                                                  slot_vectors=vecs[row:row + 1], max_new_tokens=12,
                                                                  stop_at_newline=False))
        assert prefill == 1 and batch.rows == 1  # the prefill never finishes a row
        kept = len(batch.tokens[0])
        assert batch.tokens[0] == plain[row][:min(len(guess), len(plain[row]) - 1)]
        got, steps = _decode(split, batch)
        assert got == {row: plain[row]}
        alone, alone_steps = _decode(split, _start(split, [prompts[row]], [row], vecs[row:row + 1], 12))
        assert alone == got and steps == alone_steps - kept  # every kept token saved a step


def test_a_wrong_start_guess_changes_nothing_and_rows_guess_alike(setup):
    split, prompts, vecs, plain, plain_forwards = setup
    wrong = next(t for t in range(50, 100) if all(t not in toks for toks in plain.values()))
    for guess in ([wrong] * 5, plain[1][:3]):  # row 1's start: right for row 1 only (or also others that share it)
        batch = _start_guessing(split, prompts, list(range(4)), guess, slot_vectors=vecs, max_new_tokens=12,
                                stop_at_newline=False)
        got, _ = _decode(split, batch)
        assert got == plain


def test_a_start_guess_keeps_the_memory_pick_of_the_prompt(tiny_split, tiny_titles):
    """z_t for the retriever is the prompt's last token's layer-L state, not a guessed token's."""
    prompts = _prompts(tiny_split, tiny_titles, (3, 6))
    zs = []
    torch.manual_seed(1)
    mem = torch.randn(2, 1, H) * 4

    def select(z):
        zs.append(z.clone())
        return mem, torch.ones(2, dtype=torch.bool)

    a, _ = _decode(tiny_split, start(tiny_split, prompts, [0, 1], select=select, max_new_tokens=8))
    plain_z = zs.pop()
    b, _ = _decode(tiny_split, _start_guessing(tiny_split, prompts, [0, 1], a[0][:3], select=select,
                                               max_new_tokens=8))
    torch.testing.assert_close(zs.pop(), plain_z, rtol=1e-5, atol=1e-5)
    assert a == b
