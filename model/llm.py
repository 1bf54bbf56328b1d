"""The generator LLM cut after layer L (METHOD.md §2, AutoMR §3.1).

``LLM^(:L)`` = embeddings + layers 1..L, ``LLM^(L:)`` = layers L+1..N + final norm + LM head. The lower
part encodes prompts into memory vectors and queries (``encode_lower``); the upper part generates with
the memory slot filled (``generate``) and scores a target title for many candidate slot vectors at once
(``target_logprob``, Eq. 5).

The slot: the prompt holds a placeholder token span (``model/prompts.py``). At the output of layer L
the hidden state at each slot position is replaced by the given vector, on the prefill only; the
ordinary KV cache then carries it into every decoding step. The replacement is a forward hook on
``model.model.layers[L-1]`` that reads a ``contextvars.ContextVar``, so concurrent requests (threads or
asyncio tasks) on one shared model never see each other's vectors.

Hand-written loops over the layers (``encode_lower``, ``target_logprob``, ``embed_final`` and the
training forward) use ``model.model.rotary_emb`` and ``transformers.masking_utils.create_causal_mask``
exactly as ``LlamaModel.forward`` does in transformers 5.23 (pinned); the tests compare them with the
full forward. Positions of left-padded rows follow ``generate``: ``cumsum(attention_mask) - 1``.

Tuned weights: a GGUF-loaded model cannot ``save_pretrained``; the tuned part (layers L+1..N + final
norm, + the LM head only when it is not tied to the embeddings) is saved by ``save_upper`` as
safetensors + JSON and applied on top of the base model by ``load_upper``.

Threads: on a small, shared CPU machine, fewer intra-op threads can be much faster (OpenMP threads
wait for each other when another process holds a core); the caller decides (``torch.set_num_threads``).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.masking_utils import create_causal_mask

from model.kv_cache import concat_rows, growing_cache
from model.prompts import PromptIds

UPPER_FORMAT = "automr-upper/1"
UPPER_WEIGHTS = "upper.safetensors"
UPPER_CONFIG = "upper.json"

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX512-BF16 or AMX)? Without it torch emulates
    bfloat16 matmuls, ~4x slower than float32 (AVX2-only AMD EPYC: 9 vs 43 GFLOP/s per core)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def auto_dtype() -> str:
    """``"auto"``: bfloat16 where the CPU computes it natively (half the memory traffic), else float32."""
    return "bfloat16" if native_bf16() else "float32"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name (``bfloat16``/``bf16``, ``float32``/``fp32``, ``auto``) or a dtype."""
    if isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"dtype {dtype} is not supported: use bfloat16 or float32")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use 'bfloat16', 'float32' or 'auto'")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------------------------------
# The slot replacement (request-scoped)
# --------------------------------------------------------------------------------------------------


# A lazy slot filler: given the layer-L state of each prompt's last token (its z_t) [B, H] float32,
# returns the slot vectors [B, S, H] and which rows take them [B] bool (the others keep the placeholder).
SlotSelect = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _SlotFill:
    """One request's replacement: applied once, to the first (prefill) output of ``module``.

    Either fixed ``vectors`` or a ``select`` function that picks them from the prefill's own layer-L
    state of the last prompt token (z_t), so that AutoMR needs no separate lower-layer pass."""

    module: nn.Module  # the decoder layer whose output is patched (layers[L-1])
    positions: torch.Tensor  # [B, S] long, positions in the (padded) prefill input
    vectors: torch.Tensor | None  # [B, S, H]
    seq_len: int  # length of the prefill input; a call of another length is not the prefill
    select: "SlotSelect | None" = None
    done: bool = False
    tail: int = 0  # drafted answer tokens fed after the prompt (z_t is the prompt's last token's state)


_SLOT_FILL: contextvars.ContextVar[_SlotFill | None] = contextvars.ContextVar("automr_slot_fill", default=None)


def _slot_hook(module: nn.Module, args, output):
    """Forward hook on layers[L-1]: replace the slot states of this request's prefill, else no-op."""
    fill = _SLOT_FILL.get()
    if fill is None or fill.done or fill.module is not module:
        return None
    h = output[0] if isinstance(output, tuple) else output  # [B', T, H]
    if h.shape[1] != fill.seq_len:
        raise RuntimeError(
            f"slot fill expected the prefill call with {fill.seq_len} positions, got {h.shape[1]}"
        )
    fill.done = True
    rows = fill.positions.shape[0]
    if h.shape[0] % rows:
        raise RuntimeError(f"batch of {h.shape[0]} rows is not a multiple of the {rows} prompts")
    rep = h.shape[0] // rows  # generate() expands each prompt num_beams times with repeat_interleave
    use = None
    if fill.select is not None:
        z = h[::rep, -1 - fill.tail].float()  # [B, H] the last prompt token's layer-L state (left padding: real token)
        vectors, use = fill.select(z)
        if not bool(use.any()):
            return None
    else:
        vectors = fill.vectors
    pos = fill.positions.repeat_interleave(rep, dim=0).to(h.device)  # [B', S]
    vec = vectors.repeat_interleave(rep, dim=0).to(device=h.device, dtype=h.dtype)  # [B', S, H]
    h = h.clone()
    rows_idx = torch.arange(h.shape[0], device=h.device)[:, None]  # [B', 1]
    if use is not None:  # rows without memory keep their own (placeholder) states
        keep = ~use.to(h.device).repeat_interleave(rep, dim=0)  # [B']
        vec = torch.where(keep[:, None, None], h[rows_idx, pos], vec)
    h[rows_idx, pos] = vec
    return (h, *output[1:]) if isinstance(output, tuple) else h


class slot_fill:
    """Context manager: fill the slots of the next forward of ``split`` (its prefill) in this context.

    ``positions`` [B, S] are positions in the padded input of length ``seq_len``; ``vectors`` [B, S, H].
    Used by ``SplitLM.generate`` and by training with memory; safe across threads and asyncio tasks.
    """

    def __init__(self, split: "SplitLM", positions: torch.Tensor, vectors: torch.Tensor | None, seq_len: int,
                 select: SlotSelect | None = None, tail: int = 0):
        if (vectors is None) == (select is None):
            raise ValueError("give exactly one of vectors and select")
        self._fill = _SlotFill(split.model.model.layers[split.cut - 1], positions, vectors, seq_len, select,
                               tail=tail)
        self._token = None

    def __enter__(self) -> "slot_fill":
        self._token = _SLOT_FILL.set(self._fill)
        return self

    def __exit__(self, *exc) -> None:
        _SLOT_FILL.reset(self._token)

    @property
    def applied(self) -> bool:
        return self._fill.done


def _ensure_slot_hook(layer: nn.Module) -> None:
    if not getattr(layer, "_automr_slot_hook", False):
        layer.register_forward_hook(_slot_hook)
        layer._automr_slot_hook = True


