"""PromptBuilder with the tiny BPE tokenizer: exact text, slot positions, whole-title budget cuts."""
from __future__ import annotations

import pytest

from model.grounding import clean_generated
from model.prompts import PromptBuilder, PromptIds

def _with(p: PromptIds, **changes) -> PromptIds:
    return PromptIds(**{**p.__dict__, **changes})


EXPECTED_MOVIE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGiven a list of movies the user has watched before, please recommend a new movie "
    "that the user likes to the user.\n\n"
    '### Input:\nThe user has watched the following movies before: "Toy Story (1995)", "Heat (1995)", '
    '"Fargo (1996)"\nLong-term memory: ...\n\n### Response:\n'
)


def test_exact_prompt_text_and_bos(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer)
    p = b.build(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"])
    assert p.input_ids[0] == tiny_tokenizer.bos_token_id  # this tokenizer prepends <s> like Llama's
    assert tiny_tokenizer.decode(p.input_ids, skip_special_tokens=True) == EXPECTED_MOVIE
    assert (p.n_titles, p.n_dropped) == (3, 0)


def test_no_slot_prompt_has_no_memory_line(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer)
    p = b.build(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"], with_slot=False)
    assert p.slot_positions == []
    assert tiny_tokenizer.decode(p.input_ids, skip_special_tokens=True) == EXPECTED_MOVIE.replace(
        "\nLong-term memory: ...", "")


@pytest.mark.parametrize("n_slots", [1, 2, 3])
def test_slot_positions_point_at_placeholder_tokens(tiny_tokenizer, n_slots):
    b = PromptBuilder(tiny_tokenizer, n_slots=n_slots)
    p = b.build(["Toy Story (1995)", "Heat (1995)"])
    span = tiny_tokenizer(" ...", add_special_tokens=False).input_ids
    assert len(p.slot_positions) == n_slots
    for s in p.slot_positions:
        assert p.input_ids[s - len(span) + 1: s + 1] == span  # the slot is the span's last token
    ids = p.input_ids
    text_before = tiny_tokenizer.decode(ids[: p.slot_positions[0] + 1], skip_special_tokens=True)
    assert text_before.endswith('"Heat (1995)"\nLong-term memory: ...')
    text_after = tiny_tokenizer.decode(ids[p.slot_positions[-1] + 1:], skip_special_tokens=True)
    assert text_after == "\n\n### Response:\n"
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True).count(" ...") == n_slots


@pytest.mark.parametrize("domain,verb,plural", [
    ("movie", "watched", "movies"), ("book", "read", "books"),
    ("product", "bought", "products"), ("podcast", "interacted with", "podcasts"),
])
def test_domain_words(tiny_tokenizer, domain, verb, plural):
    p = PromptBuilder(tiny_tokenizer, domain=domain).build(["A", "B"])
    text = tiny_tokenizer.decode(p.input_ids, skip_special_tokens=True)
    assert f"Given a list of {plural} the user has {verb} before, please recommend a new {domain} that" in text
    assert f"The user has {verb} the following {plural} before: \"A\", \"B\"\n" in text


def test_budget_drops_oldest_whole_titles(tiny_tokenizer, tiny_titles):
    full = PromptBuilder(tiny_tokenizer).build(tiny_titles[:10])
    n = len(full.input_ids)
    for budget in (n, n - 1, n - 12, n - 40, n - 70):
        p = PromptBuilder(tiny_tokenizer, max_tokens=budget).build(tiny_titles[:10])
        assert len(p.input_ids) <= budget
        # the result is exactly the prompt of the k most recent titles, k as large as fits
        k = p.n_titles
        assert p.n_dropped == 10 - k
        assert p == _with(PromptBuilder(tiny_tokenizer).build(tiny_titles[10 - k:10]), n_dropped=10 - k)
        if k < 10:
            one_more = PromptBuilder(tiny_tokenizer).build(tiny_titles[10 - k - 1:10])
            assert len(one_more.input_ids) > budget
    assert PromptBuilder(tiny_tokenizer, max_tokens=n - 1).build(tiny_titles[:10]).n_dropped == 1


def test_budget_can_drop_every_title_but_not_the_template(tiny_tokenizer):
    empty = PromptBuilder(tiny_tokenizer).build([])
    p = PromptBuilder(tiny_tokenizer, max_tokens=len(empty.input_ids)).build(["Toy Story (1995)", "Heat (1995)"])
    assert (p.n_titles, p.n_dropped) == (0, 2) and p.input_ids == empty.input_ids
    with pytest.raises(ValueError, match="over the budget"):
        PromptBuilder(tiny_tokenizer, max_tokens=len(empty.input_ids) - 1).build(["Heat (1995)"])


def test_response_ids_and_prompt_response_consistency(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer)
    r = b.response_ids("Fargo (1996)")
    assert r[-1] == tiny_tokenizer.eos_token_id
    assert r[:-1] == tiny_tokenizer('"Fargo (1996)"', add_special_tokens=False).input_ids
    p = b.build(["Heat (1995)"])
    text = tiny_tokenizer.decode(p.input_ids + r, skip_special_tokens=False)
    assert text.endswith('### Response:\n"Fargo (1996)"</s>')
    # a title in the history and as a response differ only by the leading space of the quote
    assert tiny_tokenizer.decode(b.title_ids("Fargo (1996)")) == ' "Fargo (1996)"'


def test_titles_are_cleaned_to_one_line(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer)
    assert b.build(["Heat\n (1995) "]) == b.build(["Heat (1995)"])
    assert b.response_ids("  Heat  (1995)") == b.response_ids("Heat (1995)")


def test_default_budget_from_tokenizer_and_signature(tiny_tokenizer):
    tiny_tokenizer.model_max_length = 200
    b = PromptBuilder(tiny_tokenizer, reserve_tokens=50)
    assert b.max_tokens == 150
    assert b.signature() == PromptBuilder(tiny_tokenizer, reserve_tokens=50).signature()
    assert b.signature() != PromptBuilder(tiny_tokenizer, domain="book", reserve_tokens=50).signature()
    assert b.signature() != PromptBuilder(tiny_tokenizer, n_slots=2, reserve_tokens=50).signature()


def test_for_model_uses_model_context(tiny_split):
    b = PromptBuilder.for_model(tiny_split, reserve_tokens=12)
    assert b.max_tokens == 512 - 12


def test_clean_generated():
    assert clean_generated('"Fargo (1996)"') == "Fargo (1996)"
    assert clean_generated(' "Fargo (1996)"\n"Heat"') == "Fargo (1996)"
    assert clean_generated('"Fargo (1996)') == "Fargo (1996)"
    assert clean_generated("Fargo") == "Fargo"


