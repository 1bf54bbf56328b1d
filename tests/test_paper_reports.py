"""Table 1 / Figure 2 / Figure 3 from evaluation results of toy rankers with known outcomes."""
from __future__ import annotations

import numpy as np

from model.data.types import Sample
from model.eval.evaluator import evaluate
from model.eval.paper_reports import figure2, figure3, table1

N_ITEMS = 30


def _samples(n: int = 40) -> list[Sample]:
    return [Sample(user_id=f"u{i}", target=i % N_ITEMS, timestamp=i, history=[(i + 1) % N_ITEMS] * 12,
                   history_ts=list(range(12))) for i in range(n)]


class Toy:
    """Puts the target first for samples whose index is in ``hits``; otherwise a fixed wrong ranking."""

    def __init__(self, name: str, hits: set[int], ages: dict[int, int] | None = None):
        self.name, self.hits, self.ages, self.trace = name, hits, ages or {}, []

    def rank(self, samples, topk):
        out = []
        for s in samples:
            i = s.timestamp
            wrong = [x for x in range(N_ITEMS) if x != s.target][:topk]
            out.append([s.target] + wrong[: topk - 1] if i in self.hits else wrong)
            self.trace.append({"generated": "", "memory_age": [self.ages[i]] if i in self.ages else []})
        return np.array(out)

    def info(self):
        return {"trace": self.trace}


def test_table_and_figures(tmp_path):
    samples = _samples()
    bigrec_hits = set(range(0, 10))
    automr_hits = set(range(0, 16))  # samples 10..15 turned from miss into hit
    ages = {i: 3 + i for i in range(40)}
    res = {name: evaluate(r, samples, progress=False, n_boot=200).to_json()
           for name, r in (("bigrec", Toy("bigrec", bigrec_hits)), ("automr", Toy("automr", automr_hits, ages)),
                           ("random", Toy("random", set(range(0, 4)))))}
    md = table1(list(res.values()), n_boot=200)
    assert "| automr |" in md and "| bigrec |" in md and "| random |" in md
    assert "+0.1500" in md  # automr - bigrec recall@1 = 16/40 - 10/40
    med = figure2(res["automr"], res["random"], tmp_path / "fig2.png", n_boot=200)
    assert (tmp_path / "fig2.png").stat().st_size > 1000
    assert abs(med["recall@1"]["automr"] - 0.4) < 0.05 and abs(med["recall@1"]["random"] - 0.1) < 0.05
    f3 = figure3(res["automr"], res["bigrec"], tmp_path / "fig3.png")
    assert f3["n_miss_to_hit"] == 6
    assert f3["median_age"] == float(np.median([3 + i for i in range(10, 16)]))
