"""Beam search over the title trie (model/generation/beams.py) against brute-force scores of every title."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.generation.beams import SeenPruner, trie_tables
from model.generation import decode, step
from tests.generation_helpers import start, trie_beam_search
from model.prompts import PromptBuilder
from model.title_trie import TitleTrie


def _title_scores(split, builder, prompt_ids, titles) -> list[float]:
    """log P(response of each title | prompt), each by a full forward."""
    out = []
    for t in titles:
        resp = builder.response_ids(t)
        ids = torch.tensor([prompt_ids + resp])
        with torch.no_grad():
            lp = torch.log_softmax(split.model(input_ids=ids).logits[0].float(), -1)
        n = len(prompt_ids)
        out.append(float(lp[torch.arange(n - 1, n - 1 + len(resp)), torch.tensor(resp)].sum()))
    return out


@pytest.mark.parametrize("template", ["list", "alpaca"])
def test_wide_beams_rank_every_unseen_title_by_its_exact_score(tiny_split, tiny_titles, template):
    builder = PromptBuilder(tiny_split.tokenizer, template=template)
    trie = TitleTrie.from_prompt_builder(tiny_titles, builder, progress=False)
    tables = trie_tables(trie)
    prompts = [builder.build(tiny_titles[:3]), builder.build(tiny_titles[5:9])]
    excludes = [{0, 1, 2, 13}, set()]
    batch = start(tiny_split, prompts, stop_at_newline=False)
    found = trie_beam_search(tiny_split, batch, trie, tables, excludes, num_beams=len(tiny_titles),
                             renormalize=False)
    for p, ex, res in zip(prompts, excludes, found):
        scores = _title_scores(tiny_split, builder, p.input_ids, tiny_titles)
        want = [i for i in np.argsort(-np.array(scores), kind="stable") if i not in ex]
        assert res.items == want
        got = [s for s, _, _ in res.finished]
        np.testing.assert_allclose(got, sorted([scores[i] for i in want], reverse=True), atol=1e-4)
        # each item with its own title's exact score (what the service reports as the item's score)
        assert [i for i, _ in res.scored_items] == want
        np.testing.assert_allclose([s for _, s in res.scored_items], [scores[i] for i in want], atol=1e-4)


def test_narrow_beams_are_the_best_titles_and_stop_early(tiny_split, tiny_titles):
    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    trie = TitleTrie.from_prompt_builder(tiny_titles, builder, progress=False)
    p = builder.build(tiny_titles[2:6])
    scores = _title_scores(tiny_split, builder, p.input_ids, tiny_titles)
    res = trie_beam_search(tiny_split, start(tiny_split, [p], stop_at_newline=False), trie, trie_tables(trie),
                           [set()], num_beams=3, renormalize=False)[0]
    assert len(res.finished) == 3
    # every finished title's score is its exact score, in order; beams may miss a title, never misrank
    for s, toks, items in res.finished:
        assert abs(s - scores[items[0]]) < 1e-4
    assert [s for s, _, _ in res.finished] == sorted([s for s, _, _ in res.finished], reverse=True)


def test_seen_pruner_closes_only_subtrees_without_unseen_items():
    seqs = [[5, 1, 9], [5, 1, 8], [5, 2, 9], [6, 9]]  # items 0..3
    trie = TitleTrie(seqs)
    item_node, sub_end = trie_tables(trie)
    pr = SeenPruner(trie, item_node, sub_end, {0, 1})
    nodes = np.array([trie.node_of(p) for p in ([5], [5, 1], [5, 2], [6])])
    # item 2 is still under "5"; both items under "5 1" are seen
    assert pr.open(nodes).tolist() == [True, False, True, True]
    all_seen = SeenPruner(trie, item_node, sub_end, {0, 1, 2, 3})
    assert not all_seen.open(np.arange(1, trie.n_nodes)).any()


def test_renormalized_scores_are_a_distribution_over_the_unseen_titles(tiny_split, tiny_titles):
    """With renormalisation every unseen title gets the log-probability of the model restricted to the
    unseen catalogue: exp(scores) sums to 1, and the order is that of the per-step renormalised product."""
    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    trie = TitleTrie.from_prompt_builder(tiny_titles, builder, progress=False)
    p = builder.build(tiny_titles[1:5])
    ex = {0, 3, 7}
    res = trie_beam_search(tiny_split, start(tiny_split, [p], stop_at_newline=False), trie, trie_tables(trie),
                           [ex], num_beams=len(tiny_titles))[0]
    assert sorted(res.items) == sorted(set(range(len(tiny_titles))) - ex)
    total = sum(np.exp(s) for s, _, _ in res.finished)
    assert abs(total - 1.0) < 1e-4
    # brute force: the product over steps of p(token) / p(tokens that lead to an unseen title)
    for s, toks, items in res.finished[:3]:
        with torch.no_grad():
            lp = torch.log_softmax(tiny_split.model(input_ids=torch.tensor([p.input_ids + toks])).logits[0].float(), -1)
        want, node = 0.0, 0
        for n, tok in enumerate(toks):
            lo, hi = trie.child_ptr[node], trie.child_ptr[node + 1]
            open_toks = [int(t) for t, k in zip(trie.child_tok[lo:hi], trie.child_node[lo:hi])
                         if set(trie.items_at(int(k))) - ex or any(i not in ex for i in _items_under(trie, int(k)))]
            row = lp[len(p.input_ids) - 1 + n]
            want += float(row[tok] - torch.logsumexp(row[open_toks], 0))
            node = trie.child(node, tok)
        assert abs(s - want) < 1e-4


def _items_under(trie, v):
    out, stack = [], [v]
    while stack:
        u = stack.pop()
        out += trie.items_at(u)
        stack += trie.child_node[trie.child_ptr[u]:trie.child_ptr[u + 1]].tolist()
    return out


def test_popularity_prior_adds_gamma_times_the_log_share_of_each_title(tiny_split, tiny_titles):
    from model.generation.beams import PopularityPrior

    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    trie = TitleTrie.from_prompt_builder(tiny_titles, builder, progress=False)
    p = builder.build(tiny_titles[1:5])
    counts = np.arange(len(tiny_titles)) * 3 % 11
    run = lambda prior: trie_beam_search(tiny_split, start(tiny_split, [p], stop_at_newline=False), trie,  # noqa: E731
                                         trie_tables(trie), [set()], num_beams=len(tiny_titles), prior=prior)[0]
    plain = {tuple(items): s for s, _, items in run(None).finished}
    gamma = 0.7
    share = np.log((1.0 + counts) / (1.0 + counts).sum())
    for s, _, items in run(PopularityPrior.from_counts(trie, counts, gamma=gamma)).finished:
        assert abs(s - (plain[tuple(items)] + gamma * share[items].sum())) < 1e-4  # one item per title here
    top = run(PopularityPrior.from_counts(trie, counts, gamma=50.0)).items[:3]  # a large gamma ranks by popularity
    assert top[0] == 7 and set(top[1:]) == {3, 14}  # counts 10, then 9 and 9 (the model breaks the tie)


def test_popularity_mixture_scores_are_the_mixture_of_the_two_distributions(tiny_split, tiny_titles):
    """With a mixture weight m every unseen title scores log((1 - m) P_model + m share), where share is its
    (1 + count) over the unseen titles'; m = 1 ranks by popularity alone, and the product prior's
    share is taken over the unseen titles too (the seen ones' mass is left out)."""
    from model.generation.beams import PopularityPrior

    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    trie = TitleTrie.from_prompt_builder(tiny_titles, builder, progress=False)
    p = builder.build(tiny_titles[1:5])
    counts = np.arange(len(tiny_titles)) * 5 % 13
    ex = {2, 7, 9}
    run = lambda prior: trie_beam_search(tiny_split, start(tiny_split, [p], stop_at_newline=False), trie,  # noqa: E731
                                         trie_tables(trie), [ex], num_beams=len(tiny_titles), prior=prior)[0]
    model = {tuple(items): s for s, _, items in run(None).finished}
    unseen = [i for i in range(len(tiny_titles)) if i not in ex]
    w = 1.0 + counts
    share = {i: w[i] / w[unseen].sum() for i in unseen}
    m = 0.4
    got = run(PopularityPrior.from_counts(trie, counts, mix=m))
    assert sorted(got.items) == sorted(unseen)
    for s, _, items in got.finished:
        (i,) = items  # one item per title here
        assert abs(np.exp(s) - ((1 - m) * np.exp(model[(i,)]) + m * share[i])) < 1e-5
    assert abs(sum(np.exp(s) for s, _, _ in got.finished) - 1.0) < 1e-4
    pop_only = run(PopularityPrior.from_counts(trie, counts, mix=1.0))
    assert [w[i] for i in pop_only.items] == sorted(w[unseen], reverse=True)
    for s, _, (i,) in pop_only.finished:
        assert abs(s - np.log(share[i])) < 1e-6
    g = 0.8
    for s, _, (i,) in run(PopularityPrior.from_counts(trie, counts, gamma=g)).finished:
        assert abs(s - (model[(i,)] + g * np.log(share[i]))) < 1e-4


def test_popularity_prior_settings_are_checked():
    from model.generation.beams import PopularityPrior

    with pytest.raises(ValueError):
        PopularityPrior(np.zeros(2), np.ones(1), mix=1.5)
    with pytest.raises(ValueError):
        PopularityPrior(np.zeros(2), np.ones(1), gamma=-1)


def test_beams_share_decoding_steps_with_greedy_rows_and_later_joiners(tiny_split, tiny_titles):
    """A request's beams are rows of the shared DecodeBatch: beside greedy rows, with rows joining
    mid-search, every request gets what it gets alone (beams: the same finished titles and scores;
    greedy: the same tokens), and a search counts as one request however many beams it holds."""
    from model.generation.beams import TrieBeams

    builder = PromptBuilder(tiny_split.tokenizer, template="list")
    trie = TitleTrie.from_prompt_builder(tiny_titles, builder, progress=False)
    tables = trie_tables(trie)
    prompts = [builder.build(tiny_titles[a:b]) for a, b in ((0, 3), (4, 9), (2, 4), (10, 16))]
    excludes = [{0, 1, 2}, {4, 5}, set(), {11}]

    def search(i):
        return TrieBeams(trie, tables, excludes[i], num_beams=4, max_new_tokens=12)

    def alone_beams(i):
        return trie_beam_search(tiny_split, start(tiny_split, [prompts[i]], stop_at_newline=False), trie, tables,
                                [excludes[i]], num_beams=4, max_new_tokens=12)[0].finished

    def alone_greedy(i):
        return decode(tiny_split, start(tiny_split, [prompts[i]], max_new_tokens=12))[0]

    def joining(i, beams):
        batch = start(tiny_split, [prompts[i]], [i], max_new_tokens=12, stop_at_newline=not beams)
        s = search(i) if beams else None
        batch.searches = [s]
        return batch, s

    batch, s0 = joining(0, True)  # beams
    searches = {0: s0}
    joins = {1: [(1, False)], 2: [(2, True), (3, False)]}  # step -> (request, beams?) joining before it
    got, requests = {}, []
    for n in range(40):
        for i, beams in joins.get(n, []):
            part, s = joining(i, beams)
            searches[i] = s
            batch.merge(part)
        requests.append((batch.rows, batch.requests))
        for tag, tokens in step(tiny_split, batch):
            got[tag] = tokens
        if not batch.rows:
            break
    assert sorted(got) == [0, 1, 2, 3]
    for i in (0, 2):
        want = alone_beams(i)
        assert [(t, it) for _, t, it in searches[i].result().finished] == [(t, it) for _, t, it in want]
        np.testing.assert_allclose([sc for sc, _, _ in searches[i].result().finished], [sc for sc, _, _ in want],
                                   atol=1e-4)
        assert got[i] == searches[i].result().tokens
    for i in (1, 3):
        assert got[i] == alone_greedy(i)
    assert max(r for _, r in requests) == 4  # all four decoded together...
    assert any(rows > r for rows, r in requests)  # ...with more rows than requests while beams were live
