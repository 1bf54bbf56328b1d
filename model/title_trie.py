"""A prefix tree over the catalogue's response token sequences, for constrained title decoding.

"Decoding Matters" (Bao et al. 2024): beam search restricted to a prefix tree of real titles returns
only valid items, no grounding needed. Each item's sequence is its response exactly as the model is
trained to emit it, ``'"Title"' + eos`` tokenized by ``PromptBuilder.response_ids`` (any
``encode(title) -> list[int]`` works), so the allowed tokens at every step are precisely the ones
that continue some catalogue title.

Representation (memory matters: Amazon catalogues have 100k+ titles, ~1M trie nodes): flat int32
arrays in CSR form, no Python object per node. Node 0 is the root; the children of node ``v`` are
``child_node[child_ptr[v]:child_ptr[v+1]]`` reached by tokens ``child_tok[...]`` (sorted ascending,
looked up by binary search). The items ending at node ``v`` are ``term_items[term_ptr[v]:term_ptr[v+1]]``.
The build sorts the sequences, takes each one's longest common prefix with its predecessor and
numbers the nodes each sequence adds in order (a preorder of the tree): one pass, memory linear in
the number of tokens.

Duplicate titles: several items can share a title and so a token sequence; they end at the same
node and ``items_of`` returns all of them, ascending by item index.

Stopping: with eos at the end of every sequence (the ``response_ids`` form) no sequence is a proper
prefix of another and decoding stops by itself. If ``encode`` does not append eos, a terminal node can
have children; when the trie knows ``eos_token_id`` it then also allows eos there.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm


class TitleTrie:
    """Prefix tree over token sequences; ``sequences[i]`` is item i's response tokens."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int | None = None) -> None:
        t0 = time.perf_counter()
        seqs = [list(map(int, s)) for s in sequences]
        n = len(seqs)
        if n == 0:
            raise ValueError("TitleTrie needs at least one sequence")
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"item {i} encodes to an empty token sequence")
            if min(s) < 0 or max(s) >= 2**31 - 1:
                raise ValueError(f"item {i}: token ids must lie in [0, 2^31-1), got {s}")

        # Sorted sequences: the rows sharing a prefix are contiguous, and row r creates exactly the
        # nodes of its prefixes longer than lcp[r] (its longest common prefix with row r-1), numbered
        # consecutively from start[r]. Numbering in row order makes node ids a preorder.
        order = sorted(range(n), key=seqs.__getitem__)  # stable: duplicates keep ascending item index
        parent_first = np.zeros(n, dtype=np.int64)  # parent of the first node row r creates
        terminal = np.zeros(n, dtype=np.int64)  # the node where row r ends
        starts = np.zeros(n, dtype=np.int64)
        counts = np.zeros(n, dtype=np.int64)
        tokens: list[int] = []
        stack: list[tuple[int, int]] = []  # (lcp, start) of earlier rows, strictly increasing lcp
        next_id, prev = 1, None
        for r, i in enumerate(order):
            s = seqs[i]
            lcp = 0
            if prev is not None:
                m = min(len(s), len(prev))
                while lcp < m and s[lcp] == prev[lcp]:
                    lcp += 1
            # the node at depth lcp-1 on this row's path was created by the latest row with a smaller lcp
            while stack and stack[-1][0] >= lcp:
                stack.pop()
            if lcp > 0:
                j_lcp, j_start = stack[-1]
                parent_first[r] = j_start + (lcp - 1 - j_lcp)
            count = len(s) - lcp
            if count:  # 0 only for an exact duplicate of the previous row: same nodes, same end
                starts[r], counts[r] = next_id, count
                tokens.extend(s[lcp:])
                terminal[r] = next_id + count - 1
                stack.append((lcp, next_id))
                next_id += count
            else:
                terminal[r] = terminal[r - 1]
            prev = s
        n_nodes = next_id

        parent = np.arange(-1, n_nodes - 1, dtype=np.int64)  # inside a row's run: the node before
        made = counts > 0
        parent[starts[made]] = parent_first[made]
        parent[0] = 0
        token = np.empty(n_nodes, dtype=np.int32)
        token[0] = -1
        token[1:] = np.asarray(tokens, dtype=np.int32)
        del tokens

        # children in CSR, grouped by parent; preorder within a parent = ascending token
        kids = np.argsort(parent[1:], kind="stable") + 1
        self.child_ptr = np.zeros(n_nodes + 1, dtype=np.int32)
        self.child_ptr[1:] = np.cumsum(np.bincount(parent[1:], minlength=n_nodes))
        self.child_node = kids.astype(np.int32)
        self.child_tok = token[kids]

        # terminal nodes -> items (ascending item index within a node)
        items = np.asarray(order, dtype=np.int64)
        by = np.lexsort((items, terminal))
        self.term_items = items[by].astype(np.int32)
        self.term_ptr = np.zeros(n_nodes + 1, dtype=np.int32)
        self.term_ptr[1:] = np.cumsum(np.bincount(terminal, minlength=n_nodes))

        # memoryviews: indexing them yields Python ints and bisect runs on them in C (~1 us per step)
        self._ptr, self._tok, self._node = memoryview(self.child_ptr), memoryview(self.child_tok), memoryview(self.child_node)
        self._tptr = memoryview(self.term_ptr)

        self.n_items = n
        self.n_nodes = n_nodes
        self.max_len = max(len(s) for s in seqs)
        self.eos_token_id = eos_token_id
        self.build_s = time.perf_counter() - t0

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_titles(
        cls,
        titles: Sequence[str],
        encode: Callable[[str], list[int]],
        eos_token_id: int | None = None,
        progress: bool = True,
    ) -> "TitleTrie":
        """Tokenize every title with ``encode`` (e.g. ``PromptBuilder.response_ids``) and build."""
        seqs = [encode(t) for t in tqdm(titles, desc="tokenize titles", disable=not progress)]
        return cls(seqs, eos_token_id=eos_token_id)

    @classmethod
    def from_prompt_builder(cls, titles: Sequence[str], builder: Any, progress: bool = True) -> "TitleTrie":
        """The trie of ``builder.response_ids(title)`` ('"Title"' + eos), the tokens the model is tuned on."""
        return cls.from_titles(titles, builder.response_ids, builder.tokenizer.eos_token_id, progress)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.child_ptr, self.child_node, self.child_tok, self.term_ptr, self.term_items))

    # -- lookups ---------------------------------------------------------------------------------

    def child(self, node: int, tok: int) -> int:
        """The child of ``node`` along ``tok``, or -1."""
        lo, hi = self._ptr[node], self._ptr[node + 1]
        j = bisect_left(self._tok, tok, lo, hi)
        return self._node[j] if j < hi and self._tok[j] == tok else -1

    def node_of(self, prefix: Iterable[int]) -> int:
        """The node reached by ``prefix`` from the root, or -1 if no title starts with it."""
        v = 0
        for t in prefix:
            v = self.child(v, int(t))
            if v < 0:
                return -1
        return v

    def is_terminal(self, node: int) -> bool:
        return self._tptr[node + 1] > self._tptr[node]

    def allowed(self, prefix: Iterable[int]) -> list[int]:
        """Tokens that extend ``prefix`` towards some title (ascending); [] if it leads nowhere.

        A terminal node that still has children also allows ``eos_token_id`` (only possible when the
        sequences do not end with eos).
        """
        v = self.node_of(prefix)
        if v < 0:
            return []
        out = self.child_tok[self.child_ptr[v] : self.child_ptr[v + 1]].tolist()
        if out and self.eos_token_id is not None and self.is_terminal(v) and self.eos_token_id not in out:
            out = sorted(out + [self.eos_token_id])
        return out

    def items_at(self, node: int) -> list[int]:
        return self.term_items[self.term_ptr[node] : self.term_ptr[node + 1]].tolist()

    def items_of(self, tokens: Iterable[int]) -> list[int]:
        """Items whose sequence is exactly ``tokens`` (ascending item index; several for a duplicated title).

        With a known eos, everything after the first eos is dropped (padding of a finished row) and a
        missing final eos is implied (``generation.generate(return_ids=True)`` strips it). A sequence that
        is no complete title gives [].
        """
        toks = [int(t) for t in tokens]
        eos = self.eos_token_id
        if eos is not None and eos in toks:
            toks = toks[: toks.index(eos) + 1]
        v = self.node_of(toks)
        if v < 0 and eos is not None and toks and toks[-1] == eos:
            v = self.node_of(toks[:-1])  # the eos that ``allowed`` adds at an inner terminal node
            return self.items_at(v) if v >= 0 else []
        if v < 0:
            return []
        if not self.is_terminal(v) and eos is not None:
            w = self.child(v, eos)
            v = w if w >= 0 else v
        return self.items_at(v)  # [] unless v is terminal

    def paths(self) -> Iterator[tuple[list[int], list[int]]]:
        """Every (token path, items) of a terminal node, depth first (for checks and debugging)."""
        stack: list[tuple[int, list[int]]] = [(0, [])]
        while stack:
            v, path = stack.pop()
            if self.is_terminal(v):
                yield path, self.items_at(v)
            lo, hi = int(self.child_ptr[v]), int(self.child_ptr[v + 1])
            for j in range(hi - 1, lo - 1, -1):
                stack.append((int(self.child_node[j]), path + [int(self.child_tok[j])]))
