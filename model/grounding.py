"""BIGRec's grounding step: map generated text to catalogue items by L2 distance in embedding space.

Every catalogue title is embedded once (in production ``SplitLM.embed_final``: the base model's last
layer, last token of the bare title, as BIGRec does) and stored in a FAISS index. A generated answer is
cleaned to a bare title (``clean_generated``), embedded the same way, and the whole catalogue is ranked
by squared L2 distance to it.

Index kinds: ``flat`` (``IndexFlatL2``, exact, the default), ``ivf`` (``IndexIVFFlat``, nlist ~ sqrt(n))
and ``hnsw`` (``IndexHNSWFlat``) for catalogues past ~1M items; ``measure_recall`` reports an
approximate kind's recall against exact.

Ranking contract (``CatalogueIndex.rank``):
- FAISS only proposes candidates; their distances are recomputed exactly in float64, so the order
  does not depend on FAISS's float32 ``|q|^2 + |x|^2 - 2 q.x`` rounding, and exact ties (duplicate
  titles give identical embeddings) are broken by item index, ascending. If the top-k boundary could
  hide a tie (or a float32 mis-ordering) with an item FAISS did not return, the search is widened.
- Items in ``exclude[b]`` (the user's history) are removed and exactly ``topk`` other items come back
  whenever the catalogue has that many; rows are padded with -1 / inf only when it has not.
- Approximate kinds may return fewer candidates than asked (small nprobe, HNSW graph); such rows fall
  back to an exact numpy scan, so the ``topk`` guarantee holds for every kind.

Storage (``save``/``load``): ``embeddings.safetensors`` (``{"embeddings": [N, H] float32}``, the source
of truth) + ``index.json`` (kind, params, n_items, dim, the caller's embedder fingerprint, a hash of
the titles). ``flat`` is rebuilt from the embeddings on load (cheap). ``ivf``/``hnsw`` also write
``index.faiss`` with ``faiss.write_index`` (FAISS's own binary format, not pickle, so it executes
nothing on load): rebuilding them is slow at the sizes they are for and HNSW's multi-threaded build
is not deterministic, so a reload would not reproduce the same rankings.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

Embedder = Callable[[list[str]], Any]  # texts -> [n, H] float embeddings (np.ndarray or torch.Tensor)

INDEX_KINDS = ("flat", "ivf", "hnsw")
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
META_FILE = "index.json"
FAISS_FILE = "index.faiss"


class StaleIndexError(ValueError):
    """A saved index does not match the embedder or the catalogue it is loaded for."""


@dataclass
class IndexConfig:
    """Which FAISS index to build and its knobs (search-time knobs can be changed after loading)."""

    kind: str = "flat"  # "flat" | "ivf" | "hnsw"
    nlist: int | None = None  # ivf: number of cells; None -> round(sqrt(n_items))
    nprobe: int = 16  # ivf: cells visited per query
    hnsw_m: int = 32  # hnsw: graph degree
    ef_construction: int = 40  # hnsw: build-time beam
    ef_search: int = 64  # hnsw: search-time beam (FAISS uses max(ef_search, k))
    margin: int = 16  # extra candidates fetched beyond topk + |exclude| to see ties at the boundary

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {INDEX_KINDS}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"IndexConfig.nlist must be >= 1 or None, got {self.nlist}")
        if self.margin < 0:
            raise ValueError(f"IndexConfig.margin must be >= 0, got {self.margin}")


# ---------------------------------------------------------------------------------------------
# Generated text -> bare title
# ---------------------------------------------------------------------------------------------

_QUOTED = re.compile(r'"([^"\n]+)"')


def clean_generated(text: str) -> str:
    """Extract the title from a generated response (BIGRec's answer is ``"Title"`` + eos).

    Rules, on the first non-empty line:
    - it starts and ends with a double quote: strip exactly those outer quotes (BIGRec's
      ``.strip('"')``; keeps inner quotes, e.g. ``""Great Performances" Cats (1998)"``);
    - it starts with a quote but goes on after the closing one (``"Heat (1995)" and more``): the text
      up to the first closing quote; no closing quote (cut-off output): the rest of the line;
    - otherwise the first quoted span in the line (``I suggest "Heat (1995)".``), else the whole line.
    The result is whitespace-stripped; "" when the text holds nothing.
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return ""
    if line.startswith('"'):
        if len(line) >= 2 and line.endswith('"'):
            return line[1:-1].strip()
        end = line.find('"', 1)
        return (line[1:end] if end != -1 else line[1:]).strip()
    m = _QUOTED.search(line)
    return (m.group(1) if m else line).strip()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Embedder output (numpy array or torch tensor of any float dtype) -> float32 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def titles_hash(titles: Sequence[str]) -> str:
    """A short hash of the catalogue titles in index order (detects a stale index)."""
    h = hashlib.sha256()
    for t in titles:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def embed_texts(
    texts: Sequence[str], embed: Embedder, batch_size: int = 256, progress: bool = True, desc: str = "embed"
) -> np.ndarray:
    """Embed texts in batches -> [n, H] float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks: list[np.ndarray] = []
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress):
        batch = list(texts[s : s + batch_size])
        e = _to_numpy(embed(batch))
        if e.ndim != 2 or e.shape[0] != len(batch):
            raise ValueError(f"embedder returned shape {tuple(e.shape)} for {len(batch)} texts; expected [n, H]")
        chunks.append(e)
    if not chunks:
        raise ValueError("no texts to embed")
    return np.concatenate(chunks, axis=0)


def _exact_sq_l2(vecs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Squared L2 distances [m] of vecs [m, H] to q [H] in float64, bit-reproducible per row.

    The sum runs over axis 0 of a contiguous [H, m] array, i.e. one plain sequential accumulation
    per column: two identical rows always get the identical distance (a pairwise/SIMD reduction
    along the row could differ with the row's memory alignment).
    """
    diff = vecs.astype(np.float64) - q.astype(np.float64)[None, :]  # [m, H]
    sq = np.ascontiguousarray((diff * diff).T)  # [H, m]
    return sq.sum(axis=0)  # [m]


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


class CatalogueIndex:
    """The catalogue's title embeddings in a FAISS index; full-catalogue L2 ranking with exclusions."""

    def __init__(
        self,
        embeddings: np.ndarray,  # [N, H]
        config: IndexConfig | None = None,
        fingerprint: str = "",
        titles_sha: str = "",
    ) -> None:
        emb = _to_numpy(embeddings)
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, H] array, got shape {tuple(emb.shape)}")
        if not np.isfinite(emb).all():
            bad = int(np.nonzero(~np.isfinite(emb).all(axis=1))[0][0])
            raise ValueError(f"embeddings contain NaN/inf (first bad item index {bad})")
        self.config = config or IndexConfig()
        self.fingerprint = fingerprint
        self.titles_sha = titles_sha
        self.n_items, self.dim = emb.shape
        self.build_s = 0.0
        t0 = time.perf_counter()
        self.index = self._make_index(emb)
        self.build_s = time.perf_counter() - t0
        self._max_sq_norm = float((emb.astype(np.float64) ** 2).sum(axis=1).max())

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        titles: Sequence[str],
        embed: Embedder,
        config: IndexConfig | None = None,
        fingerprint: str = "",
        batch_size: int = 256,
        progress: bool = True,
    ) -> "CatalogueIndex":
        """Embed every title (batched) and index the embeddings; row i is item i."""
        emb = embed_texts(titles, embed, batch_size=batch_size, progress=progress, desc="embed catalogue")
        return cls(emb, config, fingerprint=fingerprint, titles_sha=titles_hash(titles))

    def _make_index(self, emb: np.ndarray) -> faiss.Index:
        c, n, d = self.config, self.n_items, self.dim
        if c.kind == "flat":
            index = faiss.IndexFlatL2(d)
            index.add(emb)
        elif c.kind == "ivf":
            nlist = min(n, c.nlist or max(1, round(math.sqrt(n))))
            self._quantizer = faiss.IndexFlatL2(d)  # keep a Python reference: the IVF index borrows it
            index = faiss.IndexIVFFlat(self._quantizer, d, nlist, faiss.METRIC_L2)
            index.cp.seed = 1234  # k-means seed, for reproducible builds
            index.train(emb)
            index.add(emb)
            index.make_direct_map()  # reconstruct_batch for exact rescoring
        else:  # hnsw
            index = faiss.IndexHNSWFlat(d, c.hnsw_m, faiss.METRIC_L2)
            index.hnsw.efConstruction = c.ef_construction
            index.add(emb)
        self._apply_search_params(index)
        return index

    def _apply_search_params(self, index: faiss.Index) -> None:
        if self.config.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        elif self.config.kind == "hnsw":
            index.hnsw.efSearch = self.config.ef_search

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the approximate kinds' search-time knobs (ignored by ``flat``)."""
        if nprobe is not None:
            self.config.nprobe = nprobe
        if ef_search is not None:
            self.config.ef_search = ef_search
        self._apply_search_params(self.index)

    def embeddings(self) -> np.ndarray:
        """All item embeddings [N, H] float32 (a copy out of the FAISS index)."""
        return self.index.reconstruct_n(0, self.n_items)

    def vectors(self, items: Sequence[int] | np.ndarray) -> np.ndarray:
        """The embeddings [n, H] float32 of ``items`` (a copy out of the FAISS index)."""
        return self.index.reconstruct_batch(np.asarray(items, dtype=np.int64))

    # -- ranking -------------------------------------------------------------------------------

    def rank(
        self,
        queries: Any,  # [B, H]
        exclude: Sequence[set[int] | Sequence[int]] | None = None,
        topk: int = 20,
        keep_excluded: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Full-catalogue ranking by squared L2 -> (items [B, topk] int64, distances [B, topk] float32).

        ``exclude[b]``: item indices to drop from row b (ignored when ``keep_excluded``). Best first;
        exact ties by ascending item index; padded with -1 / inf only when the catalogue has fewer than
        ``topk`` admissible items.
        """
        q = _to_numpy(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got shape {tuple(q.shape)}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not np.isfinite(q).all():
            bad = int(np.nonzero(~np.isfinite(q).all(axis=1))[0][0])
            raise ValueError(f"query {bad} contains NaN/inf")
        B, n = q.shape[0], self.n_items
        if exclude is not None and len(exclude) != B:
            raise ValueError(f"exclude has {len(exclude)} rows for {B} queries")
        if exclude is None or keep_excluded:
            excl = [np.empty(0, dtype=np.int64)] * B
        else:
            excl = [np.unique(np.fromiter((int(i) for i in e), dtype=np.int64)) for e in exclude]
            excl = [e[(e >= 0) & (e < n)] for e in excl]

        out_i = np.full((B, topk), -1, dtype=np.int64)
        out_d = np.full((B, topk), np.inf, dtype=np.float32)
        # Rows are grouped by how many candidates they need; a row whose boundary is unresolved moves
        # on to a doubled k. k == n is a full scan for flat; approximate kinds then fall back to numpy.
        k0 = min(n, topk + max((len(e) for e in excl), default=0) + self.config.margin)
        need = {b: k0 for b in range(B)}  # one FAISS call for the first pass
        while need:
            by_k: dict[int, list[int]] = {}
            for b, k in need.items():
                by_k.setdefault(k, []).append(b)
            need = {}
            for k, rows in by_k.items():
                D, I = self.index.search(q[rows], k)  # [r, k]
                for r, b in enumerate(rows):
                    ok = I[r] >= 0
                    res = self._resolve(q[b], I[r][ok], D[r][ok], excl[b], topk, k)
                    if res is None:
                        need[b] = min(n, 2 * k)
                        continue
                    ids, dist = res
                    out_i[b, : len(ids)] = ids
                    out_d[b, : len(ids)] = dist
        return out_i, out_d

    def _resolve(
        self, q: np.ndarray, cand: np.ndarray, cand_d32: np.ndarray, excl: np.ndarray, topk: int, k: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top-k among the candidates, or None when a wider search is needed."""
        n = self.n_items
        if k >= n and self.config.kind != "flat" and len(cand) < n:
            # an approximate index could not enumerate the catalogue: exact scan of this row
            cand = np.arange(n, dtype=np.int64)
            cand_d32 = None
        keep = cand[~np.isin(cand, excl)] if len(excl) else cand
        dist = _exact_sq_l2(self.vectors(keep), q) if len(keep) else np.empty(0)
        order = np.lexsort((keep, dist))  # by distance, then item index
        keep, dist = keep[order], dist[order]
        seen_all = len(cand) >= n
        if not seen_all:
            if len(keep) < topk:
                return None
            # Anything FAISS did not return has a float32 distance >= the worst returned one; with
            # float32 error of order eps * (|q|^2 + |x|^2), it could still tie or beat our k-th item.
            tol = 1e-4 * (float(q.astype(np.float64) @ q.astype(np.float64)) + self._max_sq_norm) + 1e-12
            if dist[topk - 1] >= float(cand_d32.max()) - tol:
                return None
        return keep[:topk], dist[:topk].astype(np.float32)

    def ground(
        self,
        generated: Sequence[str],
        embed: Embedder,
        exclude: Sequence[set[int] | Sequence[int]] | None = None,
        topk: int = 20,
        batch_size: int = 64,
    ) -> tuple[np.ndarray, np.ndarray]:
        """BIGRec grounding of raw generated responses: clean -> embed -> rank.

        An answer that cleans to "" is embedded as " " (an empty text has no last token).
        """
        texts = [clean_generated(t) or " " for t in generated]
        q = embed_texts(texts, embed, batch_size=batch_size, progress=False)
        return self.rank(q, exclude=exclude, topk=topk)

    # -- persistence -----------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.config.kind,
            "params": asdict(self.config),
            "n_items": self.n_items,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "titles_sha": self.titles_sha,
        }

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings()}, str(d / EMBEDDINGS_FILE))
        if self.config.kind != "flat":
            faiss.write_index(self.index, str(d / FAISS_FILE))
        (d / META_FILE).write_text(json.dumps(self.meta(), indent=2) + "\n")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        fingerprint: str | None = None,
        titles: Sequence[str] | None = None,
    ) -> "CatalogueIndex":
        """Load a saved index; with ``fingerprint``/``titles`` given, raise StaleIndexError on mismatch."""
        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no saved catalogue index here")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        for key in ("format_version", "kind", "params", "n_items", "dim", "fingerprint"):
            if key not in meta:
                raise ValueError(f"{meta_path}: missing key {key!r}")
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}")
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise StaleIndexError(
                f"{meta_path}: built with embedder {meta['fingerprint']!r}, now {fingerprint!r}; rebuild the index"
            )
        if titles is not None and meta.get("titles_sha") != titles_hash(titles):
            raise StaleIndexError(f"{meta_path}: built for a different catalogue (titles hash differs); rebuild")
        emb = load_file(str(d / EMBEDDINGS_FILE))["embeddings"]
        if emb.shape != (meta["n_items"], meta["dim"]):
            raise ValueError(
                f"{d / EMBEDDINGS_FILE}: shape {tuple(emb.shape)}, {meta_path} says ({meta['n_items']}, {meta['dim']})"
            )
        try:
            config = IndexConfig(**meta["params"])
        except TypeError as e:
            raise ValueError(f"{meta_path}: bad params {meta['params']!r}: {e}") from None
        if config.kind == "flat":
            return cls(emb, config, fingerprint=meta["fingerprint"], titles_sha=meta.get("titles_sha", ""))
        index = faiss.read_index(str(d / FAISS_FILE))
        if index.ntotal != meta["n_items"] or index.d != meta["dim"]:
            raise ValueError(f"{d / FAISS_FILE}: {index.ntotal} x {index.d}, {meta_path} says {meta['n_items']} x {meta['dim']}")
        self = cls.__new__(cls)
        self.config, self.fingerprint, self.titles_sha = config, meta["fingerprint"], meta.get("titles_sha", "")
        self.n_items, self.dim, self.build_s = meta["n_items"], meta["dim"], 0.0
        if config.kind == "ivf":
            faiss.extract_index_ivf(index).make_direct_map()
        self.index = index
        self._apply_search_params(index)
        self._max_sq_norm = float((emb.astype(np.float64) ** 2).sum(axis=1).max())
        return self


