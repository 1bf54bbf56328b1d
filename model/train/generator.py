"""BIGRec tuning of the generator's upper layers (METHOD.md §2, BIGRec, AutoMR §3.1).

Embeddings and layers 1..L stay frozen (so stored memory vectors stay valid); layers L+1..N and the
final norm are tuned, fully (default) or with LoRA adapters (``peft``) that are merged back into the
weights at the end. The loss is the causal-LM cross-entropy on the response tokens only
(``'"Title"' + eos``), averaged over the tokens of an optimizer batch.

The forward is split: layers 1..L run under ``no_grad`` (no activations kept, no backward through
them), the slot is filled at layer L, then layers L+1..N run with gradients, and the LM head only at
the response positions. Full tuning keeps float32 master weights for the upper layers and computes in
bfloat16 autocast (required when the model itself is bfloat16: bf16 weights cannot absorb 1e-4-sized
AdamW updates); the tuned layers are cast back to the model's dtype when training ends.

Slot during tuning: ``slot_fill="placeholder"`` (BIGRec: the slot keeps its placeholder's own state)
or ``"memory"`` with a ``slot_fn(samples) -> [B, S, H]`` callable (e.g. the AutoMR retriever's pick),
the hook for training with retrieved memory.

Defaults (BIGRec / AutoMR §5.1.4): 1,024 seeded training samples, AdamW, lr 1e-4 (AutoMR searched
{1e-3, 1e-4, 1e-5} for LLM methods; BIGRec uses 1e-4), batch 32 (AutoMR: 32) as 4 micro-batches of 8,
linear warm-up (BIGRec: 20 steps) then linear decay, gradient clipping 1.0, at most 5 epochs with
early stopping on the validation loss of 256 seeded valid samples (patience 1).
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from model.checkpoint import fingerprint, save_upper
from model.data.types import Sample
from model.llm import SplitLM, left_pad
from model.prompts import PromptBuilder
from model.train.lora import inject_lora, load_plain_state, plain_upper_state, remove_lora
from model.train.packed import Chunk, build_chunks, packed_loss

SlotFn = Callable[[Sequence[Sample]], torch.Tensor]  # samples -> [B, S, H] slot vectors
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class GeneratorTrainConfig:
    n_train: int | None = 1024  # seeded subset of the train split; None = all
    n_valid: int | None = 256  # seeded subset of the valid split for early stopping; None = all
    seed: int = 0
    epochs: int = 5  # at most
    patience: int = 1  # epochs without a better valid loss before stopping
    batch_size: int = 32  # samples per optimizer step
    micro_batch_size: int = 8  # samples per forward/backward (gradient accumulation)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    mode: str = "full"  # "full" | "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    slot_fill: str = "placeholder"  # "placeholder" (BIGRec) | "memory" (needs slot_fn)
    # "packed": every target of a user in packed rows of the list template (model/train/packed.py);
    # batch_size / micro_batch_size then count rows of ``chunk_targets`` targets.
    # "sliding": one Alpaca prompt per sample (BIGRec's recipe)
    recipe: str = "sliding"
    template: str = "alpaca"  # the prompt template (model/prompts.py); "packed" needs "list"
    chunk_targets: int = 32
    subset: str = "random"  # how n_train samples are chosen: "random" (seeded) | "latest" (by time)
    n_slots: int = 1
    autocast_bf16: bool | None = None  # None: on when the model is bfloat16 (required then)
    # full tuning of a bfloat16 model without autocast: the forward and backward run in bfloat16 and the
    # optimizer keeps float32 master copies (an update below bf16's resolution is not lost); ~20% faster
    # than autocast with float32 weights on a CPU (BENCHMARKS)
    master_weights: bool = False
    out_dir: str | None = None  # checkpoints: OUT/best (upper layers), OUT/train_log.json
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ValueError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.slot_fill not in ("placeholder", "memory"):
            raise ValueError(f"slot_fill must be 'placeholder' or 'memory', got {self.slot_fill!r}")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        if self.recipe not in ("packed", "sliding"):
            raise ValueError(f"recipe must be 'packed' or 'sliding', got {self.recipe!r}")
        if self.recipe == "packed" and self.template != "list":
            raise ValueError("the packed recipe tunes on the list template (template='list')")
        if self.recipe == "packed" and self.slot_fill != "placeholder":
            raise ValueError("memory-aware tuning (slot_fill='memory') needs the sliding recipe: a packed row "
                             "has one slot for all its targets")
        if self.subset not in ("random", "latest"):
            raise ValueError(f"subset must be 'random' or 'latest', got {self.subset!r}")
        if self.master_weights and self.mode != "full":
            raise ValueError("master_weights applies to full tuning (LoRA adapters are float32 already)")
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 1 and lr > 0")


@dataclass
class Example:
    """One tuning example: prompt + response tokens; the loss covers positions >= n_prompt."""

    sample: Sample
    input_ids: list[int]
    n_prompt: int
    slot_positions: list[int]


@dataclass
class TrainReport:
    n_train: int
    n_valid: int
    epochs_run: int
    best_epoch: int  # 0 = the untuned model was best
    best_valid_loss: float
    valid_losses: list[float]  # index 0: before training
    train_losses: list[float]  # mean per epoch
    seconds: float
    sec_per_sample: float  # training forward+backward+step, per target seen
    tokens_per_sample: float  # tokens fed per target
    trainable_params: int
    config: dict = field(default_factory=dict)
    tokens_per_second: float = 0.0  # of the training steps (validation excluded)
    targets_per_second: float = 0.0
    train_targets: int = 0  # targets per epoch

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Examples and the loss
# --------------------------------------------------------------------------------------------------


def build_examples(builder: PromptBuilder, samples: Sequence[Sample], titles: Sequence[str],
                   k_short: int, with_slot: bool = True) -> list[Example]:
    """Prompt of the K short-term titles (+ slot) followed by the target's response tokens."""
    out = []
    for s in samples:
        if not 0 <= s.target < len(titles):
            raise ValueError(f"sample of user {s.user_id}: target {s.target} is not an item index")
        p = builder.build([titles[i] for i in s.short_term(k_short)], with_slot=with_slot)
        out.append(Example(s, p.input_ids + builder.response_ids(titles[s.target]), len(p.input_ids),
                           p.slot_positions))
    return out


