"""The priority policy alone (service/priority.py): order and credit, without a model.

The runner's use of it (answers unchanged, chunks, no starvation) is tested in test_batching.py.
"""
from dataclasses import dataclass

import pytest

from service.priority import BackgroundPriority


@dataclass
class Call:
    key: str
    name: str = ""

    @property
    def background(self) -> bool:  # as the runner marks them with the keys below, absent a request's own say
        return self.key == "fh"


@dataclass
class Adm:
    background: bool
    name: str = ""


def test_settings_are_checked():
    for share, chunk in [(1.0, 256), (-0.1, 256), (0.25, 0)]:
        with pytest.raises(ValueError, match="background_share"):
            BackgroundPriority(["full-history"], share, chunk)
    assert "full-history" not in BackgroundPriority()
    p = BackgroundPriority(["full-history"])
    assert "full-history" in p and "automr" not in p


def test_first_takes_foreground_calls_before_background_ones():
    p = BackgroundPriority(["fh"])
    queue = [Call("fh", "bg1"), Call("automr", "a1"), Call("fh", "bg2"), Call("bigrec", "b1")]
    assert p.first(queue, lambda c: True).name == "a1"  # no credit: the oldest foreground call
    assert p.first([Call("fh", "bg1"), Call("fh", "bg2")], lambda c: True).name == "bg1"  # nothing else queued
    assert p.first([Call("automr", "a1"), Call("bigrec", "b1")], lambda c: True).name == "a1"  # first come, first served


def test_first_takes_a_background_call_within_credit_when_it_fits():
    p = BackgroundPriority(["fh"])
    p.credit = 0.1
    queue = [Call("automr", "a1"), Call("fh", "bg1"), Call("fh", "bg2")]
    assert p.first(queue, lambda c: True).name == "bg1"  # not starved while the others fill the rows
    assert p.first(queue, lambda c: c.key != "fh").name == "a1"  # it does not fit now: the foreground call
    p.credit = 0.0
    assert p.first(queue, lambda c: True).name == "a1"


def test_turn_runs_foreground_prefills_first_and_background_ones_alone_or_within_credit():
    p = BackgroundPriority(["fh"])
    adms = [Adm(True, "bg"), Adm(False, "fg1"), Adm(False, "fg2")]
    assert p.turn(adms, others_live=True).name == "fg1"
    bg = [Adm(True, "bg1"), Adm(True, "bg2")]
    assert p.turn(bg, others_live=False).name == "bg1"  # nothing else live: it runs
    assert p.turn(bg, others_live=True) is None  # others live, no credit: it waits a turn
    p.credit = 0.01
    assert p.turn(bg, others_live=True).name == "bg1"
    assert p.turn([], others_live=False) is None


def test_chunk_is_at_most_the_background_chunk():
    p = BackgroundPriority(["fh"], chunk_tokens=256)
    assert (p.chunk(None), p.chunk(0), p.chunk(64), p.chunk(1024)) == (256, 256, 64, 256)


def test_credit_earns_the_share_of_other_work_and_pays_background_seconds():
    p = BackgroundPriority(["fh"], share=0.25)
    p.begin_turn()
    p.end_turn(yielding=True, elapsed=0.3)  # 0.3 s of other work, no background prefill: earns 0.3 / 3
    assert p.credit == pytest.approx(0.1)
    p.begin_turn()
    p.ran(0.08, beside_others=True)  # a chunk beside other work, inside a turn of 0.2 s
    p.end_turn(yielding=True, elapsed=0.2)
    assert p.credit == pytest.approx(0.1 + (0.2 - 0.08) / 3 - 0.08)
    p.ran(0.5, beside_others=False)  # alone (nothing else live): recorded, not paid from the credit
    assert p.seconds == pytest.approx({"beside_others": 0.08, "alone": 0.5})
    p.begin_turn()
    p.end_turn(yielding=False, elapsed=0.1)  # no background work waited: nothing is saved up for later
    assert p.credit == 0.0


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_background_time_beside_other_work_converges_to_its_share(share):
    """A runner's loop in miniature: every turn runs 20 ms of other work, plus a 30 ms background
    chunk when the policy gives the background admission its turn."""
    p = BackgroundPriority(["fh"], share=share)
    adms, total = [Adm(True)], 0.0
    for _ in range(2000):
        p.begin_turn()
        elapsed = 0.02
        if p.turn(adms, others_live=True) is not None:
            p.ran(0.03, beside_others=True)
            elapsed += 0.03
        p.end_turn(yielding=True, elapsed=elapsed)
        total += elapsed
    assert p.seconds["beside_others"] / total == pytest.approx(share, abs=0.02)
    assert p.seconds["alone"] == 0.0
