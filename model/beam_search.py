"""Beam search over the catalogue's title trie, the user's seen items pruned ("Decoding Matters", D3).

The generator ranks: every beam is a prefix of some catalogue title that the user has not seen, and a
beam ends when its title's last token (the answer's end: eos or the list template's newline) is taken.
Scores are the sum of the tokens' log-probabilities, with no length normalisation (D3: tokens of
probability ~1 would inflate a normalised score). Since a score can only fall as a beam grows, the search
of a request stops exactly when ``num_beams`` titles are finished and no live beam scores above the
worst of them.

A request's search (``TrieBeams``) runs on its rows of a ``DecodeBatch`` (``model/llm.py``), stepped by
``SplitLM.step`` like greedy rows and beside them: the prompt is prefilled once, slots filled as for greedy
decoding, and its KV row is copied to the beams (``DecodeBatch.select``); each step is one forward of
every live row of the batch. The service's continuous batching and the evaluator run the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

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

    @property
    def tokens(self) -> list[int]:
        """The best title's tokens ([] when no title was found)."""
        return self.finished[0][1] if self.finished else []


class TrieBeams:
    """The beam search of one request, a step at a time, on its rows of a shared ``DecodeBatch``.

    Its live beams are consecutive rows of the batch, in the order of ``live``; ``SplitLM.step`` hands
    each step's log-probabilities of those rows to ``expand``, which says which rows (duplicated or
    dropped) and tokens go on. Greedy rows of other requests decode beside them in the same forward.

    ``renormalize``: each step's log-probabilities are normalised over the tokens that lead to an unseen
    title, so a title's score is its log-probability under the model restricted to the user's unseen
    catalogue (the scores of all titles sum to 1). Without it a token keeps its share of the whole
    vocabulary, and every token of a long title pays for the mass the model puts outside the catalogue.
    ``prior`` (``popularity_mass``, gamma): each step also adds gamma x the log-share of the (1 + count)
    popularity mass of the token's subtree among the open ones, so a title's score gains gamma x the log of
    its popularity share (the steps telescope): BIGRec's popularity weighting, moved into the search."""

    def __init__(self, trie: TitleTrie, tables: tuple[np.ndarray, np.ndarray], exclude: set[int],
                 num_beams: int, max_new_tokens: int = 64, renormalize: bool = True,
                 prior: tuple[np.ndarray, float] | None = None):
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        self.trie, self.num_beams, self.max_new_tokens = trie, num_beams, max_new_tokens
        self.renormalize, self.prior = renormalize, prior if prior is not None and prior[1] else None
        self.exclude = exclude
        self.sub_end = tables[1]
        self.pruner = SeenPruner(trie, tables[0], tables[1], exclude)
        self.live: list[_Beam] = [_Beam(0.0, 0)]
        self.done: list[tuple[float, list[int], list[int]]] = []
        self.steps = 0
        self.finished = False

    @property
    def rows(self) -> int:
        """Its rows in the batch (its live beams)."""
        return 0 if self.finished else len(self.live)

    def result(self) -> BeamResult:
        return BeamResult(list(self.done))

    def _worst(self) -> float:
        return self.done[self.num_beams - 1][0] if len(self.done) >= self.num_beams else -np.inf

    def _candidates(self, logp: np.ndarray) -> list[tuple[float, int, int, int]]:
        """(score, beam, token, child node) of every open continuation of every live beam."""
        trie, cands = self.trie, []
        for b, beam in enumerate(self.live):
            lo, hi = int(trie.child_ptr[beam.node]), int(trie.child_ptr[beam.node + 1])
            toks, kids = trie.child_tok[lo:hi], trie.child_node[lo:hi]
            keep = self.pruner.open(kids)
            toks, kids = toks[keep], kids[keep]
            if not len(toks):
                continue
            lp = logp[b, toks]
            if self.renormalize:
                top = lp.max()
                lp = lp - (top + np.log(np.exp(lp - top).sum()))
            if self.prior is not None:
                cum, gamma = self.prior
                mass = cum[trie.term_ptr[self.sub_end[kids]]] - cum[trie.term_ptr[kids]]
                lp = lp + gamma * (np.log(mass) - np.log(mass.sum()))
            cands.extend(zip((beam.score + lp).tolist(), [b] * len(toks), toks.tolist(), kids.tolist()))
        return cands

    def expand(self, logp: np.ndarray) -> list[tuple[int, int]]:
        """One step: ``logp`` [beams, V] are the next-token log-probabilities of the live beams (in
        order). Returns the next step's rows as (live beam it continues, token), in order; [] once the
        search is finished: ``num_beams`` titles are done and no live beam scores above the worst of
        them (a score only falls as a beam grows), nothing is left open, or the token budget is spent."""
        if self.finished:
            raise RuntimeError("this beam search is finished")
        trie = self.trie
        nxt: list[_Beam] = []
        plan: list[tuple[int, int]] = []
        for sc, b, tok, kid in sorted(self._candidates(logp), key=lambda c: -c[0]):
            if sc <= self._worst():
                break  # nothing below can enter the finished top-B
            if trie.is_terminal(kid) and trie.child_ptr[kid + 1] == trie.child_ptr[kid]:
                items = [i for i in trie.items_at(kid) if i not in self.exclude]
                self.done.append((sc, self.live[b].tokens + [tok], items))
                self.done.sort(key=lambda d: -d[0])
                del self.done[self.num_beams:]
            elif len(nxt) < self.num_beams:
                nxt.append(_Beam(sc, kid, self.live[b].tokens + [tok]))
                plan.append((b, tok))
        self.steps += 1
        keep = [i for i, beam in enumerate(nxt) if beam.score > self._worst()]
        if not keep or self.steps >= self.max_new_tokens:
            self.live, self.finished = [], True
            return []
        self.live = [nxt[i] for i in keep]
        return [plan[i] for i in keep]


def trie_beam_search(lm: SplitLM, batch: DecodeBatch, trie: TitleTrie, tables: tuple[np.ndarray, np.ndarray],
                     excludes: Sequence[set[int]], num_beams: int, max_new_tokens: int = 64,
                     renormalize: bool = True, prior: tuple[np.ndarray, float] | None = None) -> list[BeamResult]:
    """Beam search (``TrieBeams``) for every row of ``batch`` (row j = request j, prefilled, its next
    logits pending), stepped by ``SplitLM.step`` as the service steps it. Returns, per request, up to
    ``num_beams`` finished titles in score order. ``batch`` is consumed."""
    if len(excludes) != batch.rows:
        raise ValueError(f"{len(excludes)} exclude sets for {batch.rows} rows")
    searches = [TrieBeams(trie, tables, ex, num_beams, max_new_tokens, renormalize, prior) for ex in excludes]
    batch.searches = list(searches)
    lm.decode(batch)
    return [s.result() for s in searches]