def response_loss(split: SplitLM, batch: Sequence[Example], slot_vectors: torch.Tensor | None = None,
                  autocast: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over the response tokens, number of those tokens) for a batch.

    Layers 1..L run without gradients; gradients flow into layers L+1..N (and LoRA adapters).
    ``slot_vectors`` [B, S, H] replace the slot states at layer L (``None``: placeholder).
    """
    dev = split.device
    ids, mask = left_pad([e.input_ids for e in batch], split.pad_id, dev)  # [B, T]
    t = ids.shape[1]
    with torch.no_grad():
        h = split.lower_forward(ids, mask)  # [B, T, H]
    if slot_vectors is not None:
        pads = [t - len(e.input_ids) for e in batch]
        pos = torch.tensor([[pads[i] + q for q in e.slot_positions] for i, e in enumerate(batch)],
                           dtype=torch.long, device=dev)
        if slot_vectors.shape[:2] != pos.shape:
            raise ValueError(f"slot_vectors {tuple(slot_vectors.shape)} do not match slots {tuple(pos.shape)}")
        h = split.replace_slots(h, pos, slot_vectors)
    rows, cols, targets = [], [], []
    for i, e in enumerate(batch):
        pad = t - len(e.input_ids)
        for j in range(e.n_prompt, len(e.input_ids)):  # token j is predicted by the state at j - 1
            rows.append(i)
            cols.append(pad + j - 1)
            targets.append(e.input_ids[j])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        h = split.upper_forward(h, mask)  # [B, T, H]
        logits = split.model.lm_head(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)])  # [N, V]
    loss = nn.functional.cross_entropy(logits.float(), torch.tensor(targets, device=dev), reduction="sum")
    return loss, len(targets)


# --------------------------------------------------------------------------------------------------
# Trainable parameters: full upper layers or LoRA
# --------------------------------------------------------------------------------------------------


def _upper_modules(split: SplitLM) -> list[nn.Module]:
    return [*split.upper_layers(), split.model.model.norm]


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------


def _subset(samples: list[Sample], n: int | None, seed: int, how: str = "random") -> list[Sample]:
    if n is None or n >= len(samples):
        return list(samples)
    if how == "latest":  # the targets nearest the validation period (a temporal split)
        return sorted(samples, key=lambda s: (s.timestamp, s.user_id))[-n:]
    return random.Random(seed).sample(samples, n)


def _slot_vectors(cfg: GeneratorTrainConfig, slot_fn: SlotFn | None, batch: Sequence[Example]):
    if cfg.slot_fill == "placeholder":
        return None
    vec = slot_fn([e.sample for e in batch])
    return vec.detach()


@torch.no_grad()
def evaluate_loss(split: SplitLM, examples: Sequence[Example], batch_size: int = 16, autocast: bool = False,
                  slot_vectors_fn: Callable[[Sequence[Example]], torch.Tensor | None] | None = None,
                  progress: bool = False) -> float:
    """Mean cross-entropy per response token over ``examples``."""
    total, n = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="valid", disable=not progress, leave=False):
        batch = examples[i:i + batch_size]
        vec = slot_vectors_fn(batch) if slot_vectors_fn is not None else None
        loss, k = response_loss(split, batch, vec, autocast)
        total, n = total + float(loss), n + k
    return total / max(n, 1)


def train_generator(split: SplitLM, dataset, cfg: GeneratorTrainConfig | None = None,
                    slot_fn: SlotFn | None = None) -> TrainReport:
    """Tune the upper layers of ``split`` in place on ``dataset`` (a ``PreparedDataset``: ``catalogue``,
    ``split(name)``, ``config`` with ``domain`` and ``k_short``). The best epoch's weights (by valid
    loss) are left in the model, cast to its dtype; the base upper layers are kept for grounding
    (``SplitLM.embed_final``). Returns a report; with ``cfg.out_dir`` also writes OUT/best (the tuned
    upper layers, ``checkpoint.load_upper``) and OUT/train_log.json.
    """
    cfg = cfg or GeneratorTrainConfig()
    cfg.validate()
    if cfg.slot_fill == "memory" and slot_fn is None:
        raise ValueError("slot_fill='memory' needs a slot_fn(samples) -> [B, S, H]")
    if split.dtype == torch.bfloat16 and not _autocast(split, cfg) and not cfg.master_weights:
        raise ValueError("a bfloat16 model is tuned with float32 master weights, under bf16 autocast or as "
                         "master copies: autocast_bf16 cannot be False without master_weights")

    titles = dataset.catalogue.titles
    k_short = int(dataset.config.get("k_short", 10))
    builder = PromptBuilder.for_model(split, domain=dataset.config.get("domain", "movie"), n_slots=cfg.n_slots,
                                      template=cfg.template)
    train_samples = _subset(dataset.split("train"), cfg.n_train, cfg.seed, cfg.subset)
    valid = build_examples(builder, _subset(dataset.split("valid"), cfg.n_valid, cfg.seed + 1), titles, k_short)
    if not train_samples:
        raise ValueError("the train split is empty")
    if cfg.recipe == "packed":
        return train_packed(split, build_chunks(builder, train_samples, titles, k_short, cfg.chunk_targets),
                            valid, cfg, slot_fn)
    return train_on_examples(split, build_examples(builder, train_samples, titles, k_short), valid, cfg, slot_fn)


def train_packed(split: SplitLM, train: list[Chunk], valid: list[Example], cfg: GeneratorTrainConfig,
                 slot_fn: SlotFn | None = None) -> TrainReport:
    """``train_loop`` on packed rows. Layers 1..L are frozen, so each row's layer-L states are computed
    once and kept for the later epochs (about 1.2 KB per token in bfloat16)."""
    autocast = _autocast(split, cfg)
    lower_cache: dict = {}

    return train_loop(
        split, train, valid, cfg,
        unit_loss=lambda micro: packed_loss(split, micro, autocast, lower_cache),
        n_loss=lambda c: len(c.loss_targets), n_tokens=len, n_targets=lambda c: c.n_targets,
        valid_slot_fn=lambda b: _slot_vectors(cfg, slot_fn, b))


def _autocast(split: SplitLM, cfg: GeneratorTrainConfig) -> bool:
    """bf16 autocast over float32 weights: the default for a bfloat16 model, unless master weights."""
    if cfg.master_weights:
        return False
    return cfg.autocast_bf16 if cfg.autocast_bf16 is not None else split.dtype == torch.bfloat16


def train_on_examples(split: SplitLM, train: list[Example], valid: list[Example],
                      cfg: GeneratorTrainConfig, slot_fn: SlotFn | None = None) -> TrainReport:
    """The loop of ``train_generator`` on ready-made examples (tests and custom data)."""
    autocast = _autocast(split, cfg)
    vec_fn = (lambda b: _slot_vectors(cfg, slot_fn, b))
    return train_loop(
        split, train, valid, cfg,
        unit_loss=lambda micro: response_loss(split, micro, vec_fn(micro), autocast),
        n_loss=lambda e: len(e.input_ids) - e.n_prompt, n_tokens=lambda e: len(e.input_ids),
        n_targets=lambda e: 1, valid_slot_fn=vec_fn)


def train_loop(split: SplitLM, train: list, valid: list[Example], cfg: GeneratorTrainConfig, *,
               unit_loss: Callable[[list], tuple[torch.Tensor, int]], n_loss: Callable[[object], int],
               n_tokens: Callable[[object], int], n_targets: Callable[[object], int],
               valid_slot_fn: Callable | None = None) -> TrainReport:
    """Tune the upper layers on ``train`` units (sliding-window ``Example``s or packed ``Chunk``s):
    ``cfg.batch_size`` units per optimizer step, ``cfg.micro_batch_size`` per forward; ``unit_loss(micro)``
    is (summed loss, its tokens). Early stopping on the loss of the unpacked ``valid`` examples, which
    hold each target's exact inference prompt."""
    cfg.validate()
    autocast = _autocast(split, cfg)
    model_dtype = split.dtype
    split.snapshot_base_upper()
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    # -- trainable parameters (lower part stays frozen and untouched) --
    for p in split.model.parameters():
        p.requires_grad_(False)
    masters: list[nn.Parameter] | None = None  # float32 copies of bfloat16 weights (cfg.master_weights)
    if cfg.mode == "full":
        params = []
        for m in _upper_modules(split):
            if not cfg.master_weights:
                m.float()
            for p in m.parameters():
                p.requires_grad_(True)
                params.append(p)
        if cfg.master_weights:
            masters = [nn.Parameter(p.detach().float().clone()) for p in params]
    else:
        params = inject_lora(split, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(masters or params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, max(total_steps // 10, 1))

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 0 at total_steps
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return cfg.lr * max(0.0, (total_steps - step) / max(total_steps - warmup, 1))

    log: dict = {"config": asdict(cfg), "fingerprint": fingerprint(split), "steps": [], "epochs": []}

    def run_valid() -> float:
        split.model.eval()
        if not valid:
            return float("nan")
        return evaluate_loss(split, valid, 16, autocast, valid_slot_fn, cfg.progress)

    def checkpoint(state, name: str, extra: dict) -> None:
        if out_dir is not None:
            save_upper(split, out_dir / name, extra=extra, state=state)

    t0 = time.time()
    valid_losses = [run_valid()]
    best_loss, best_epoch = valid_losses[0], 0
    best_state = plain_upper_state(split)
    train_losses, bad_epochs, step, train_time, seen, tokens, targets = [], 0, 0, 0.0, 0, 0, 0
    epochs_run = 0
    for epoch in range(1, cfg.epochs + 1):
        epochs_run = epoch
        split.model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        ep_loss, ep_tok = 0.0, 0
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}", disable=not cfg.progress)
        for start in bar:
            ts = time.time()
            batch = [train[i] for i in order[start:start + cfg.batch_size]]
            n_tok_batch = sum(n_loss(e) for e in batch)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for m0 in range(0, len(batch), cfg.micro_batch_size):
                micro = batch[m0:m0 + cfg.micro_batch_size]
                loss, k = unit_loss(micro)
                (loss / n_tok_batch).backward()
                batch_loss += float(loss.detach())
            if masters is not None:  # bf16 gradients -> float32 masters -> step -> bf16 weights
                for p, mp in zip(params, masters):
                    mp.grad = None if p.grad is None else p.grad.float()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(masters or params, cfg.max_grad_norm)
            opt.step()
            if masters is not None:
                with torch.no_grad():
                    for p, mp in zip(params, masters):
                        p.copy_(mp)
            train_time += time.time() - ts
            seen += len(batch)
            tokens += sum(n_tokens(e) for e in batch)
            targets += sum(n_targets(e) for e in batch)
            ep_loss, ep_tok = ep_loss + batch_loss, ep_tok + n_tok_batch
            log["steps"].append({"step": step, "epoch": epoch, "lr": lr_at(step), "loss": batch_loss / n_tok_batch})
            bar.set_postfix(loss=f"{batch_loss / n_tok_batch:.3f}")
            step += 1
        train_losses.append(ep_loss / max(ep_tok, 1))
        vl = run_valid()
        valid_losses.append(vl)
        improved = not (vl >= best_loss)  # NaN (no valid set): always take the latest
        log["epochs"].append({"epoch": epoch, "train_loss": train_losses[-1], "valid_loss": vl, "improved": improved})
        if improved:
            best_loss, best_epoch, bad_epochs = vl, epoch, 0
            best_state = plain_upper_state(split)
            checkpoint(best_state, "best", {"epoch": epoch, "valid_loss": vl, "train": asdict(cfg)})
        else:
            bad_epochs += 1
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
        if bad_epochs >= cfg.patience:
            break

    # -- leave the best weights in the model, plain layout, model dtype --
    if cfg.mode == "lora":
        remove_lora(split)
    for m in _upper_modules(split):
        m.to(model_dtype)
    load_plain_state(split, best_state)
    for p in split.model.parameters():
        p.requires_grad_(False)
    split.model.eval()
    if best_epoch == 0:
        checkpoint(best_state, "best", {"epoch": 0, "valid_loss": best_loss, "train": asdict(cfg)})

    report = TrainReport(
        n_train=sum(n_targets(u) for u in train), n_valid=len(valid), epochs_run=epochs_run, best_epoch=best_epoch,
        best_valid_loss=best_loss, valid_losses=valid_losses, train_losses=train_losses,
        seconds=time.time() - t0, sec_per_sample=train_time / max(targets, 1),
        tokens_per_sample=tokens / max(targets, 1), trainable_params=n_trainable, config=asdict(cfg),
        tokens_per_second=tokens / max(train_time, 1e-9), targets_per_second=targets / max(train_time, 1e-9),
        train_targets=targets // max(epochs_run, 1),
    )
    if out_dir is not None:
        log["report"] = report.to_json()
        (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return report
