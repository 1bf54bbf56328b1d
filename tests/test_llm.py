"""SplitLM against independent computations on the tiny random Llama (float32).

References never use SplitLM's hand-written layer loops nor the engine's forward: they are full
``model(...)`` forwards of single unpadded sequences, with the slot replacement done by a test hook
(``tests/generation_helpers.py``, checked itself against a manual replacement below).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext as _nothing

import pytest
import torch
from transformers import StoppingCriteriaList

from model import generation
from model.checkpoint import fingerprint, load_upper, save_upper
from model.generation import generate, step
from model.generation.prefill import _shared_head
from model.llm import SplitLM, left_pad
from model.scoring import target_logprob
from tests.generation_helpers import StopCriterion, slot_replaced, start, stop_tables
from model.prompts import PromptBuilder, PromptIds

H = 64
ATOL = 1e-4


def _prompts(tok, titles, sizes=(3, 6, 9), n_slots=1):
    b = PromptBuilder(tok, n_slots=n_slots)
    return b, [b.build(titles[:k]) for k in sizes]


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]  # [T, V]


def _logits_with_fill(split, ids: list[int], slots: list[int], vec: torch.Tensor | None) -> torch.Tensor:
    """Full forward of one unpadded sequence; slot states replaced at layer L when ``vec`` [S, H]."""
    x = torch.tensor([ids])
    if vec is None:
        return split.model(x).logits[0]
    with slot_replaced(split, torch.tensor([slots]), vec[None], x.shape[1]) as f:
        logits = split.model(x).logits[0]
    assert f["applied"]
    return logits


def _greedy_uncached(split, prompt: PromptIds, vec, max_new: int):
    """Recompute the whole growing sequence each step (no KV cache), replacing the slot every step."""
    ids, steps = list(prompt.input_ids), []
    for _ in range(max_new):
        logits = _logits_with_fill(split, ids, prompt.slot_positions, vec)[-1]
        steps.append(logits)
        nxt = int(logits.argmax())
        if nxt == split.eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt.input_ids):], steps


# ---- encode_lower ---------------------------------------------------------------------------------


def test_encode_lower_equals_full_forward_hidden_state_with_padding(tiny_split, tiny_titles):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(1, 4, 9, 2))
    seqs = [p.input_ids for p in prompts]
    assert len({len(s) for s in seqs}) == 4  # unequal lengths in one padded batch
    z = tiny_split.encode_lower(seqs, batch_size=8)
    assert z.shape == (4, H) and z.dtype == torch.float32
    for s, zi in zip(seqs, z):
        ref = tiny_split.model(torch.tensor([s]), output_hidden_states=True).hidden_states[2][0, -1]
        torch.testing.assert_close(zi, ref, atol=ATOL, rtol=1e-4)
    # order is kept when batches are regrouped by length
    z1 = tiny_split.encode_lower(seqs, batch_size=1)
    torch.testing.assert_close(z, z1, atol=ATOL, rtol=1e-4)


def test_encode_lower_runs_only_layers_up_to_cut(tiny_split, tiny_titles):
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(tiny_split.model.model.layers)]
    hooks.append(tiny_split.model.lm_head.register_forward_pre_hook(lambda m, a: calls.append("head")))
    hooks.append(tiny_split.model.model.norm.register_forward_pre_hook(lambda m, a: calls.append("norm")))
    try:
        tiny_split.encode_lower([[5, 6, 7], [8, 9]])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]  # cut = 2: layers 1..2 only, once (one batch)


def test_pad_token_falls_back_to_eos_and_left_padding(tiny_split):
    tok = tiny_split.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    ids, mask = left_pad([[7, 8, 9], [4]], pad_id=2)
    assert ids.tolist() == [[7, 8, 9], [2, 2, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cut_out_of_range_is_rejected(tiny_lm, tiny_tokenizer):
    for cut in (0, 4):
        with pytest.raises(ValueError, match="cut L"):
            SplitLM.from_model(tiny_lm, tiny_tokenizer, cut=cut)


# ---- the memory slot --------------------------------------------------------------------------------


def test_slot_hook_equals_manual_replacement_and_matters(tiny_split, tiny_titles):
    _, (p,) = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(4,))
    vec = torch.randn(1, H) * 3
    hooked = _logits_with_fill(tiny_split, p.input_ids, p.slot_positions, vec)
    # manual: lower layers by the full forward's hidden states, replace, then the upper layers by hand
    x = torch.tensor([p.input_ids])
    h_l = tiny_split.model(x, output_hidden_states=True).hidden_states[2].clone()
    h_l[0, p.slot_positions[0]] = vec[0]
    manual = tiny_split.model.lm_head(tiny_split.upper_forward(h_l, torch.ones_like(x)))[0]
    torch.testing.assert_close(hooked, manual, atol=ATOL, rtol=1e-4)
    plain = _full_logits(tiny_split.model, p.input_ids)
    assert (hooked[-1] - plain[-1]).abs().max() > 1e-3  # the replacement reaches the last token
    # before the slot nothing changes (causal)
    torch.testing.assert_close(hooked[: p.slot_positions[0]], plain[: p.slot_positions[0]], atol=ATOL, rtol=0)


def test_generate_with_cache_equals_uncached_recompute(tiny_split, tiny_titles):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(2, 7, 4))
    vecs = torch.randn(3, 1, H) * 4
    got = generate(tiny_split, prompts, vecs, max_new_tokens=8, return_ids=True)
    for i, p in enumerate(prompts):
        ref, _ = _greedy_uncached(tiny_split, p, vecs[i], 8)
        assert got[i] == ref, f"row {i}"
    # logits of every step, through the same hook + HF generate with its KV cache
    ids, mask = left_pad([p.input_ids for p in prompts], tiny_split.pad_id)
    pos = torch.tensor(generation.prefill.slot_columns(prompts, mask))
    with slot_replaced(tiny_split, pos, vecs, ids.shape[1]):
        out = tiny_split.model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                        min_new_tokens=5, output_logits=True, return_dict_in_generate=True,
                                        pad_token_id=tiny_split.pad_id, eos_token_id=None)
    for i, p in enumerate(prompts):
        seq = list(p.input_ids)
        for step in range(5):
            ref = _logits_with_fill(tiny_split, seq, p.slot_positions, vecs[i])[-1]
            torch.testing.assert_close(out.logits[step][i], ref, atol=ATOL, rtol=1e-4)
            seq.append(int(out.sequences[i, ids.shape[1] + step]))
    # and the vectors matter: without them the first-step logits differ
    _, no_fill = _greedy_uncached(tiny_split, prompts[0], None, 1)
    assert (no_fill[0] - out.logits[0][0]).abs().max() > 1e-3


def test_generate_without_vectors_keeps_placeholder_state(tiny_split, tiny_titles):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(3, 8))
    plain = generate(tiny_split, prompts, None, max_new_tokens=6, return_ids=True)
    # filling the slot with the placeholder's own layer-L state is the identity
    own = torch.stack([
        tiny_split.model(torch.tensor([p.input_ids]), output_hidden_states=True).hidden_states[2][0, p.slot_positions]
        for p in prompts
    ])  # [B, 1, H]
    same = generate(tiny_split, prompts, own, max_new_tokens=6, return_ids=True)
    assert plain == same
    for i, p in enumerate(prompts):
        assert plain[i] == _greedy_uncached(tiny_split, p, None, 6)[0]


SHORT_PROMPTS = [PromptIds([1, 50, 61, 70, 80], [2]), PromptIds([1, 90, 33, 101], [1]),
                 PromptIds([1, 44, 45, 46, 47, 48, 49], [5])]  # the slot weighs a lot in short prompts


def test_two_slots_and_shape_errors(tiny_split, tiny_titles):
    b, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(3, 5), n_slots=2)
    assert all(len(p.slot_positions) == 2 for p in prompts)
    vecs = torch.randn(2, 2, H) * 4
    got = generate(tiny_split, prompts, vecs, max_new_tokens=5, return_ids=True)
    for i, p in enumerate(prompts):
        assert got[i] == _greedy_uncached(tiny_split, p, vecs[i], 5)[0]
    with pytest.raises(ValueError, match="slots"):
        generate(tiny_split, prompts, torch.randn(2, 1, H))
    with pytest.raises(ValueError, match="slot_vectors must be"):
        generate(tiny_split, prompts, torch.randn(3, 2, H))


def test_concurrent_requests_do_not_share_slot_vectors(tiny_split):
    prompts = SHORT_PROMPTS[:2]
    torch.manual_seed(3)
    va, vb = torch.randn(2, 1, H) * 4, torch.randn(2, 1, H) * 4
    seq_a = generate(tiny_split, prompts, va, max_new_tokens=6, return_ids=True)
    seq_b = generate(tiny_split, prompts, vb, max_new_tokens=6, return_ids=True)
    seq_n = generate(tiny_split, prompts, None, max_new_tokens=6, return_ids=True)
    assert seq_a != seq_b and seq_a != seq_n and seq_b != seq_n  # the three requests really differ
    results: dict[str, list] = {"a": [], "b": [], "n": []}
    errors = []
    start = threading.Barrier(3)

    def worker(name, vec):
        try:
            start.wait()
            for _ in range(3):
                results[name].append(generate(tiny_split, prompts, vec, max_new_tokens=6, return_ids=True))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=a) for a in (("a", va), ("b", vb), ("n", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results["a"] == [seq_a] * 3 and results["b"] == [seq_b] * 3 and results["n"] == [seq_n] * 3


# ---- the shared template head's KV cache -----------------------------------------------------------


def _prefill_lengths(split):
    """Records the sequence length of every forward through the embeddings (prefill, head, steps)."""
    seen: list[int] = []
    split.model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    return seen


def test_head_cache_is_computed_once_and_prefill_skips_the_head(tiny_split, tiny_titles):
    b, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(2, 7, 4))
    head = prompts[0].n_shared
    assert head == len(b._head) > 5 and all(p.input_ids[:head] == prompts[0].input_ids[:head] for p in prompts)
    seen = _prefill_lengths(tiny_split)
    generate(tiny_split, prompts, torch.randn(3, 1, H), max_new_tokens=3, return_ids=True)
    t = max(len(p.input_ids) for p in prompts)
    assert seen[:2] == [head, t - head]  # the head once, then the rows' own tokens only
    seen.clear()
    generate(tiny_split, prompts[:1], None, max_new_tokens=3, return_ids=True)
    assert seen[0] == len(prompts[0].input_ids) - head and head not in seen[1:2]  # reused, not recomputed


def test_head_cache_gives_the_same_tokens_as_full_prefill(tiny_split, tiny_titles):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(2, 9, 5, 1))
    torch.manual_seed(5)
    vecs = torch.randn(4, 1, H) * 30
    select_rows = torch.tensor([True, False, True, True])

    def picked(reuse):  # the memory picked from z_t: z_t must be the same with and without the cached head
        p = generation.begin(tiny_split, prompts, max_new_tokens=6, reuse_head=reuse)
        z = generation.advance(tiny_split, p)
        done = generation.decode(tiny_split, generation.complete(tiny_split, p, z[:, None, :] * 0.5 + vecs,
                                                                 select_rows))
        return [tiny_split.strip_eos(done[i]) for i in range(len(prompts))]

    def run(reuse):
        common = dict(max_new_tokens=6, return_ids=True, reuse_head=reuse)
        return (generate(tiny_split, prompts, vecs, **common), generate(tiny_split, prompts, None, **common),
                picked(reuse))

    seen = _prefill_lengths(tiny_split)
    cached = run(True)
    t = max(len(p.input_ids) for p in prompts)
    assert t - prompts[0].n_shared in seen and t not in seen
    seen.clear()
    full = run(False)
    assert t in seen and t - prompts[0].n_shared not in seen
    assert cached == full
    filled = [generation.run(tiny_split, generation.begin(tiny_split, prompts, reuse_head=True), v).logits
              for v in (vecs, None)]
    assert (filled[0] - filled[1]).abs().max() > 1e-3  # the slots were filled


def test_head_cache_follows_weight_changes(tiny_split, tiny_titles):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(3, 6))
    before = generate(tiny_split, prompts, None, max_new_tokens=6, return_ids=True)
    _perturb_upper(tiny_split, seed=7)  # in place, as an optimizer step or load_upper does
    after = generate(tiny_split, prompts, None, max_new_tokens=6, return_ids=True)
    for i, p in enumerate(prompts):
        assert after[i] == _greedy_uncached(tiny_split, p, None, 6)[0]
    assert after != before


def test_prompts_without_a_common_head_are_prefilled_whole(tiny_split, tiny_titles):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(3, 6))
    other = PromptIds([7] + prompts[1].input_ids[1:], prompts[1].slot_positions, n_shared=prompts[1].n_shared)
    assert _shared_head([prompts[0], other]) == 0
    assert _shared_head([prompts[0], PromptIds(prompts[1].input_ids, [2], n_shared=prompts[1].n_shared)]) == 0
    assert _shared_head(SHORT_PROMPTS) == 0
    seen = _prefill_lengths(tiny_split)
    got = generate(tiny_split, [prompts[0], other], None, max_new_tokens=4, return_ids=True)
    assert seen[0] == len(other.input_ids)
    assert got[1] == _greedy_uncached(tiny_split, other, None, 4)[0]


@pytest.mark.parametrize("with_slots", [False, True])
def test_compacting_greedy_equals_hf_generate_and_drops_finished_rows(tiny_split, tiny_titles, with_slots):
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(2, 9, 5, 1))
    torch.manual_seed(11)
    vecs = torch.randn(4, 1, H) * 4 if with_slots else None
    free = generate(tiny_split, prompts, vecs, max_new_tokens=10, return_ids=True, stop_at_newline=False)
    # make one token that rows generate at different steps end the answer line, so rows finish apart
    stop = free[0][2]
    newline, lead, content = (torch.zeros(tiny_split.model.config.vocab_size, dtype=torch.bool) for _ in range(3))
    newline[stop] = lead[stop] = True
    batch_sizes = []
    hook = tiny_split.model.model.embed_tokens.register_forward_hook(lambda m, a, o: batch_sizes.append(a[0].shape[0]))
    with stop_tables(tiny_split, newline, lead, content):
        got = generate(tiny_split, prompts, vecs, max_new_tokens=10, return_ids=True)
        hook.remove()
        compact = list(batch_sizes)  # rows per forward of the compacting decoder (the head is cached)
        # the reference: HF generate (full prefill, its own cache) with the slots replaced at layer L
        ids, mask = left_pad([p.input_ids for p in prompts], tiny_split.pad_id)
        crit = StopCriterion(generation.stop_rule(tiny_split), start=ids.shape[1])
        with slot_replaced(tiny_split, torch.tensor(generation.prefill.slot_columns(prompts, mask)),
                           vecs if vecs is not None else torch.zeros(0, 1, H), ids.shape[1]) if with_slots else _nothing():
            out = tiny_split.model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                            pad_token_id=tiny_split.pad_id, eos_token_id=tiny_split.eos_id,
                                            stopping_criteria=StoppingCriteriaList([crit]))
    ref = [tiny_split.strip_eos(row) for row in out[:, ids.shape[1]:].tolist()]
    assert got == ref
    lengths = sorted(len(r) for r in got)
    assert lengths[0] < lengths[-1]  # rows did finish at different steps
    assert compact[0] == len(prompts) and compact == sorted(compact, reverse=True) and compact[-1] < len(prompts)


def test_rows_joining_and_leaving_mid_decode_get_the_tokens_they_get_alone(tiny_split, tiny_titles):
    """Continuous batching: rows of other lengths join a running batch (``DecodeBatch.merge``), the
    batch empties and refills; every row's tokens equal those of generating it alone."""
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(2, 9, 5, 1, 7))
    torch.manual_seed(5)
    vecs = torch.randn(5, 1, H) * 4
    budget = [10, 10, 10, 3, 10]
    alone = [generate(tiny_split, [p], vecs[i:i + 1], max_new_tokens=budget[i], return_ids=True, stop_at_newline=False)[0]
             for i, p in enumerate(prompts)]

    def alone_batch(i):
        return start(tiny_split, [prompts[i]], [i], slot_vectors=vecs[i:i + 1], max_new_tokens=budget[i],
                     stop_at_newline=False)

    batch = start(tiny_split, prompts[:2], [0, 1], slot_vectors=vecs[:2], max_new_tokens=10, stop_at_newline=False)
    got, sizes = {}, []
    joins = {2: [2, 3], 5: [4]}  # step -> rows that join before it
    for n in range(40):
        for i in joins.get(n, []):
            batch.merge(alone_batch(i))
        sizes.append(batch.rows)
        for tag, tokens in step(tiny_split, batch):
            got[tag] = tiny_split.strip_eos(tokens)
        if len(got) == len(prompts):
            break
    assert got == dict(enumerate(alone))
    assert max(sizes) >= 3 and sizes[-1] < max(sizes)  # rows did share steps, and left
    # a batch whose rows all left takes the next one whole
    empty = start(tiny_split, [prompts[3]], ["x"], max_new_tokens=1, stop_at_newline=False)
    assert [t for t, _ in step(tiny_split, empty)] == ["x"] and empty.rows == 0
    empty.merge(alone_batch(1))
    out = {}
    while empty.rows:
        out.update((t, tiny_split.strip_eos(k)) for t, k in step(tiny_split, empty))
    assert out == {1: alone[1]}


