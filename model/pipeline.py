"""The wiring of the LLM recommender: which pieces, from where, put together how.

The evaluator's LLM methods (``model/eval/llm_methods.py``) and the online service (``service/``) need
the same pieces: the generator (base model + tuned upper layers), its prompt builder, the catalogue's
grounding index and, for AutoMR, the retriever. ``load_pipeline`` loads them from an artefact folder
(layout in ``model/artefacts.py``); ``Pipeline.recommender`` builds a ``Recommender`` for one slot
policy over the shared pieces (several recommenders can share one model); ``Pipeline.memory_encoder``
builds the matching ``MemoryEncoder``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from model.artefacts import load_lm, load_or_build_index, load_popularity
from model.generation.draft import NgramDrafter
from model.grounding import CatalogueIndex, titles_hash
from model.grounding_memo import GroundingMemo
from model.checkpoint import fingerprint
from model.llm import SplitLM
from model.memory import ELEMENT_KINDS, MemoryCache, MemoryEncoder
from model.prompts import PromptBuilder
from model.recommend import Recommender, RecommenderConfig
from model.retriever import CONFIG_NAME as RETRIEVER_CONFIG
from model.retriever import WEIGHTS_NAME as RETRIEVER_WEIGHTS
from model.retriever import Retriever


@dataclass
class Pipeline:
    """The loaded pieces every LLM method shares (one model in memory)."""

    lm: SplitLM
    builder: PromptBuilder
    titles: list[str]
    index: CatalogueIndex
    retriever: Retriever | None  # None: no trained retriever (the 'learned' policy is unavailable)
    k_short: int  # K: titles in the short-term prompt, and the window length of a memory element
    element: str = "window"  # memory element kind: window | item
    generator_dir: Path | None = None  # where the tuned upper layers came from (None: base model)
    retriever_dir: Path | None = None
    # sizes of the shared pieces built on first use (set them before): the draft table's pool of recent
    # answers' contexts (NgramDrafter.max_recent) and the grounding memo's recent answers
    draft_learn: int = 50_000
    ground_memo_recent: int = 10_000
    popularity: "np.ndarray | None" = None  # training-period counts per item (ARTEFACTS/popularity.json)
    _drafter: NgramDrafter | None = field(default=None, init=False, repr=False)
    _ground_memo: GroundingMemo | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.element not in ELEMENT_KINDS:
            raise ValueError(f"unknown memory element kind {self.element!r}; use one of {ELEMENT_KINDS}")
        if self.k_short < 1:
            raise ValueError(f"k_short must be >= 1, got {self.k_short}")
        if self.index.n_items != len(self.titles):
            raise ValueError(f"the index holds {self.index.n_items} items, the catalogue {len(self.titles)}")

    @property
    def n_slots(self) -> int:
        return self.builder.n_slots

    @property
    def drafter(self) -> NgramDrafter:
        """The catalogue's draft table for speculative steps (model/generation/draft.py), built once and shared
        by every recommender of this pipeline."""
        if self._drafter is None:
            self._drafter = NgramDrafter.from_prompt_builder(self.titles, self.builder, max_recent=self.draft_learn)
        return self._drafter

    @property
    def ground_memo(self) -> GroundingMemo:
        """Grounding embeddings by text (catalogue titles + recent answers; model/grounding_memo.py),
        shared by every recommender of this pipeline: they ground with the same base model."""
        if self._ground_memo is None:
            self._ground_memo = GroundingMemo(self.titles, self.index, max_recent=self.ground_memo_recent)
        return self._ground_memo

    @property
    def ground_memo_built(self) -> GroundingMemo | None:
        """The grounding memo if a recommender has built it, else None (metrics read it without
        building one)."""
        return self._ground_memo

    def recommender(self, policy: str = "none", full_history: bool = False, **config) -> Recommender:
        """A ``Recommender`` over the shared pieces. ``config``: other ``RecommenderConfig`` fields
        (max_new_tokens, num_beams, batch_size, topk, draft_tokens...)."""
        cfg = RecommenderConfig(policy=policy, full_history=full_history, n_slots=self.n_slots, **config)
        return Recommender(self.lm, self.builder, self.titles, self.index,
                           self.retriever if policy == "learned" else None, cfg,
                           drafter=self.drafter if cfg.draft_tokens else None,
                           ground_memo=self.ground_memo if cfg.ground_memo else None, popularity=self.popularity)

    def memory_encoder(self, cache: MemoryCache | None = None, query_cache: MemoryCache | None = None,
                       progress: bool = False, batch_size: int = 16) -> MemoryEncoder:
        return MemoryEncoder(self.lm, self.builder, self.titles, element=self.element, k_short=self.k_short,
                             cache=cache, query_cache=query_cache, progress=progress, batch_size=batch_size)

    def cached_memory_encoder(self, directory: str | Path, progress: bool = False) -> MemoryEncoder:
        """A ``MemoryEncoder`` whose elements (and window queries) live in disk caches under
        ``directory`` (``ARTEFACTS/memory``), keyed by the encoder's fingerprint."""
        enc = self.memory_encoder()
        cache = MemoryCache(directory, enc.cache_fingerprint(self.element), self.element)
        qcache = cache if self.element == "window" else MemoryCache(directory, enc.cache_fingerprint("window"), "window")
        return self.memory_encoder(cache=cache, query_cache=qcache, progress=progress)

    def memory_fingerprint(self) -> str:
        """What a stored memory vector must be keyed by when its key is an *event* (not the tuple of
        its items, as in ``MemoryCache``): the encoder's fingerprint (lower layers, L, dtype, tokenizer,
        prompt template, element kind) + K (the window length) + the catalogue's titles (a window's
        prompt is made of them)."""
        enc = MemoryEncoder(self.lm, self.builder, self.titles, element=self.element, k_short=self.k_short)
        return f"{enc.cache_fingerprint()}|K={self.k_short}|titles:{titles_hash(self.titles)}"

    def version(self) -> str:
        """A short identifier of the model that answers: lower part, tuned upper layers, retriever."""
        gen = _file_digest(self.generator_dir / "upper.safetensors") if self.generator_dir else None
        ret = _file_digest(self.retriever_dir / RETRIEVER_WEIGHTS) if self.retriever_dir else None
        return (f"L{self.lm.cut}-lm:{fingerprint(self.lm)[:10]}-gen:{gen or 'base'}"
                f"-ret:{ret or 'none'}-{self.element}")


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.blake2b(digest_size=5)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def retriever_element(directory: str | Path) -> str | None:
    """The memory element kind a saved retriever was trained on (None when not recorded)."""
    report = Path(directory) / "train_report.json"
    if not report.is_file():
        return None
    return json.loads(report.read_text()).get("element")


