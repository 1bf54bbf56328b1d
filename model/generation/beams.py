"""Beam search over the catalogue's title trie, the user's seen items pruned ("Decoding Matters", D3).

The generator ranks: every beam is a prefix of some catalogue title that the user has not seen, and a
beam ends when its title's last token (the answer's end: eos or the list template's newline) is taken.
Scores are the sum of the tokens' log-probabilities, with no length normalisation (D3: tokens of
probability ~1 would inflate a normalised score). Since a score can only fall as a beam grows, the search
of a request stops exactly when ``num_beams`` titles are finished and no live beam scores above the
worst of them.

A request's search (``TrieBeams``) runs on its rows of a ``DecodeBatch`` (``model/generation/batch.py``), stepped by
``generation.step`` like greedy rows and beside them: the prompt is prefilled once, slots filled as for greedy
decoding, and its KV row is copied to the beams (``DecodeBatch.select``); each step is one forward of
every live row of the batch. The service's continuous batching and the evaluator run the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from model.title_trie import TitleTrie


class SeenPruner:
    """Which trie nodes still lead to an unseen item, for one request's excluded items.

    Node ids are a preorder, so a node's subtree is the id range ``[v, end[v])`` and the items ending in
    it are ``term_ptr[end[v]] - term_ptr[v]``; the excluded ones are counted by binary search in the
    sorted terminal nodes of the excluded items. With item ``weights``, ``excluded_mass`` sums the
    weights of the excluded items under a node the same way."""

    def __init__(self, trie: TitleTrie, item_node: np.ndarray, sub_end: np.ndarray, exclude: Iterable[int],
                 weights: np.ndarray | None = None):
        self.trie, self.sub_end = trie, sub_end
        ex = np.fromiter((int(i) for i in exclude if 0 <= int(i) < len(item_node)), dtype=np.int64)
        nodes = item_node[ex]
        order = np.argsort(nodes, kind="stable")
        self._ex = nodes[order]  # the excluded items' terminal nodes, sorted
        self._ex_cum = None if weights is None else np.concatenate([[0.0], np.cumsum(weights[ex][order])])

    def open(self, kids: np.ndarray) -> np.ndarray:
        """[k] bool: does the subtree of each node in ``kids`` hold an item that is not excluded?"""
        ends = self.sub_end[kids]
        total = self.trie.term_ptr[ends] - self.trie.term_ptr[kids]
        if self._ex.size:
            total = total - (np.searchsorted(self._ex, ends) - np.searchsorted(self._ex, kids))
        return total > 0

    def excluded_mass(self, kids: np.ndarray) -> np.ndarray:
        """[k] the summed weights of the excluded items in the subtree of each node in ``kids``."""
        if self._ex_cum is None or not self._ex.size:
            return np.zeros(len(kids))
        ends = self.sub_end[kids]
        return self._ex_cum[np.searchsorted(self._ex, ends)] - self._ex_cum[np.searchsorted(self._ex, kids)]


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


@dataclass(frozen=True)
class PopularityPrior:
    """The training counts folded into the beam scores. A title's popularity share is its (1 + count)
    over that of the user's unseen catalogue; each step adds the log-share of the token's subtree among
    the open ones (the steps telescope to the title's share).

    - ``gamma`` (product): the score gains gamma x log(share), BIGRec's popularity weighting
      (1 + pop)^gamma moved into the search.
    - ``mix`` (mixture): the score is log((1 - mix) x P_model(title) + mix x share): a title either
      expert ranks high stays high (the product keeps only titles both rank high).
    Both only fall as a beam grows, so the search's exact stop still holds."""

    cum: np.ndarray  # popularity_mass(trie, counts)
    weights: np.ndarray  # [n_items] 1 + count
    gamma: float = 0.0
    mix: float = 0.0

    def __post_init__(self) -> None:
        if self.gamma < 0 or not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"need gamma >= 0 and 0 <= mix <= 1, got {self.gamma} and {self.mix}")

    @classmethod
    def from_counts(cls, trie: TitleTrie, counts, gamma: float = 0.0, mix: float = 0.0) -> "PopularityPrior":
        counts = np.asarray(counts, dtype=np.float64)
        return cls(popularity_mass(trie, counts), 1.0 + counts, float(gamma), float(mix))

    @property
    def active(self) -> bool:
        return bool(self.gamma or self.mix)