# ---------------------------------------------------------------------------------------------
# Recall of approximate kinds against exact
# ---------------------------------------------------------------------------------------------


@dataclass
class RecallReport:
    kind: str
    params: dict
    n_items: int
    dim: int
    n_queries: int
    k: int
    recall: float  # mean |approx top-k ∩ exact top-k| / k
    build_s: float
    query_s: float
    exact_build_s: float
    exact_query_s: float
    extra: dict = field(default_factory=dict)

    def row(self) -> str:
        p = {"ivf": f"nlist={self.params.get('nlist')} nprobe={self.params.get('nprobe')}",
             "hnsw": f"M={self.params.get('hnsw_m')} efC={self.params.get('ef_construction')} efS={self.params.get('ef_search')}",
             "flat": "-"}[self.kind]
        return (f"{self.kind:5s} {p:30s} recall@{self.k}={self.recall:.4f} build={self.build_s:7.2f}s "
                f"query={1e3 * self.query_s / self.n_queries:7.3f}ms/q (exact {1e3 * self.exact_query_s / self.n_queries:.3f}ms/q)")


def measure_recall(
    index_kind: str,
    embeddings: np.ndarray,  # [N, H]
    queries: np.ndarray,  # [Q, H]
    k: int = 20,
    exact: CatalogueIndex | None = None,
    **params: Any,
) -> RecallReport:
    """Recall@k of an ``index_kind`` index against exact ``IndexFlatL2`` ranking on ``queries``.

    ``params`` are IndexConfig fields (nlist, nprobe, hnsw_m, ef_construction, ef_search). Pass a
    prebuilt ``exact`` index to reuse it across calls. Times are wall-clock on this machine.
    """
    if exact is None:
        exact = CatalogueIndex(embeddings, IndexConfig(kind="flat"))
    t0 = time.perf_counter()
    ref, _ = exact.rank(queries, topk=k)
    exact_query_s = time.perf_counter() - t0
    approx = CatalogueIndex(embeddings, IndexConfig(kind=index_kind, **params))
    t0 = time.perf_counter()
    got, _ = approx.rank(queries, topk=k)
    query_s = time.perf_counter() - t0
    hits = [len(set(a.tolist()) & set(r.tolist())) for a, r in zip(got, ref)]
    cfg = asdict(approx.config)
    if index_kind == "ivf":
        cfg["nlist"] = faiss.extract_index_ivf(approx.index).nlist
    return RecallReport(
        kind=index_kind, params=cfg, n_items=approx.n_items, dim=approx.dim, n_queries=len(queries), k=k,
        recall=float(np.mean(hits)) / k, build_s=approx.build_s, query_s=query_s,
        exact_build_s=exact.build_s, exact_query_s=exact_query_s,
    )


def synthetic_catalogue(
    n_items: int, dim: int, n_queries: int, n_clusters: int = 256, noise: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered synthetic item embeddings [N, H] and queries [Q, H] near random items (benchmarks, tests).

    Items are Gaussian blobs around cluster centres (title embeddings cluster by genre, words...);
    a query is a random item plus noise, like a generated title that is close to, not on, a real one.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) * 2.0
    items = centres[rng.integers(0, n_clusters, n_items)] + rng.standard_normal((n_items, dim)).astype(np.float32)
    src = rng.integers(0, n_items, n_queries)
    queries = items[src] + noise * rng.standard_normal((n_queries, dim)).astype(np.float32)
    return np.ascontiguousarray(items, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32)