def test_lm_head_input_is_given_standard_strides(tiny_split, tiny_titles):
    """The head sees fresh [B, k, H] tensors: torch's CPU matmul folds them into one mm, while a view
    of the last positions (batch stride T*H) costs a bmm over a copy of the [H, V] weight."""
    _, prompts = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(3, 6))
    seen = []
    hook = tiny_split.model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        generate(tiny_split, prompts, torch.randn(2, 1, H), max_new_tokens=3)
    finally:
        hook.remove()
    assert seen and all(x.is_contiguous() for x in seen)


# ---- target_logprob (Eq. 5) -----------------------------------------------------------------------


def _brute_logprob(split, prompt, target, vec):
    logits = _logits_with_fill(split, prompt.input_ids + target, prompt.slot_positions, vec)
    n = len(prompt.input_ids)
    logp = torch.log_softmax(logits[n - 1:-1].float(), -1)
    return logp.gather(-1, torch.tensor(target)[:, None]).sum()


@pytest.mark.parametrize("n_slots", [1, 2])
def test_target_logprob_equals_brute_force(tiny_split, tiny_titles, n_slots):
    b, (p,) = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(5,), n_slots=n_slots)
    y = b.response_ids(tiny_titles[12])
    vecs = torch.randn(7, n_slots, H) * 4
    got = target_logprob(tiny_split, p, y, vecs, chunk_size=3)  # chunks 3 + 3 + 1
    ref = torch.stack([_brute_logprob(tiny_split, p, y, vecs[e]) for e in range(7)])
    assert got.shape == (7,)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-5)
    assert ref.max() - ref.min() > 1e-3  # candidates really differ
    base = target_logprob(tiny_split, p, y, None)
    torch.testing.assert_close(base, _brute_logprob(tiny_split, p, y, None)[None], atol=1e-3, rtol=1e-5)


