"""Memory elements of windows: from the model (window elements) or from a table of every catalogue
item encoded once at start-up (item elements: the element of a window is its last item's, so appends
store their events' vectors without a model call).

The worker's encode calls run ``encode`` on the model thread; ``item_vectors`` reads the warmed
table from any thread (it never changes once built).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from model.pipeline import Pipeline

log = logging.getLogger(__name__)


class MemoryElements:
    def __init__(self, pipeline: Pipeline, batch_size: int = 16, memory_dir: Path | None = None):
        self.pipeline, self.batch_size = pipeline, batch_size
        self.encoder = pipeline.memory_encoder(batch_size=batch_size)  # memoizes item elements in memory
        if memory_dir is not None and pipeline.element == "item":
            try:  # item vectors depend on the title only: keep them on disk across restarts
                self.encoder = pipeline.cached_memory_encoder(memory_dir)
            except (OSError, ValueError) as e:
                log.warning("item vectors are not cached on disk (%s): %s", memory_dir, e)
        self.table: np.ndarray | None = None  # [n_items, H] float16 item elements (``warm``)

    @property
    def hidden_size(self) -> int:
        return self.pipeline.lm.hidden_size

    def encode(self, windows: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[n, H] float32: the element of each window (item indices, oldest first). A model call,
        except for item elements once warmed."""
        if self.pipeline.element == "window":
            vecs = self.encoder.encode_windows(list(windows))  # [n, H]
        elif self.table is not None:  # warmed item elements: the window's last item, as stored
            return self.table[[w[-1] for w in windows]].astype(np.float32)
        else:  # item elements: the window's last item alone, each title encoded once (cache)
            vecs = self.encoder.encode([(w[-1],) for w in windows])
        return vecs.float().numpy()

    def warm(self) -> int:
        """Item elements: encode every catalogue title now (start-up, before the worker takes calls)
        so that no request waits for its memory vectors, and keep them as ``table`` (float16, as the
        store keeps them). The encoder with its cache is let go, so the vectors are held once.
        Returns how many were encoded (0: all cached, already warm, or window elements)."""
        if self.pipeline.element != "item" or self.table is not None:
            return 0
        keys = [(i,) for i in range(len(self.pipeline.titles))]
        todo = len(self.encoder.cache.missing(keys))
        t0 = time.perf_counter()
        try:
            vecs = self.encoder.encode(keys)
        except OSError as e:  # a read-only artefact folder: keep them in memory instead
            log.warning("cannot write the item vector cache (%s); keeping it in memory", e)
            self.encoder = self.pipeline.memory_encoder(batch_size=self.batch_size)
            vecs = self.encoder.encode(keys)
        self.table = vecs.float().numpy().astype(np.float16)  # what ``encode`` gives, rounded as stored
        self.table.flags.writeable = False  # read from the event loop's thread: never changes
        self.encoder = None  # the table serves every item element from now on: the vectors are held once
        log.info("item memory vectors: %d encoded, %d cached, %.1f s", todo, len(keys) - todo, time.perf_counter() - t0)
        return todo

    def item_vectors(self, items: Sequence[int]) -> np.ndarray | None:
        """[n, H] float16 elements of these catalogue items without a model call (item elements once
        warmed); None when elements depend on the window."""
        return None if self.table is None else self.table[list(items)]
