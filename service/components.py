"""What the service loads once at start-up: the model pipeline, the catalogue, the popularity
fallback and the dataset's histories for seeding the store.

``load_components(settings)`` reads them from the prepared dataset (``AUTOMR_DATA_DIR``) and the
artefact folder (``AUTOMR_ARTEFACTS_DIR``) written by the offline commands. Tests build
``Components`` by hand (``Components.from_dataset`` with a tiny pipeline) and inject them into
``create_app``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from memory_store import Event
from model.data.types import Catalogue
from model.pipeline import Pipeline, load_pipeline
from service.settings import Settings

log = logging.getLogger(__name__)

Histories = Callable[[], Iterable[tuple[str, list[Event]]]]


@dataclass
class Components:
    pipeline: Pipeline
    catalogue: Catalogue
    popularity: np.ndarray  # [n_items] train-split counts (the popularity baseline's rule)
    dataset_name: str
    dataset_id: str  # identity of the prepared dataset: names the store's "seeded" marker
    histories: Histories | None = None  # every user's interactions, for seeding (None: nothing to seed)
    model_version: str = ""
    _pop_order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.catalogue)
        if list(self.pipeline.titles) != list(self.catalogue.titles):
            raise ValueError("the pipeline's titles are not the catalogue's (another dataset?)")
        self.popularity = np.asarray(self.popularity, dtype=np.float64)
        if self.popularity.shape != (n,):
            raise ValueError(f"popularity has shape {self.popularity.shape}, the catalogue {n} items")
        # most popular first, ties by the lower item index (as the popularity baseline ranks)
        self._pop_order = np.lexsort((np.arange(n), -self.popularity))
        if not self.model_version:
            self.model_version = self.pipeline.version()

    def most_popular(self, k: int, exclude: set[int] = frozenset()) -> list[int]:
        out = []
        for i in self._pop_order:
            if int(i) not in exclude:
                out.append(int(i))
                if len(out) == k:
                    break
        return out

    @classmethod
    def from_dataset(cls, ds, pipeline: Pipeline, model_version: str = "") -> "Components":
        """From a ``PreparedDataset``: popularity over its train split, histories from interactions.csv."""
        from model.baselines.popularity import popularity_counts

        counts = popularity_counts(ds.split("train"), len(ds.catalogue))
        return cls(pipeline=pipeline, catalogue=ds.catalogue, popularity=counts, dataset_name=ds.name,
                   dataset_id=dataset_id(ds), histories=lambda: dataset_histories(ds), model_version=model_version)


def dataset_id(ds) -> str:
    """A digest of dataset.json + stats.json: changes when the dataset is prepared differently."""
    blob = json.dumps({"config": ds.config, "stats": ds.stats}, sort_keys=True, default=str)
    return f"{ds.name}-{hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()}"


def dataset_histories(ds) -> Iterator[tuple[str, list[Event]]]:
    """Each user's interactions as events (ids derived from (timestamp, item): ``Event.from_interaction``),
    users in order of first appearance. The store keeps the newest 100 per user."""
    inter = ds.interactions
    ids = ds.catalogue.item_ids
    users = inter.user.astype(str)
    order = np.argsort(users, kind="stable")  # rows of one user together, their order kept
    users, items, ts = users[order], inter.item[order], inter.timestamp[order]
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(users)]):
        if hi > lo:
            yield str(users[lo]), [Event.from_interaction(ids[int(i)], int(t)) for i, t in zip(items[lo:hi], ts[lo:hi])]


def load_components(settings: Settings, progress: bool = False) -> Components:
    """Load everything from the prepared dataset and the artefact folder named by the settings."""
    from model.data.prepared import PreparedDataset

    ds = PreparedDataset.load(settings.resolved_data_dir())
    # K: the dataset's (what the retriever was trained with) unless AUTOMR_K_SHORT is set explicitly
    k_short = settings.k_short if "k_short" in settings.model_fields_set else ds.k_short
    if k_short != ds.k_short:
        log.warning("AUTOMR_K_SHORT=%d differs from the dataset's k_short=%d", k_short, ds.k_short)
    artefacts = settings.resolved_artefacts_dir()
    pipeline = load_pipeline(
        ds.catalogue.titles, artefacts, domain=ds.domain, k_short=k_short, model=settings.model_path,
        cut=settings.cut_layer, dtype=settings.dtype, generator_dir=settings.generator_dir,
        retriever_dir=settings.retriever_dir,
        need_retriever=True if settings.slot_policy == "learned" else None,
        element=settings.memory_element, progress=progress,
    )
    return Components.from_dataset(ds, pipeline)
