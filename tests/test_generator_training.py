"""BIGRec tuning of the upper layers on the tiny random Llama."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from model.data.types import Catalogue, Sample
from model.checkpoint import fingerprint, load_upper, upper_state_dict
from model.llm import SplitLM
from tests.generation_helpers import slot_replaced
from model.prompts import PromptBuilder
from model.train.generator import (
    GeneratorTrainConfig,
    build_examples,
    evaluate_loss,
    response_loss,
    train_generator,
)


@dataclass
class TinyDataset:
    """The part of ``PreparedDataset`` that training reads, in memory."""

    catalogue: Catalogue
    samples: dict[str, list[Sample]]
    config: dict = field(default_factory=lambda: {"domain": "movie", "k_short": 3})

    def split(self, name: str) -> list[Sample]:
        return self.samples[name]


def _dataset(titles: list[str], n_users: int = 6) -> TinyDataset:
    cat = Catalogue(item_ids=[str(i) for i in range(len(titles))], titles=list(titles))
    samples = []
    for u in range(n_users):
        hist = [(u * 3 + j) % len(titles) for j in range(4)]
        target = (u * 3 + 7) % len(titles)
        samples.append(Sample(f"u{u}", target, 100 + u, hist, list(range(4))))
    return TinyDataset(cat, {"train": samples, "valid": samples[:3], "test": []})


def _cfg(**kw) -> GeneratorTrainConfig:
    base = dict(n_train=None, n_valid=None, epochs=6, patience=6, batch_size=3, micro_batch_size=3, lr=1e-2,
                warmup_steps=1, progress=False)
    base.update(kw)
    return GeneratorTrainConfig(**base)


def _lower_state(split: SplitLM) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, m in enumerate(split.lower_modules()) for k, v in m.state_dict().items()}


def _brute_loss(split, ex, vec=None) -> tuple[float, int]:
    x = torch.tensor([ex.input_ids])
    if vec is None:
        logits = split.model(x).logits[0]
    else:
        with slot_replaced(split, torch.tensor([ex.slot_positions]), vec[None], x.shape[1]):
            logits = split.model(x).logits[0]
    n = ex.n_prompt
    tgt = torch.tensor(ex.input_ids[n:])
    return float(torch.nn.functional.cross_entropy(logits[n - 1:-1], tgt, reduction="sum")), len(tgt)


def test_response_loss_equals_full_forward_on_response_tokens(tiny_split, tiny_titles):
    ds = _dataset(tiny_titles)
    b = PromptBuilder(tiny_split.tokenizer)
    exs = build_examples(b, ds.split("train")[:3], tiny_titles, k_short=3)
    exs[1] = build_examples(b, [Sample("x", 5, 0, [1, 2, 3, 4, 6], [0] * 5)], tiny_titles, k_short=5)[0]
    assert len({len(e.input_ids) for e in exs}) > 1  # padded batch
    loss, n = response_loss(tiny_split, exs)
    ref = [_brute_loss(tiny_split, e) for e in exs]
    assert n == sum(k for _, k in ref) == sum(len(b.response_ids(tiny_titles[e.sample.target])) for e in exs)
    assert float(loss) == pytest.approx(sum(v for v, _ in ref), rel=1e-5)
    vec = torch.randn(3, 1, 64) * 4
    loss_m, _ = response_loss(tiny_split, exs, vec)
    ref_m = sum(_brute_loss(tiny_split, e, vec[i])[0] for i, e in enumerate(exs))
    assert float(loss_m) == pytest.approx(ref_m, rel=1e-5)
    assert abs(float(loss_m) - float(loss)) > 1e-4


def test_full_tuning_lowers_loss_keeps_lower_part_and_round_trips(tmp_path, tiny_split, tiny_titles, tiny_lm_factory):
    ds = _dataset(tiny_titles)
    lower_before = _lower_state(tiny_split)
    fp = fingerprint(tiny_split)
    b = PromptBuilder.for_model(tiny_split)
    valid = build_examples(b, ds.split("valid"), tiny_titles, 3)
    embed_before = tiny_split.embed_final([tiny_titles[0]])

    rep = train_generator(tiny_split, ds, _cfg(out_dir=str(tmp_path / "run")))

    assert rep.valid_losses[0] > 2.0 and rep.best_valid_loss < 0.5 * rep.valid_losses[0]
    assert rep.train_losses[-1] < rep.train_losses[0]
    assert rep.n_train == 6 and rep.epochs_run == 6 and rep.sec_per_sample > 0
    # the model holds the best weights, in its own dtype, frozen
    assert evaluate_loss(tiny_split, valid) == pytest.approx(rep.best_valid_loss, rel=1e-5)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in tiny_split.model.parameters())
    # embeddings and layers 1..L bitwise unchanged; the fingerprint too
    after = _lower_state(tiny_split)
    assert all(torch.equal(lower_before[k], after[k]) for k in lower_before)
    assert fingerprint(tiny_split) == fp
    # grounding still uses the base upper layers
    torch.testing.assert_close(tiny_split.embed_final([tiny_titles[0]]), embed_before)
    # checkpoint + log on disk; loading it on a fresh base model gives identical logits
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == list(range(1, 7)) and log["report"]["best_epoch"] == rep.best_epoch
    fresh = SplitLM.from_model(tiny_lm_factory(), tiny_split.tokenizer, cut=2)
    meta = load_upper(fresh, tmp_path / "run" / "best")
    assert meta["extra"]["epoch"] == rep.best_epoch
    x = torch.tensor([valid[0].input_ids])
    assert torch.equal(fresh.model(x).logits, tiny_split.model(x).logits)


def test_lora_tuning_merges_into_plain_layers(tmp_path, tiny_split, tiny_titles, tiny_lm_factory):
    ds = _dataset(tiny_titles)
    lower_before = _lower_state(tiny_split)
    keys_before = set(upper_state_dict(tiny_split))
    rep = train_generator(tiny_split, ds, _cfg(mode="lora", lora_r=4, lr=2e-2, out_dir=str(tmp_path / "lora")))
    assert rep.best_valid_loss < 0.8 * rep.valid_losses[0]
    assert rep.trainable_params == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))  # 2 upper layers
    assert set(upper_state_dict(tiny_split)) == keys_before  # adapters merged and removed
    assert not any("lora" in n for n, _ in tiny_split.model.named_parameters())
    after = _lower_state(tiny_split)
    assert all(torch.equal(lower_before[k], after[k]) for k in lower_before)
    valid = build_examples(PromptBuilder.for_model(tiny_split), ds.split("valid"), tiny_titles, 3)
    assert evaluate_loss(tiny_split, valid) == pytest.approx(rep.best_valid_loss, rel=1e-4)
    fresh = SplitLM.from_model(tiny_lm_factory(), tiny_split.tokenizer, cut=2)
    load_upper(fresh, tmp_path / "lora" / "best")
    x = torch.tensor([valid[0].input_ids])
    torch.testing.assert_close(fresh.model(x).logits, tiny_split.model(x).logits)


def test_memory_slot_fill_calls_slot_fn_with_batch_samples(tiny_split, tiny_titles):
    ds = _dataset(tiny_titles)
    seen: list[str] = []

    def slot_fn(samples):
        seen.extend(s.user_id for s in samples)
        g = torch.Generator().manual_seed(sum(int(s.user_id[1:]) for s in samples))
        return torch.randn(len(samples), 1, 64, generator=g)

    with pytest.raises(ValueError, match="slot_fn"):
        train_generator(tiny_split, ds, _cfg(slot_fill="memory"))
    rep = train_generator(tiny_split, ds, _cfg(slot_fill="memory", epochs=1), slot_fn=slot_fn)
    # valid (u0..u2) before training, one epoch over u0..u5, valid again
    assert sorted(seen) == sorted(["u0", "u1", "u2"] * 2 + [f"u{i}" for i in range(6)])
    assert rep.epochs_run == 1


def test_bf16_model_tunes_with_fp32_master_weights(tiny_tokenizer, tiny_titles, tiny_lm_factory):
    split = SplitLM.from_model(tiny_lm_factory().to(torch.bfloat16), tiny_tokenizer, cut=2)
    ds = _dataset(tiny_titles)
    lower_before = _lower_state(split)
    upper_before = {k: v.clone() for k, v in upper_state_dict(split).items()}
    with pytest.raises(ValueError, match="autocast"):
        train_generator(split, ds, _cfg(autocast_bf16=False))
    rep = train_generator(split, ds, _cfg(epochs=2, lr=1e-4))
    assert rep.best_epoch >= 1
    assert all(p.dtype == torch.bfloat16 for p in split.model.parameters())
    after = _lower_state(split)
    assert all(torch.equal(lower_before[k], after[k]) for k in lower_before)
    changed = [k for k, v in upper_state_dict(split).items() if not torch.equal(v, upper_before[k])]
    assert len(changed) > len(upper_before) // 2  # small updates survived (fp32 master weights)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        GeneratorTrainConfig(batch_size=10, micro_batch_size=4).validate()
    with pytest.raises(ValueError, match="mode"):
        GeneratorTrainConfig(mode="qlora").validate()
    with pytest.raises(ValueError, match="slot_fill"):
        GeneratorTrainConfig(slot_fill="random").validate()


def _sequence_dataset(titles: list[str], n_users: int = 4, length: int = 9, k: int = 3) -> TinyDataset:
    """Users with consecutive sliding-window samples (what the packed recipe packs)."""
    cat = Catalogue(item_ids=[str(i) for i in range(len(titles))], titles=list(titles))
    train, valid = [], []
    for u in range(n_users):
        items = [(u * 5 + 3 * j) % len(titles) for j in range(length)]
        for t in range(k, length):
            (train if t < length - 1 else valid).append(Sample(f"u{u}", items[t], 100 * u + t, items[:t],
                                                               list(range(t))))
    return TinyDataset(cat, {"train": train, "valid": valid, "test": []}, {"domain": "movie", "k_short": k})


@pytest.mark.parametrize("master", [False, True])
def test_packed_recipe_lowers_the_exact_valid_loss(tiny_tokenizer, tiny_titles, tiny_lm_factory, master):
    """The packed rows train what the unpacked inference prompts score; a bf16 model with float32 master
    copies keeps small updates and stays bf16."""
    model = tiny_lm_factory()
    if master:
        model = model.to(torch.bfloat16)
    split = SplitLM.from_model(model, tiny_tokenizer, cut=2)
    ds = _sequence_dataset(tiny_titles)
    lower_before = _lower_state(split)
    rep = train_generator(split, ds, _cfg(recipe="packed", template="list", chunk_targets=2, batch_size=2,
                                          micro_batch_size=1, epochs=4, patience=4, lr=3e-3, master_weights=master))
    assert rep.valid_losses[rep.best_epoch] < rep.valid_losses[0] - 0.1
    assert rep.train_targets == len(ds.split("train")) and rep.targets_per_second > 0
    after = _lower_state(split)
    assert all(torch.equal(lower_before[k], after[k]) for k in lower_before)
    assert all(p.dtype == (torch.bfloat16 if master else torch.float32) for p in split.model.parameters())
    with pytest.raises(ValueError, match="list template"):
        GeneratorTrainConfig(recipe="packed").validate()
