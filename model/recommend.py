"""The one recommend function: context + memory -> slot filling -> generated title -> grounded ranking.

The offline evaluator (``model/eval/llm_methods.py``) and the online service both call
``Recommender.recommend``; the only difference is where the short-term items and the memory vectors
come from (prepared samples + a memory cache, or Redis).

What fills the memory slot is the *slot policy*:

- ``none``      BIGRec: the slot keeps the placeholder's own state (no memory);
- ``learned``   AutoMR: the retriever's top-k elements (Eq. 3);
- ``random``    a uniformly random element (RQ2 baseline), seeded per request;
- ``semantic``  ReLLa adapted: the element with the highest cosine to the query ``z_t``;

``full_history=True`` is the context-window baseline: every history title in the prompt, no slot.

Decoding: greedy, grounded to the catalogue by L2 (BIGRec), or, with ``constrained=True`` ("Decoding
Matters", Bao et al. 2024), beam search restricted to a prefix tree of the user's unseen titles,
``num_beams`` beams; the ranking is then the beams' items (best first) followed by the L2 grounding of
the best beam for the rest. Both run on the engine of ``model/generation/``, a batch at a time here,
continuously batched in the service (``begin`` / ``advance`` / ``generation.step`` / ``finish``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from model import generation
from model.generation import DecodeBatch, Prefill
from model.generation.beams import PopularityPrior, TrieBeams, trie_tables
from model.generation.draft import NgramDrafter
from model.generation.prefill import prefill_groups
from model.grounding import CatalogueIndex, clean_generated
from model.grounding_memo import GroundingMemo
from model.llm import SplitLM
from model.prompts import PromptBuilder, PromptIds
from model.retriever import Retriever
from model.title_trie import TitleTrie

log = logging.getLogger(__name__)

SlotPolicy = Literal["none", "learned", "random", "semantic"]
SLOT_POLICIES: tuple[str, ...] = ("none", "learned", "random", "semantic")
Pick = tuple[list[int], list[float]]  # the memory positions that fill the slots ([] = none), their scores


@dataclass
class RecommendRequest:
    """One user's context. Item indices are dense catalogue indices, oldest first."""

    context: list[int]  # the titles shown in the prompt (the last K, or the whole history)
    memory: torch.Tensor | None = None  # [M, H] memory element vectors, oldest first (None: no memory)
    exclude: set[int] = field(default_factory=set)  # items never recommended (the user's seen items)
    query: torch.Tensor | None = None  # [H] z_t when the caller already has it (cache); else from the prefill
    seed: int = 0  # for the random policy


@dataclass
class Recommendation:
    items: list[int]  # ranked item indices, best first
    distances: list[float]  # L2 (squared) distance of each item to the generated title's embedding
    generated: str  # the generated title (cleaned)
    memory_indices: list[int]  # positions in the request's memory that filled the slots ([] = none)
    memory_scores: list[float]  # the policy's score of each selected element
    beam_items: list[int] = field(default_factory=list)  # constrained decoding: the beams' items, best first
    # the score of each beam item's title (log-probability over the unseen titles + the popularity prior)
    beam_scores: list[float] = field(default_factory=list)


@dataclass(eq=False)
class PrefillGroup:
    """One prefill of some requests' prompts (``Recommender.begin``) and what their memory pick needs."""

    prefill: Prefill
    rows: list[int]  # the requests' positions in the call to ``begin``
    requests: list[RecommendRequest]
    picks: list[Pick | None]  # made before the prefill (None: from its z_t, in ``Recommender.advance``)

    @property
    def tags(self) -> list:
        return self.prefill.tags


