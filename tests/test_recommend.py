"""The shared recommend function (model/recommend.py) on a tiny random model: each slot policy,
exclusions, constrained decoding, and agreement with the pieces run by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import generation
from model.generation import generate
from model.grounding import CatalogueIndex, clean_generated
from model.llm import SplitLM
from model.prompts import PromptBuilder
from model.recommend import Recommender, RecommenderConfig, RecommendRequest
from model.retriever import Retriever, RetrieverConfig
from tests.conftest import TINY_TITLES, build_tiny_lm


@pytest.fixture
def parts(tiny_tokenizer, one_thread):
    lm = SplitLM.from_model(build_tiny_lm(len(tiny_tokenizer), seed=3), tiny_tokenizer, cut=2)
    lm.snapshot_base_upper()
    builder = PromptBuilder.for_model(lm, domain="movie", n_slots=1)
    index = CatalogueIndex.build(TINY_TITLES, lambda t: lm.embed_final(list(t)).numpy(), progress=False)
    return lm, builder, index


def _rec(parts, **cfg) -> Recommender:
    lm, builder, index = parts
    retriever = None
    if cfg.get("policy") == "learned":
        torch.manual_seed(0)
        retriever = Retriever(RetrieverConfig(hidden_size=lm.hidden_size, mlp_hidden=16)).eval()
    return Recommender(lm, builder, TINY_TITLES, index, retriever,
                       RecommenderConfig(max_new_tokens=6, **cfg))


def _memory(lm, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, lm.hidden_size, generator=g)


def test_bigrec_equals_pieces_run_by_hand(parts):
    lm, builder, index = parts
    rec = _rec(parts)
    reqs = [RecommendRequest(context=[0, 1, 2], exclude={0, 1, 2}), RecommendRequest(context=[5, 6, 7, 8])]
    got = rec.recommend(reqs, topk=5)
    for req, r in zip(reqs, got):
        p = builder.build([TINY_TITLES[i] for i in req.context])
        text = generate(lm, [p], max_new_tokens=6)[0]
        emb = lm.embed_final([clean_generated(text) or " "]).numpy()
        d = ((index.embeddings() - emb) ** 2).sum(1)
        order = [i for i in np.lexsort((np.arange(len(d)), d)) if i not in req.exclude][:5]
        assert r.items == order
        assert r.generated == clean_generated(text)
        assert r.memory_indices == []
        assert not set(r.items) & req.exclude


def test_learned_semantic_random_select_the_right_element(parts):
    lm, builder, _ = parts
    mem = _memory(lm, 7)
    req = RecommendRequest(context=[0, 1, 2], memory=mem, seed=11)
    p = builder.build([TINY_TITLES[i] for i in req.context])
    z_t = lm.encode_lower([p.input_ids])[0]

    learned = _rec(parts, policy="learned")
    r = learned.recommend([req])[0]
    expect = int(torch.argmax(learned.retriever.scores(z_t[None], mem[None])[0]))
    assert r.memory_indices == [expect]

    r = _rec(parts, policy="semantic").recommend([req])[0]
    cos = torch.nn.functional.cosine_similarity(mem, z_t[None], dim=-1)
    assert r.memory_indices == [int(torch.argmax(cos))]

    rnd = _rec(parts, policy="random")
    a = rnd.recommend([req])[0].memory_indices
    assert a == rnd.recommend([req])[0].memory_indices  # seeded per request
    assert a == np.random.default_rng(11).choice(7, size=1, replace=False).tolist()


def test_memory_changes_generation_and_matches_slot_fill_by_hand(parts):
    lm, builder, _ = parts
    mem = _memory(lm, 3, seed=5) * 5
    req = RecommendRequest(context=[3, 4], memory=mem)
    rec = _rec(parts, policy="semantic")
    r = rec.recommend([req])[0]
    p = builder.build([TINY_TITLES[i] for i in req.context])
    m = r.memory_indices[0]
    by_hand = generate(lm, [p], slot_vectors=mem[m][None, None], max_new_tokens=6)[0]
    assert r.generated == clean_generated(by_hand)


def test_batch_mixing_memory_and_no_memory_equals_one_by_one(parts):
    rec = _rec(parts, policy="semantic")
    lm = parts[0]
    reqs = [RecommendRequest(context=[0, 1], memory=_memory(lm, 4, 1) * 5),
            RecommendRequest(context=[2, 3, 4]),  # no memory: placeholder state
            RecommendRequest(context=[5], memory=_memory(lm, 2, 2) * 5, exclude={9})]
    batched = rec.recommend(reqs, topk=6)
    single = [rec.recommend([q], topk=6)[0] for q in reqs]
    for b, s in zip(batched, single):
        assert b.items == s.items and b.memory_indices == s.memory_indices


def test_full_history_has_no_slot_and_rejects_memory_policies(parts):
    rec = _rec(parts, full_history=True)
    assert rec.prompts([RecommendRequest(context=list(range(12)))])[0].slot_positions == []
    with pytest.raises(ValueError, match="full_history"):
        RecommenderConfig(policy="learned", full_history=True)
    with pytest.raises(ValueError, match="retriever"):
        Recommender(parts[0], parts[1], TINY_TITLES, parts[2], None, RecommenderConfig(policy="learned"))


def test_constrained_beams_are_real_titles_and_respect_exclusions(parts):
    rec = _rec(parts, constrained=True, num_beams=4)
    rec.config.max_new_tokens = 24
    reqs = [RecommendRequest(context=[0, 1, 2], exclude={0, 1, 2}), RecommendRequest(context=[7, 8])]
    for req, r in zip(reqs, rec.recommend(reqs, topk=10)):
        assert r.beam_items, "beam search over the trie must end on real titles"
        assert all(0 <= i < len(TINY_TITLES) for i in r.beam_items)
        head = [b for b in r.beam_items if b not in req.exclude]
        assert r.items[: len(head)] == head[:10]
        assert len(r.items) == len(set(r.items)) == 10
        assert not set(r.items) & req.exclude
        assert r.generated in TINY_TITLES


@pytest.mark.parametrize("policy,num_beams", [("learned", 1), ("semantic", 2)])
def test_pick_from_the_prefill_equals_pick_from_a_separate_lower_pass(parts, policy, num_beams, monkeypatch):
    """z_t taken inside the generator's prefill (no query given) = z_t from encode_lower: same picks,
    same text, same ranking; and no separate lower-layer pass runs."""
    lm, builder, _ = parts
    rec = _rec(parts, policy=policy, num_beams=num_beams, constrained=num_beams > 1)
    contexts = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9], [1, 4]]
    mems = [_memory(lm, 6, seed=1), None, _memory(lm, 9, seed=2), _memory(lm, 3, seed=3)]
    lazy = [RecommendRequest(context=c, memory=m) for c, m in zip(contexts, mems)]
    z = lm.encode_lower([builder.build([TINY_TITLES[i] for i in c]).input_ids for c in contexts])  # [4, H]
    eager = [RecommendRequest(context=c, memory=m, query=z[j]) for j, (c, m) in enumerate(zip(contexts, mems))]
    want = rec.recommend(eager, topk=6)

    calls = []
    real = lm.encode_lower
    monkeypatch.setattr(lm, "encode_lower", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = rec.recommend(lazy, topk=6)
    assert calls == []
    for g, w, m in zip(got, want, mems):
        assert g.memory_indices == w.memory_indices
        assert (g.memory_indices != []) == (m is not None)
        assert g.memory_scores == pytest.approx(w.memory_scores, abs=1e-4)
        assert g.generated == w.generated
        assert g.items == w.items


@pytest.mark.parametrize("full_history", [False, True])
def test_recommend_runs_the_step_path_with_its_groups_and_drafts(parts, full_history, monkeypatch):
    """``recommend`` (the evaluator's call) decodes greedy answers with the service's step-wise path:
    prefill groups and drafted steps give the answers of one padded prefill and plain steps."""
    lm, _, _ = parts
    policy = "none" if full_history else "learned"
    reqs = [RecommendRequest(context=list(range(i, i + 2 + 2 * i)), memory=_memory(lm, 5, seed=i),
                             exclude={i}) for i in range(5)]
    if full_history:
        reqs = [RecommendRequest(context=r.context, exclude=r.exclude) for r in reqs]
    plain = _rec(parts, policy=policy, full_history=full_history, prefill_max_tokens=1 << 20, batch_size=4)
    grouped = _rec(parts, policy=policy, full_history=full_history, prefill_max_tokens=1, batch_size=4,
                   draft_tokens=4, draft_max_rows=4)
    starts, observed = [], []
    begin = generation.begin
    monkeypatch.setattr(generation, "begin",
                        lambda lm, prompts, *a, **k: starts.append(len(prompts)) or begin(lm, prompts, *a, **k))
    monkeypatch.setattr(grouped.drafter, "observe", lambda tokens: observed.append(list(tokens)))
    a = plain.recommend(reqs, topk=5)
    assert starts == [4, 1]  # one padded prefill per batch of 4
    starts.clear()
    b = grouped.recommend(reqs, topk=5)
    assert starts == [1] * 5  # every prompt prefilled alone (prefill_max_tokens=1)
    assert len(observed) == 5  # every answer was decoded with the draft table in the batch
    assert [r.generated for r in a] == [r.generated for r in b]
    assert [r.items for r in a] == [r.items for r in b]
    assert [r.memory_indices for r in a] == [r.memory_indices for r in b]
