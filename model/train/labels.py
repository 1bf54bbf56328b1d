"""Retriever labels (AutoMR Eq. 5): how much each memory element helps the generator predict y.

For a sample with query ``z_t``, target ``y`` and memory elements ``z_1..z_M``:

    δ_m = log P(y | z_t, z_m) − log P(y | z_t)

summed over the target's response tokens (``PromptBuilder.response_ids``), computed with the upper
layers only: the prompt is the generation prompt (short-term titles + the memory slot), and ``z_m``
replaces the slot's layer-L state. The baseline ``log P(y | z_t)`` is the same prompt with the slot
holding its placeholder's own state (``slot_vectors=None``), which is exactly how the no-memory
recommender (BIGRec mode) generates. The paper writes a difference of products of probabilities;
for titles of 10+ tokens those underflow, so we keep log-likelihoods and apply a temperature at
training time: ``s' = softmax(δ / τ)`` (``τ`` is not stored here).

A ``LabelSet`` holds per-sample ragged data as flat tensors + offsets, with the element vectors
deduplicated (a window shared by many samples of one user is stored once), in safetensors.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

LABEL_FORMAT = "automr-labels-v1"


@dataclass
class LabelSet:
    """Annotated samples for retriever training.

    Sample ``i`` has the elements ``elements[element_index[offsets[i]:offsets[i+1]]]`` (oldest first)
    with labels ``delta[offsets[i]:offsets[i+1]]``.
    """

    query: torch.Tensor  # [N, H] z_t
    elements: torch.Tensor  # [E, H] distinct element vectors z_m
    element_index: torch.Tensor  # [T] int64 into elements
    offsets: torch.Tensor  # [N+1] int64
    delta: torch.Tensor  # [T] float32, δ_m
    baseline: torch.Tensor | None = None  # [N] float32, log P(y | z_t) (no memory)
    sample_index: torch.Tensor | None = None  # [N] int64, position in the annotated sample list
    element_keys: torch.Tensor | None = None  # [E, W] int64 (window items / item index), −1 padded
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        N, T = self.query.shape[0], self.delta.shape[0]
        if self.offsets.shape != (N + 1,) or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != T:
            raise ValueError(f"offsets must be [N+1] from 0 to T={T} (N={N}), got shape {tuple(self.offsets.shape)}")
        if self.element_index.shape != (T,):
            raise ValueError(f"element_index must have T={T} entries, got {tuple(self.element_index.shape)}")
        if T and (int(self.element_index.min()) < 0 or int(self.element_index.max()) >= self.elements.shape[0]):
            raise ValueError("element_index points outside elements")
        if self.elements.ndim != 2 or (N and self.elements.shape[1] != self.query.shape[1]):
            raise ValueError(f"elements must be [E, H={self.query.shape[1]}], got {tuple(self.elements.shape)}")
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        queries: Sequence[torch.Tensor],  # N × [H]
        memories: Sequence[torch.Tensor],  # N × [M_i, H]
        deltas: Sequence[torch.Tensor],  # N × [M_i]
        baseline: torch.Tensor | None = None,
    ) -> "LabelSet":
        """Build from per-sample tensors (no element sharing); handy for synthetic data."""
        if not (len(queries) == len(memories) == len(deltas)):
            raise ValueError("queries, memories and deltas differ in length")
        counts = [int(m.shape[0]) for m in memories]
        for i, (m, d) in enumerate(zip(memories, deltas)):
            if d.shape != (m.shape[0],):
                raise ValueError(f"sample {i}: {m.shape[0]} elements but delta has shape {tuple(d.shape)}")
        offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
        T = int(offsets[-1])
        H = int(queries[0].shape[-1]) if len(queries) else 0
        elements = torch.cat([m.float() for m in memories]) if T else torch.zeros(0, H)
        delta = torch.cat([d.float() for d in deltas]) if T else torch.zeros(0)
        return cls(
            query=torch.stack([q.float() for q in queries]) if len(queries) else torch.zeros(0, H),
            elements=elements,
            element_index=torch.arange(T, dtype=torch.long),
            offsets=offsets,
            delta=delta,
            baseline=baseline,
        )

    # ---- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.query.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.query.shape[1])

    def counts(self) -> torch.Tensor:
        """Number of memory elements of each sample [N]."""
        return self.offsets[1:] - self.offsets[:-1]

    def sample_deltas(self, i: int) -> torch.Tensor:
        return self.delta[self.offsets[i] : self.offsets[i + 1]]

    def sample_memory(self, i: int) -> torch.Tensor:
        return self.elements[self.element_index[self.offsets[i] : self.offsets[i + 1]]]

    def padded(self, rows: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch of samples padded to the longest memory among them.

        Returns z_t [b, H], memory [b, M, H], mask [b, M] (True = real element), delta [b, M] (0 at padding).
        """
        rows = torch.as_tensor(rows, dtype=torch.long)
        start, n = self.offsets[rows], self.counts()[rows]  # [b]
        M = int(n.max()) if len(rows) else 0
        ar = torch.arange(M)
        mask = ar[None, :] < n[:, None]  # [b, M]
        flat = (start[:, None] + ar[None, :]).clamp_max(max(self.delta.shape[0] - 1, 0))  # [b, M]
        flat = torch.where(mask, flat, torch.zeros_like(flat))
        if self.delta.shape[0] == 0:
            return self.query[rows].float(), torch.zeros(len(rows), 0, self.hidden_size), mask, torch.zeros(len(rows), 0)
        memory = self.elements[self.element_index[flat]].float()  # [b, M, H]
        delta = torch.where(mask, self.delta[flat].float(), torch.zeros((), dtype=torch.float32))  # [b, M]
        return self.query[rows].float(), memory, mask, delta

    def subset(self, rows: torch.Tensor | Sequence[int]) -> "LabelSet":
        """The given samples (elements table kept whole)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        n = self.counts()[rows]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = n.cumsum(0)
        flat = torch.cat([torch.arange(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows.tolist()]) if len(rows) else torch.zeros(0, dtype=torch.long)
        return LabelSet(
            query=self.query[rows],
            elements=self.elements,
            element_index=self.element_index[flat],
            offsets=offsets,
            delta=self.delta[flat],
            baseline=None if self.baseline is None else self.baseline[rows],
            sample_index=None if self.sample_index is None else self.sample_index[rows],
            element_keys=self.element_keys,
            meta=dict(self.meta),
        )

    def nonempty(self) -> "LabelSet":
        """Only the samples with at least one memory element."""
        return self.subset(torch.nonzero(self.counts() > 0).flatten())

    # ---- combine -------------------------------------------------------------------------------
    @staticmethod
    def concat(parts: Sequence["LabelSet"]) -> "LabelSet":
        """Concatenate; elements with equal keys (when all parts have keys) are stored once."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        keyed = all(p.element_keys is not None for p in parts)
        width = max(int(p.element_keys.shape[1]) for p in parts) if keyed else 0
        table: dict[tuple, int] = {}
        new_elems: list[torch.Tensor] = []
        new_keys: list[tuple] = []
        idx_parts, off_parts, base = [], [torch.zeros(1, dtype=torch.long)], 0
        n_elems = 0
        for p in parts:
            if keyed:
                remap = torch.empty(p.elements.shape[0], dtype=torch.long)
                used = torch.unique(p.element_index).tolist()
                keys = p.element_keys.tolist()
                take = []
                for e in used:
                    k = tuple(x for x in keys[e] if x >= 0)
                    j = table.get(k)
                    if j is None:
                        j = table[k] = len(new_keys)
                        new_keys.append(k)
                        take.append(e)
                    remap[e] = j
                if take:
                    new_elems.append(p.elements[torch.tensor(take)])
                idx_parts.append(remap[p.element_index])
            else:
                new_elems.append(p.elements)
                idx_parts.append(p.element_index + n_elems)
                n_elems += p.elements.shape[0]
            off_parts.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        H = parts[0].hidden_size
        element_keys = None
        if keyed:
            element_keys = torch.full((len(new_keys), width), -1, dtype=torch.long)
            for i, k in enumerate(new_keys):
                element_keys[i, : len(k)] = torch.tensor(k, dtype=torch.long)

        def cat_opt(name: str) -> torch.Tensor | None:
            xs = [getattr(p, name) for p in parts]
            return None if any(x is None for x in xs) else torch.cat(xs)

        dtype = parts[0].elements.dtype
        return LabelSet(
            query=torch.cat([p.query for p in parts]),
            elements=torch.cat([e.to(dtype) for e in new_elems]) if new_elems else torch.zeros(0, H, dtype=dtype),
            element_index=torch.cat(idx_parts),
            offsets=torch.cat(off_parts),
            delta=torch.cat([p.delta for p in parts]),
            baseline=cat_opt("baseline"),
            sample_index=cat_opt("sample_index"),
            element_keys=element_keys,
            meta=dict(parts[0].meta),
        )

    # ---- storage -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One safetensors file (tensors + JSON metadata)."""
        tensors = {
            "query": self.query.contiguous(),
            "elements": self.elements.contiguous(),
            "element_index": self.element_index.contiguous(),
            "offsets": self.offsets.contiguous(),
            "delta": self.delta.contiguous(),
        }
        for name in ("baseline", "sample_index", "element_keys"):
            x = getattr(self, name)
            if x is not None:
                tensors[name] = x.contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": LABEL_FORMAT, "meta": json.dumps(self.meta)})
        tmp.replace(path)  # atomic: a crashed run never leaves a half-written chunk

    @classmethod
    def load(cls, path: str | Path) -> "LabelSet":
        """A file written by ``save``, or a directory of chunks written by ``annotate``."""
        path = Path(path)
        if path.is_dir():
            chunks = sorted(path.glob("labels-*.safetensors"))
            if not chunks:
                raise FileNotFoundError(f"{path}: no labels-*.safetensors chunks")
            return cls.concat([cls.load(c) for c in chunks])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such label file")
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != LABEL_FORMAT:
                raise ValueError(f"{path}: not an AutoMR label file (format {md.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            query=t["query"],
            elements=t["elements"],
            element_index=t["element_index"],
            offsets=t["offsets"],
            delta=t["delta"],
            baseline=t.get("baseline"),
            sample_index=t.get("sample_index"),
            element_keys=t.get("element_keys"),
            meta=json.loads(md.get("meta", "{}")),
        )


