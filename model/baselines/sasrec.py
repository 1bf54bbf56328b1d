"""SASRec (Kang & McAuley, ICDM 2018): a causal self-attention next-item model, as a baseline.

Model: item embedding (shared with the output layer, index 0 = padding) scaled by sqrt(H) plus a
learned absolute position embedding, ``n_blocks`` pre-LayerNorm causal self-attention blocks with a
point-wise feed-forward layer, a final LayerNorm. The score of item ``i`` after a sequence is the dot
product of the last position's state with ``i``'s embedding.

Training follows the paper: every position of a user's training sequence predicts the next item,
binary cross-entropy on the positive and one sampled negative per position (uniform over the items
the user's training sequence does not contain), Adam. Sequences are left-padded to ``max_len`` so the
most recent item always sits at the last position, at training and at ranking time.

Training sequences (TRAIN samples only): for each user, the train sample with the latest target gives
``history + [target]`` (at most ``max_history + 1`` = 101 items); like the original SASRec, which trains
on each user's most recent ``max_len`` items, earlier interactions of very long users are not used.
Early stopping: full-ranking ``val_metric`` (NDCG@10) on the VALID samples every ``eval_every`` epochs,
patience ``patience`` evaluations; the best weights are kept.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from model.data.types import Sample
from model.eval.metrics import ndcg_at, recall_at
from model.eval.ranker import exclude_history, top_k

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- model


@dataclass
class SASRecConfig:
    n_items: int  # catalogue size; embedding row i + 1 is item i, row 0 is padding
    max_len: int = 100
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.hidden % cfg.n_heads:
            raise ValueError(f"hidden {cfg.hidden} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=-1)  # 3 x [B, T, H]
        q, k, v = (t.view(B, T, self.n_heads, H // self.n_heads).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # [B, nh, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, H))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        x = x + self.drop(self.ffn(self.ln2(x)))
        return x


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # small embeddings: N(0, 1) rows (the nn.Embedding default) give initial logits of std ~sqrt(H)
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: [B, T] embedding rows (item + 1, 0 = pad), left-padded, T <= max_len -> [B, T, H]."""
        B, T = seq.shape
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=seq.device)  # last item -> last position
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden) + self.pos_emb(pos)  # [B, T, H]
        keep = (seq > 0).unsqueeze(-1)  # [B, T, 1]
        x = self.drop(x) * keep
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()  # [T, T]
        allowed = causal & (seq > 0)[:, None, :]  # [B, T, T]: earlier or same, non-pad keys
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=seq.device)  # pad rows attend to themselves
        allowed = allowed.unsqueeze(1)  # [B, 1, T, T]
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.ln_f(x)

    def item_logits(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """h: [..., H], items: [...] embedding rows -> [...] dot products."""
        return (h * self.item_emb(items)).sum(-1)

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, n_items] scores of every catalogue item after the sequence."""
        h = self.forward(seq)[:, -1]  # [B, H]
        return h @ self.item_emb.weight[1:].T


def encode_histories(histories: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Left-padded [n, max_len] embedding rows (item + 1) of the last ``max_len`` items of each history."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[i, max_len - len(h) :] = torch.as_tensor(h, dtype=torch.long) + 1
    return out


# ----------------------------------------------------------------------------- training data


def user_train_sequences(train_samples: Sequence[Sample]) -> list[list[int]]:
    """One item sequence per user: the latest train sample's ``history + [target]`` (see module doc).

    "Latest" = highest target timestamp; among samples of one user in the same second, the one whose
    target is in no other candidate's history (the last in sequence order), else the last in file order.
    """
    latest: dict[str, list[Sample]] = {}
    for s in train_samples:
        cur = latest.get(s.user_id)
        if cur is None or s.timestamp > cur[0].timestamp:
            latest[s.user_id] = [s]
        elif s.timestamp == cur[0].timestamp:
            cur.append(s)
    seqs = []
    for user in sorted(latest):
        cands = latest[user]
        if len(cands) > 1:
            ends = [c for c in cands if not any(c.target in o.history for o in cands if o is not c)]
            cands = ends or cands
        s = cands[-1]
        seqs.append(list(s.history) + [s.target])
    return seqs


def build_training_arrays(seqs: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, positives: [U, max_len] embedding rows; position t's input is followed by positive t."""
    seqs = [s[-(max_len + 1) :] for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("no training sequence with at least two items")
    inp = encode_histories([s[:-1] for s in seqs], max_len)
    pos = encode_histories([s[1:] for s in seqs], max_len)
    return inp, pos


def sample_negatives(inp: torch.Tensor, pos: torch.Tensor, n_items: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] uniform item rows in 1..n_items not in the user's training sequence (rejection)."""
    seen = torch.cat([inp, pos], dim=1)  # [B, 2T]
    neg = torch.randint(1, n_items + 1, pos.shape, generator=gen)
    for _ in range(100):
        bad = (neg.unsqueeze(-1) == seen.unsqueeze(1)).any(-1)  # [B, T]
        if not bad.any():
            break
        neg[bad] = torch.randint(1, n_items + 1, (int(bad.sum()),), generator=gen)
    return neg


# ----------------------------------------------------------------------------- ranker


class SASRecRanker:
    name = "sasrec"

    def __init__(self, model: SASRec, train_info: dict | None = None, batch_size: int = 512):
        self.model = model.eval()
        self.train_info = train_info or {}
        self.batch_size = batch_size

    @property
    def config(self) -> SASRecConfig:
        return self.model.cfg

    @torch.no_grad()
    def scores(self, samples: Sequence[Sample]) -> np.ndarray:
        """[n, n_items] float32 scores from each sample's (last max_len) history; history not excluded."""
        self.model.eval()
        out = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            width = max(1, min(self.config.max_len, max(len(s.history) for s in chunk)))  # trim the padding
            seq = encode_histories([s.history for s in chunk], width)  # [b, width]
            out.append(self.model.score_all(seq).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.n_items), dtype=np.float32)

    def rank(self, samples: Sequence[Sample], topk: int) -> np.ndarray:
        return top_k(exclude_history(self.scores(samples), samples), topk)

    def info(self) -> dict:
        return {"config": asdict(self.config), "train": self.train_info}

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE))
        (d / CONFIG_FILE).write_text(json.dumps({"config": asdict(self.config), "train": self.train_info}, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "SASRecRanker":
        d = Path(directory)
        for f in (WEIGHTS_FILE, CONFIG_FILE):
            if not (d / f).is_file():
                raise ValueError(f"{d}: missing {f} (not a saved SASRec model)")
        meta = json.loads((d / CONFIG_FILE).read_text())
        model = SASRec(SASRecConfig(**meta["config"]))
        model.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
        return cls(model, meta.get("train", {}))


# ----------------------------------------------------------------------------- training


@dataclass
class SASRecTrainConfig:
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 300
    eval_every: int = 5  # epochs between validations
    patience: int = 5  # validations without improvement before stopping
    val_metric: str = "ndcg@10"  # or "recall@10", any recall@K / ndcg@K
    val_limit: int | None = None  # validate on a fixed seeded subset of this size (None: all)
    seed: int = 0
    progress: bool = True


def _val_score(model: SASRec, valid: Sequence[Sample], metric: str, batch_size: int = 1024) -> float:
    """Mean full-ranking ``metric`` of ``valid``; rank = number of non-history items scored above the target."""
    kind, k = metric.split("@")
    fn = {"ndcg": ndcg_at, "recall": recall_at}[kind]
    ranker = SASRecRanker(model, batch_size=batch_size)
    ranks = []
    for start in range(0, len(valid), batch_size):
        chunk = valid[start : start + batch_size]
        sc = exclude_history(ranker.scores(chunk).astype(np.float64), chunk)  # [b, n_items]
        tgt = sc[np.arange(len(chunk)), [s.target for s in chunk]]
        ranks.append((sc > tgt[:, None]).sum(axis=1))
    model.train()
    return float(fn(np.concatenate(ranks), int(k)).mean())


def train_sasrec(
    train_samples: Sequence[Sample],
    valid_samples: Sequence[Sample],
    n_items: int,
    model_cfg: SASRecConfig | None = None,
    train_cfg: SASRecTrainConfig | None = None,
) -> SASRecRanker:
    """Train with early stopping on validation; returns the best model. Seeded; global RNG untouched."""
    mcfg = model_cfg or SASRecConfig(n_items=n_items)
    tcfg = train_cfg or SASRecTrainConfig()
    if mcfg.n_items != n_items:
        raise ValueError(f"model config has n_items={mcfg.n_items}, dataset has {n_items}")
    if not valid_samples:
        raise ValueError("SASRec early stopping needs validation samples")
    valid = list(valid_samples)
    if tcfg.val_limit is not None and tcfg.val_limit < len(valid):
        pick = np.sort(np.random.default_rng(tcfg.seed).permutation(len(valid))[: tcfg.val_limit])
        valid = [valid[i] for i in pick]

    inp, pos = build_training_arrays(user_train_sequences(train_samples), mcfg.max_len)  # [U, T] each
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)  # init and dropout
        gen = torch.Generator().manual_seed(tcfg.seed)  # shuffling and negatives
        model = SASRec(mcfg)
        opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.98))
        best, best_epoch, best_state, bad, history = -1.0, 0, None, 0, []
        bar = tqdm(range(1, tcfg.max_epochs + 1), desc="sasrec", unit="epoch", disable=not tcfg.progress)
        for epoch in bar:
            model.train()
            perm = torch.randperm(inp.shape[0], generator=gen)
            total, count = 0.0, 0
            for start in range(0, inp.shape[0], tcfg.batch_size):
                b = perm[start : start + tcfg.batch_size]
                x, p = inp[b], pos[b]  # [B, max_len]
                width = int((p > 0).sum(1).max())
                x, p = x[:, -width:], p[:, -width:]  # [B, T]: drop the all-padding left columns
                n = sample_negatives(x, p, n_items, gen)  # [B, T]
                h = model(x)  # [B, T, H]
                mask = p > 0  # [B, T]
                lp, ln = model.item_logits(h, p)[mask], model.item_logits(h, n)[mask]  # [N]
                loss = F.binary_cross_entropy_with_logits(lp, torch.ones_like(lp)) + F.binary_cross_entropy_with_logits(
                    ln, torch.zeros_like(ln)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * int(mask.sum())
                count += int(mask.sum())
            if epoch % tcfg.eval_every == 0 or epoch == tcfg.max_epochs:
                score = _val_score(model, valid, tcfg.val_metric)
                history.append({"epoch": epoch, "loss": total / max(count, 1), tcfg.val_metric: score})
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}", **{tcfg.val_metric: f"{score:.4f}"})
                if score > best:
                    best, best_epoch, bad = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
                    if bad >= tcfg.patience:
                        break
        bar.close()
        model.load_state_dict(best_state)
    info = {
        **{k: v for k, v in asdict(tcfg).items() if k != "progress"},
        "best_epoch": best_epoch,
        "epochs_run": history[-1]["epoch"],
        f"best_valid_{tcfg.val_metric}": best,
        "n_valid": len(valid),
        "n_train_sequences": int(inp.shape[0]),
        "n_train_positions": int((pos > 0).sum()),
        "train_seconds": time.perf_counter() - t0,
        "history": history,
    }
    return SASRecRanker(model.eval(), info)