@dataclass
class RecommenderConfig:
    policy: SlotPolicy = "none"
    full_history: bool = False
    n_slots: int = 1  # top-k elements into k slots
    topk: int = 20
    max_new_tokens: int = 32
    num_beams: int = 1
    constrained: bool = False  # beam search over a prefix tree of catalogue titles
    # constrained: normalise each step over the tokens that lead to an unseen title (model/generation/beams.py)
    renormalize: bool = True
    # constrained: the popularity prior (model/generation/beams.py PopularityPrior; needs the recommender's
    # counts): gamma x log(share) added to a title's score (product), and/or the weight of the share in
    # a mixture with the model's probability
    popularity_gamma: float = 0.0
    popularity_mix: float = 0.0
    batch_size: int = 16  # LLM batch (generation and grounding embeddings)
    # reuse the KV cache of the prompt template's head (exact in float32; in bfloat16 its rounding
    # differs from a full prefill's, which can flip near-tied greedy tokens: see BENCHMARKS.md §8)
    head_cache: bool = True
    # step-wise generation (``start``): rows sorted by prompt length are prefilled in groups of at
    # most this many padded prompt tokens (rows x longest prompt); a longer prompt is prefilled alone.
    # Padding wastes compute and a padded batch takes torch's masked attention path: long prompts of
    # unequal length are faster one by one (BENCHMARKS §4.5)
    prefill_max_tokens: int = 2048
    # speculative steps (step-wise generation only): while the decoding batch has at most
    # ``draft_max_rows`` rows, a step also checks up to ``draft_tokens`` tokens per row guessed from
    # the catalogue's titles (model/generation/draft.py); the answers stay the greedy ones. 0 = off
    draft_tokens: int = 0
    draft_max_rows: int = 1
    # grounding embeddings by text (model/grounding_memo.py): an answer equal to a catalogue title takes
    # the index's row, an answer seen recently its remembered vector; only new texts are embedded
    ground_memo: bool = True

    def __post_init__(self) -> None:
        if self.policy not in SLOT_POLICIES:
            raise ValueError(f"unknown slot policy {self.policy!r}; use one of {SLOT_POLICIES}")
        if self.full_history and self.policy != "none":
            raise ValueError("full_history puts every title in the prompt: it takes no memory slot (policy 'none')")
        if self.n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {self.n_slots}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and not self.constrained:
            raise ValueError("beams run over the catalogue's title trie: num_beams > 1 needs constrained=true")
        if self.prefill_max_tokens < 1:
            raise ValueError(f"prefill_max_tokens must be >= 1, got {self.prefill_max_tokens}")
        if self.popularity_gamma < 0 or not 0.0 <= self.popularity_mix <= 1.0:
            raise ValueError(f"need popularity_gamma >= 0 and 0 <= popularity_mix <= 1, got "
                             f"{self.popularity_gamma} and {self.popularity_mix}")
        if self.draft_tokens < 0 or self.draft_max_rows < 1:
            raise ValueError(f"draft_tokens must be >= 0 and draft_max_rows >= 1, got {self.draft_tokens} "
                             f"and {self.draft_max_rows}")


