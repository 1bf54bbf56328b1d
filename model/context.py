"""A user's context for one recommendation: the one definition the service, the memory encoder and
the evaluator share (METHOD.md §1, §3).

    history       h_0 .. h_{n-1}    item indices, oldest first
    short-term    the last K items (or the caller's recent items): the prompt's titles
    memory        positions 0 .. n-K-1: every item older than the last K, one element each
    element of m  the window of the K items ending at m ("window" elements), or h_m alone ("item")
    full history  every title in the prompt (memory's, then the short-term ones), no memory slot
"""
from __future__ import annotations

from typing import Sequence


def n_memory(n: int, k: int) -> int:
    """How many of ``n`` history items are memory: all but the last ``k``."""
    return max(n - k, 0)


def short_term(history: Sequence[int], k: int) -> list[int]:
    """The prompt's items: the last ``k`` of the history."""
    return list(history[-k:])


def window(history: Sequence, m: int, k: int) -> tuple:
    """The ``k`` entries of ``history`` ending at position ``m`` (fewer for the first ones)."""
    return tuple(history[max(0, m - k + 1): m + 1])


def element_key(history: Sequence[int], m: int, k: int, element: str) -> tuple[int, ...]:
    """What memory element ``m`` encodes: its window of ``k`` items, or its item alone."""
    return (history[m],) if element == "item" else window(history, m, k)


def prompt_items(history: Sequence[int], k: int, full_history: bool = False,
                 recent: Sequence[int] | None = None) -> list[int]:
    """The items whose titles the prompt shows: the short-term ones, or with ``full_history`` every
    one (the memory's, then the short-term ones). ``recent``: the caller's own short-term items,
    which replace the stored ones."""
    n_mem = n_memory(len(history), k)
    if full_history:
        return list(history[:n_mem]) + list(recent if recent is not None else history[n_mem:])
    return short_term(recent if recent is not None else history, k)