def generator_template(directory: str | Path) -> str:
    """The prompt template a tuned generator was tuned on (``upper.json``); "alpaca" for the base model
    and for generators saved before the key existed."""
    try:
        extra = json.loads((Path(directory) / "upper.json").read_text()).get("extra", {})
    except (OSError, ValueError):
        return "alpaca"
    return extra.get("template") or extra.get("train_report", {}).get("config", {}).get("template") or "alpaca"


def has_retriever(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / RETRIEVER_CONFIG).is_file() and (d / RETRIEVER_WEIGHTS).is_file()


def load_pipeline(
    titles: Sequence[str],
    artefacts: str | Path,
    *,
    domain: str = "movie",
    k_short: int = 10,
    model: str | Path | None = None,
    cut: int = 20,
    dtype: str = "auto",
    generator_dir: str | Path | None = None,
    retriever_dir: str | Path | None = None,
    need_retriever: bool | None = None,
    element: str | None = None,
    n_slots: int = 1,
    progress: bool = True,
) -> Pipeline:
    """Load the pieces from ``artefacts`` (``generator/``, ``index/``, ``retriever/``; see
    ``model/artefacts.py``). ``need_retriever``: True = fail without one, False = do not load it,
    None = load it when present. ``element``: the memory element kind; None = the one the retriever
    was trained on (``retriever/train_report.json``), else ``window``; an explicit kind that differs
    from the retriever's is refused (its scores would compare vectors of another space)."""
    root = Path(artefacts)
    gen_dir = Path(generator_dir) if generator_dir is not None else root / "generator"
    ret_dir = Path(retriever_dir) if retriever_dir is not None else root / "retriever"
    lm = load_lm(model, cut=cut, dtype=dtype, generator_dir=gen_dir)
    builder = PromptBuilder.for_model(lm, domain=domain, n_slots=n_slots, template=generator_template(gen_dir))
    titles = list(titles)
    index = load_or_build_index(lm, titles, root / "index", progress=progress)
    retriever = None
    if need_retriever or (need_retriever is None and has_retriever(ret_dir)):
        retriever = Retriever.load(ret_dir)  # FileNotFoundError names what is missing
        if retriever.config.hidden_size != lm.hidden_size:
            raise ValueError(f"{ret_dir}: retriever for hidden size {retriever.config.hidden_size}, "
                             f"the model has {lm.hidden_size}")
        trained_on = retriever_element(ret_dir)
        if element is not None and trained_on is not None and element != trained_on:
            raise ValueError(f"{ret_dir}: the retriever was trained on {trained_on!r} memory elements, "
                             f"the pipeline asks for {element!r}")
        element = element or trained_on
    element = element or "window"
    return Pipeline(lm=lm, builder=builder, titles=titles, index=index, retriever=retriever, k_short=k_short,
                    popularity=load_popularity(root, len(titles)),
                    element=element, generator_dir=gen_dir if (gen_dir / "upper.safetensors").is_file() else None,
                    retriever_dir=ret_dir if retriever is not None else None)
