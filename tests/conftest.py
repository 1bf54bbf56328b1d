"""Shared tiny fixtures: a small real BPE tokenizer built offline and a tiny random Llama.

``tiny_tokenizer`` (session): byte-level BPE trained on the prompt template and a few titles, wrapped in
``PreTrainedTokenizerFast``; it prepends ``<s>`` like Llama's tokenizer and has no pad token (SplitLM
must fall back to eos). ``tiny_lm`` (function): a fresh ``LlamaForCausalLM`` (4 layers, hidden 64,
tied embeddings like SmolLM2) in float32, seeded. ``tiny_split``: ``SplitLM`` over it, cut L = 2.
"""
from __future__ import annotations

import os

import pytest
import torch

# gc.freeze() at ready is process-wide: many apps in one test process must not freeze each other's garbage
os.environ.setdefault("AUTOMR_GC_FREEZE", "false")

TINY_TITLES = [
    "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)",
    "Seven (Se7en) (1995)", "The Usual Suspects (1995)", "Mighty Aphrodite (1995)", "Postino, Il (1994)",
    "Star Wars (1977)", "Fargo (1996)", "Heat (1995)", "Casino (1995)", "Sabrina (1995)",
]


def _corpus() -> list[str]:
    from model import prompts as P  # the template strings

    texts = [P.PREAMBLE, P.INSTRUCTION, P.INPUT_HEAD, P.SLOT_HEAD, P.PLACEHOLDER * 5, P.RESPONSE_HEAD]
    for verb, plural in P.DOMAIN_WORDS.values():
        texts.append(P.INSTRUCTION.format(plural=plural, verb=verb, noun=plural[:-1]))
        texts.append(P.INPUT_HEAD.format(verb=verb, plural=plural))
    texts += [P.TITLE_PIECE.format(title=t) + "," for t in TINY_TITLES]
    texts += [P.RESPONSE.format(title=t) for t in TINY_TITLES]
    return texts * 3


def build_tiny_tokenizer(vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_lm(vocab_size: int, seed: int = 0, n_layers: int = 4, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float().eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_session():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_session):
    """A fresh copy per test (SplitLM sets pad token / padding side on it)."""
    import copy

    return copy.deepcopy(tiny_tokenizer_session)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (restored after): a tiny model gains nothing from more, and
    on a shared, loaded machine every extra OpenMP thread makes each small op wait for stragglers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_lm(tiny_tokenizer, one_thread):
    return build_tiny_lm(len(tiny_tokenizer))


@pytest.fixture
def tiny_lm_factory(tiny_tokenizer, one_thread):
    """``make(seed=0, n_layers=4, tie=True)`` -> a fresh tiny Llama for ``tiny_tokenizer``."""

    def make(seed: int = 0, n_layers: int = 4, tie: bool = True):
        return build_tiny_lm(len(tiny_tokenizer), seed=seed, n_layers=n_layers, tie=tie)

    return make


@pytest.fixture
def tiny_split(tiny_lm, tiny_tokenizer):
    from model.llm import SplitLM

    return SplitLM.from_model(tiny_lm, tiny_tokenizer, cut=2)


@pytest.fixture
def tiny_titles() -> list[str]:
    return list(TINY_TITLES)


def write_tiny_csv_dataset(folder, n_users: int, per_user: int, seed: int, step: int = 100) -> None:
    """A generic-CSV dataset over TINY_TITLES: items.csv + interactions.csv (each user rates
    ``per_user`` distinct random items, one every ``step`` seconds)."""
    import csv
    import random

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows([[str(i), t] for i, t in enumerate(TINY_TITLES, start=1)])
    rng = random.Random(seed)
    with open(folder / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            for j, it in enumerate(rng.sample(range(1, len(TINY_TITLES) + 1), per_user)):
                w.writerow([f"u{u}", str(it), step * j + u])


@pytest.fixture
def anyio_backend():
    """Async tests (``pytest.mark.anyio``) run on asyncio."""
    return "asyncio"