@dataclass
class _Beam:
    score: float  # what ranks the beam (``lm`` without a mixture)
    node: int
    tokens: list[int] = field(default_factory=list)
    lm: float = 0.0  # the model's log-probability of the prefix (+ gamma x its log popularity share)
    pop: float = 0.0  # its log popularity share among the unseen titles


@dataclass
class BeamResult:
    """One request's finished titles, best first: (score, tokens, items not excluded)."""

    finished: list[tuple[float, list[int], list[int]]]

    @property
    def scored_items(self) -> list[tuple[int, float]]:
        """Each item of the finished titles once, best first, with its title's score."""
        out, seen = [], set()
        for score, _, items in self.finished:
            for i in items:
                if i not in seen:
                    seen.add(i)
                    out.append((i, score))
        return out

    @property
    def items(self) -> list[int]:
        return [i for i, _ in self.scored_items]

    @property
    def tokens(self) -> list[int]:
        """The best title's tokens ([] when no title was found)."""
        return self.finished[0][1] if self.finished else []


class TrieBeams:
    """The beam search of one request, a step at a time, on its rows of a shared ``DecodeBatch``.

    Its live beams are consecutive rows of the batch, in the order of ``live``; ``generation.step`` hands
    each step's log-probabilities of those rows to ``expand``, which says which rows (duplicated or
    dropped) and tokens go on. Greedy rows of other requests decode beside them in the same forward.

    ``renormalize``: each step's log-probabilities are normalised over the tokens that lead to an unseen
    title, so a title's score is its log-probability under the model restricted to the user's unseen
    catalogue (the scores of all titles sum to 1). Without it a token keeps its share of the whole
    vocabulary, and every token of a long title pays for the mass the model puts outside the catalogue.
    ``prior``: the popularity prior (``PopularityPrior``: product and/or mixture)."""

    def __init__(self, trie: TitleTrie, tables: tuple[np.ndarray, np.ndarray], exclude: set[int],
                 num_beams: int, max_new_tokens: int = 64, renormalize: bool = True,
                 prior: PopularityPrior | None = None):
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        self.trie, self.num_beams, self.max_new_tokens = trie, num_beams, max_new_tokens
        self.renormalize = renormalize
        self.prior = prior if prior is not None and prior.active else None
        self.exclude = exclude
        self.sub_end = tables[1]
        self.pruner = SeenPruner(trie, tables[0], tables[1], exclude,
                                 weights=self.prior.weights if self.prior is not None else None)
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

    def _candidates(self, logp: np.ndarray) -> list[tuple[float, int, int, int, float, float]]:
        """(score, beam, token, child node, lm, pop) of every open continuation of every live beam."""
        trie, prior, cands = self.trie, self.prior, []
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
            lm = beam.lm + lp
            pop = np.zeros_like(lm)
            score = lm
            if prior is not None:
                mass = (prior.cum[trie.term_ptr[self.sub_end[kids]]] - prior.cum[trie.term_ptr[kids]]
                        - self.pruner.excluded_mass(kids))  # the unseen titles' (1 + count) under each token
                share = np.log(mass) - np.log(mass.sum())
                lm = lm + prior.gamma * share
                pop = beam.pop + share
                score = lm
                if prior.mix:
                    score = np.logaddexp(np.log1p(-prior.mix) + lm if prior.mix < 1 else -np.inf,
                                         np.log(prior.mix) + pop)
            cands.extend(zip(score.tolist(), [b] * len(toks), toks.tolist(), kids.tolist(), lm.tolist(),
                             pop.tolist()))
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
        for sc, b, tok, kid, lm, pop in sorted(self._candidates(logp), key=lambda c: -c[0]):
            if sc <= self._worst():
                break  # nothing below can enter the finished top-B
            if trie.is_terminal(kid) and trie.child_ptr[kid + 1] == trie.child_ptr[kid]:
                items = [i for i in trie.items_at(kid) if i not in self.exclude]
                self.done.append((sc, self.live[b].tokens + [tok], items))
                self.done.sort(key=lambda d: -d[0])
                del self.done[self.num_beams:]
            elif len(nxt) < self.num_beams:
                nxt.append(_Beam(sc, kid, self.live[b].tokens + [tok], lm, pop))
                plan.append((b, tok))
        self.steps += 1
        keep = [i for i, beam in enumerate(nxt) if beam.score > self._worst()]
        if not keep or self.steps >= self.max_new_tokens:
            self.live, self.finished = [], True
            return []
        self.live = [nxt[i] for i in keep]
        return [plan[i] for i in keep]