# ---- annotation (Eq. 5) -------------------------------------------------------------------------
MANIFEST = "manifest.json"


def choose_samples(samples: Sequence, k_short: int, budget: int | None, seed: int = 0) -> list[int]:
    """Indices of the samples to annotate: those with a non-empty memory, a seeded subset of
    ``budget`` of them when given, in their original order (keeps a user's samples together)."""
    eligible = [i for i, s in enumerate(samples) if len(s.history) > k_short]
    if budget is not None and budget < len(eligible):
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        eligible = sorted(random.Random(seed).sample(eligible, budget))
    return eligible


def sample_deltas(encoder, sample, batch_elements: int = 32) -> tuple[list, torch.Tensor, float]:
    """(element keys, δ [M] float32, log P(y | z_t)) of one sample; each distinct element scored once.

    One call of ``SplitLM.target_logprob`` for all of the sample's elements (its shared prefix runs
    once); the baseline is the same prompt with the slot's placeholder state (``slot_vectors=None``).
    """
    lm, builder, titles = encoder.lm, encoder.builder, encoder.titles
    keys = encoder.element_keys(sample)
    distinct = list(dict.fromkeys(keys))
    vectors = encoder.encode(distinct)  # [D, H]
    prompt = builder.build([titles[i] for i in sample.short_term(encoder.k_short)], with_slot=True)
    target = builder.response_ids(titles[sample.target])
    base = float(lm.target_logprob(prompt, target, None, chunk_size=batch_elements)[0])
    lp = lm.target_logprob(prompt, target, vectors[:, None, :], chunk_size=batch_elements)  # [D]
    pos = {k: i for i, k in enumerate(distinct)}
    delta = (lp.float() - base)[[pos[k] for k in keys]]
    return keys, delta, base


