"""The AutoMR offline stages: generator tuning, then Eq. 5 labels and the Eq. 6 retriever.

Both read and write the artefact folder (layout in ``model/artefacts.py``) so that a rerun resumes:
labels are written in chunks (``ARTEFACTS/labels/<element>/<split>``), memory elements are cached
(``ARTEFACTS/memory``), and the retriever lands in ``ARTEFACTS/retriever``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import save_upper
from model.pipeline import Pipeline, load_pipeline
from model.train.labels import LabelSet, annotate
from model.train.retriever import RetrieverTrainConfig, train_retriever

log = logging.getLogger(__name__)


@dataclass
class LabelBudget:
    train: int = 256  # labelled train samples (seeded subset)
    valid: int = 64  # labelled valid samples (early stopping proxy)
    per_user: int | None = 8  # runs of consecutive samples per user: they share memory elements
    seed: int = 0


def tune_generator_stage(lm, ds, artefacts: Path, *, recipe: str = "packed", mode: str = "full",
                         batch_size: int = 8, **config) -> dict:
    """Tune ``lm``'s upper layers on ``ds`` and save ARTEFACTS/generator (with the prompt template it was
    tuned on) and ARTEFACTS/popularity.json (the beams' prior); returns the training report.
    ``config``: other ``GeneratorTrainConfig`` fields (n_train, epochs, lr, ...). The recipe fixes the
    template ("packed": list, "sliding": BIGRec's Alpaca), the micro-batch and, for full tuning of a
    bfloat16 model in packed rows, float32 master weights."""
    import torch

    from model.artefacts import save_popularity
    from model.baselines.popularity import popularity_counts
    from model.train.generator import GeneratorTrainConfig, train_generator

    packed = recipe == "packed"
    cfg = GeneratorTrainConfig(recipe=recipe, mode=mode, batch_size=batch_size,
                               template="list" if packed else "alpaca",
                               micro_batch_size=min(4 if packed else 8, batch_size),
                               master_weights=packed and mode == "full" and lm.dtype == torch.bfloat16,
                               out_dir=str(artefacts / "generator-run"), **config)
    report = train_generator(lm, ds, cfg).to_json()
    save_popularity(artefacts, popularity_counts(ds.split("train"), len(ds.catalogue)))
    save_upper(lm, artefacts / "generator", extra={"train_report": report, "dataset": ds.name,
                                                  "template": cfg.template})
    return report


def open_pipeline(ds, artefacts: Path, *, model=None, cut: int = 20, dtype: str = "auto",
                  element: str = "window", progress: bool = True) -> Pipeline:
    """The tuned generator (ARTEFACTS/generator when present) and index, with no retriever."""
    return load_pipeline(ds.catalogue.titles, artefacts, domain=ds.domain, k_short=ds.k_short, model=model,
                         cut=cut, dtype=dtype, need_retriever=False, element=element, progress=progress)


def label_split(pipe: Pipeline, ds, artefacts: Path, split: str, budget: int, per_user: int | None,
                seed: int, progress: bool = True) -> LabelSet:
    """Eq. 5 labels of a seeded subset of ``split`` (resumable chunks on disk)."""
    encoder = pipe.cached_memory_encoder(artefacts / "memory", progress=progress)
    out = artefacts / "labels" / pipe.element / split
    return annotate(encoder, ds.split(split), out, budget=budget, seed=seed, per_user=per_user, progress=progress)


def train_retriever_stage(pipe: Pipeline, ds, artefacts: Path, budget: LabelBudget,
                          cfg: RetrieverTrainConfig, progress: bool = True) -> dict:
    """Labels for train and valid, then the retriever; saves ARTEFACTS/retriever and returns the report."""
    train = label_split(pipe, ds, artefacts, "train", budget.train, budget.per_user, budget.seed, progress)
    valid = label_split(pipe, ds, artefacts, "valid", budget.valid, budget.per_user, budget.seed + 1, progress)
    retriever, report = train_retriever(train, valid, cfg)
    out = artefacts / "retriever"
    retriever.save(out)
    report["element"] = pipe.element
    report["cut"] = pipe.lm.cut
    (out / "train_report.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("retriever saved to %s", out)
    return report
