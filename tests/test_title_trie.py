"""Prefix tree of catalogue titles for constrained decoding: checked against brute force over the list."""
from __future__ import annotations

import random

import pytest
import torch

from model.llm import left_pad
from model.prompts import PromptBuilder
from model.title_trie import TitleTrie, beams_to_items


def brute_allowed(seqs: list[list[int]], prefix: list[int]) -> list[int]:
    n = len(prefix)
    return sorted({s[n] for s in seqs if len(s) > n and s[:n] == prefix})


def brute_items(seqs: list[list[int]], tokens: list[int]) -> list[int]:
    return [i for i, s in enumerate(seqs) if s == tokens]


def random_sequences(n: int, vocab: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


# ---- structure, against brute force -------------------------------------------------------------


def test_random_sequences_match_brute_force() -> None:
    seqs = random_sequences(400, vocab=6, max_len=6, seed=0)
    seqs[3], seqs[7] = [1, 2, 3, 4, 5, 0, 1], [1, 2, 3, 4, 5, 0]  # the second a prefix of the first
    seqs += [list(seqs[3]), list(seqs[7]), list(seqs[3])]  # duplicated titles
    trie = TitleTrie(seqs)  # no eos: some sequences are proper prefixes of others
    prefixes = {tuple(s[:k]) for s in seqs for k in range(len(s) + 1)}
    assert trie.n_nodes == len(prefixes)  # one node per distinct prefix (root = empty prefix)
    # every root-to-terminal path is a real sequence, each real sequence is a path, items are all its copies
    paths = {tuple(p): items for p, items in trie.paths()}
    assert set(paths) == {tuple(s) for s in seqs}
    for p, items in paths.items():
        assert items == brute_items(seqs, list(p))
    assert paths[tuple(seqs[3])] == [3, 400, 402] and paths[tuple(seqs[7])] == [7, 401]
    for p in prefixes:
        assert trie.allowed(list(p)) == brute_allowed(seqs, list(p))
    # prefixes of no sequence lead nowhere
    rng = random.Random(1)
    for _ in range(200):
        q = [rng.randrange(8) for _ in range(rng.randint(1, 7))]
        if tuple(q) not in prefixes:
            assert trie.node_of(q) == -1 and trie.allowed(q) == [] and trie.items_of(q) == []


def test_terminal_inner_node_allows_eos_when_known() -> None:
    seqs = [[5, 6], [5, 6, 7], [5, 8]]
    trie = TitleTrie(seqs, eos_token_id=99)
    assert trie.allowed([5]) == [6, 8]
    assert trie.allowed([5, 6]) == [7, 99]  # [5, 6] is complete, [5, 6, 7] goes on
    assert trie.items_of([5, 6]) == [0] and trie.items_of([5, 6, 99]) == [0]
    assert trie.items_of([5, 6, 7]) == [1] and trie.items_of([5]) == []
    assert TitleTrie(seqs).allowed([5, 6]) == [7]  # without eos nothing to add


def test_bad_sequences_raise() -> None:
    with pytest.raises(ValueError, match="item 1 encodes to an empty token sequence"):
        TitleTrie([[1], []])
    with pytest.raises(ValueError, match="at least one"):
        TitleTrie([])
    with pytest.raises(ValueError, match="token ids"):
        TitleTrie([[1, -2]])
    with pytest.raises(ValueError, match="fallback"):
        TitleTrie([[1, 2]]).prefix_allowed_tokens_fn(0)


# ---- with the real response tokenization -----------------------------------------------------------


@pytest.fixture
def catalogue(tiny_titles) -> list[str]:
    # duplicated titles (different items, same title), and titles sharing long prefixes
    return tiny_titles + ["Heat (1995)", "Toy Story 2 (1999)", "Toy Story (1995)", "Heat and Dust (1983)"]


def test_trie_over_response_ids(tiny_tokenizer, catalogue) -> None:
    builder = PromptBuilder(tiny_tokenizer, n_slots=0)
    trie = TitleTrie.from_prompt_builder(catalogue, builder, progress=False)
    seqs = [builder.response_ids(t) for t in catalogue]
    eos = tiny_tokenizer.eos_token_id
    assert trie.eos_token_id == eos and all(s[-1] == eos for s in seqs)
    assert {tuple(p) for p, _ in trie.paths()} == {tuple(s) for s in seqs}
    for s in seqs:
        for k in range(len(s) + 1):
            assert trie.allowed(s[:k]) == brute_allowed(seqs, s[:k])
    heat = [i for i, t in enumerate(catalogue) if t == "Heat (1995)"]
    toy = [i for i, t in enumerate(catalogue) if t == "Toy Story (1995)"]
    assert len(heat) == 2 and len(toy) == 2
    assert trie.items_of(builder.response_ids("Heat (1995)")) == heat
    assert trie.items_of(builder.response_ids("Heat (1995)")[:-1]) == heat  # eos stripped by SplitLM
    assert trie.items_of(builder.response_ids("Heat (1995)") + [eos, eos]) == heat  # padding of a finished row
    assert trie.items_of(builder.response_ids("Heat (1995)")[:-2]) == []  # unfinished
    beams = [seqs[toy[0]], builder.response_ids("Not A Movie"), seqs[heat[1]], seqs[toy[1]]]
    assert beams_to_items(trie, beams) == toy + heat


def test_prefix_allowed_tokens_fn_uses_each_rows_prompt_length(tiny_tokenizer, catalogue) -> None:
    builder = PromptBuilder(tiny_tokenizer, n_slots=0)
    trie = TitleTrie.from_prompt_builder(catalogue, builder, progress=False)
    resp = builder.response_ids("Fargo (1996)")
    fn = trie.prefix_allowed_tokens_fn([3, 5])
    row0 = torch.tensor([7, 7, 7] + resp[:2])
    row1 = torch.tensor([7, 7, 7, 7, 7] + resp[:2])
    assert fn(0, row0) == fn(1, row1) == brute_allowed([builder.response_ids(t) for t in catalogue], resp[:2])
    assert fn(0, torch.tensor([7, 7, 7])) == sorted({builder.response_ids(t)[0] for t in catalogue})
    # a finished row (eos, then padding) gets the fallback, never an empty list
    eos = tiny_tokenizer.eos_token_id
    assert fn(0, torch.tensor([7, 7, 7] + resp + [eos])) == [eos]


# ---- constrained generation with a tiny random model -----------------------------------------------


def _prompts(builder: PromptBuilder, titles: list[str]) -> list[list[int]]:
    histories = [titles[0:3], titles[4:10], titles[2:4], titles[9:17]]  # different prompt lengths
    return [builder.build(h, with_slot=False).input_ids for h in histories]


def test_constrained_generate_returns_only_catalogue_titles(tiny_lm, tiny_tokenizer, catalogue) -> None:
    builder = PromptBuilder(tiny_tokenizer, n_slots=0)
    trie = TitleTrie.from_prompt_builder(catalogue, builder, progress=False)
    responses = {tuple(builder.response_ids(t)) for t in catalogue}
    eos = tiny_tokenizer.eos_token_id
    ids, mask = left_pad(_prompts(builder, catalogue), eos)
    T = ids.shape[1]
    max_new = max(len(r) for r in responses) + 2

    def run(**kw) -> list[list[int]]:
        out = tiny_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                               pad_token_id=eos, eos_token_id=eos, **kw)
        new = out[:, T:].tolist()
        return [s[: s.index(eos) + 1] if eos in s else s for s in new]

    # unconstrained, the random model does not write titles: the constraint is what makes them valid
    free = run()
    assert any(tuple(s) not in responses for s in free)

    fn = trie.prefix_allowed_tokens_fn(T)
    greedy = run(prefix_allowed_tokens_fn=fn)
    assert all(tuple(s) in responses for s in greedy), greedy
    assert all(trie.items_of(s) for s in greedy)

    beams = run(prefix_allowed_tokens_fn=fn, num_beams=4, num_return_sequences=4)
    assert len(beams) == 4 * len(_prompts(builder, catalogue))
    assert all(tuple(s) in responses for s in beams), beams
    for p in range(len(beams) // 4):
        group = [tuple(s) for s in beams[4 * p: 4 * p + 4]]
        assert len(set(group)) == 4  # four different titles per prompt
        assert len(beams_to_items(trie, group)) >= 4


def test_constrained_splitlm_generate(tiny_split, tiny_tokenizer, catalogue) -> None:
    builder = PromptBuilder(tiny_tokenizer, n_slots=1)
    trie = TitleTrie.from_prompt_builder(catalogue, builder, progress=False)
    prompts = [builder.build(h) for h in (catalogue[0:3], catalogue[4:10], catalogue[9:17])]
    T = max(len(p.input_ids) for p in prompts)
    slots = torch.randn(len(prompts), 1, tiny_split.hidden_size)
    for beams in (1, 3):
        out = tiny_split.generate(prompts, slot_vectors=slots, max_new_tokens=24, num_beams=beams,
                                  prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(T), return_ids=True)
        for ids in out:
            items = trie.items_of(ids)
            assert items, ids
            assert builder.response_ids(catalogue[items[0]])[:-1] == ids
