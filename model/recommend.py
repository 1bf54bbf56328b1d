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

Decoding: greedy (default) or beam search for one title, grounded to the catalogue by L2 (BIGRec).
``constrained=True`` is the measured alternative ("Decoding Matters", Bao et al. 2024): beam search
restricted to a prefix tree of real titles, ``num_beams`` beams returned; the ranking is the beams'
items (best first, seen items dropped) followed by the L2 grounding of the best beam for the rest.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from model.grounding import CatalogueIndex, clean_generated
from model.grounding_memo import GroundingMemo
from model.llm import DecodeBatch, Prefill, SplitLM
from model.prompts import PromptBuilder, PromptIds
from model.retriever import Retriever
from model.draft import NgramDrafter
from model.beam_search import PopularityPrior, TrieBeams, trie_tables
from model.title_trie import TitleTrie

log = logging.getLogger(__name__)

SlotPolicy = Literal["none", "learned", "random", "semantic"]
SLOT_POLICIES: tuple[str, ...] = ("none", "learned", "random", "semantic")


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
    beam_items: list[int] = field(default_factory=list)  # constrained decoding: the beams' items


def prefill_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices in prefill groups: by increasing length, each group as long as its rows x its
    longest length stays within ``max_tokens`` (a row longer than that forms a group alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class RecommenderConfig:
    policy: SlotPolicy = "none"
    full_history: bool = False
    n_slots: int = 1  # top-k elements into k slots
    topk: int = 20
    max_new_tokens: int = 32
    num_beams: int = 1
    constrained: bool = False  # beam search over a prefix tree of catalogue titles
    # constrained: normalise each step over the tokens that lead to an unseen title (model/beam_search.py)
    renormalize: bool = True
    # constrained: the popularity prior (model/beam_search.py PopularityPrior; needs the recommender's
    # counts): gamma x log(share) added to a title's score (product), and/or the weight of the share in
    # a mixture with the model's probability
    popularity_gamma: float = 0.0
    popularity_mix: float = 0.0
    batch_size: int = 16  # LLM batch (generation and grounding embeddings)
    # reuse the KV cache of the prompt template's head (exact in float32; in bfloat16 its rounding
    # differs from a full prefill's, which can flip near-tied greedy tokens: see BENCHMARKS.md §5)
    head_cache: bool = True
    # step-wise generation (``start``): rows sorted by prompt length are prefilled in groups of at
    # most this many padded prompt tokens (rows x longest prompt); a longer prompt is prefilled alone.
    # Padding wastes compute and a padded batch takes torch's masked attention path: four
    # full-history prompts of 262-1,233 tokens took 7.4 s together and 3.6 s one by one (BENCHMARKS §6c)
    prefill_max_tokens: int = 2048
    # speculative steps (step-wise generation only): while the decoding batch has at most
    # ``draft_max_rows`` rows, a step also checks up to ``draft_tokens`` tokens per row guessed from
    # the catalogue's titles (model/draft.py); the answers stay the greedy ones. 0 = off
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
        self._trie_tables = None  # built with the trie's first beam search (model/beam_search.py)
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
        """The trie's node tables for pruning seen items (``model/beam_search.py``), built once."""
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

    def select_memory(self, requests: Sequence[RecommendRequest]) -> list[tuple[list[int], list[float]] | None]:
        """Per request: the memory positions that fill the slots and their scores ([] = no memory), or
        ``None`` when the pick needs z_t that the caller did not give: it is then made during the
        generator's own prefill (``generate``), from the same layer-L state, without a second pass."""
        policy, k = self.config.policy, self.config.n_slots
        out: list[tuple[list[int], list[float]] | None] = [([], []) for _ in requests]
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
                out[i] = None  # picked lazily from the prefill's z_t
            else:
                out[i] = self.pick(r.memory, r.query.float())
        return out

    def pick(self, memory: torch.Tensor, query: torch.Tensor) -> tuple[list[int], list[float]]:
        """The top-``n_slots`` elements of ``memory`` [M, H] for the query z_t [H] under the policy."""
        mem = memory.float()  # [M, H]
        if self.config.policy == "semantic":
            s = torch.nn.functional.cosine_similarity(mem, query[None, :], dim=-1)  # [M]
        else:  # learned
            with torch.no_grad():
                s = self.retriever.scores(query[None, :], mem[None])[0]  # [M]
        top = torch.topk(s, min(self.config.n_slots, len(s)))
        return top.indices.tolist(), top.values.tolist()

    def _slot_select(self, requests: Sequence[RecommendRequest], rows: Sequence[int],
                     picks: list[tuple[list[int], list[float]] | None]):
        """The prefill's slot filler for one generation batch (``SplitLM.generate(slot_select=...)``):
        rows with a full pick take its vectors, lazy rows are picked from their z_t here (``picks`` is
        completed in place), the others keep the placeholder. None when no row takes memory."""
        k, h = self.config.n_slots, self.lm.hidden_size
        if not any(picks[i] is None or len(picks[i][0]) == k for i in rows):
            return None

        def select(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # z [b, H]
            vec = torch.zeros(len(rows), k, h)  # [b, k, H]
            use = torch.zeros(len(rows), dtype=torch.bool)  # [b]
            for j, i in enumerate(rows):
                if picks[i] is None:
                    picks[i] = self.pick(requests[i].memory, z[j])
                if len(picks[i][0]) == k:
                    vec[j] = requests[i].memory[picks[i][0]].float()
                    use[j] = True
            return vec, use

        return select

    def generate(
        self, requests: Sequence[RecommendRequest], prompts: Sequence[PromptIds],
        picks: list[tuple[list[int], list[float]] | None],
    ) -> tuple[list[str], list[list[int]]]:
        """Generated text per request (and, when constrained, the items of its beams, best first).

        Per ``batch_size`` requests: greedy decoding and the beam search over the title trie run the
        service's step-wise path (``_begin`` + ``SplitLM.step``: prefill groups, drafting per the config
        for greedy rows), unconstrained beams one HF ``generate`` call. Rows with a full set of slot
        vectors get them at layer L, rows without memory keep the placeholder state; lazy picks
        (``None``) are made inside the prefill and written back into ``picks``."""
        cfg = self.config
        texts: list[str] = [""] * len(requests)
        beams: list[list[int]] = [[] for _ in requests]
        for s in range(0, len(requests), cfg.batch_size):
            rows = list(range(s, min(s + cfg.batch_size, len(requests))))
            if self.stepwise:  # the service's step-wise path (``begin``): a batch at a time here
                batch = self._prefill(self._begin(requests, prompts, picks, rows, rows))
                searches = dict(zip(batch.tags, batch.searches))
                for i, tokens in self.lm.decode(batch).items():
                    texts[i] = self.lm.text(tokens)
                    if searches[i] is not None:
                        beams[i] = searches[i].result().items
                continue
            batch = [prompts[i] for i in rows]
            common = dict(slot_select=self._slot_select(requests, rows, picks), n_slots=cfg.n_slots,
                          max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, reuse_head=cfg.head_cache)
            for i, t in zip(rows, self.lm.generate(batch, **common)):  # unconstrained beams: HF generate
                texts[i] = t
        return texts, beams

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
        """Recommend for a batch of requests (results in request order)."""
        if not requests:
            return []
        prompts = self.prompts(requests)
        picks = self.select_memory(requests)
        texts, beams = self.generate(requests, prompts, picks)
        return self.finish(requests, texts, beams, picks, topk)

    # ---- the same path in steps (the service's continuous batching: model/llm.py DecodeBatch) ------

    @property
    def stepwise(self) -> bool:
        """Can generation run as ``start`` + ``SplitLM.step``: greedy, or beams over the title trie
        (not unconstrained beams, which HF ``generate`` runs)?"""
        return self.config.constrained or self.config.num_beams == 1

    def search(self, request: RecommendRequest) -> TrieBeams:
        """A beam search over the title trie for ``request`` (its seen items pruned), to be stepped
        on its prefilled row (``DecodeBatch.searches``)."""
        cfg = self.config
        return TrieBeams(self.trie, self.trie_tables, request.exclude, cfg.num_beams, cfg.max_new_tokens,
                         renormalize=cfg.renormalize, prior=self._prior)

    def start(self, requests: Sequence[RecommendRequest], tags: Sequence) -> tuple[DecodeBatch, list]:
        """``recommend`` up to its generation: the prompts, the memory picks and the prefill, as a
        ``DecodeBatch`` whose rows are named by ``tags``; decode it with ``self.lm.step`` (it can be
        merged with other batches of the same model) and pass the texts to ``finish``."""
        prefills, picks = self.begin(requests, tags)
        return self._prefill(prefills), picks  # the prefills made the lazy picks

    def begin(self, requests: Sequence[RecommendRequest], tags: Sequence) -> tuple[list[Prefill], list]:
        """``start`` without running the prefills: one ``Prefill`` per prefill group, for
        ``self.lm.advance`` (whole or in chunks: the service feeds long prefills between decoding
        steps), and the memory picks, completed in place by the prefills' last chunks. With a
        constrained config each prefill carries its rows' beam searches (``Prefill.searches``)."""
        if not self.stepwise:
            raise ValueError("step-wise generation is greedy or beams over the title trie: set num_beams=1 or "
                             "constrained=true")
        if not requests:
            raise ValueError("start needs at least one request")
        picks = self.select_memory(requests)
        return self._begin(requests, self.prompts(requests), picks, range(len(requests)), tags), picks

    def _begin(self, requests: Sequence[RecommendRequest], prompts: Sequence[PromptIds],
               picks: list[tuple[list[int], list[float]] | None], rows: Sequence[int],
               tags: Sequence) -> list[Prefill]:
        """The prefills of ``rows`` (named by ``tags``, one per row): in groups of similar length
        (``prefill_max_tokens``), with the drafting policy of the config for greedy rows (a group of
        at most ``draft_max_rows`` rows feeds the drafted start of an answer in its prefill); a
        constrained config gives each row its beam search (``search``)."""
        cfg = self.config
        policy = dict(drafter=self.drafter, draft_tokens=cfg.draft_tokens,
                      draft_max_rows=cfg.draft_max_rows) if cfg.draft_tokens and not cfg.constrained else {}
        out = []
        for group in prefill_groups([len(prompts[i].input_ids) for i in rows], cfg.prefill_max_tokens):
            at = [rows[g] for g in group]
            prefill = self.lm.begin([prompts[i] for i in at], [tags[g] for g in group],
                                    slot_select=self._slot_select(requests, at, picks), n_slots=cfg.n_slots,
                                    max_new_tokens=cfg.max_new_tokens, reuse_head=cfg.head_cache, **policy)
            if cfg.constrained:
                prefill.searches = [self.search(requests[i]) for i in at]
            out.append(prefill)
        return out

    def _prefill(self, prefills: Sequence[Prefill]) -> DecodeBatch:
        """Run ``prefills`` whole, one after the other, into one decoding batch."""
        batch = None
        for part in (self.lm.advance(p) for p in prefills):
            if batch is None:
                batch = part
            else:
                batch.merge(part)
        return batch

    def finish(self, requests: Sequence[RecommendRequest], texts: Sequence[str], beams: Sequence[list[int]] | None,
               picks: Sequence[tuple[list[int], list[float]] | None], topk: int | None = None) -> list[Recommendation]:
        """``recommend`` after generation: grounding and the ranked items of each request."""
        topk = topk or self.config.topk
        beams = beams or [[] for _ in requests]
        picks = [p if p is not None else ([], []) for p in picks]
        items, dist = self.ground(requests, texts, topk)
        out = []
        for i, r in enumerate(requests):
            ranked = [(int(x), float(d)) for x, d in zip(items[i], dist[i]) if x >= 0]
            if beams[i]:  # constrained: the beams' real titles first, then the L2 ranking
                first = [b for b in beams[i] if b not in r.exclude]
                head = set(first)
                ranked = [(b, 0.0) for b in first] + [(x, d) for x, d in ranked if x not in head]
                ranked = ranked[:topk]
            out.append(Recommendation(
                items=[x for x, _ in ranked],
                distances=[d for _, d in ranked],
                generated=clean_generated(texts[i]),
                beam_items=beams[i],
                memory_indices=picks[i][0],
                memory_scores=picks[i][1],
            ))
        return out

