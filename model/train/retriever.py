"""Retriever training (AutoMR Eq. 6): minimise KL(s' ‖ s), s' = softmax(δ/τ), s = softmax(scores).

Adam, the paper's grid lr ∈ {1e-2, 1e-3, 1e-4} × batch ∈ {256, 512, 1024, 2048} (``grid=True``; one
setting by default), early stopping with patience 10.

Validation. The paper stops on the downstream recommender's validation Recall@1, which needs a
generation pass over the validation set per epoch. Per epoch we use a cheap proxy on the validation
*labels* instead (``proxy``):

- ``mean_delta`` (default): mean δ of the element the retriever selects — the gain in the target's
  log-likelihood that retrieval brings, i.e. what Recall@1 rewards, in expectation;
- ``hit_best``: share of samples whose selected element is the one with the largest δ;
- ``neg_kl``: −KL(s' ‖ s) on validation (depends on τ, so not comparable across τ values).

The final choice among grid settings is ``select_by(retriever) -> float`` (higher is better), which
the caller can set to the real downstream validation Recall@1; without it, the best proxy value.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from model.retriever import Retriever, RetrieverConfig
from model.train.labels import LabelSet

PROXIES = ("mean_delta", "hit_best", "neg_kl")


@dataclass
class RetrieverTrainConfig:
    lr: float = 1e-3
    batch_size: int = 256
    tau: float = 1.0  # label temperature: s' = softmax(δ / τ)
    max_epochs: int = 100
    patience: int = 10  # epochs without a better validation proxy before stopping
    proxy: str = "mean_delta"  # see module docstring
    grid: bool = False  # search lrs × batch_sizes × taus
    lrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    batch_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    taus: tuple[float, ...] | None = None  # τ values searched with grid=True; None = (tau,)
    micro_batch: int = 256  # samples per forward (gradients are accumulated to batch_size)
    mlp_hidden: int = 256
    activation: str = "relu"
    normalize: bool = True  # fit the retriever's standardisation statistics on the training set
    seed: int = 0
    progress: bool = True

    def settings(self) -> list[tuple[float, int, float]]:
        """The (lr, batch_size, tau) settings to train."""
        if not self.grid:
            return [(self.lr, self.batch_size, self.tau)]
        taus = self.taus if self.taus is not None else (self.tau,)
        return list(itertools.product(self.lrs, self.batch_sizes, taus))


# ---- loss and metrics ---------------------------------------------------------------------------
def label_distribution(delta: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """s' = softmax(δ/τ) over the real elements [b, M] (0 at padding)."""
    logits = (delta / tau).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).masked_fill(~mask, 0.0)