def test_target_logprob_accepts_flat_vectors_and_no_slot_prompt(tiny_split, tiny_titles):
    b, (p,) = _prompts(tiny_split.tokenizer, tiny_titles, sizes=(4,))
    y = b.response_ids(tiny_titles[13])
    v = torch.randn(3, H)
    torch.testing.assert_close(target_logprob(tiny_split, p, y, v), target_logprob(tiny_split, p, y, v[:, None]))
    q = b.build(tiny_titles[:4], with_slot=False)
    assert q.slot_positions == []
    torch.testing.assert_close(target_logprob(tiny_split, q, y, None),
                               _brute_logprob(tiny_split, q, y, None)[None], atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="no slot"):
        target_logprob(tiny_split, q, y, v)


# ---- embed_final ----------------------------------------------------------------------------------


def test_embed_final_equals_last_hidden_state_of_bare_text(tiny_split, tiny_titles):
    texts = [tiny_titles[0], tiny_titles[7], "Heat"]
    e = tiny_split.embed_final(texts, batch_size=2)
    assert e.shape == (3, H)
    for t, ei in zip(texts, e):
        ids = tiny_split.tokenizer(t).input_ids
        assert ids[0] == tiny_split.tokenizer.bos_token_id  # the tokenizer's own special tokens
        ref = tiny_split.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(ei, ref, atol=ATOL, rtol=1e-4)