def _annotate_chunk(encoder, samples: Sequence, rows: list[int], batch_elements: int, meta: dict) -> LabelSet:
    chunk = [samples[i] for i in rows]
    encoder.prefetch(chunk)  # batched encoding of every missing element and query
    queries = encoder.queries(chunk)  # [n, H]
    table: dict[tuple, int] = {}
    element_index, deltas, baselines, counts = [], [], [], []
    for s in chunk:
        keys, delta, base = sample_deltas(encoder, s, batch_elements)
        element_index += [table.setdefault(k, len(table)) for k in keys]
        deltas.append(delta)
        baselines.append(base)
        counts.append(len(keys))
    keys = list(table)
    from model.memory import keys_to_tensor  # local: memory imports nothing from here, keep it so

    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return LabelSet(
        query=queries,
        elements=encoder.encode(keys) if keys else torch.zeros(0, queries.shape[1]),
        element_index=torch.tensor(element_index, dtype=torch.long),
        offsets=offsets,
        delta=torch.cat(deltas) if deltas else torch.zeros(0),
        baseline=torch.tensor(baselines, dtype=torch.float32),
        sample_index=torch.tensor(rows, dtype=torch.long),
        element_keys=keys_to_tensor(keys),
        meta=meta,
    )


def annotate(
    encoder,
    samples: Sequence,
    out_dir: str | Path | None = None,
    budget: int | None = None,
    seed: int = 0,
    batch_elements: int = 32,
    chunk_size: int = 256,
    progress: bool = True,
) -> LabelSet:
    """Label the memory of (a seeded subset of) ``samples`` with Eq. 5's δ.

    ``encoder`` is a ``model.memory.MemoryEncoder`` (it holds the ``SplitLM``, the ``PromptBuilder``,
    the titles and the element cache). Samples without memory (history of only K items) are skipped;
    ``budget`` keeps a seeded random subset of the rest. ``batch_elements`` is how many candidate slot
    vectors go through the upper layers at once.

    With ``out_dir`` the labels are written as ``labels-00000.safetensors``, … (``chunk_size`` samples
    each) next to a ``manifest.json``; a rerun with the same settings skips the chunks already on disk
    (resumable), and a rerun with other settings is refused. Returns the whole ``LabelSet``.
    """
    if getattr(encoder.builder, "n_slots", 1) != 1:
        raise ValueError(f"labels score one element in one slot; the prompt builder has n_slots={encoder.builder.n_slots}")
    if chunk_size < 1 or batch_elements < 1:
        raise ValueError("chunk_size and batch_elements must be >= 1")
    rows = choose_samples(samples, encoder.k_short, budget, seed)
    meta = {
        "format": LABEL_FORMAT,
        "element": encoder.element,
        "k_short": encoder.k_short,
        "cache_fingerprint": encoder.cache_fingerprint(),
        "seed": seed,
        "budget": budget,
        "n_input_samples": len(samples),
        "chunk_size": chunk_size,
        "rows_hash": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16],
        "n_rows": len(rows),
    }
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        man = out / MANIFEST
        if man.is_file():
            old = json.loads(man.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(f"{out} holds labels made with other settings ({', '.join(diff)} differ); "
                                 f"use another directory or delete it")
        else:
            man.write_text(json.dumps(meta, indent=2) + "\n")
    parts = []
    starts = range(0, len(rows), chunk_size)
    for c, start in enumerate(tqdm(starts, desc="labels (chunks)", disable=not progress)):
        path = out / f"labels-{c:05d}.safetensors" if out is not None else None
        if path is not None and path.is_file():
            parts.append(LabelSet.load(path))
            continue
        part = _annotate_chunk(encoder, samples, rows[start : start + chunk_size], batch_elements, meta)
        if path is not None:
            part.save(path)
        parts.append(part)
    if not parts:
        raise ValueError("no sample has a memory element to label (all histories have only K items)")
    return LabelSet.concat(parts)