def kl_loss(log_s: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample KL(s' ‖ s) [b] with s' = softmax(δ/τ), log_s = log_softmax(scores) (−inf at padding)."""
    target = label_distribution(delta, mask, tau)  # [b, M]
    log_t = torch.log(target.clamp_min(1e-30))
    keep = mask & (target > 0)
    terms = torch.where(keep, target * (log_t - log_s.masked_fill(~mask, 0.0)), torch.zeros_like(target))
    return terms.sum(-1)


@torch.no_grad()
def evaluate(retriever: Retriever, labels: LabelSet, tau: float = 1.0, micro_batch: int = 512) -> dict[str, float]:
    """Validation metrics of a retriever on annotated samples (those with ≥1 element).

    mean_delta: mean δ of the selected element; hit_best: share where it has the maximal δ;
    gain_share: share where δ_selected > 0; kl: mean KL(s' ‖ s); neg_kl = −kl.
    """
    retriever.eval()
    rows = torch.nonzero(labels.counts() > 0).flatten()
    tot = {"mean_delta": 0.0, "hit_best": 0.0, "gain_share": 0.0, "kl": 0.0}
    for mb in rows.split(micro_batch):
        z, mem, mask, d = labels.padded(mb)
        log_s = retriever(z, mem, mask)  # [b, M]
        sel = log_s.argmax(-1)  # [b]
        d_sel = d.gather(1, sel[:, None]).squeeze(1)  # [b]
        d_max = d.masked_fill(~mask, float("-inf")).max(-1).values
        tot["mean_delta"] += float(d_sel.sum())
        tot["hit_best"] += float((d_sel >= d_max).float().sum())
        tot["gain_share"] += float((d_sel > 0).float().sum())
        tot["kl"] += float(kl_loss(log_s, d, mask, tau).sum())
    n = max(len(rows), 1)
    out = {k: v / n for k, v in tot.items()}
    out["neg_kl"] = -out["kl"]
    return out


@torch.no_grad()
def reference_metrics(labels: LabelSet) -> dict[str, float]:
    """What random and oracle selection score on the same labels (to read the proxies against)."""
    rows = torch.nonzero(labels.counts() > 0).flatten()
    rnd = orc = rnd_hit = 0.0
    for i in rows.tolist():
        d = labels.sample_deltas(i).float()
        rnd += float(d.mean())
        orc += float(d.max())
        rnd_hit += float((d >= d.max()).float().mean())
    n = max(len(rows), 1)
    return {"random_mean_delta": rnd / n, "oracle_mean_delta": orc / n, "random_hit_best": rnd_hit / n, "samples": len(rows)}


# ---- training -----------------------------------------------------------------------------------
def _fit_one(
    train: LabelSet, valid: LabelSet, cfg: RetrieverTrainConfig, lr: float, batch_size: int, tau: float
) -> tuple[Retriever, dict]:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = Retriever(RetrieverConfig(train.hidden_size, mlp_hidden=cfg.mlp_hidden, activation=cfg.activation))
    if cfg.normalize:
        used = torch.unique(train.element_index)
        g = torch.Generator().manual_seed(cfg.seed)
        q_rows = torch.randperm(len(train), generator=g)[:100_000]
        e_rows = used[torch.randperm(len(used), generator=g)[:100_000]]
        model.fit_normalization(train.query[q_rows].float(), train.elements[e_rows].float())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows_all = torch.nonzero(train.counts() > 0).flatten()
    if len(rows_all) == 0:
        raise ValueError("the training label set has no sample with a memory element")

    best_val, best_state, best_epoch, bad = -math.inf, copy.deepcopy(model.state_dict()), -1, 0
    history = []
    bar = tqdm(range(cfg.max_epochs), desc=f"retriever lr={lr:g} bs={batch_size} tau={tau:g}", disable=not cfg.progress)
    for epoch in bar:
        model.train()
        perm = rows_all[torch.randperm(len(rows_all), generator=gen)]
        loss_sum = 0.0
        for b in range(0, len(perm), batch_size):
            rows = perm[b : b + batch_size]
            opt.zero_grad(set_to_none=True)
            for mb in rows.split(cfg.micro_batch):
                z, mem, mask, d = train.padded(mb)
                kl = kl_loss(model(z, mem, mask), d, mask, tau)  # [b]
                (kl.sum() / len(rows)).backward()
                loss_sum += float(kl.detach().sum())
            opt.step()
        metrics = evaluate(model, valid, tau, cfg.micro_batch)
        rec = {"epoch": epoch, "train_kl": loss_sum / len(rows_all), **metrics}
        history.append(rec)
        val = metrics[cfg.proxy]
        if val > best_val:
            best_val, best_state, best_epoch, bad = val, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            bad += 1
        bar.set_postfix(train_kl=f"{rec['train_kl']:.4f}", **{cfg.proxy: f"{val:.4f}"}, best=best_epoch)
        if bad >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"lr": lr, "batch_size": batch_size, "tau": tau, "best_epoch": best_epoch,
                   "epochs": len(history), "best_proxy": best_val, "history": history}


def train_retriever(
    train_set: LabelSet,
    valid_set: LabelSet,
    cfg: RetrieverTrainConfig | None = None,
    select_by: Callable[[Retriever], float] | None = None,
) -> tuple[Retriever, dict]:
    """Train one retriever per setting; return the best by ``select_by`` (default: the proxy) and a report.

    The report is JSON-serialisable: ``runs`` (one per setting, with per-epoch history),
    ``chosen`` (index into runs), ``reference`` (random/oracle values of the proxies on valid).
    """
    cfg = cfg or RetrieverTrainConfig()
    if cfg.proxy not in PROXIES:
        raise ValueError(f"unknown proxy {cfg.proxy!r}; use one of {PROXIES}")
    if train_set.hidden_size != valid_set.hidden_size:
        raise ValueError(f"train (H={train_set.hidden_size}) and valid (H={valid_set.hidden_size}) label sets differ in hidden size")
    if int((valid_set.counts() > 0).sum()) == 0:
        raise ValueError("the validation label set has no sample with a memory element")
    runs, best, best_score = [], None, -math.inf
    for lr, bs, tau in cfg.settings():
        model, run = _fit_one(train_set, valid_set, cfg, lr, bs, tau)
        run["select_score"] = float(select_by(model)) if select_by is not None else run["best_proxy"]
        runs.append(run)
        if run["select_score"] > best_score:
            best, best_score, chosen = model, run["select_score"], len(runs) - 1
    report = {
        "config": asdict(cfg),
        "select_by": "callback" if select_by is not None else cfg.proxy,
        "runs": runs,
        "chosen": chosen,
        "reference": reference_metrics(valid_set),
        "train_samples": int((train_set.counts() > 0).sum()),
        "valid_samples": int((valid_set.counts() > 0).sum()),
    }
    return best, report