class Recommender:
    """Holds the generator, its prompt builder, the catalogue index and (for AutoMR) the retriever."""

    def __init__(
        self,
        lm: SplitLM,
        builder: PromptBuilder,
        titles: Sequence[str],
        index: CatalogueIndex,
        retriever: Retriever | None = None,
        config: RecommenderConfig | None = None,
        drafter: NgramDrafter | None = None,
        ground_memo: GroundingMemo | None = None,
        popularity: np.ndarray | None = None,
    ):
        self.lm, self.builder, self.titles, self.index = lm, builder, list(titles), index
        self.retriever = retriever
        self.config = config or RecommenderConfig()
        if self.config.policy == "learned" and retriever is None:
            raise ValueError("the 'learned' slot policy needs a trained retriever")
        if builder.n_slots != self.config.n_slots:
            raise ValueError(f"the prompt builder has {builder.n_slots} slots, the config asks for {self.config.n_slots}")
        if index.n_items != len(self.titles):
            raise ValueError(f"the index holds {index.n_items} items, the catalogue {len(self.titles)}")
        self._trie: TitleTrie | None = None
        self._trie_tables = None  # built with the trie's first beam search (model/generation/beams.py)
        self._drafter = drafter  # None: built from the catalogue on first use
        self._ground_memo = ground_memo  # None: built on first use (config.ground_memo)
        cfg = self.config
        if (cfg.popularity_gamma or cfg.popularity_mix) and popularity is None:  # artefacts without counts
            log.warning("no item counts (ARTEFACTS/popularity.json): the popularity prior is off")
            self.config = dataclasses.replace(cfg, popularity_gamma=0.0, popularity_mix=0.0)
        self._prior = None
        if self.config.popularity_gamma or self.config.popularity_mix:
            self._prior = PopularityPrior.from_counts(self.trie, popularity, self.config.popularity_gamma,
                                                      self.config.popularity_mix)

    @property
    def trie(self) -> TitleTrie:
        """Prefix tree of the catalogue's response token sequences (built once, on first use)."""
        if self._trie is None:
            self._trie = TitleTrie.from_prompt_builder(self.titles, self.builder, progress=False)
        return self._trie

    @property
    def trie_tables(self):
        """The trie's node tables for pruning seen items (``model/generation/beams.py``), built once."""
        if self._trie_tables is None:
            self._trie_tables = trie_tables(self.trie)
        return self._trie_tables

    @property
    def drafter(self) -> NgramDrafter:
        """Draft table of the catalogue's response token sequences (built once, on first use)."""
        if self._drafter is None:
            self._drafter = NgramDrafter.from_prompt_builder(self.titles, self.builder)
        return self._drafter

    @property
    def ground_memo(self) -> GroundingMemo:
        """Grounding embeddings remembered by text (built once, on first use)."""
        if self._ground_memo is None:
            self._ground_memo = GroundingMemo(self.titles, self.index)
        return self._ground_memo

    # ---- steps ---------------------------------------------------------------------------------

    def prompts(self, requests: Sequence[RecommendRequest]) -> list[PromptIds]:
        with_slot = not self.config.full_history
        return [self.builder.build([self.titles[i] for i in r.context], with_slot=with_slot) for r in requests]

    def select_memory(self, requests: Sequence[RecommendRequest]) -> list[Pick | None]:
        """Per request: the memory positions that fill the slots and their scores ([] = no memory), or
        ``None`` when the pick needs z_t that the caller did not give: it is then made from the
        prefill's own layer-L state (``choose``), without a second lower-layer pass."""
        policy, k = self.config.policy, self.config.n_slots
        out: list[Pick | None] = [([], []) for _ in requests]
        if policy == "none":
            return out
        for i, r in enumerate(requests):
            if r.memory is None or len(r.memory) == 0:
                continue
            if policy == "random":
                m = len(r.memory)
                pick = np.random.default_rng(r.seed).choice(m, size=min(k, m), replace=False).tolist()
                out[i] = (pick, [float("nan")] * len(pick))
            elif r.query is None:
                out[i] = None  # picked from the prefill's z_t
            else:
                out[i] = self.pick(r.memory, r.query.float())
        return out

    def pick(self, memory: torch.Tensor, query: torch.Tensor) -> Pick:
        """The top-``n_slots`` elements of ``memory`` [M, H] for the query z_t [H] under the policy."""
        mem = memory.float()  # [M, H]
        if self.config.policy == "semantic":
            s = torch.nn.functional.cosine_similarity(mem, query[None, :], dim=-1)  # [M]
        else:  # learned
            with torch.no_grad():
                s = self.retriever.scores(query[None, :], mem[None])[0]  # [M]
        top = torch.topk(s, min(self.config.n_slots, len(s)))
        return top.indices.tolist(), top.values.tolist()

    def choose(self, requests: Sequence[RecommendRequest], picks: Sequence[Pick | None],
               z: torch.Tensor) -> tuple[list[Pick], torch.Tensor | None, torch.Tensor | None]:
        """The memory of one prefill's rows, from their z_t ``z`` [b, H] (the prefill's layer-L state
        of each prompt's last token): the picks made (a ``None`` pick is made from z here), the slot
        vectors [b, k, H] and which rows take them [b] bool (None, None: no row takes memory; a row
        whose pick is short of ``n_slots`` keeps the placeholder)."""
        k = self.config.n_slots
        picks = [self.pick(r.memory, z[j]) if p is None else p for j, (r, p) in enumerate(zip(requests, picks))]
        use = torch.tensor([len(p[0]) == k for p in picks], dtype=torch.bool)  # [b]
        if not bool(use.any()):
            return picks, None, None
        vectors = torch.zeros(len(requests), k, self.lm.hidden_size)  # [b, k, H]
        for j in use.nonzero()[:, 0].tolist():
            vectors[j] = requests[j].memory[picks[j][0]].float()
        return picks, vectors, use

    def ground(self, requests: Sequence[RecommendRequest], texts: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """BIGRec grounding of the generated texts (clean -> base-model embedding -> L2 rank); the
        embeddings of texts the memo knows are not recomputed."""
        embed = lambda batch: self.lm.embed_final(list(batch), base=True).numpy()  # noqa: E731  [b, H]
        if self.config.ground_memo:
            embed = self.ground_memo.wrap(embed)
        return self.index.ground(texts, embed, exclude=[r.exclude for r in requests], topk=topk,
                                 batch_size=max(self.config.batch_size, 16))

    # ---- the whole path ------------------------------------------------------------------------

    def recommend(self, requests: Sequence[RecommendRequest], topk: int | None = None) -> list[Recommendation]:
        """Recommend for a batch of requests (results in request order): ``batch_size`` requests at a
        time are prefilled and decoded (``start`` + ``generation.decode``), then all are grounded."""
        if not requests:
            return []
        texts: list[str] = []
        beams: list[list[int]] = []
        picks: list[Pick] = []
        for s in range(0, len(requests), self.config.batch_size):
            part = list(requests[s:s + self.config.batch_size])
            batch, part_picks = self.start(part, list(range(len(part))))
            searches = dict(zip(batch.tags, batch.searches))
            done = generation.decode(self.lm, batch)
            texts += [self.lm.text(done[i]) for i in range(len(part))]
            beams += [searches[i].result().scored_items if searches[i] is not None else [] for i in range(len(part))]
            picks += part_picks
        return self.finish(requests, texts, beams, picks, topk)

    # ---- the same path in steps (the service's continuous batching) ----------------------------

    def search(self, request: RecommendRequest) -> TrieBeams:
        """A beam search over the title trie for ``request`` (its seen items pruned), to be stepped
        on its prefilled row (``DecodeBatch.searches``)."""
        cfg = self.config
        return TrieBeams(self.trie, self.trie_tables, request.exclude, cfg.num_beams, cfg.max_new_tokens,
                         renormalize=cfg.renormalize, prior=self._prior)

    def begin(self, requests: Sequence[RecommendRequest], tags: Sequence) -> list[PrefillGroup]:
        """``recommend`` up to its prefill: the prompts, the picks that need no z_t, and one
        ``PrefillGroup`` per group of similar prompt length (``prefill_max_tokens``), whose rows are
        named by ``tags`` (one per request). Run each with ``advance``, whole or in chunks (the service
        feeds background prefills between decoding steps). A group of at most ``draft_max_rows``
        greedy rows feeds the drafted start of an answer in its prefill (the config's drafting); a
        constrained config gives each row its beam search (``search``)."""
        if not requests:
            raise ValueError("begin needs at least one request")
        if len(tags) != len(requests):
            raise ValueError(f"{len(tags)} tags for {len(requests)} requests")
        cfg = self.config
        prompts, picks = self.prompts(requests), self.select_memory(requests)
        policy = dict(drafter=self.drafter, draft_tokens=cfg.draft_tokens,
                      draft_max_rows=cfg.draft_max_rows) if cfg.draft_tokens and not cfg.constrained else {}
        out = []
        for rows in prefill_groups([len(p.input_ids) for p in prompts], cfg.prefill_max_tokens):
            prefill = generation.begin(self.lm, [prompts[i] for i in rows], [tags[i] for i in rows],
                                       max_new_tokens=cfg.max_new_tokens, reuse_head=cfg.head_cache, **policy)
            if cfg.constrained:
                prefill.searches = [self.search(requests[i]) for i in rows]
            out.append(PrefillGroup(prefill, rows, [requests[i] for i in rows], [picks[i] for i in rows]))
        return out

    def advance(self, group: PrefillGroup, max_tokens: int | None = None) -> tuple[DecodeBatch, list[Pick]] | None:
        """Feed ``group``'s next chunk (at most ``max_tokens`` padded tokens; None: all that is left).
        After its last chunk: its rows as a ``DecodeBatch`` (to decode with ``generation.step``, alone
        or merged with other batches of the same model) and the memory picks of its rows, made from
        the prefill's own z_t; before it, None."""
        z = generation.advance(self.lm, group.prefill, max_tokens)
        if z is None:
            return None
        picks, vectors, use = self.choose(group.requests, group.picks, z)
        return generation.complete(self.lm, group.prefill, vectors, use), picks

    def start(self, requests: Sequence[RecommendRequest], tags: Sequence) -> tuple[DecodeBatch, list[Pick]]:
        """``begin`` and every group's prefill run whole, into one decoding batch; the memory picks
        in request order."""
        batch, picks = None, [([], [])] * len(requests)
        for group in self.begin(requests, tags):
            part, group_picks = self.advance(group)
            for i, p in zip(group.rows, group_picks):
                picks[i] = p
            if batch is None:
                batch = part
            else:
                batch.merge(part)
        return batch, picks

    def finish(self, requests: Sequence[RecommendRequest], texts: Sequence[str],
               beams: Sequence[list[tuple[int, float]]] | None, picks: Sequence[tuple[list[int], list[float]] | None],
               topk: int | None = None) -> list[Recommendation]:
        """``recommend`` after generation: grounding and the ranked items of each request. ``beams``: each
        request's beam items with their titles' scores, best first ([] for greedy decoding)."""
        topk = topk or self.config.topk
        beams = beams or [[] for _ in requests]
        picks = [p if p is not None else ([], []) for p in picks]
        items, dist = self.ground(requests, texts, topk)
        out = []
        for i, r in enumerate(requests):
            ranked = [(int(x), float(d)) for x, d in zip(items[i], dist[i]) if x >= 0]
            if beams[i]:  # constrained: the beams' real titles first (at distance 0), then the L2 ranking
                head = {b for b, _ in beams[i] if b not in r.exclude}
                ranked = [(b, 0.0) for b, _ in beams[i] if b in head] + [(x, d) for x, d in ranked if x not in head]
                ranked = ranked[:topk]
            out.append(Recommendation(
                items=[x for x, _ in ranked],
                distances=[d for _, d in ranked],
                generated=clean_generated(texts[i]),
                beam_items=[b for b, _ in beams[i]],
                beam_scores=[s for _, s in beams[i]],
                memory_indices=picks[i][0],
                memory_scores=picks[i][1],
            ))
        return out

