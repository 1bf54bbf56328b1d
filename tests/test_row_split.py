"""A forward run in row parts on the row-split threads (``model/row_split.py``) equals the forward run
whole: the prefill with memory slots, decoding steps after a merge and after rows were dropped and
copied (beams), chunks of a background prefill, and the KV each part appends in place."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from model.generation import advance, begin, complete, step
from model.prompts import PromptBuilder
from model.row_split import RowSplit
from tests.generation_helpers import start

H = 64


@pytest.fixture
def split_rows(tiny_split):
    split = tiny_split.row_split = RowSplit(workers=3, min_tokens=1)
    yield split
    split.close()
    tiny_split.row_split = None


def _decode(split, prompts, vecs, steps: int, merge_at: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits and tokens of ``steps`` steps of the first prompts; the last one joins at ``merge_at``;
    the batch's rows are reordered (a row copied, one dropped) after the step before it."""
    batch = start(split, prompts[:-1], list(range(len(prompts) - 1)), slot_vectors=vecs[:-1], max_new_tokens=steps + 2,
                  stop_at_newline=False)
    seen = []
    for n in range(steps):
        if n == merge_at:
            batch.merge(start(split, prompts[-1:], [len(prompts) - 1], slot_vectors=vecs[-1:],
                              max_new_tokens=steps + 2, stop_at_newline=False))
        if n == 1:
            batch.select([0, 0] + list(range(2, batch.rows)))  # row 0 branches, row 1 goes: beams do so
        seen.append(batch.logits.clone())
        step(split, batch)
    return seen, batch.tokens


def test_a_split_forward_equals_the_whole_forward(tiny_split, tiny_titles, split_rows):
    b = PromptBuilder(tiny_split.tokenizer)
    prompts = [b.build(tiny_titles[:k]) for k in (2, 9, 5, 7, 3)]
    torch.manual_seed(3)
    vecs = torch.randn(len(prompts), 1, H) * 4
    t0 = split_rows.wall_s
    split_logits, split_tokens = _decode(tiny_split, prompts, vecs, 6, merge_at=3)
    assert split_rows.wall_s > t0  # the parts ran on the row threads
    tiny_split.row_split = None
    whole_logits, whole_tokens = _decode(tiny_split, prompts, vecs, 6, merge_at=3)
    assert split_tokens == whole_tokens
    for s, w in zip(split_logits, whole_logits):
        torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-4)


def test_background_chunks_split_as_the_whole_prefill(tiny_split, tiny_titles, split_rows):
    b = PromptBuilder(tiny_split.tokenizer)
    prompts = [b.build(tiny_titles[:k]) for k in (6, 8, 7)]
    vecs = torch.randn(3, 1, H)

    def chunked(max_tokens):
        p = begin(tiny_split, prompts, reuse_head=False)
        while (z := advance(tiny_split, p, max_tokens)) is None:
            pass
        return z, complete(tiny_split, p, vecs).logits

    z_split, logits_split = chunked(12)
    tiny_split.row_split = None
    z_whole, logits_whole = chunked(None)
    torch.testing.assert_close(z_split, z_whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_split, logits_whole, rtol=1e-4, atol=1e-4)


def test_parts_are_even_and_small_or_grad_forwards_run_whole():
    split = RowSplit(workers=2, min_tokens=64)
    try:
        with torch.no_grad():
            assert split.parts(5, 20) == [(0, 2), (2, 5)]
            assert split.parts(3, 20) is None  # 60 tokens < 64
            assert split.parts(1, 500) is None
            split.active = False  # the service's state alone on its CPUs (the thread governor's call)
            assert split.parts(5, 20) is None
        assert split.parts(16, 100) is None  # gradients on: training runs whole
    finally:
        split.close()
    with pytest.raises(ValueError):
        RowSplit(workers=1)


def test_workers_run_one_thread_and_start_no_openmp_team():
    """Each worker runs one intra-op thread, and getting there starts no OpenMP team of its own: libgomp
    spins far less at every barrier once it manages more threads than there are CPUs, so idle teams
    would slow the model thread's whole forwards. In a fresh process: no other thread starts meanwhile."""
    code = textwrap.dedent("""
        import os, torch
        from model.row_split import RowSplit
        torch.set_num_threads(2)
        torch.zeros(1 << 20).add_(1)  # this thread's team: its pool thread exists from here on
        before = len(os.listdir("/proc/self/task"))
        split = RowSplit(workers=3)
        made = len(os.listdir("/proc/self/task")) - before
        counts = split.run(lambda i, a, b: torch.get_num_threads(), [(0, 1), (1, 2), (2, 3)])
        print(made, counts, torch.get_num_threads())
        split.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "3 [1, 1, 1] 2"  # the 3 workers alone; the caller keeps its 2


def test_whole_forwards_are_timed_for_the_governor(tiny_split, tiny_titles):
    """A forward too small to split runs on the caller's thread, and its wall and CPU seconds are
    counted: the thread governor decides the intra-op count of those forwards from them."""
    split = tiny_split.row_split = RowSplit(workers=2, min_tokens=10**9)
    try:
        b = PromptBuilder(tiny_split.tokenizer)
        start(tiny_split, [b.build(tiny_titles[:3]), b.build(tiny_titles[:4])], slot_vectors=torch.zeros(2, 1, H))
        assert split.wall_s == 0.0  # nothing ran in parts
        assert split.whole_wall_s > 0 and 0 < split.whole_cpu_s <= split.whole_wall_s * 1.5
    finally:
        tiny_split.row_split = None
        split.close()
