"""The stop rule: a row ends with its answer's line.

The answer is one line (a title; ``clean_generated`` reads the first non-empty line), so the tokens
after it are never used; a generator that runs on after its title would otherwise cost up to
``max_new_tokens`` steps. A row also ends at eos or at its token budget (``decode.finishes``).
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch


class StopAfterFirstLine:
    """Per row: stop once a newline follows some non-blank generated text.

    ``newline`` [V] bool: the token's text holds a newline; ``lead`` [V] bool: non-blank text before
    that newline; ``content`` [V] bool: non-blank text anywhere."""

    def __init__(self, newline: torch.Tensor, lead: torch.Tensor, content: torch.Tensor):
        self.newline, self.lead, self.content = newline, lead, content

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


_RULES: "weakref.WeakKeyDictionary[object, StopAfterFirstLine]" = weakref.WeakKeyDictionary()


def stop_rule(lm) -> StopAfterFirstLine:
    """The stop rule of ``lm``'s tokenizer, built once per model (it decodes the whole vocabulary)."""
    rule = _RULES.get(lm)
    if rule is None:
        rule = _RULES[lm] = StopAfterFirstLine(*line_tables(lm.tokenizer, lm.vocab_size))
    return rule
