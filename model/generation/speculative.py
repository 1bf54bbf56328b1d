"""Speculative greedy steps: feed each row's guessed continuation, keep what greedy decoding would take.

A guess comes from the catalogue's titles (``draft.NgramDrafter``). A row keeps the longest prefix of
its guess that equals its own greedy choices, so one forward can add several tokens and the tokens
are still the greedy ones. Rejected positions stay in the KV cache as masked holes (mask 0): no cache
is rewritten, and later tokens take position ids that skip them, so attention and positions are those
of a plain decode. The accept counts are what ``accept`` returns through the batch's new state.
"""
from __future__ import annotations

import torch

from model.generation.batch import DecodeBatch, Finished, finishes, leave, take
from model.generation.forward import forward
from model.generation.stop import StopAfterFirstLine


def drafts(batch: DecodeBatch) -> list[list[int]]:
    """Each row's guessed continuation (within its token budget), or none outside the policy."""
    if not batch.drafting:
        return [[] for _ in range(batch.rows)]
    return [batch.drafter.draft(toks, min(batch.draft_tokens, budget - len(toks)))
            for toks, budget in zip(batch.tokens, batch.max_new)]


def verify(lm, batch: DecodeBatch, nxt: torch.Tensor, guesses: list[list[int]],
           stop: StopAfterFirstLine | None) -> Finished:
    """One forward of each row's pending token ``nxt`` [n] and its guess; row j keeps the longest
    guess prefix that equals its greedy choices (the logits at each fed position), and its next
    logits are those after the last kept token."""
    n, k = batch.rows, max(len(d) for d in guesses)
    ids = torch.full((n, 1 + k), lm.pad_id, dtype=torch.long)  # [n, 1+k]
    new = torch.zeros(n, 1 + k, dtype=batch.mask.dtype)  # [n, 1+k] 1 = a fed token
    ids[:, 0], new[:, 0] = nxt, 1
    for j, d in enumerate(guesses):
        ids[j, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
        new[j, 1:1 + len(d)] = 1
    pos = batch.last[:, None] + 1 + torch.arange(1 + k, device=batch.last.device)  # [n, 1+k]
    mask = torch.cat([batch.mask, new.to(batch.mask.device)], 1)
    logits = forward(lm, ids.to(lm.device), mask, pos, batch.cache, keep=1 + k)
    return accept(lm, batch, logits, guesses, new, lead=1, stop=stop)


def accept(lm, batch: DecodeBatch, logits: torch.Tensor, guesses: list[list[int]], new: torch.Tensor,
           lead: int, stop: StopAfterFirstLine | None, finish: bool = True) -> Finished:
    """Keep each row's guessed tokens as far as they equal its greedy choices; ``logits`` [n, k', V]
    are those after each fed position (``logits[:, a]`` chooses the token after ``lead`` fed tokens
    and ``a`` guessed ones), ``new`` [n, lead + k] the mask of the fed columns (1 = a real token).
    The rejected columns become holes, the row continues from the logits after its last kept token.
    ``finish=False`` stops before a token that would finish a row (it stays pending)."""
    n = batch.rows
    greedy = logits.argmax(-1).cpu()  # [n, k'] the model's choice after each fed token
    kept, done = [], []
    for j, d in enumerate(guesses):
        a, fin = 0, False
        while a < len(d) and d[a] == int(greedy[j, a]) and not fin:
            if not finish and finishes(lm, batch, j, d[a], stop):
                break  # left pending: the first step takes it and finishes the row
            fin = take(lm, batch, j, d[a], stop)
            a += 1
        kept.append(a)
        done.append(fin)
    keep = torch.tensor(kept)  # [n] guessed tokens kept per row
    cols = torch.arange(new.shape[1])[None, :]
    new = new * (cols < lead + keep[:, None]).to(new.dtype)  # holes after the kept ones
    batch.mask = torch.cat([batch.mask, new.to(batch.mask.device)], 1)
    batch.last = batch.last + lead + keep.to(batch.last.device)
    batch.logits = logits[torch.arange(n), keep.to(logits.device)].float()  # [n, V]
    return leave(batch, done)
