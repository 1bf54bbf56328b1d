"""Priority on the one model thread: background calls yield to the others.

A call is background when its recommender is (``keys``: the service's full-history mode by default,
``AUTOMR_BACKGROUND_MODES``), unless its request says otherwise (``"priority"`` in ``POST /recommend``:
``"background"`` for work nobody waits for, such as precomputing recommendations; ``"interactive"``).
Full-history prompts (~1,200 tokens, ~1.2 s of prefill) would otherwise stop the short modes' rows
for their whole length (BENCHMARKS §4.3, §8). The scheduler (``service/scheduler.py``) asks this policy three things:

- which queued call to take next (``first``): the oldest call that is not background; a
  background call when no other is queued, or when its credit allows and it fits now, so that it is
  not starved while the others fill every row;
- which admission's prefill runs now (``turn``): foreground ones first; a background one when nothing
  else is live, or within its credit;
- how many padded tokens a background prefill runs at a time (``chunk``).

The credit bounds background model time beside other live work to ``share`` of the runner's: each
turn of the model thread in which background work waits beside other work earns
``share / (1 - share)`` of the other work's seconds and spends the background prefills' seconds of
that turn (``seconds["beside_others"]``). A turn without waiting background work resets it to 0, so
credit is never saved up for later. Priority decides order only: the answers are the same.
"""
from __future__ import annotations

from typing import Callable, Collection, Protocol, Sequence, TypeVar


class _Queued(Protocol):
    background: bool  # a queued call that yields to the others


class _Admitted(Protocol):
    background: bool  # admitted background calls


C = TypeVar("C", bound=_Queued)
A = TypeVar("A", bound=_Admitted)


class BackgroundPriority:
    """Which recommenders' calls yield to the others by default (``keys``), and the credit that bounds
    the background calls' share of the model's time while other work is live. ``seconds`` is the
    background prefills' model time since start, beside other live work (what spends the credit) or
    alone: ``/metrics`` reads it."""

    def __init__(self, keys: Collection[str] = (), share: float = 0.25, chunk_tokens: int = 256):
        if not 0 <= share < 1 or chunk_tokens < 1:
            raise ValueError(f"need 0 <= background_share < 1 and background_chunk_tokens >= 1; got "
                             f"{share}, {chunk_tokens}")
        self.keys = frozenset(keys)
        self.share, self.chunk_tokens = share, chunk_tokens
        self._earn = share / (1 - share)  # background seconds per second of other work
        self.credit = 0.0  # seconds a background prefill may still take while other work is live
        self.seconds = {"beside_others": 0.0, "alone": 0.0}
        self._mark = 0.0  # seconds["beside_others"] when the current turn began

    def __contains__(self, key: object) -> bool:
        """Are the recommender ``key``'s calls background unless a request says otherwise?"""
        return key in self.keys

    def first(self, queue: Sequence[C], takeable: Callable[[C], bool]) -> C:
        """The queued call to take next (``queue`` oldest first, not empty). First come, first served
        within each class; a call that cannot run yet holds the later ones of its class."""
        first = next((c for c in queue if not c.background), queue[0])
        if not first.background and self.credit > 0:
            waiting = next((c for c in queue if c.background), None)
            if waiting is not None and takeable(waiting):
                return waiting
        return first

    def turn(self, admissions: Sequence[A], others_live: bool) -> A | None:
        """The admission whose prefill runs now (``admissions`` in turn order): the first foreground
        one; else the first background one when nothing else is live or its credit allows (None: it
        waits a turn)."""
        for adm in admissions:
            if not adm.background:
                return adm
        if admissions and (not others_live or self.credit > 0):
            return admissions[0]
        return None

    def chunk(self, tokens: int | None) -> int:
        """Padded tokens of a background prefill's next forward, given the runner's chunk (None: whole)."""
        return min(tokens or self.chunk_tokens, self.chunk_tokens)

    def ran(self, seconds: float, beside_others: bool) -> None:
        """A background prefill forward took ``seconds``, beside other live work or alone."""
        self.seconds["beside_others" if beside_others else "alone"] += seconds

    def begin_turn(self) -> None:
        """The model thread starts a turn (a take, a prefill, a step, a grounding pass)."""
        self._mark = self.seconds["beside_others"]

    def end_turn(self, yielding: bool, elapsed: float) -> None:
        """The turn took ``elapsed`` seconds; ``yielding``: background work waited beside other live
        work during it, so the credit earns the other work's seconds and pays the background ones."""
        if yielding:
            spent = self.seconds["beside_others"] - self._mark
            self.credit += self._earn * (elapsed - spent) - spent
        else:
            self.credit = 0.0
