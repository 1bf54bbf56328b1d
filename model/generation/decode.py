"""Decoding steps: every row of a ``DecodeBatch`` takes its next token, finished rows leave.

    batch = prefill.run(lm, prefill.begin(lm, prompts), slot_vectors)
    done = decode(lm, batch)          # tag -> new tokens
    texts = generate(lm, prompts, slot_vectors)   # the same in one call

A finished row no longer costs a step (a batch is otherwise held until its longest answer: one chatty
row of 32 tokens made every row of a 16-request batch pay 32 steps), and rows can join between steps
(``DecodeBatch.merge``). Greedy rows take the same tokens as HF ``generate`` greedy with the stop rule
(tested); beam rows are expanded by their request's ``TrieBeams``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from model.generation import prefill, speculative
from model.generation.batch import DecodeBatch, Finished, leave, take
from model.generation.forward import forward
from model.generation.stop import StopAfterFirstLine, stop_rule
from model.prompts import PromptIds

@torch.no_grad()
def step(lm, batch: DecodeBatch) -> Finished:
    """One step of every row of ``batch``: each takes its next token (greedy, or its beam search's
    choice); rows that are finished (eos, the end of their answer line, or their token budget) leave
    the batch and are returned as (tag, new tokens including the one that ended them); the others run
    one forward.

    Speculative steps (``batch.drafter``, while the batch has at most ``draft_max_rows`` rows): the
    forward also feeds each row's guessed continuation and the row keeps the guesses that match its
    own greedy choices (``speculative.verify``), so one forward can add several tokens; the tokens are
    still the greedy ones."""
    stop = stop_rule(lm) if any(batch.stop_lines) else None
    if any(s is not None for s in batch.searches):
        finished, nxt = _search_step(lm, batch, stop)
    else:
        nxt = batch.logits.argmax(-1).cpu()  # [n]
        done = [take(lm, batch, j, tok, stop) for j, tok in enumerate(nxt.tolist())]
        finished = leave(batch, done)
        nxt = nxt[[j for j in range(len(done)) if not done[j]]]
    if not batch.rows:
        return finished
    drafts = speculative.drafts(batch)
    if any(drafts):
        return finished + speculative.verify(lm, batch, nxt, drafts, stop)
    batch.last = batch.last + 1
    batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
    batch.logits = forward(lm, nxt[:, None].to(lm.device), batch.mask, batch.last[:, None], batch.cache)[:, -1].float()
    return finished


def decode(lm, batch: DecodeBatch) -> dict[Any, list[int]]:
    """Step ``batch`` until every row has finished: tag -> new tokens."""
    out: dict[Any, list[int]] = {}
    while batch.rows:
        out.update(step(lm, batch))
    return out


def _search_step(lm, batch: DecodeBatch, stop: StopAfterFirstLine | None) -> tuple[Finished, torch.Tensor]:
    """The choices of a step whose batch holds beam rows: greedy rows take their best token as in
    ``step``; each beam search expands its rows (``TrieBeams.expand``), which may copy or drop
    them. The batch is reordered for the next forward (a search's rows stay consecutive); returns
    the finished rows (a finished search: its tag and best title's tokens) and the next tokens."""
    logits = batch.logits
    order, toks, finished = [], [], []
    j = 0
    while j < batch.rows:
        search = batch.searches[j]
        if search is None:
            tok = int(logits[j].argmax())
            if take(lm, batch, j, tok, stop):
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


def generate(lm, prompts: Sequence[PromptIds], slot_vectors: torch.Tensor | None = None, *, max_new_tokens: int = 32,
             stop_at_newline: bool = True, reuse_head: bool = True, return_ids: bool = False) -> list:
    """Greedy answers of ``prompts``, the whole path in one call: their text (or, ``return_ids``, their
    new token ids without eos). ``slot_vectors`` [B, S, H] replace every prompt's slot states at layer
    L; None keeps the placeholder's own states."""
    if not prompts:
        return []
    p = prefill.begin(lm, prompts, max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline,
                      reuse_head=reuse_head)
    done = decode(lm, prefill.run(lm, p, slot_vectors))
    new = [done[i] for i in range(len(prompts))]
    return [lm.strip_eos(s) for s in new] if return_ids else [lm.text(s) for s in new]