# ---- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_tracks_lower_part_only(tiny_lm, tiny_tokenizer, tiny_lm_factory):
    split = SplitLM.from_model(tiny_lm, tiny_tokenizer, cut=2)
    fp = fingerprint(split)
    assert fp == fingerprint(split)
    twin = SplitLM.from_model(tiny_lm_factory(), tiny_tokenizer, cut=2)
    assert fingerprint(twin) == fp  # same weights, new objects
    assert fingerprint(SplitLM.from_model(tiny_lm_factory(), tiny_tokenizer, cut=3)) != fp
    with torch.no_grad():
        split.model.model.layers[3].mlp.up_proj.weight[0, 0] += 1.0  # upper layer: memory stays valid
    assert fingerprint(split) == fp
    with torch.no_grad():
        split.model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3  # lower layer
    assert fingerprint(split) != fp
    other_dtype = SplitLM.from_model(tiny_lm_factory().to(torch.bfloat16), tiny_tokenizer, cut=2)
    assert fingerprint(other_dtype) != fp


# ---- upper layers on disk -------------------------------------------------------------------------


def _perturb_upper(split, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in split.upper_layers().parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_save_load_upper_round_trip(tmp_path, tiny_tokenizer, tiny_titles, tiny_lm_factory):
    tuned = SplitLM.from_model(tiny_lm_factory(), tiny_tokenizer, cut=2)
    b, (p,) = _prompts(tiny_tokenizer, tiny_titles, sizes=(4,))
    base_logits = _full_logits(tuned.model, p.input_ids)
    base_embed = tuned.embed_final([tiny_titles[3]])
    tuned.snapshot_base_upper()
    _perturb_upper(tuned)
    save_upper(tuned, tmp_path / "ck", extra={"note": "test"})
    assert {f.name for f in (tmp_path / "ck").iterdir()} == {"upper.safetensors", "upper.json"}

    fresh = SplitLM.from_model(tiny_lm_factory(), tiny_tokenizer, cut=2)
    meta = load_upper(fresh, tmp_path / "ck")
    assert meta["extra"] == {"note": "test"} and meta["cut"] == 2
    want = _full_logits(tuned.model, p.input_ids)
    assert (want - base_logits).abs().max() > 1e-3
    assert torch.equal(_full_logits(fresh.model, p.input_ids), want)
    # grounding embeddings still come from the base upper layers, unless asked otherwise
    torch.testing.assert_close(fresh.embed_final([tiny_titles[3]]), base_embed, atol=ATOL, rtol=1e-4)
    assert (fresh.embed_final([tiny_titles[3]], base=False) - base_embed).abs().max() > 1e-4

    other_cut = SplitLM.from_model(tiny_lm_factory(), tiny_tokenizer, cut=3)
    with pytest.raises(ValueError, match="cut=2"):
        load_upper(other_cut, tmp_path / "ck")
    other_base = SplitLM.from_model(tiny_lm_factory(seed=5), tiny_tokenizer, cut=2)
    with pytest.raises(ValueError, match="fingerprint"):
        load_upper(other_base, tmp_path / "ck")
    with pytest.raises(ValueError, match="does not hold"):
        load_upper(fresh, tmp_path / "missing")


def test_load_local_hf_directory(tmp_path, tiny_lm, tiny_tokenizer, tiny_titles):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    split = SplitLM.load(tmp_path / "m", cut=2, dtype="float32")
    assert split.dtype == torch.float32 and split.n_layers == 4 and split.hidden_size == H
    _, (p,) = _prompts(split.tokenizer, tiny_titles, sizes=(3,))
    torch.testing.assert_close(_full_logits(split.model, p.input_ids), _full_logits(tiny_lm, p.input_ids))
    with pytest.raises(ValueError, match="does not exist"):
        SplitLM.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        SplitLM.load(tmp_path / "m", dtype="float16")


def test_auto_dtype_follows_the_cpu(monkeypatch):
    """``auto`` is bfloat16 only where the CPU has native bf16 (else torch emulates it, ~4x slower)."""
    from model import llm

    for native, expect in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(llm, "native_bf16", lambda native=native: native)
        assert llm.resolve_dtype("auto") == expect
    monkeypatch.undo()
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert llm.native_bf16() is native


def test_settings_resolve_auto_dtype(monkeypatch):
    from model import llm
    from service.settings import Settings

    monkeypatch.delenv("AUTOMR_DTYPE", raising=False)
    monkeypatch.setattr(llm, "native_bf16", lambda: False)
    assert Settings().dtype == "float32"  # /version and results name the dtype used, never "auto"
    monkeypatch.setattr(llm, "native_bf16", lambda: True)
    assert Settings().dtype == "bfloat16"
    monkeypatch.setenv("AUTOMR_DTYPE", "float32")
    assert Settings().dtype == "float32"  # an explicit choice stands


# ---- the real SmolLM2 (skipped unless the asset is fetched) --------------------------------------


@pytest.mark.integration
def test_smollm2_gguf_split_matches_full_forward(one_thread):
    from model.assets import asset_paths

    gguf = asset_paths().gguf_path
    if not gguf.is_file():
        pytest.skip(f"{gguf} not fetched (automr fetch-assets)")
    split = SplitLM.load(gguf, cut=20, dtype="float32")
    assert split.n_layers == 30 and split.hidden_size == 576
    b = PromptBuilder.for_model(split)
    p = b.build(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"])
    assert split.tokenizer.convert_ids_to_tokens(p.input_ids[p.slot_positions[0]]) == "Ġ..."
    ref = split.model(torch.tensor([p.input_ids]), output_hidden_states=True).hidden_states
    z = split.encode_lower([p.input_ids, p.input_ids[:-5]])
    torch.testing.assert_close(z[0], ref[20][0, -1], atol=1e-3, rtol=1e-3)
    y = b.response_ids("Star Wars (1977)")
    vec = torch.randn(2, 1, 576)
    got = target_logprob(split, p, y, vec)
    ref_lp = torch.stack([_brute_logprob(split, p, y, vec[e]) for e in range(2)])
    torch.testing.assert_close(got, ref_lp, atol=1e-2, rtol=1e-4)


def test_stop_after_first_line_cuts_exactly_after_the_newline(tiny_tokenizer, one_thread):
    """Greedy generation with the newline stop = the unstopped generation cut after the first token
    that ends a non-blank line. Which tokens count as newlines is injected (the tiny model rarely
    writes one): the unstopped run's 4th new token is declared a newline, its 1st one blank."""
    from tests.conftest import TINY_TITLES, build_tiny_lm

    tiny_split = SplitLM.from_model(build_tiny_lm(len(tiny_tokenizer), seed=1), tiny_tokenizer, cut=2)  # varied tokens
    builder = PromptBuilder.for_model(tiny_split, domain="movie", n_slots=1)
    prompts = [builder.build(list(TINY_TITLES[:3])), builder.build(list(TINY_TITLES[4:9]))]
    free = generate(tiny_split, prompts, max_new_tokens=10, return_ids=True, stop_at_newline=False)
    assert all(len(f) == 10 for f in free)  # no eos within 10 tokens (else pick another seed)
    vocab = tiny_split.model.get_output_embeddings().weight.shape[0]
    newline, lead, content = (torch.zeros(vocab, dtype=torch.bool) for _ in range(3))
    content[:] = True
    row0_nl = free[0][3]
    newline[row0_nl] = True
    content[free[0][0]] = False  # a blank first token: the newline still follows content (tokens 1, 2)
    with stop_tables(tiny_split, newline, lead, content):
        got = generate(tiny_split, prompts, max_new_tokens=10, return_ids=True)
        for f, g in zip(free, got):
            cut = next((j for j, t in enumerate(f) if newline[t] and any(content[x] for x in f[:j])), None)
            want = f if cut is None else f[: cut + 1]
            assert g == want
        assert got[0] == free[0][:4]
        # a newline before any content does not stop: declare only the first token a newline, and blank
        newline[:] = False
        content[:] = True
        newline[free[0][0]] = True
        content[free[0][0]] = False
        assert generate(tiny_split, prompts[:1], max_new_tokens=10, return_ids=True)[0] == free[0]


def test_the_per_token_stop_check_equals_the_whole_row_check():
    """``ends_with_stop`` (the step path, one token at a time) stops a row at the same token as
    ``done`` over the row's whole prefix (HF generate's check)."""
    from model.generation import StopAfterFirstLine

    g = torch.Generator().manual_seed(0)
    v = 12
    for _ in range(200):
        newline, lead, content = (torch.rand(v, generator=g) < p for p in (0.2, 0.3, 0.4))
        stop = StopAfterFirstLine(newline, lead & newline, content | (lead & newline))
        row = torch.randint(0, v, (10,), generator=g).tolist()
        whole = next((n for n in range(1, 11) if bool(stop.done(torch.tensor([row[:n]]))[0])), None)
        step = next((n for n in range(1, 11) if stop.ends_with_stop(row[:n])), None)
        assert step == whole