def _dense_head_input(module: nn.Module, args: tuple) -> tuple:
    """The LM head's input with standard strides.

    HF's causal LMs call the head on ``hidden[:, -k:, :]``, a view whose batch stride is still T*H.
    torch's CPU matmul cannot fold such a [B, k, H] view into one mm and falls back to a bmm over a
    materialised copy of the [H, V] weight: 78 ms per prefill at B=1 and ~580 ms at B=8 for
    SmolLM2's 49k x 576 head, against ~6 ms for the same product on a fresh tensor.
    """
    x = args[0]
    if x.dim() == 3 and x.stride() != x.new_empty(x.shape).stride():
        x = x.clone(memory_format=torch.contiguous_format)
    return (x, *args[1:])


def _ensure_dense_head_input(head: nn.Module | None) -> None:
    if head is not None and not getattr(head, "_automr_dense_input", False):
        head.register_forward_pre_hook(_dense_head_input)
        head._automr_dense_input = True


# --------------------------------------------------------------------------------------------------
# Stopping after the answer's line
# --------------------------------------------------------------------------------------------------


class StopAfterFirstLine(StoppingCriteria):
    """Per row: stop once a newline follows some non-blank generated text. The answer is one line (a
    title; ``clean_generated`` reads the first non-empty line), so the tokens after it are never used;
    a generator that runs on after its title would otherwise cost up to ``max_new_tokens`` steps.

    ``newline`` [V] bool: the token's text holds a newline; ``lead`` [V] bool: non-blank text before
    that newline; ``content`` [V] bool: non-blank text anywhere. ``start``: where new tokens begin."""

    def __init__(self, newline: torch.Tensor, lead: torch.Tensor, content: torch.Tensor, start: int):
        self.newline, self.lead, self.content, self.start = newline, lead, content, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return self.done(input_ids[:, self.start:].cpu()).to(input_ids.device)

    def done(self, new: torch.Tensor) -> torch.Tensor:
        """[B] bool from the new tokens only, ``new`` [B, n] (CPU)."""
        if new.shape[1] == 0:
            return torch.zeros(new.shape[0], dtype=torch.bool)
        content = self.content[new]  # [B, n]
        before = (content.cumsum(1) - content.long()) > 0  # non-blank text strictly before position j
        return (self.newline[new] & (self.lead[new] | before)).any(1)  # [B]

    def ends_with_stop(self, new: Sequence[int]) -> bool:
        """``done`` for one row whose earlier tokens were checked already (none ended the line): does
        its last new token end the answer line? Constant work per token instead of ``done``'s whole row."""
        last = new[-1]
        if not bool(self.newline[last]):
            return False
        return bool(self.lead[last]) or bool(self.content[list(new[:-1])].any())