GRID_LRS = (1e-2, 1e-3, 1e-4)
GRID_BATCHES = (256, 512, 1024, 2048)


def train_sasrec_grid(
    train_samples: Sequence[Sample],
    valid_samples: Sequence[Sample],
    n_items: int,
    model_cfg: SASRecConfig | None = None,
    train_cfg: SASRecTrainConfig | None = None,
    lrs: Sequence[float] = GRID_LRS,
    batch_sizes: Sequence[int] = GRID_BATCHES,
) -> SASRecRanker:
    """The paper's lr x batch grid; keeps the run with the best validation score."""
    base = train_cfg or SASRecTrainConfig()
    best, runs = None, []
    for lr in lrs:
        for bs in batch_sizes:
            cfg = SASRecTrainConfig(**{**asdict(base), "lr": lr, "batch_size": bs})
            r = train_sasrec(train_samples, valid_samples, n_items, model_cfg, cfg)
            score = r.train_info[f"best_valid_{base.val_metric}"]
            runs.append({"lr": lr, "batch_size": bs, "score": score, "best_epoch": r.train_info["best_epoch"],
                         "train_seconds": r.train_info["train_seconds"]})
            if best is None or score > best.train_info[f"best_valid_{base.val_metric}"]:
                best = r
    best.train_info["grid"] = runs
    return best


