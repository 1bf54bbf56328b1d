"""BIGRec's Alpaca prompt with a memory slot after the history (METHOD.md §2).

The prompt is assembled from pieces that are tokenized separately and concatenated, so that the
position of every title and of the slot is known exactly and whole titles can be dropped to fit a
token budget. The pieces (``|`` marks a piece boundary, ``t1`` the oldest kept title)::

    [bos] | Below is an instruction ... ### Input:\\nThe user has watched the following movies before:
          | "t1" | , | "t2" | , | ... | "tK"
          | \\nLong-term memory: | ...  (× n_slots)  | \\n\\n### Response:\\n

Each title piece is ``' "Title"'`` (leading space); without a slot the tail is ``\\n\\n### Response:\\n``.

``template="list"`` is the short form the packed trainer (``model/train/packed.py``) tunes on: one title
per line, and the answer is simply the next line::

    [bos] | Long-term memory: | ... | \\nThe user has watched these movies, oldest first: | \\n
          | t1 | \\n | t2 | \\n | ... | tK | \\n

Every piece is tokenized alone. The memory slot (one) is the placeholder in the head, before the titles:
every title and the last newline read it in layers L+1..N, and the last newline, whose layer-L state is
z_t, predicts the answer. (A slot at the last token would replace z_t itself: every memory element then
cost the target ~7 nats of log-likelihood on validation, the best one included.) The response is
``Title`` + the newline, which ends the line (no eos). Without a slot (full-history) the tokens are the
same and the placeholder keeps its own state, so full-history differs only by how many titles it holds.
The slot position is the last token of each placeholder span (``' ...'``, one token for SmolLM2).
The response (``response_ids``) is ``'"Title"'`` tokenized on its own + eos, and training / scoring
concatenates prompt ids + response ids: tokenizing the pieces separately is what makes the prompt's
tokens independent of what follows it, so generation and training see the same ids.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

# domain -> (verb in "the user has ___ the following", plural noun)
DOMAIN_WORDS: dict[str, tuple[str, str]] = {
    "movie": ("watched", "movies"),
    "product": ("bought", "products"),
    "book": ("read", "books"),
    "game": ("played", "games"),
    "music": ("listened to", "songs"),
    "item": ("interacted with", "items"),
}

PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
INSTRUCTION = (
    "### Instruction:\nGiven a list of {plural} the user has {verb} before, please recommend a new {noun} "
    "that the user likes to the user.\n\n"
)
INPUT_HEAD = "### Input:\nThe user has {verb} the following {plural} before:"
TITLE_PIECE = ' "{title}"'
SEPARATOR = ","
SLOT_HEAD = "\nLong-term memory:"
PLACEHOLDER = " ..."
RESPONSE_HEAD = "\n\n### Response:\n"
RESPONSE = '"{title}"'
TEMPLATE_VERSION = "bigrec-alpaca-slot/1"
LIST_SLOT_HEAD = "Long-term memory:"
LIST_HEAD = "\nThe user has {verb} these {plural}, oldest first:"
LINE = "\n"
TEMPLATES: tuple[str, ...] = ("alpaca", "list")


@dataclass
class PromptIds:
    """A tokenized prompt: ``input_ids`` end right before the response text."""

    input_ids: list[int]
    slot_positions: list[int]  # token positions of the memory slot(s) (empty when no slot)
    n_titles: int = 0  # titles kept in the prompt
    n_dropped: int = 0  # oldest titles dropped to fit the token budget
    n_shared: int = 0  # leading tokens every prompt of its builder shares (the template head): their
    #                    KV cache can be computed once and reused by generation (``model/generation/prefill.py``)


def one_line(title: str) -> str:
    """One line, no surrounding whitespace (titles come from user data)."""
    return " ".join(str(title).split())


class PromptBuilder:
    """Builds BIGRec prompts with ``n_slots`` memory slots for one tokenizer and domain.

    ``max_tokens`` is the budget of the prompt (response excluded); ``None`` means the tokenizer's
    ``model_max_length`` minus ``reserve_tokens`` (room for the response) when that is finite, else
    no budget. Use ``PromptBuilder.for_model`` to take the budget from a ``SplitLM``'s context.
    Titles over the budget are dropped from the oldest side, whole titles only.
    """

    def __init__(
        self,
        tokenizer,
        domain: str = "movie",
        n_slots: int = 1,
        max_tokens: int | None = None,
        reserve_tokens: int = 64,
        placeholder: str = PLACEHOLDER,
        template: str = "alpaca",
    ):
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; use one of {TEMPLATES}")
        if template == "list" and n_slots > 1:
            raise ValueError("the list template has one slot (the prompt's last token); n_slots must be <= 1")
        self.template = template
        if n_slots < 0:
            raise ValueError(f"n_slots must be >= 0, got {n_slots}")
        self.tokenizer = tokenizer
        self.domain = domain
        self.n_slots = n_slots
        self.placeholder = placeholder
        verb, plural = DOMAIN_WORDS.get(domain, ("interacted with", domain + "s"))
        self.verb, self.plural = verb, plural
        if max_tokens is None:
            limit = getattr(tokenizer, "model_max_length", None)
            if isinstance(limit, int) and 0 < limit < 10**7:
                max_tokens = limit - reserve_tokens
        self.max_tokens = max_tokens

        self._bos = self._bos_ids()
        if template == "list":
            self._line = self._encode(LINE)
            self._pre_slot = self._bos + self._encode(LIST_SLOT_HEAD)  # shared by every prompt
            self._head = (self._pre_slot + self._encode(placeholder)
                          + self._encode(LIST_HEAD.format(verb=verb, plural=plural)) + self._line)
            self._sep = list(self._line)
        else:
            head = PREAMBLE + INSTRUCTION.format(plural=plural, verb=verb, noun=domain) + INPUT_HEAD.format(
                verb=verb, plural=plural
            )
            self._head = self._bos + self._encode(head)
            self._sep = self._encode(SEPARATOR)
        self._slot_head = self._encode(SLOT_HEAD)
        self._placeholder = self._encode(placeholder)
        if not self._placeholder:
            raise ValueError(f"placeholder {placeholder!r} encodes to no tokens")
        self._response_head = self._encode(RESPONSE_HEAD)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos token")
        self._eos = int(eos)

    @classmethod
    def for_model(cls, split_lm, domain: str = "movie", n_slots: int = 1, reserve_tokens: int = 64,
                  **kwargs) -> "PromptBuilder":
        """A builder whose budget is the model's context minus ``reserve_tokens`` for the response."""
        return cls(split_lm.tokenizer, domain, n_slots, max_tokens=split_lm.max_context - reserve_tokens,
                   reserve_tokens=reserve_tokens, **kwargs)

    # ---- tokenization of pieces -----------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _bos_ids(self) -> list[int]:
        """[bos] when the tokenizer itself prepends one to plain text (Llama), else []."""
        with_special = list(self.tokenizer("a", add_special_tokens=True).input_ids)
        plain = list(self.tokenizer("a", add_special_tokens=False).input_ids)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
            return [int(bos)]
        return []

    def title_ids(self, title: str) -> list[int]:
        """Tokens of one title as it appears in the history: ``' "Title"'`` (list: ``Title``)."""
        if self.template == "list":
            return self._encode(one_line(title))
        return self._encode(TITLE_PIECE.format(title=one_line(title)))

    @property
    def head_ids(self) -> list[int]:
        """The template head every prompt starts with."""
        return list(self._head)

    @property
    def sep_ids(self) -> list[int]:
        """The tokens between two titles (list: the newline that also ends each title)."""
        return list(self._sep)

    # ---- the prompt -----------------------------------------------------------------------------

    def _tail(self, with_slot: bool) -> tuple[list[int], list[int]]:
        """(tail tokens, slot positions relative to the tail start)."""
        if not with_slot or self.n_slots == 0:
            return list(self._response_head), []
        tail, rel = list(self._slot_head), []
        for _ in range(self.n_slots):
            tail += self._placeholder
            rel.append(len(tail) - 1)
        return tail + self._response_head, rel

    def build(self, titles: list[str], with_slot: bool = True) -> PromptIds:
        """The prompt for a history (oldest first). ``with_slot=False``: no slot line (full history)."""
        if self.template == "list":
            return self._build_list(titles, with_slot)
        pieces = [self.title_ids(t) for t in titles]
        tail, rel_slots = self._tail(with_slot)
        fixed = len(self._head) + len(tail)
        if self.max_tokens is not None and fixed > self.max_tokens:
            raise ValueError(
                f"the prompt without titles needs {fixed} tokens, over the budget of {self.max_tokens}"
            )
        # Drop the oldest whole titles until the rest fits.
        start = 0
        if self.max_tokens is not None:
            total = fixed + sum(len(p) for p in pieces) + len(self._sep) * max(len(pieces) - 1, 0)
            while start < len(pieces) and total > self.max_tokens:
                total -= len(pieces[start]) + (len(self._sep) if start < len(pieces) - 1 else 0)
                start += 1
        ids = list(self._head)
        for j, p in enumerate(pieces[start:]):
            if j:
                ids += self._sep
            ids += p
        offset = len(ids)
        ids += tail
        return PromptIds(
            input_ids=ids,
            slot_positions=[offset + r for r in rel_slots],
            n_titles=len(pieces) - start,
            n_dropped=start,
            n_shared=len(self._head),
        )

    def _build_list(self, titles: list[str], with_slot: bool) -> PromptIds:
        """``head | t1 | \\n | ... | tK | \\n``; the slot is the head's placeholder."""
        pieces = [self.title_ids(t) + self._line for t in titles]
        start = 0
        if self.max_tokens is not None:
            total = len(self._head) + sum(len(p) for p in pieces)
            if len(self._head) > self.max_tokens:
                raise ValueError(f"the prompt without titles needs {len(self._head)} tokens, over the budget "
                                 f"of {self.max_tokens}")
            while start < len(pieces) and total > self.max_tokens:
                total -= len(pieces[start])
                start += 1
        ids = list(self._head)
        for p in pieces[start:]:
            ids += p
        slots = [self.list_slot] if with_slot and self.n_slots else []
        return PromptIds(input_ids=ids, slot_positions=slots, n_titles=len(pieces) - start, n_dropped=start,
                         n_shared=len(self._pre_slot))  # the KV of what precedes the slot is shared

    @property
    def list_slot(self) -> int:
        """The slot's position in a list-template prompt (the placeholder's last token, in the head)."""
        return len(self._pre_slot) + len(self._placeholder) - 1

    def response_ids(self, title: str) -> list[int]:
        """The target's response tokens: ``'"Title"'`` tokenized on its own, then eos (list: ``Title``
        + the newline that ends its line)."""
        if self.template == "list":
            return self.title_ids(title) + self._line
        return self._encode(RESPONSE.format(title=one_line(title))) + [self._eos]

    @property
    def answer_end(self) -> list[int]:
        """The tokens that end an answer: eos (alpaca) or the newline (list)."""
        return list(self._line) if self.template == "list" else [self._eos]

    def signature(self) -> str:
        """Changes with anything that changes the prompt's tokens (for memory-vector cache keys)."""
        parts = [TEMPLATE_VERSION if self.template == "alpaca" else "list/1", self.domain, str(self.n_slots), self.placeholder, str(self.max_tokens),
                 repr(self._head), repr(self._placeholder), repr(self._sep)]
        return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()
