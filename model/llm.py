"""The generator LLM cut after layer L (METHOD.md §2, AutoMR §3.1): the model and nothing else.

``LLM^(:L)`` = embeddings + layers 1..L, ``LLM^(L:)`` = layers L+1..N + final norm + LM head. The lower
part encodes prompts into memory vectors and queries (``encode_lower``); ``replace_slots`` puts memory
vectors into the slot positions of layer-L states; the upper part and ``head`` turn them into logits.
Generation (``model/generation/``), Eq. 5's scores (``model/scoring.py``) and training drive these
pieces; tuned weights on disk and the lower part's identity are in ``model/checkpoint.py``.

The hand-written loops over the layers use ``model.model.rotary_emb`` and
``transformers.masking_utils.create_causal_mask`` exactly as ``LlamaModel.forward`` does in
transformers 5.23 (pinned); the tests compare them with the full forward. Positions of left-padded
rows follow HF ``generate``: ``cumsum(attention_mask) - 1``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import create_causal_mask

from model.row_split import RowSplit, run_layers_split

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


def _batches(order: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


def _run_layers(layers, h, mask, position_ids, cache, pe) -> torch.Tensor:
    for layer in layers:
        h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                  use_cache=cache is not None, position_embeddings=pe)
    return h


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
        self.row_split: RowSplit | None = None  # large forwards in row parts (model/row_split.py)
        self._base_upper: nn.ModuleList | None = None  # untuned layers L+1..N (+ norm), see embed_final
        self._base_norm: nn.Module | None = None

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

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (at least the tokenizer's vocabulary)."""
        return max(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])

    def lower_layers(self) -> nn.ModuleList:
        return self.model.model.layers[: self.cut]

    # ---- the pieces of the forward --------------------------------------------------------------

    def causal_mask(self, h: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                    cache=None, layer_idx: int | None = None):
        """The causal mask of a forward over ``h`` [B, T, H] (made before any layer writes ``cache``;
        ``layer_idx``: the layer whose cache length counts, for a forward of the upper layers alone)."""
        return create_causal_mask(config=self.model.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, layer_idx=layer_idx)

    def run_layers(self, layers, h, mask, position_ids, cache=None) -> torch.Tensor:
        """Decoder ``layers`` in order over ``h`` [B, T, H] (their KV appended to ``cache`` if given);
        in row parts on ``row_split``'s threads when it is set and the forward is large enough."""
        pe = self.model.model.rotary_emb(h, position_ids=position_ids)
        if self.row_split is not None:
            return run_layers_split(self.row_split, _run_layers, layers, h, mask, position_ids, cache, pe,
                                    self.model.config)
        return _run_layers(layers, h, mask, position_ids, cache, pe)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of last-layer states [B, T, H]: the final norm, then the LM head. The norm
        is per position, so norming only the positions kept is exact; its output is a fresh tensor,
        which torch's CPU matmul takes as one mm (a strided [B, k, H] view costs a bmm over a copy of
        the [H, V] weight)."""
        return self.model.lm_head(self.model.model.norm(h))

    def lower_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layer-L states [B, T, H] of left-padded ``input_ids`` [B, T] (embeddings + layers 1..L only)."""
        pos = positions_from_mask(attention_mask)
        h = self.model.model.embed_tokens(input_ids)
        return self.run_layers(self.lower_layers(), h, self.causal_mask(h, attention_mask, pos), pos)

    def upper_forward(self, h: torch.Tensor, attention_mask: torch.Tensor, layers=None, norm=None) -> torch.Tensor:
        """Final-norm states [B, T, H] from layer-L states ``h`` [B, T, H] (layers L+1..N + norm)."""
        pos = positions_from_mask(attention_mask)
        layers = self.upper_layers() if layers is None else layers
        h = self.run_layers(layers, h, self.causal_mask(h, attention_mask, pos), pos)
        return (self.model.model.norm if norm is None else norm)(h)

    def lower_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layer-L states [B, T, H] under an explicit mask [B, 1, T, T] (bool, True = attend) and
        position ids [B, T]: the packed rows of ``model/train/packed.py``."""
        h = self.model.model.embed_tokens(input_ids)
        return self.run_layers(self.lower_layers(), h, mask, position_ids)

    def upper_states(self, h: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-norm states [B, T, H] from layer-L states under an explicit mask and position ids."""
        return self.model.model.norm(self.run_layers(self.upper_layers(), h, mask, position_ids))

    @staticmethod
    def replace_slots(h: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """Out-of-place: ``h`` [B, T, H] with ``h[b, positions[b, s]] = vectors[b, s]`` for the rows
        ``rows`` [r] (None: all); the other rows keep their states."""
        h = h.clone()
        rows = torch.arange(h.shape[0], device=h.device) if rows is None else rows.to(h.device)
        h[rows[:, None], positions.to(h.device)[rows]] = vectors.to(device=h.device, dtype=h.dtype)[rows]
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

    def text(self, tokens: Sequence[int]) -> str:
        """The text of a row's new tokens (cut at eos)."""
        return self.tokenizer.decode(self.strip_eos(list(tokens)), skip_special_tokens=True)

    def strip_eos(self, seq: list[int]) -> list[int]:
        """Cut at the first eos; drop the padding that follows a row stopped by a stopping criterion."""
        seq = seq[: seq.index(self.eos_id)] if self.eos_id in seq else seq
        while seq and seq[-1] == self.pad_id:
            seq = seq[:-1]
        return seq

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

