"""Loading the trained pieces from an artefact directory (shared by the evaluator and the service).

Layout of ``ARTEFACTS/`` (one per dataset and cut L)::

    generator/   upper.safetensors + upper.json   tuned layers L+1..N (``automr train generator``)
    index/       catalogue title embeddings (base model) + index.json     (built on first use)
    memory/      MemoryCache shards of encoded elements and queries       (built on demand)
    labels/      Eq. 5 labels                                             (``automr train retriever``)
    retriever/   retriever.safetensors + retriever.json                   (``automr train retriever``)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from model.assets import asset_paths
from model.grounding import CatalogueIndex, StaleIndexError
from model.checkpoint import fingerprint, load_upper
from model.llm import SplitLM

log = logging.getLogger(__name__)

_LM_CACHE: dict[tuple, SplitLM] = {}


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (``automr assets fetch``)."""
    path = asset_paths().gguf_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `automr assets fetch` first (or set AUTOMR_MODEL_PATH)")
    return path


def load_lm(model_path: str | Path | None = None, cut: int = 20, dtype: str = "auto",
            generator_dir: str | Path | None = None) -> SplitLM:
    """The generator: base model (HF dir or GGUF) + tuned upper layers when ``generator_dir`` holds them.

    Cached per process, so several evaluation methods share one model.
    """
    path = Path(model_path) if model_path else default_model_path()
    gen = Path(generator_dir) if generator_dir else None
    has_upper = gen is not None and (gen / "upper.safetensors").is_file()
    key = (str(path), cut, dtype, str(gen) if has_upper else None)
    if key not in _LM_CACHE:
        lm = SplitLM.load(path, cut=cut, dtype=dtype)
        lm.snapshot_base_upper()  # grounding embeds with the base model, also after tuning
        if has_upper:
            load_upper(lm, gen)
            log.info("loaded tuned upper layers from %s", gen)
        elif gen is not None:
            log.warning("no tuned generator in %s: using the base model's upper layers", gen)
        _LM_CACHE[key] = lm
    return _LM_CACHE[key]


def index_fingerprint(lm: SplitLM) -> str:
    """The grounding embedder: the base model's final layer (lower fingerprint + 'base-final')."""
    return f"{fingerprint(lm)}|base-final-last-token"


def load_or_build_index(lm: SplitLM, titles: Sequence[str], directory: str | Path, progress: bool = True) -> CatalogueIndex:
    """The catalogue's FAISS index: loaded when it matches the model and titles, else (re)built and saved."""
    directory = Path(directory)
    fp = index_fingerprint(lm)
    try:
        return CatalogueIndex.load(directory, fingerprint=fp, titles=titles)
    except FileNotFoundError:
        pass
    except StaleIndexError as e:
        log.warning("%s; rebuilding", e)
    embed = lambda texts: lm.embed_final(list(texts), base=True).numpy()  # noqa: E731
    index = CatalogueIndex.build(titles, embed, fingerprint=fp, batch_size=64, progress=progress)
    index.save(directory)
    return index


POPULARITY_FILE = "popularity.json"


def save_popularity(directory: str | Path, counts, rule: str = "targets") -> Path:
    """ARTEFACTS/popularity.json: the training period's interaction count of every catalogue item (the
    popularity prior of the beam search, ``RecommenderConfig.popularity_gamma``)."""
    import json

    path = Path(directory) / POPULARITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rule": rule, "counts": [int(c) for c in counts]}))
    return path


def load_popularity(directory: str | Path, n_items: int):
    """The counts of ``save_popularity`` as an int64 array, or None when the file is absent."""
    import json

    import numpy as np

    path = Path(directory) / POPULARITY_FILE
    if not path.is_file():
        return None
    counts = np.asarray(json.loads(path.read_text())["counts"], dtype=np.int64)
    if counts.shape != (n_items,):
        raise ValueError(f"{path}: {counts.shape[0]} counts for a catalogue of {n_items} items")
    return counts
