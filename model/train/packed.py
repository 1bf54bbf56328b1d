"""Packed tuning rows: every training target of a user in one sequence, each under its inference context.

The list template (``PromptBuilder(template="list")``) writes a history as one title per line, and the
answer is the next line. A user's items ``i0, i1, ...`` are therefore written once, in order, and every
title is both a target and context for the titles after it. A row (a *chunk*) holds::

    head | t[s-K] \\n | ... | t[s-1] \\n | ans[s] | t[s] \\n | ans[s+1] | t[s+1] \\n | ...
         '---- K context items, no loss ---'    '------ C targets, loss on title + newline ------'

The head holds the memory slot (its placeholder keeps its own state here: BIGRec tuning). ``ans[j]`` is a
copy of the newline that ends item j-1, at that newline's position id: at inference the prompt ends with
that newline, which predicts the answer. The attention mask gives every target's tokens exactly the keys
that its inference prompt holds: the head, the K items before it (the last one's newline replaced by
``ans[j]``) and its own earlier tokens; ``ans[j]`` sees the same, minus the target.
Position ids keep each item's tokens contiguous after the one before, so the K context items and ``ans[j]``
lie at the same relative positions (RoPE depends only on those) as in the inference prompt.

What is not identical to inference (and why it is cheap): the context items' own states were computed over
their own K predecessors (at inference the oldest title of the window sees none), an item's tokens saw
their own answer copy, and the head lies further back than in a prompt of K titles (at most one chunk). The first
target of a chunk that starts at the head is exact; ``tests/test_packed.py`` checks it against the
unpacked prompt. Cost: about ``len(title) + 2`` tokens per target against ~220 for a sliding-window prompt
of the Alpaca template (``BENCHMARKS.md`` has both trainers' tokens/s and targets/s).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from model.data.types import Sample
from model.prompts import PromptBuilder

HEAD, ITEM, ANSWER = 0, 1, 2


@dataclass
class Chunk:
    """One packed row. Per token: id, position id, kind (HEAD / ITEM / ANSWER) and the item's index in the
    row (-1 for the head; an answer copy carries its target's index)."""

    input_ids: list[int]
    positions: list[int]
    kind: list[int]
    item: list[int]
    is_sep: list[bool]  # the newline that ends an item (context copy)
    loss_cols: list[int]  # state at this column predicts ...
    loss_targets: list[int]  # ... this token
    answer_cols: list[int]  # the column that predicts each target's first token, in order
    samples: list[Sample] = field(default_factory=list)  # the sample of each target (memory-aware tuning)
    k_short: int = 10

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return len(self.answer_cols)

    def mask(self) -> torch.Tensor:
        """[T, T] bool: query row may attend to key column."""
        return chunk_mask(self.kind, self.item, self.is_sep, self.k_short)


def chunk_mask(kind: Sequence[int], item: Sequence[int], is_sep: Sequence[bool], k_short: int) -> torch.Tensor:
    kind_t = torch.tensor(kind)
    it = torch.tensor(item)
    sep = torch.tensor(is_sep)
    t = len(kind)
    idx = torch.arange(t)
    q_kind, k_kind = kind_t[:, None], kind_t[None, :]
    qi, ki = it[:, None], it[None, :]
    causal = idx[None, :] <= idx[:, None]
    head_key = (k_kind == HEAD) & ((q_kind != HEAD) | causal)
    # a target (an item with an answer copy in this row) sees the previous item without its newline (the
    # copy stands in for it); a context-only item sees that newline itself
    is_target = torch.zeros(int(it.max()) + 2 if t else 1, dtype=torch.bool)
    is_target[it[kind_t == ANSWER] + 1] = True
    q_target = is_target[it + 1][:, None]  # [T, 1]
    window = (k_kind == ITEM) & (q_kind != HEAD) & (ki >= qi - k_short) & (ki <= qi - 1)
    window &= ~(q_target & sep[None, :] & (ki == qi - 1))
    own_item = (q_kind == ITEM) & (k_kind == ITEM) & (ki == qi) & causal
    own_answer = (k_kind == ANSWER) & (ki == qi) & (q_kind != HEAD)
    return head_key | window | own_item | own_answer


def user_runs(samples: Sequence[Sample]) -> list[tuple[list[int], list[int], list[Sample]]]:
    """Runs of consecutive samples of one user: (items oldest first, the positions that are targets, their
    samples). A run is the first sample's history, then every target in time order, so the packed rows see
    exactly the items the sliding-window samples see; a sample whose history does not continue the run
    (a subset with gaps) starts a new one."""
    by_user: dict[str, list[Sample]] = {}
    for s in samples:
        by_user.setdefault(s.user_id, []).append(s)
    runs = []
    for ss in by_user.values():
        seq: list[int] = []
        targets: list[int] = []
        kept: list[Sample] = []
        for s in sorted(ss, key=lambda s: (s.timestamp, len(s.history))):
            k = min(len(s.history), len(seq))
            if not seq or s.history[-k:] != seq[-k:]:
                if targets:
                    runs.append((seq, targets, kept))
                seq, targets, kept = list(s.history), [], []
            targets.append(len(seq))
            kept.append(s)
            seq.append(s.target)
        if targets:
            runs.append((seq, targets, kept))
    return runs


def build_chunks(builder: PromptBuilder, samples: Sequence[Sample], titles: Sequence[str], k_short: int,
                 chunk_targets: int = 32) -> list[Chunk]:
    """Packed rows of at most ``chunk_targets`` targets for ``samples`` (any subset of a split)."""
    if builder.template != "list":
        raise ValueError("packed rows need the list template (PromptBuilder(template='list'))")
    if chunk_targets < 1 or k_short < 1:
        raise ValueError("chunk_targets and k_short must be >= 1")
    head = builder.head_ids
    line = builder.sep_ids
    title_cache: dict[int, list[int]] = {}

    def tid(i: int) -> list[int]:
        if i not in title_cache:
            title_cache[i] = builder.title_ids(titles[i])
        return title_cache[i]

    chunks = []
    for seq, targets, kept in user_runs(samples):
        for c0 in range(0, len(targets), chunk_targets):
            tg = targets[c0:c0 + chunk_targets]
            ss = kept[c0:c0 + chunk_targets]
            first = max(tg[0] - k_short, 0)
            chunks.append(_chunk(head, line, [tid(i) for i in seq[first:tg[-1] + 1]],
                                 [p - first for p in tg], ss, k_short))
    return chunks


def _chunk(head: list[int], line: list[int], items: list[list[int]], target_rows: list[int],
           samples: list[Sample], k_short: int) -> Chunk:
    ids, pos, kind, item, sep = list(head), list(range(len(head))), [HEAD] * len(head), [-1] * len(head), \
        [False] * len(head)
    loss_cols, loss_targets, answer_cols = [], [], []
    targets = set(target_rows)
    next_pos = len(head)
    prev_sep_pos = len(head) - 1  # the head's newline ends "item -1"
    for j, title in enumerate(items):
        piece = title + line
        if j in targets:
            answer_col = len(ids)
            ids.append(line[-1])
            pos.append(prev_sep_pos)
            kind.append(ANSWER)
            item.append(j)
            sep.append(False)
            answer_cols.append(answer_col)
            prev = answer_col
        start = len(ids)
        for n, tok in enumerate(piece):
            ids.append(tok)
            pos.append(next_pos + n)
            kind.append(ITEM)
            item.append(j)
            sep.append(n == len(piece) - 1)
            if j in targets:
                loss_cols.append(prev)
                loss_targets.append(tok)
                prev = start + n
        next_pos += len(piece)
        prev_sep_pos = next_pos - 1
    return Chunk(ids, pos, kind, item, sep, loss_cols, loss_targets, answer_cols, samples, k_short)


def pad_chunks(chunks: Sequence[Chunk], pad_id: int, device=None):
    """ids [B, T], positions [B, T], mask [B, 1, T, T] (right padding; a pad attends to itself only)."""
    t = max(len(c) for c in chunks)
    b = len(chunks)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    mask = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
    for r, c in enumerate(chunks):
        n = len(c)
        ids[r, :n] = torch.tensor(c.input_ids)
        pos[r, :n] = torch.tensor(c.positions)
        pos[r, n:] = torch.arange(n, t)
        mask[r, :n, :n] = c.mask()
    return ids.to(device), pos.to(device), mask[:, None].to(device)


def packed_loss(split, chunks: Sequence[Chunk], autocast: bool = False,
                lower_cache: dict | None = None) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over every target token of ``chunks``, number of those tokens).

    Layers 1..L run without gradients (their states are kept in ``lower_cache``, keyed by ``id(chunk)``,
    when given: they never change). The slot keeps its placeholder's state: one slot in the head serves
    every target of a row, so memory-aware tuning (a target's own element in the slot) needs the sliding
    recipe."""
    dev = split.device
    ids, pos, mask = pad_chunks(chunks, split.pad_id, dev)
    b, t = ids.shape
    with torch.no_grad():
        missing = [r for r, c in enumerate(chunks) if lower_cache is None or id(c) not in lower_cache]
        cached = set(range(b)) - set(missing)
        h = torch.zeros(b, t, split.hidden_size, dtype=split.dtype, device=dev)
        if missing:
            sel = torch.tensor(missing, device=dev)
            hm = split.lower_states(ids[sel], pos[sel], mask[sel])
            h[sel] = hm
            if lower_cache is not None:
                for j, r in enumerate(missing):
                    lower_cache[id(chunks[r])] = hm[j, :len(chunks[r])].clone()
        for r in cached:
            h[r, :len(chunks[r])] = lower_cache[id(chunks[r])]
    lrows = torch.tensor([r for r, c in enumerate(chunks) for _ in c.loss_cols], dtype=torch.long, device=dev)
    lcols = torch.tensor([q for c in chunks for q in c.loss_cols], dtype=torch.long, device=dev)
    tgt = torch.tensor([x for c in chunks for x in c.loss_targets], dtype=torch.long, device=dev)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = split.upper_states(h, pos, mask)  # [B, T, H] after the final norm
        logits = split.model.lm_head(out[lrows, lcols])  # [N, V]
    loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum")
    return loss, int(tgt.numel())