def line_tables(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``StopAfterFirstLine``'s per-token tables [V] bool (newline, lead, content) from the token texts."""
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))])
    texts += [""] * (vocab_size - len(texts))
    newline = torch.tensor(["\n" in t for t in texts])
    lead = torch.tensor([bool(t.split("\n", 1)[0].strip()) if "\n" in t else False for t in texts])
    content = torch.tensor([bool(t.strip()) for t in texts])
    return newline, lead, content


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ids [B, T] long, attention mask [B, T] long (1 = real token)."""
    if not seqs:
        raise ValueError("empty batch")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("a sequence in the batch has no tokens")
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, t - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of left-padded rows, as ``generate`` computes them (pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _batches(order: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


@dataclass(eq=False)
class Prefill:
    """A prefill in progress (``SplitLM.begin``), run by ``SplitLM.advance`` whole or chunk by chunk.

    The fed columns are the prompts (left-padded after the shared head, whose KV is in ``cache``
    already) then the drafted guess; columns before ``at`` are in the cache. The last chunk starts
    at or before ``final_from``, the first slot column (the prompt length without slots)."""

    ids: torch.Tensor  # [B, T + k] fed token ids: the prompts, then the k drafted guess tokens
    mask: torch.Tensor  # [B, T + k] attention mask (0 = padding)
    pos: torch.Tensor  # [B, T + k] position ids
    prompt_len: int  # T
    at: int  # the next column to feed
    final_from: int  # the first slot column (T without slots): chunks before the last end at or before it
    cache: DynamicCache
    fill_from: Callable[[int, int], Any]  # (offset, tail) -> the last forward's slot_fill or None
    draft: list[int]
    tags: list[Any]
    max_new_tokens: int
    stop_at_newline: bool
    policy: dict  # the batch's drafting policy (DecodeBatch's drafter, draft_tokens, draft_max_rows)
    searches: list[Any] | None = None  # per row: None (greedy) or its beam search (DecodeBatch.searches)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def done(self) -> bool:
        """Has its last chunk run (every column fed)?"""
        return self.at >= self.ids.shape[1]


# --------------------------------------------------------------------------------------------------
# SplitLM
# --------------------------------------------------------------------------------------------------


def _drafts_for(rows: int, drafter: Any, draft_tokens: int, draft_max_rows: int) -> bool:
    """The speculative-step policy: drafted tokens are fed while at most ``draft_max_rows`` rows decode."""
    return drafter is not None and draft_tokens >= 1 and rows <= draft_max_rows


@dataclass(eq=False)
class DecodeBatch:
    """Rows being decoded together (``SplitLM.start``, ``SplitLM.step``).

    Row j has a KV cache row, an attention mask row (0 = padding: rows of different lengths share
    one sequence axis), the position id of its last token, the scores of its next token, the new
    tokens so far, a budget and a stop rule, its caller's ``tag`` and its search: None for greedy
    decoding, else the ``model.beam_search.TrieBeams`` of its request, whose live beams are
    consecutive rows (they share the request's tag). Rows leave when finished (``step``) and others
    join between steps (``merge``); neither changes any other row's tokens."""

    cache: DynamicCache  # per layer [n, kv_heads, T, d]
    mask: torch.Tensor  # [n, T]
    last: torch.Tensor  # [n]
    logits: torch.Tensor  # [n, V] float32
    tokens: list[list[int]]
    tags: list[Any]
    max_new: list[int]
    stop_lines: list[bool]  # the row ends with its answer line (``StopAfterFirstLine``)
    # speculative steps (``SplitLM.step``): while the batch has at most ``draft_max_rows`` rows, each
    # step also checks up to ``draft_tokens`` tokens per row guessed by ``drafter`` (model/draft.py)
    drafter: Any = None
    draft_tokens: int = 0
    draft_max_rows: int = 1
    searches: list[Any] | None = None  # per row: None (greedy) or its request's beam search

    def __post_init__(self) -> None:
        if self.searches is None:
            self.searches = [None] * len(self.tags)

    @property
    def rows(self) -> int:
        return len(self.tags)

    @property
    def requests(self) -> int:
        """Requests being decoded: greedy rows, and beam searches counted once each."""
        return sum(1 for j, s in enumerate(self.searches) if s is None or j == 0 or self.searches[j - 1] is not s)

    @property
    def drafting(self) -> bool:
        """Does the next forward feed drafted tokens (the policy: few enough rows decode)?"""
        return (_drafts_for(self.rows, self.drafter, self.draft_tokens, self.draft_max_rows)
                and all(s is None for s in self.searches))  # beam rows take no drafts

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order; a row listed twice is copied: a beam that branches)."""
        keep = list(keep)
        if keep == list(range(self.rows)):  # no copy of the cache (beams that each took one token)
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx.to(self.mask.device))
        self.mask, self.last, self.logits = self.mask[idx.to(self.mask.device)], self.last[idx], self.logits[idx]
        self.tokens = [list(self.tokens[j]) for j in keep]
        for name in ("tags", "max_new", "stop_lines", "searches"):
            old = getattr(self, name)
            setattr(self, name, [old[j] for j in keep])

    def _live_columns(self) -> torch.Tensor | None:
        """Positions some row attends to ([t'], CPU), or None when that is all of them."""
        live = self.mask.bool().any(0).cpu()  # [T]
        return None if bool(live.all()) else live.nonzero()[:, 0]

    def merge(self, other: "DecodeBatch") -> None:
        """Append ``other``'s rows (prefilled, next token pending): the shorter side is left-padded
        (masked) to the longer's length, so both keep their positions and attention."""
        if not self.rows:  # every row has left: the batch becomes ``other``
            self.__dict__.update(other.__dict__)
            return
        if self.drafter is None:  # the drafting policy is the batch's; it takes the first one offered
            self.drafter, self.draft_tokens, self.draft_max_rows = other.drafter, other.draft_tokens, other.draft_max_rows
        # positions masked for every row of a side (left by finished rows, padding, rejected draft
        # tokens) are dropped while copying: the batch's sequence axis would otherwise only grow as
        # long as rows keep joining, and every merge and attention would pay for it. Position ids are
        # explicit (``last``), so nothing else changes.
        cols = [self._live_columns(), other._live_columns()]
        masks = [m if c is None else m[:, c.to(m.device)] for m, c in ((self.mask, cols[0]), (other.mask, cols[1]))]
        t = max(m.shape[1] for m in masks)
        pad = lambda m: torch.nn.functional.pad(m, (t - m.shape[1], 0))  # noqa: E731  [n, T] -> [n, t]
        merged = (concat_rows([self.cache, other.cache], columns=cols), torch.cat([pad(m) for m in masks], 0),
                  torch.cat([self.last, other.last], 0), torch.cat([self.logits, other.logits], 0))
        self.cache, self.mask, self.last, self.logits = merged  # all or nothing: a failure above changes nothing
        for name in ("tokens", "tags", "max_new", "stop_lines", "searches"):
            getattr(self, name).extend(getattr(other, name))


class SplitLM:
    """A Llama-family causal LM seen as ``LLM^(:L)`` and ``LLM^(L:)``; see the module docstring.

    Attributes: ``model`` (the HF ``*ForCausalLM``), ``tokenizer`` (pad token set, left padding),
    ``cut`` (L, 1 <= L < N), ``n_layers`` (N), ``hidden_size``, ``dtype``, ``device``.
    Vectors returned (``encode_lower``, ``embed_final``) are float32 on the CPU; vectors passed in
    are cast to the model's dtype.
    """

    def __init__(self, model: nn.Module, tokenizer, cut: int):
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise ValueError(f"{type(model).__name__} is not a Llama-family causal LM (model.model.layers)")
        n = len(base.layers)
        if not 1 <= cut < n:
            raise ValueError(f"cut L={cut} must satisfy 1 <= L < N={n}")
        layer_types = getattr(model.config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError("only full-attention models are supported (found sliding/linear attention layers)")
        self.model = model
        self.tokenizer = tokenizer
        self.cut = cut
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _ensure_slot_hook(base.layers[cut - 1])
        _ensure_dense_head_input(model.get_output_embeddings())
        self._base_upper: nn.ModuleList | None = None  # untuned layers L+1..N (+ norm), see embed_final
        self._base_norm: nn.Module | None = None
        self._fp_cache: tuple[tuple, str] | None = None
        self._head_kv: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, cut: int) -> "SplitLM":
        return cls(model, tokenizer, cut)

    @classmethod
    def load(
        cls,
        path: str | Path,
        gguf_file: str | None = None,
        cut: int = 20,
        dtype: str | torch.dtype = "auto",
    ) -> "SplitLM":
        """Load a local HF directory, or a GGUF file (``path`` = the .gguf, or a dir + ``gguf_file``).

        Nothing is downloaded (``local_files_only``). GGUF weights are dequantized into plain
        ``nn.Linear`` layers, so the upper layers can be tuned and hashed like any other model.
        """
        path = Path(path)
        if gguf_file is None and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        if not path.exists():
            raise ValueError(f"model path {path} does not exist")
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ValueError(f"GGUF file {path / gguf_file} does not exist")
        torch_dtype = resolve_dtype(dtype)
        kwargs: dict = {"local_files_only": True}
        if gguf_file is not None:
            from transformers import GgufConfig

            kwargs["gguf_file"] = gguf_file
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            kwargs["quantization_config"] = GgufConfig(gguf_file=str(path / gguf_file), dequantize=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
        return cls(model, tokenizer, cut)

    # ---- basic properties -----------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def lower_modules(self) -> list[nn.Module]:
        """Embeddings + layers 1..L: never tuned (memory vectors depend on them)."""
        return [self.model.model.embed_tokens, *self.model.model.layers[: self.cut]]

    def upper_layers(self) -> nn.ModuleList:
        return self.model.model.layers[self.cut:]

    # ---- the pieces of the forward --------------------------------------------------------------

    def _mask(self, h: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache=None):
        return create_causal_mask(
            config=self.model.config,
            inputs_embeds=h,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=self.cut if cache is not None else None,
        )

    def _run_layers(self, layers, h, mask, position_ids, cache=None) -> torch.Tensor:
        pe = self.model.model.rotary_emb(h, position_ids=position_ids)
        for layer in layers:
            h = layer(
                h,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=pe,
            )
        return h

    def lower_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layer-L states [B, T, H] of left-padded ``input_ids`` [B, T] (embeddings + layers 1..L only)."""
        pos = positions_from_mask(attention_mask)
        h = self.model.model.embed_tokens(input_ids)
        mask = self._mask(h, attention_mask, pos)
        return self._run_layers(self.model.model.layers[: self.cut], h, mask, pos)

    def upper_forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor, layers=None, norm=None
    ) -> torch.Tensor:
        """Final-norm states [B, T, H] from layer-L states ``h`` [B, T, H] (layers L+1..N + norm)."""
        pos = positions_from_mask(attention_mask)
        mask = self._mask(h, attention_mask, pos)
        layers = self.upper_layers() if layers is None else layers
        h = self._run_layers(layers, h, mask, pos)
        return (self.model.model.norm if norm is None else norm)(h)

    def lower_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layer-L states [B, T, H] under an explicit mask [B, 1, T, T] (bool, True = attend) and
        position ids [B, T]: the packed rows of ``model/train/packed.py``."""
        h = self.model.model.embed_tokens(input_ids)
        return self._run_layers(self.model.model.layers[: self.cut], h, mask, position_ids)

    def upper_states(self, h: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-norm states [B, T, H] from layer-L states under an explicit mask and position ids."""
        return self.model.model.norm(self._run_layers(self.upper_layers(), h, mask, position_ids))

    @staticmethod
    def replace_slots(h: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Out-of-place: ``h`` [B, T, H] with ``h[b, positions[b, s]] = vectors[b, s]``."""
        h = h.clone()
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        h[rows, positions.to(h.device)] = vectors.to(device=h.device, dtype=h.dtype)
        return h

    # ---- LLM^(:L) -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_lower(self, batch: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """[B, H] float32: the layer-L state of each sequence's last token (Eq. 2 / the query z_t).

        Runs only the embeddings and layers 1..L. Sequences are grouped by length to limit padding.
        """
        if len(batch) == 0:
            return torch.zeros(0, self.hidden_size)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        out = torch.empty(len(batch), self.hidden_size, dtype=torch.float32)
        for idx in _batches(order, batch_size):
            ids, mask = left_pad([batch[i] for i in idx], self.pad_id, self.device)
            h = self.lower_forward(ids, mask)  # [b, T, H]
            out[idx] = h[:, -1].float().cpu()
        return out

    # ---- generation with the slot ---------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[PromptIds],
        slot_vectors: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
        return_ids: bool = False,
        num_return_sequences: int = 1,
        slot_select: SlotSelect | None = None,
        n_slots: int = 1,
        stop_at_newline: bool = True,
        reuse_head: bool = True,
        compact: bool = True,
    ) -> list:
        """Greedy (or beam) generation from a batch of prompts; the decoded new tokens per prompt.

        ``slot_vectors`` [B, S, H] replace the layer-L states at each prompt's ``slot_positions``
        (prefill only); ``None`` keeps the placeholder's own states (BIGRec, no memory).
        ``slot_select`` (instead of ``slot_vectors``; ``n_slots`` slots per prompt) picks them during
        the prefill from each prompt's z_t, the layer-L state of its last token (``SlotSelect``): the
        same z_t as ``encode_lower`` of the prompt, without a second lower-layer pass.
        ``prefix_allowed_tokens_fn(batch_id, input_ids)`` is passed to ``generate`` as is (HF
        convention): ``input_ids`` is the whole row, padded to T = max prompt length, so the new
        tokens start at index T (``max(len(p.input_ids) for p in prompts)``); ``batch_id`` is the
        prompt's row, shared by its beams.
        ``return_ids=True`` returns the new token ids (eos and later tokens removed) instead of text.
        ``num_return_sequences`` R > 1 (beam search, R <= num_beams): per prompt a list of its R
        sequences, best first.
        ``stop_at_newline`` (greedy only): a row stops at the newline that ends its first non-blank
        line (``StopAfterFirstLine``); the text up to there is the same as without it.
        ``reuse_head``: prefill only what follows the template head the prompts share
        (``PromptIds.n_shared``), its KV cache computed once and kept (``_head_cache``).
        ``compact`` (greedy without ``prefix_allowed_tokens_fn``): decode with ``start``/``step``, which drop
        finished rows; ``False`` runs HF ``generate`` (same tokens, tested).
        """
        if num_return_sequences > max(num_beams, 1):
            raise ValueError(f"num_return_sequences={num_return_sequences} needs num_beams >= it, got {num_beams}")
        if not prompts:
            return []
        b = len(prompts)
        if compact and num_beams == 1 and prefix_allowed_tokens_fn is None:
            batch = self.start(prompts, slot_vectors=slot_vectors, slot_select=slot_select, n_slots=n_slots,
                               max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline, reuse_head=reuse_head)
            done = self.decode(batch)
            new = [done[i] for i in range(b)]
        else:
            ids, mask, head, fill_from, cache = self._prefill_inputs(prompts, slot_vectors, slot_select, n_slots,
                                                                     reuse_head, rows=b * num_beams)
            fill = fill_from(head)
            t = ids.shape[1]
            stop = StopAfterFirstLine(*self.line_tables(), start=t) if stop_at_newline and num_beams == 1 else None
            gen_cfg = GenerationConfig(
                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                num_return_sequences=num_return_sequences, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                bos_token_id=self.tokenizer.bos_token_id,
            )
            with fill if fill is not None else contextlib.nullcontext():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                          prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, past_key_values=cache,
                                          stopping_criteria=StoppingCriteriaList([stop] if stop else []))
            if fill is not None and not fill.applied:
                raise RuntimeError("the slot replacement hook did not run during generate")
            new = out[:, t:].tolist()
        res = [self._strip_eos(seq) for seq in new] if return_ids else [self.text(seq) for seq in new]
        if num_return_sequences == 1:
            return res
        r = num_return_sequences
        return [res[i * r : (i + 1) * r] for i in range(b)]

    def text(self, tokens: Sequence[int]) -> str:
        """The text of a row's new tokens (cut at eos)."""
        return self.tokenizer.decode(self._strip_eos(list(tokens)), skip_special_tokens=True)

    def _prefill_inputs(self, prompts: Sequence[PromptIds], slot_vectors: torch.Tensor | None,
                        slot_select: SlotSelect | None, n_slots: int, reuse_head: bool, rows: int, spare: int = 64):
        """ids, mask [B, T], the cached head length, the slot filler's maker and the cache (the head's KV
        for ``rows`` rows with room for ``spare`` more positions, or None) of a prefill of ``prompts``.

        ``fill_from(offset, tail)`` is the ``slot_fill`` (or None) of a forward that feeds the columns
        from ``offset`` on, then ``tail`` drafted tokens."""
        if slot_vectors is not None and slot_select is not None:
            raise ValueError("give slot_vectors or slot_select, not both")
        head = self._shared_head(prompts) if reuse_head else 0
        ids, mask = self._pad_after_head(prompts, head)
        b, t = ids.shape
        positions = None
        if slot_vectors is not None:
            positions = self._padded_slot_positions(prompts, mask, tuple(slot_vectors.shape))
        elif slot_select is not None:
            positions = self._padded_slot_positions(prompts, mask, (b, n_slots, self.hidden_size))

        def fill_from(offset: int, tail: int = 0) -> slot_fill | None:
            if positions is None:
                return None
            if slot_vectors is not None:
                return slot_fill(self, positions - offset, slot_vectors, seq_len=t - offset + tail)
            return slot_fill(self, positions - offset, None, seq_len=t - offset + tail, select=slot_select, tail=tail)

        # the prefill runs over each row's tokens after the shared head only
        cache = self._head_cache(prompts[0].input_ids[:head], rows, spare) if head else None
        return ids, mask, head, fill_from, cache

    @staticmethod
    def _slot_columns(prompts: Sequence[PromptIds], mask: torch.Tensor) -> list[list[int]]:
        """Each row's slot positions in the padded batch: shifted by its padding, which comes before
        the prompt or, with a shared head, right after it (slots always lie after the head)."""
        pads = (mask == 0).sum(-1).tolist()
        return [[pads[i] + q for q in p.slot_positions] for i, p in enumerate(prompts)]

    def _first_slot(self, prompts: Sequence[PromptIds], mask: torch.Tensor) -> int:
        """The first padded column that holds a slot in some row (the prompt length T when none)."""
        return min((c for row in self._slot_columns(prompts, mask) for c in row), default=mask.shape[1])

    # ---- greedy decoding, one step at a time ------------------------------------------------------

    def start(self, prompts: Sequence[PromptIds], tags: Sequence | None = None, **kwargs) -> "DecodeBatch":
        """Prefill ``prompts`` in one forward (``begin`` + ``advance``) for greedy decoding with ``step``."""
        return self.advance(self.begin(prompts, tags, **kwargs))

    @torch.no_grad()
    def begin(self, prompts: Sequence[PromptIds], tags: Sequence | None = None, *,
              slot_vectors: torch.Tensor | None = None, slot_select: SlotSelect | None = None, n_slots: int = 1,
              max_new_tokens: int = 32, stop_at_newline: bool = True, reuse_head: bool = True,
              drafter: Any = None, draft_tokens: int = 0, draft_max_rows: int = 1) -> "Prefill":
        """A prefill of ``prompts`` (with their slots filled as in ``generate``) for greedy decoding with
        ``step``, to be run by ``advance`` (whole, or in chunks). ``tags``: each row's name in what
        ``step`` returns (default: its index). Only the shared template head's cache is made here.

        ``drafter``, ``draft_tokens``, ``draft_max_rows``: the batch's speculative-step policy
        (``DecodeBatch``). When it drafts for these rows, the drafted start of an answer
        (``drafter.draft([], draft_tokens)``) is also fed after the prompts in the prefill's last
        forward. Each row keeps it as far as it equals its greedy choices, as a speculative ``step``
        does (``_accept``), so a right guess costs no decoding step; a row is never finished there
        (the token that would end it is left for the first ``step``)."""
        b = len(prompts)
        tags = list(range(b)) if tags is None else list(tags)
        if len(tags) != b:
            raise ValueError(f"{len(tags)} tags for {b} prompts")
        policy = dict(drafter=drafter, draft_tokens=draft_tokens, draft_max_rows=draft_max_rows)
        draft = drafter.draft([], min(draft_tokens, max_new_tokens - 1)) if _drafts_for(b, **policy) else []
        k = len(draft)
        spare = max(len(p.input_ids) for p in prompts) + k + max_new_tokens  # room for every fed token
        ids, mask, head, fill_from, cache = self._prefill_inputs(prompts, slot_vectors, slot_select, n_slots,
                                                                 reuse_head, b, spare)
        cache = cache if cache is not None else growing_cache(self.model.config, spare=spare)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] the left-padded batch's position ids
        fed_ids, fed_mask, fed_pos = ids, mask, pos
        if k:  # [B, T + k]: the guesses follow every row's prompt
            guess = torch.tensor(draft, dtype=torch.long, device=ids.device).expand(b, -1)
            fed_ids = torch.cat([ids, guess], 1)
            fed_mask = torch.cat([mask, torch.ones_like(guess, dtype=mask.dtype)], 1)
            fed_pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(k, device=pos.device)], 1)
        return Prefill(ids=fed_ids, mask=fed_mask, pos=fed_pos, prompt_len=ids.shape[1], at=head,
                       final_from=self._first_slot(prompts, mask), cache=cache, fill_from=fill_from, draft=draft,
                       tags=tags, max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline, policy=policy)

    @torch.no_grad()
    def advance(self, prefill: "Prefill", max_tokens: int | None = None) -> "DecodeBatch | None":
        """Feed ``prefill``'s next chunk: at most ``max_tokens`` padded tokens (rows x columns; None:
        everything left); the ``DecodeBatch`` once its last chunk has run, else None.

        Chunked prefill: a long prefill run whole stops every row that is decoding for its whole
        length (a ~1,200-token full-history prompt takes ~1.2 s); the runner feeds a chunk between two
        decoding steps instead. Every chunk but the last runs the base model only (its KV goes into
        the cache, no LM head) and ends before the first slot; the last one feeds the slots, the
        prompts' last tokens (z_t) and the drafted guess, so the slot fill and the memory pick are
        those of a whole prefill. Exact: attention and positions are those of one forward."""
        p, t = prefill, prefill.prompt_len
        if p.done:
            raise ValueError("this prefill has already run")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        end = p.ids.shape[1] if max_tokens is None else p.at + max(1, max_tokens // p.rows)
        if end < p.final_from:  # a chunk before the slots: its KV only
            self.model.model(input_ids=p.ids[:, p.at:end], attention_mask=p.mask[:, :end],
                             position_ids=p.pos[:, p.at:end], past_key_values=p.cache, use_cache=True)
            p.at = end
            return None
        k = len(p.draft)
        fill = p.fill_from(p.at, k)
        with fill if fill is not None else contextlib.nullcontext():
            out = self.model(input_ids=p.ids[:, p.at:], attention_mask=p.mask, position_ids=p.pos[:, p.at:],
                             past_key_values=p.cache, use_cache=True, logits_to_keep=1 + k)
        if fill is not None and not fill.applied:
            raise RuntimeError("the slot replacement hook did not run during the prefill")
        b = p.rows
        batch = DecodeBatch(cache=p.cache, mask=p.mask[:, :t], last=p.pos[:, t - 1], logits=out.logits[:, -1].float(),
                            tokens=[[] for _ in range(b)], tags=p.tags, max_new=[p.max_new_tokens] * b,
                            stop_lines=[p.stop_at_newline] * b, searches=p.searches, **p.policy)
        if k:
            stop = StopAfterFirstLine(*self.line_tables(), start=0) if p.stop_at_newline else None
            self._accept(batch, out.logits, [p.draft] * b, torch.ones(b, k, dtype=p.mask.dtype), lead=0, stop=stop,
                         finish=False)
        p.at = p.ids.shape[1]
        return batch

    def decode(self, batch: "DecodeBatch") -> dict[Any, list[int]]:
        """Step ``batch`` until every row has finished: tag -> new tokens."""
        out: dict[Any, list[int]] = {}
        while batch.rows:
            out.update(self.step(batch))
        return out

    @torch.no_grad()
    def step(self, batch: "DecodeBatch") -> list[tuple[Any, list[int]]]:
        """One greedy step of every row of ``batch``: each takes its best next token; rows that are
        finished (eos, the end of their answer line, or their token budget) leave the batch and are
        returned as (tag, new tokens including the one that ended them); the others run one forward.

        A finished row no longer costs a step (a batch is otherwise held until its longest answer:
        one chatty row of 32 tokens made every row of a 16-request batch pay 32 steps), and rows
        can join between steps (``DecodeBatch.merge``). The same tokens as HF ``generate`` greedy with
        ``StopAfterFirstLine`` (tested).

        Speculative steps (``batch.drafter``, while the batch has at most ``draft_max_rows`` rows): the
        forward also feeds each row's guessed continuation (``_verify``) and the row keeps the guesses
        that match its own greedy choices, so one forward can add several tokens; the tokens are
        still the greedy ones."""
        if any(s is not None for s in batch.searches):
            finished, nxt = self._search_step(batch)
        else:
            nxt = batch.logits.argmax(-1).cpu()  # [n]
            stop = StopAfterFirstLine(*self.line_tables(), start=0) if any(batch.stop_lines) else None
            done = [self._take(batch, j, tok, stop) for j, tok in enumerate(nxt.tolist())]
            finished = self._leave(batch, done)
            nxt = nxt[[j for j in range(len(done)) if not done[j]]]
        if not batch.rows:
            return finished
        drafts = self._drafts(batch)
        if any(drafts):
            return finished + self._verify(batch, nxt, drafts, stop)
        batch.last = batch.last + 1
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        out = self.model(input_ids=nxt[:, None].to(self.device), attention_mask=batch.mask,
                         position_ids=batch.last[:, None], past_key_values=batch.cache, use_cache=True)
        batch.logits = out.logits[:, -1].float()
        return finished

    def _search_step(self, batch: "DecodeBatch") -> tuple[list[tuple[Any, list[int]]], torch.Tensor]:
        """The choices of a step whose batch holds beam rows: greedy rows take their best token as in
        ``step``; each beam search expands its rows (``TrieBeams.expand``), which may copy or drop
        them. The batch is reordered for the next forward (a search's rows stay consecutive); returns
        the finished rows (a finished search: its tag and best title's tokens) and the next tokens."""
        stop = StopAfterFirstLine(*self.line_tables(), start=0) if any(batch.stop_lines) else None
        logits = batch.logits
        order, toks, finished = [], [], []
        j = 0
        while j < batch.rows:
            search = batch.searches[j]
            if search is None:
                tok = int(logits[j].argmax())
                if self._take(batch, j, tok, stop):
                    finished.append((batch.tags[j], batch.tokens[j]))
                else:
                    order.append(j)
                    toks.append(tok)
                j += 1
                continue
            n = search.rows  # its live beams, rows j .. j + n - 1
            logp = torch.log_softmax(logits[j:j + n].float(), -1).cpu().numpy()  # [n, V]
            plan = search.expand(logp)
            if search.finished:
                finished.append((batch.tags[j], search.result().tokens))
            for b, tok in plan:
                order.append(j + b)
                toks.append(tok)
            j += n
        batch.select(order)
        return finished, torch.tensor(toks, dtype=torch.long)

    def _finishes(self, batch: "DecodeBatch", j: int, tok: int, stop: StopAfterFirstLine | None) -> bool:
        """Would ``tok`` finish row ``j`` (eos, its token budget, or the end of its answer line)?"""
        toks = batch.tokens[j]
        return (tok == self.eos_id or len(toks) + 1 >= batch.max_new[j]
                or (batch.stop_lines[j] and stop.ends_with_stop([*toks, tok])))

    def _take(self, batch: "DecodeBatch", j: int, tok: int, stop: StopAfterFirstLine | None) -> bool:
        """Append ``tok`` to row ``j``'s tokens; is the row finished?"""
        done = self._finishes(batch, j, tok, stop)
        batch.tokens[j].append(tok)
        return done

    @staticmethod
    def _leave(batch: "DecodeBatch", done: Sequence[bool]) -> list[tuple[Any, list[int]]]:
        """Drop the finished rows from ``batch``; their (tag, tokens). A drafter that learns from
        answers (``observe``) sees each finished row's tokens."""
        finished = [(batch.tags[j], batch.tokens[j]) for j in range(len(done)) if done[j]]
        if finished:
            batch.select([j for j in range(len(done)) if not done[j]])
            observe = getattr(batch.drafter, "observe", None)
            for _, tokens in finished if observe is not None else ():
                observe(tokens)
        return finished

    @staticmethod
    def _drafts(batch: "DecodeBatch") -> list[list[int]]:
        """Each row's guessed continuation (within its token budget), or none outside the policy."""
        if not batch.drafting:
            return [[] for _ in range(batch.rows)]
        return [batch.drafter.draft(toks, min(batch.draft_tokens, budget - len(toks)))
                for toks, budget in zip(batch.tokens, batch.max_new)]

    def _verify(self, batch: "DecodeBatch", nxt: torch.Tensor, drafts: list[list[int]],
                stop: StopAfterFirstLine | None) -> list[tuple[Any, list[int]]]:
        """One forward of each row's pending token ``nxt`` [n] and its draft; row j keeps the longest
        draft prefix that equals its greedy choices (the logits at each fed position), and its next
        logits are those after the last kept token. The positions of rejected or padded draft tokens
        stay in the KV cache as masked holes (mask 0): no cache is rewritten, and later tokens take
        position ids that skip them, so attention and positions are those of a plain decode."""
        n, k = batch.rows, max(len(d) for d in drafts)
        ids = torch.full((n, 1 + k), self.pad_id, dtype=torch.long)  # [n, 1+k]
        new = torch.zeros(n, 1 + k, dtype=batch.mask.dtype)  # [n, 1+k] 1 = a fed token
        ids[:, 0], new[:, 0] = nxt, 1
        for j, d in enumerate(drafts):
            ids[j, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
            new[j, 1:1 + len(d)] = 1
        pos = batch.last[:, None] + 1 + torch.arange(1 + k, device=batch.last.device)  # [n, 1+k]
        mask = torch.cat([batch.mask, new.to(batch.mask.device)], 1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos,
                         past_key_values=batch.cache, use_cache=True, logits_to_keep=1 + k)
        return self._accept(batch, out.logits, drafts, new, lead=1, stop=stop)

    def _accept(self, batch: "DecodeBatch", logits: torch.Tensor, drafts: list[list[int]], new: torch.Tensor,
                lead: int, stop: StopAfterFirstLine | None, finish: bool = True) -> list[tuple[Any, list[int]]]:
        """Keep each row's drafted tokens as far as they equal its greedy choices; ``logits`` [n, k', V]
        are those after each fed position (``logits[:, a]`` chooses the token after ``lead`` fed
        tokens and ``a`` drafted ones), ``new`` [n, lead + k] the mask of the fed columns (1 = a real
        token). The rejected columns become holes, the row continues from the logits after its last
        kept token. ``finish=False`` stops before a token that would finish a row (it stays pending)."""
        n = batch.rows
        greedy = logits.argmax(-1).cpu()  # [n, k'] the model's choice after each fed token
        kept, done = [], []
        for j, d in enumerate(drafts):
            a, fin = 0, False
            while a < len(d) and d[a] == int(greedy[j, a]) and not fin:
                if not finish and self._finishes(batch, j, d[a], stop):
                    break  # left pending: the first step takes it and finishes the row
                fin = self._take(batch, j, d[a], stop)
                a += 1
            kept.append(a)
            done.append(fin)
        keep = torch.tensor(kept)  # [n] draft tokens kept per row
        cols = torch.arange(new.shape[1])[None, :]
        new = new * (cols < lead + keep[:, None]).to(new.dtype)  # holes after the kept ones
        batch.mask = torch.cat([batch.mask, new.to(batch.mask.device)], 1)
        batch.last = batch.last + lead + keep.to(batch.last.device)
        batch.logits = logits[torch.arange(n), keep.to(logits.device)].float()  # [n, V]
        return self._leave(batch, done)

    # ---- the shared template head's KV cache ----------------------------------------------------

    def _shared_head(self, prompts: Sequence[PromptIds]) -> int:
        """Length of the template head all ``prompts`` share and whose KV cache generation may reuse
        (0: none). Every prompt must keep at least one token and all its slots after it."""
        n = min(p.n_shared for p in prompts)
        if n < 1:
            return 0
        first = list(prompts[0].input_ids[:n])
        for p in prompts:
            if len(p.input_ids) <= n or list(p.input_ids[:n]) != first or any(q < n for q in p.slot_positions):
                return 0
        return n

    def _pad_after_head(self, prompts: Sequence[PromptIds], head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask [B, T]: left-padded prompts, or with ``head`` > 0 ``head | padding | rest`` per row.

        The padding moves after the shared head so that every row's head sits at positions [0, head)
        and one cached head serves the batch; the position ids (mask cumsum) and attention over the
        real tokens are those of the left-padded batch."""
        if head == 0:
            return left_pad([p.input_ids for p in prompts], self.pad_id, self.device)
        rest, mask = left_pad([p.input_ids[head:] for p in prompts], self.pad_id, self.device)
        b = len(prompts)
        lead = torch.tensor(prompts[0].input_ids[:head], dtype=torch.long, device=self.device).expand(b, -1)
        return torch.cat([lead, rest], 1), torch.cat([torch.ones_like(lead), mask], 1)

    def _head_cache(self, head_ids: Sequence[int], rows: int, spare: int = 64) -> DynamicCache:
        """A fresh cache holding the KV of ``head_ids`` (all layers) for ``rows`` rows, with room for
        ``spare`` more positions.

        The head's KV is computed once per (head, weights) and kept: the key includes every
        parameter's storage and in-place version counter, so tuning or loading weights recomputes it."""
        stamp = tuple((q.data_ptr(), q._version) for q in self.model.parameters())
        key = (tuple(int(i) for i in head_ids), stamp)
        kv = self._head_kv.get(key)
        if kv is None:
            ids = torch.tensor([list(head_ids)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            while len(self._head_kv) >= 4:  # one head per builder in practice
                self._head_kv.pop(next(iter(self._head_kv)))
            self._head_kv[key] = kv
        cache = growing_cache(self.model.config, spare=spare)  # later tokens append in place (model/kv_cache.py)
        for i, (k, v) in enumerate(kv):  # [1, kv_heads, head, d] -> [rows, ...], copied into the buffers
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return cache

    def line_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``StopAfterFirstLine``'s token tables, built once (decodes the whole vocabulary, ~1 s)."""
        if getattr(self, "_lines", None) is None:
            vocab = max(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])
            self._lines = line_tables(self.tokenizer, vocab)
        return self._lines

    def _strip_eos(self, seq: list[int]) -> list[int]:
        """Cut at the first eos; drop the padding that follows a row stopped by a stopping criterion."""
        seq = seq[: seq.index(self.eos_id)] if self.eos_id in seq else seq
        while seq and seq[-1] == self.pad_id:
            seq = seq[:-1]
        return seq

    def _padded_slot_positions(self, prompts, mask, shape: tuple[int, ...]) -> torch.Tensor:
        """Slot positions [B, S] in the padded batch (each row shifted by its padding, which comes
        before the prompt or, with a shared head, right after it: slots always lie after the head);
        ``shape`` is the slot vectors' [B, S, H]."""
        b = len(prompts)
        if len(shape) != 3 or shape[0] != b or shape[2] != self.hidden_size:
            raise ValueError(f"slot_vectors must be [B={b}, S, H={self.hidden_size}], got {tuple(shape)}")
        s = shape[1]
        for i, p in enumerate(prompts):
            if len(p.slot_positions) != s:
                raise ValueError(f"prompt {i} has {len(p.slot_positions)} slots, slot_vectors give {s}")
        return torch.tensor(self._slot_columns(prompts, mask), dtype=torch.long, device=self.device)

    # ---- LLM^(L:) scores for Eq. 5 --------------------------------------------------------------

    @torch.no_grad()
    def target_logprob(
        self,
        prompt: PromptIds,
        target_ids: Sequence[int],
        slot_vectors: torch.Tensor | None,
        chunk_size: int = 32,
    ) -> torch.Tensor:
        """[E] float32: sum_i log P(target_i | prompt with the slots filled by candidate e, target_<i).

        ``slot_vectors`` [E, S, H] (or [E, H] when S = 1); ``None`` scores the placeholder itself
        (E = 1, the no-memory term log P(y | z_t) of Eq. 5). Cost: layers 1..L run once over
        prompt+target; layers L+1..N run once over the prefix before the first slot (its KV cache is
        shared), then over the rest for the E candidates in chunks; the LM head only at the target
        positions.
        """
        target_ids = list(target_ids)
        if not target_ids:
            raise ValueError("target_ids is empty")
        seq = list(prompt.input_ids) + target_ids
        n_prompt, n_total = len(prompt.input_ids), len(seq)
        slots = list(prompt.slot_positions)
        if slot_vectors is not None:
            if not slots:
                raise ValueError("slot_vectors given but the prompt has no slot")
            if slot_vectors.ndim == 2:
                slot_vectors = slot_vectors[:, None, :]
            if slot_vectors.ndim != 3 or tuple(slot_vectors.shape[1:]) != (len(slots), self.hidden_size):
                raise ValueError(
                    f"slot_vectors must be [E, S={len(slots)}, H={self.hidden_size}], got {tuple(slot_vectors.shape)}"
                )
            if slot_vectors.shape[0] == 0:
                return torch.zeros(0)
        p0 = min(slots) if slots else n_prompt - 1  # the first position whose upper states vary
        dev = self.device
        ids = torch.tensor([seq], dtype=torch.long, device=dev)
        ones = torch.ones_like(ids)
        h_low = self.lower_forward(ids, ones)  # [1, T, H]

        # Upper layers over the shared prefix [0, p0), once, into a cache of layers L+1..N.
        prefix = DynamicCache(config=self.model.config)
        pos = torch.arange(n_total, device=dev)[None]  # [1, T]
        if p0 > 0:
            hp = h_low[:, :p0]
            self._run_layers(self.upper_layers(), hp, self._mask(hp, ones[:, :p0], pos[:, :p0], prefix),
                             pos[:, :p0], prefix)

        tgt = torch.tensor(target_ids, device=dev)  # [Y]
        first = n_prompt - 1 - p0  # suffix index of the state that predicts target token 0
        e_total = 1 if slot_vectors is None else slot_vectors.shape[0]
        rel_slots = torch.tensor([q - p0 for q in slots], dtype=torch.long, device=dev)
        out = []
        end = n_total - 1  # the last target token predicts nothing: positions [p0, T-1) suffice
        for start in range(0, e_total, chunk_size):
            c = min(chunk_size, e_total - start)
            hs = h_low[:, p0:end].expand(c, -1, -1)  # [c, T-1-p0, H]
            if slot_vectors is not None:
                vec = slot_vectors[start:start + c]
                hs = self.replace_slots(hs, rel_slots[None].expand(c, -1), vec)
            cache = self._repeat_cache(prefix, c) if p0 > 0 else DynamicCache(config=self.model.config)
            spos = pos[:, p0:end].expand(c, -1)
            mask = self._mask(hs, torch.ones(c, end, dtype=torch.long, device=dev), spos, cache)
            hs = self._run_layers(self.upper_layers(), hs, mask, spos, cache)
            hs = self.model.model.norm(hs[:, first:first + len(target_ids)])  # [c, Y, H]
            logits = self.model.lm_head(hs)  # [c, Y, V], in the model's dtype like the served forward
            picked = logits.gather(-1, tgt[None, :, None].expand(c, -1, 1))[..., 0].float()  # [c, Y]
            lse = torch.logsumexp(logits.float(), dim=-1)  # [c, Y]
            out.append((picked - lse).sum(-1).cpu())
        return torch.cat(out)

    def _repeat_cache(self, prefix: DynamicCache, c: int) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        for i in range(self.cut, self.n_layers):
            k, v = prefix.layers[i].keys, prefix.layers[i].values  # [1, kv_heads, p0, d]
            cache.layers[i].update(k.expand(c, -1, -1, -1), v.expand(c, -1, -1, -1))
        return cache

    # ---- grounding embeddings -------------------------------------------------------------------

    @torch.no_grad()
    def embed_final(self, texts: Sequence[str], batch_size: int = 64, base: bool = True) -> torch.Tensor:
        """[B, H] float32: last-layer state (after the final norm) of the last token of each bare text.

        BIGRec's grounding embedding (``hidden_states[-1][:, -1]``), tokenized with the tokenizer's
        own special tokens, no prompt. ``base=True`` uses the untuned upper layers even after
        ``load_upper`` or training (BIGRec grounds with the base model).
        """
        seqs = [self.tokenizer(t).input_ids for t in texts]
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"text {i} ({texts[i]!r}) has no tokens")
        layers = norm = None
        if base and self._base_upper is not None:
            layers, norm = self._base_upper, self._base_norm
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.empty(len(seqs), self.hidden_size, dtype=torch.float32)
        for idx in _batches(order, batch_size):
            ids, mask = left_pad([seqs[i] for i in idx], self.pad_id, self.device)
            h = self.upper_forward(self.lower_forward(ids, mask), mask, layers=layers, norm=norm)
            out[idx] = h[:, -1].float().cpu()
        return out

    def snapshot_base_upper(self) -> None:
        """Keep a copy of the untuned upper layers + norm (once) before they are tuned or replaced."""
        if self._base_upper is None:
            self._base_upper = copy.deepcopy(self.upper_layers())
            self._base_norm = copy.deepcopy(self.model.model.norm)
            for p in [*self._base_upper.parameters(), *self._base_norm.parameters()]:
                p.requires_grad_(False)

    # ---- identity of the lower part -------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hex digest that changes when the model config, the tokenizer vocabulary, the embedding or
        lower-layer weights (all their bytes), L or the dtype change. Upper layers are excluded: tuning
        them keeps stored memory vectors valid. Hashes ~20 layers (~0.2 s for SmolLM2); cached until a
        lower parameter is modified in place (torch version counters)."""
        tensors = [t for m in self.lower_modules() for t in m.state_dict().values()]
        key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
        if self._fp_cache is not None and self._fp_cache[0] == key:
            return self._fp_cache[1]
        h = hashlib.blake2b(digest_size=16)
        cfg = self.model.config.to_dict()
        for k in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype",
                  "architectures", "use_cache", "_commit_hash"):
            cfg.pop(k, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        vocab = sorted(self.tokenizer.get_vocab().items())
        h.update(json.dumps(vocab, ensure_ascii=False).encode())
        h.update(f"cut={self.cut};dtype={self.dtype}".encode())
        for m in self.lower_modules():
            for name, t in m.state_dict().items():
                h.update(name.encode())
                h.update(_tensor_bytes(t))
        digest = h.hexdigest()
        self._fp_cache = (key, digest)
        return digest

    # ---- tuned upper layers on disk -------------------------------------------------------------

    def upper_state_dict(self) -> dict[str, torch.Tensor]:
        """The tunable part: ``layers.{i}.*`` for i in L..N-1 (0-based), ``norm.weight``, and
        ``lm_head.weight`` only when it is not tied to the (frozen) embeddings."""
        state = {}
        for i in range(self.cut, self.n_layers):
            for k, v in self.model.model.layers[i].state_dict().items():
                state[f"layers.{i}.{k}"] = v
        for k, v in self.model.model.norm.state_dict().items():
            state[f"norm.{k}"] = v
        if not self._head_tied():
            state["lm_head.weight"] = self.model.lm_head.weight
        return state

    def _head_tied(self) -> bool:
        return self.model.lm_head.weight.data_ptr() == self.model.model.embed_tokens.weight.data_ptr()

    def save_upper(self, path: str | Path, extra: dict | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``path/upper.safetensors`` + ``path/upper.json``, in the live dtype of the parameters.

        ``state`` overrides the live parameters (same keys as ``upper_state_dict``), e.g. a best
        checkpoint kept in memory or LoRA-merged weights during training.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.upper_state_dict() if state is None else state
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, str(path / UPPER_WEIGHTS))
        meta = {
            "format": UPPER_FORMAT,
            "cut": self.cut,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": int(self.model.config.vocab_size),
            "model_type": getattr(self.model.config, "model_type", None),
            "base_fingerprint": self.fingerprint(),
            "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
            "keys": sorted(state),
            "extra": extra or {},
        }
        (path / UPPER_CONFIG).write_text(json.dumps(meta, indent=2))

    def load_upper(self, path: str | Path, check_fingerprint: bool = True) -> dict:
        """Apply tuned upper layers saved by ``save_upper`` on top of this (base) model; returns the
        JSON config. Refuses files made for another cut, model shape, or (unless
        ``check_fingerprint=False``) another lower part."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, w_path = path / UPPER_CONFIG, path / UPPER_WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise ValueError(f"{path} does not hold {UPPER_CONFIG} and {UPPER_WEIGHTS}")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        if meta.get("format") != UPPER_FORMAT:
            raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {UPPER_FORMAT!r}")
        for k, mine in (("cut", self.cut), ("n_layers", self.n_layers), ("hidden_size", self.hidden_size)):
            if meta.get(k) != mine:
                raise ValueError(f"{cfg_path}: {k}={meta.get(k)} but this model has {k}={mine}")
        if check_fingerprint and meta.get("base_fingerprint") != self.fingerprint():
            raise ValueError(
                f"{cfg_path}: saved for a lower part with fingerprint {meta.get('base_fingerprint')}, this model "
                f"has {self.fingerprint()} (other base weights, tokenizer or dtype)"
            )
        state = load_file(str(w_path))
        mine = self.upper_state_dict()
        if set(state) != set(mine):
            missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise ValueError(f"{w_path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(mine[k].shape):
                raise ValueError(f"{w_path}: {k} has shape {tuple(v.shape)}, expected {tuple(mine[k].shape)}")
        self.snapshot_base_upper()
        with torch.no_grad():
            for k, v in state.items():
                mine[k].copy_(v.to(mine[k].dtype))
        return meta
