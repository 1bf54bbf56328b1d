"""Prefix tree of catalogue titles for constrained decoding: checked against brute force over the list."""
from __future__ import annotations

import random

import pytest

from model.prompts import PromptBuilder
from model.title_trie import TitleTrie


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
