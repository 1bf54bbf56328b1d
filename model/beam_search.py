"""Beam search over the catalogue's title trie, the user's seen items pruned ("Decoding Matters", D3).

The generator ranks: every beam is a prefix of some catalogue title that the user has not seen, and a
beam ends when its title's last token (the answer's end: eos or the list template's newline) is taken.
Scores are the sum of the tokens' log-probabilities, with no length normalisation (D3: tokens of
probability ~1 would inflate a normalised score). Since a score can only fall as a beam grows, the search
of a request stops exactly when ``num_beams`` titles are finished and no live beam scores above the
worst of them.

It runs on a ``DecodeBatch`` (``model/llm.py``) whose rows are the requests' prefilled prompts, slots
filled as for greedy decoding: the prompt is prefilled once per request and its KV rows are copied to
the beams (``DecodeBatch.select``); each step is one forward of every live beam of every request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from model.llm import DecodeBatch, SplitLM
from model.title_trie import TitleTrie


class SeenPruner:
    """Which trie nodes still lead to an unseen item, for one request's excluded items.

    Node ids are a preorder, so a node's subtree is the id range ``[v, end[v])`` and the items ending in
    it are ``term_ptr[end[v]] - term_ptr[v]``; the excluded ones are counted by binary search in the
    sorted terminal nodes of the excluded items."""

    def __init__(self, trie: TitleTrie, item_node: np.ndarray, sub_end: np.ndarray, exclude: Iterable[int]):
        self.trie, self.sub_end = trie, sub_end
        ex = np.fromiter((int(i) for i in exclude if 0 <= int(i) < len(item_node)), dtype=np.int64)
        self._ex = np.sort(item_node[ex])  # the excluded items' terminal nodes

    def open(self, kids: np.ndarray) -> np.ndarray:
        """[k] bool: does the subtree of each node in ``kids`` hold an item that is not excluded?"""
        ends = self.sub_end[kids]
        total = self.trie.term_ptr[ends] - self.trie.term_ptr[kids]
        if self._ex.size:
            total = total - (np.searchsorted(self._ex, ends) - np.searchsorted(self._ex, kids))
        return total > 0


def trie_tables(trie: TitleTrie) -> tuple[np.ndarray, np.ndarray]:
    """(item -> its terminal node, node -> the end of its subtree's id range), built once per trie."""
    n = trie.n_nodes
    item_node = np.zeros(trie.n_items, dtype=np.int64)
    counts = np.diff(trie.term_ptr)
    nodes = np.repeat(np.arange(n), counts)
    item_node[trie.term_items] = nodes
    parent = np.zeros(n, dtype=np.int64)
    parent[trie.child_node] = np.repeat(np.arange(n), np.diff(trie.child_ptr))
    sub_end = np.arange(1, n + 1, dtype=np.int64)
    for v in range(n - 1, 0, -1):  # preorder: children have larger ids than their parent
        p = parent[v]
        if sub_end[v] > sub_end[p]:
            sub_end[p] = sub_end[v]
    return item_node, sub_end


def popularity_mass(trie: TitleTrie, counts: np.ndarray) -> np.ndarray:
    """Cumulative (1 + count) of the items in the trie's terminal order: the popularity mass of a node's
    subtree is ``cum[term_ptr[end[v]]] - cum[term_ptr[v]]``."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (trie.n_items,):
        raise ValueError(f"popularity counts must be [{trie.n_items}], got {counts.shape}")
    return np.concatenate([[0.0], np.cumsum(1.0 + counts[trie.term_items])])


@dataclass
class _Beam:
    score: float
    node: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class BeamResult:
    """One request's finished titles, best first: (score, tokens, items not excluded)."""

    finished: list[tuple[float, list[int], list[int]]]

    @property
    def items(self) -> list[int]:
        out, seen = [], set()
        for _, _, items in self.finished:
            for i in items:
                if i not in seen:
                    seen.add(i)
                    out.append(i)
        return out


@torch.no_grad()
def trie_beam_search(lm: SplitLM, batch: DecodeBatch, trie: TitleTrie, tables: tuple[np.ndarray, np.ndarray],
                     excludes: Sequence[set[int]], num_beams: int, max_new_tokens: int = 64,
                     renormalize: bool = True, prior: tuple[np.ndarray, float] | None = None) -> list[BeamResult]:
    """Beam search for every row of ``batch`` (row j = request j, prefilled, its next logits pending).

    ``renormalize``: each step's log-probabilities are normalised over the tokens that lead to an unseen
    title, so a title's score is its log-probability under the model restricted to the user's unseen
    catalogue (the scores of all titles sum to 1). Without it a token keeps its share of the whole
    vocabulary, and every token of a long title pays for the mass the model puts outside the catalogue.
    ``prior`` (``popularity_mass``, gamma): each step also adds gamma x the log-share of the (1 + count)
    popularity mass of the token's subtree among the open ones, so a title's score gains gamma x the log of
    its popularity share (the steps telescope): BIGRec's popularity weighting, moved into the search.
    Returns, per request, up to ``num_beams`` finished titles in score order. ``batch`` is consumed."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    n_req = batch.rows
    if len(excludes) != n_req:
        raise ValueError(f"{len(excludes)} exclude sets for {n_req} rows")
    item_node, sub_end = tables
    pruners = [SeenPruner(trie, item_node, sub_end, ex) for ex in excludes]
    live: list[list[_Beam]] = [[_Beam(0.0, 0)] for _ in range(n_req)]
    done: list[list[tuple[float, list[int], list[int]]]] = [[] for _ in range(n_req)]
    row_of = [(r, 0) for r in range(n_req)]  # batch row -> (request, beam index)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(batch.logits.float(), -1).numpy()  # [n, V]
        nxt_rows, nxt_toks = [], []
        new_live: list[list[_Beam]] = [[] for _ in range(n_req)]
        per_req: list[list[tuple[float, int, int, int]]] = [[] for _ in range(n_req)]
        for j, (r, b) in enumerate(row_of):
            beam, pr = live[r][b], pruners[r]
            lo, hi = int(trie.child_ptr[beam.node]), int(trie.child_ptr[beam.node + 1])
            toks, kids = trie.child_tok[lo:hi], trie.child_node[lo:hi]
            keep = pr.open(kids)
            toks, kids = toks[keep], kids[keep]
            if not len(toks):
                continue
            lp = logp[j, toks]
            if renormalize:
                top = lp.max()
                lp = lp - (top + np.log(np.exp(lp - top).sum()))
            if prior is not None and prior[1]:
                cum, gamma = prior
                mass = cum[trie.term_ptr[sub_end[kids]]] - cum[trie.term_ptr[kids]]
                lp = lp + gamma * (np.log(mass) - np.log(mass.sum()))
            scores = beam.score + lp
            for tok, kid, sc in zip(toks.tolist(), kids.tolist(), scores.tolist()):
                per_req[r].append((sc, j, tok, kid))
        for r in range(n_req):
            cands = sorted(per_req[r], key=lambda c: -c[0])
            for sc, j, tok, kid in cands:
                worst = done[r][num_beams - 1][0] if len(done[r]) >= num_beams else -np.inf
                if sc <= worst:
                    break  # nothing below can enter the finished top-B
                if trie.is_terminal(kid) and trie.child_ptr[kid + 1] == trie.child_ptr[kid]:
                    _, bb = row_of[j]
                    items = [i for i in trie.items_at(kid) if i not in excludes[r]]
                    done[r].append((sc, live[r][bb].tokens + [tok], items))
                    done[r].sort(key=lambda d: -d[0])
                    del done[r][num_beams:]
                elif len(new_live[r]) < num_beams:
                    _, bb = row_of[j]
                    new_live[r].append(_Beam(sc, kid, live[r][bb].tokens + [tok]))
                    nxt_rows.append(j)
                    nxt_toks.append(tok)
        # a request is finished when no live beam can beat its B-th finished title
        rows, toks = nxt_rows, nxt_toks
        order = [row_of[j][0] for j in rows]
        keep = [i for i, r in enumerate(order)
                if not (len(done[r]) >= num_beams and max(b.score for b in new_live[r]) <= done[r][num_beams - 1][0])]
        if not keep:
            break
        counters = [0] * n_req
        row_of = []
        kept_live: list[list[_Beam]] = [[] for _ in range(n_req)]
        for i in keep:
            r = order[i]
            kept_live[r].append(new_live[r][counters[r]])
            row_of.append((r, len(kept_live[r]) - 1))
            counters[r] += 1
        live = kept_live
        batch.select([rows[i] for i in keep])
        ids = torch.tensor([toks[i] for i in keep], dtype=torch.long, device=lm.device)[:, None]
        batch.last = batch.last + 1
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        out = lm.model(input_ids=ids, attention_mask=batch.mask, position_ids=batch.last[:, None],
                       past_key_values=batch.cache, use_cache=True)
        batch.logits = out.logits[:, -1].float()
    return [BeamResult(d) for d in done]