# ----------------------------------------------------------------------------- registry factory

_MODEL_KEYS = {"max_len", "hidden", "n_blocks", "n_heads", "dropout"}
_TRAIN_KEYS = {f for f in SASRecTrainConfig.__dataclass_fields__} - {"progress"}
_OTHER_KEYS = {"grid", "retrain", "lrs", "batch_sizes"}


def _fingerprint(train_samples: Sequence[Sample], valid_samples: Sequence[Sample], n_items: int, opts: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"n_items": n_items, "opts": opts}, sort_keys=True).encode())
    for split in (train_samples, valid_samples):
        h.update(np.array([s.target for s in split], dtype=np.int64).tobytes())
        h.update(np.array([s.timestamp for s in split], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def build_sasrec(ctx) -> SASRecRanker:
    """Registry factory: load the model saved in ``ctx.artefact_dir`` if it was trained on the same data
    with the same options, else train (single setting, or the grid with ``options["grid"]``) and save.

    Options: model (max_len, hidden, n_blocks, n_heads, dropout), training (lr, batch_size, max_epochs,
    eval_every, patience, val_metric, val_limit, seed), grid (bool), lrs / batch_sizes (grid values),
    retrain (bool).
    """
    opts = dict(ctx.options)
    unknown = set(opts) - _MODEL_KEYS - _TRAIN_KEYS - _OTHER_KEYS
    if unknown:
        raise ValueError(f"unknown sasrec option(s) {sorted(unknown)}; known: {sorted(_MODEL_KEYS | _TRAIN_KEYS | _OTHER_KEYS)}")
    ds = ctx.dataset
    n_items = len(ds.catalogue)
    train, valid = ds.split("train"), ds.split("valid")
    opts.setdefault("seed", ctx.seed)
    mcfg = SASRecConfig(n_items=n_items, **{k: opts[k] for k in _MODEL_KEYS if k in opts})
    tcfg = SASRecTrainConfig(progress=ctx.progress, **{k: opts[k] for k in _TRAIN_KEYS if k in opts})
    fp_opts = {k: v for k, v in opts.items() if k != "retrain"}
    fp = _fingerprint(train, valid, n_items, {"model": asdict(mcfg), "train": fp_opts})
    art = ctx.artefact_dir
    if art is not None and not opts.get("retrain") and (Path(art) / CONFIG_FILE).is_file():
        ranker = SASRecRanker.load(art)
        if ranker.train_info.get("fingerprint") == fp:
            ranker.train_info["loaded_from"] = str(art)
            return ranker
    if opts.get("grid"):
        ranker = train_sasrec_grid(
            train, valid, n_items, mcfg, tcfg,
            lrs=opts.get("lrs", GRID_LRS), batch_sizes=opts.get("batch_sizes", GRID_BATCHES),
        )
    else:
        ranker = train_sasrec(train, valid, n_items, mcfg, tcfg)
    ranker.train_info["fingerprint"] = fp
    if art is not None:
        ranker.save(art)
    return ranker
