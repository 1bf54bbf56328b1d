"""Markdown tables of evaluation results and paired comparisons."""
from __future__ import annotations

from typing import Sequence

from model.eval.evaluator import EvalResult
from model.eval.metrics import METRICS

TABLE_METRICS: tuple[str, ...] = (
    "recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20",
)


def _as_result(r: EvalResult | dict) -> EvalResult:
    return r if isinstance(r, EvalResult) else EvalResult.from_json(r)


def results_table(
    results: Sequence[EvalResult | dict], metrics: Sequence[str] = TABLE_METRICS, ci: str = "pm", digits: int = 4
) -> str:
    """Method x metrics; each cell ``mean ± half-width`` (``ci="pm"``) or ``mean [lo, hi]`` (``"interval"``)."""
    if ci not in ("pm", "interval", "none"):
        raise ValueError(f"ci must be 'pm', 'interval' or 'none', got {ci!r}")
    rows = [_as_result(r) for r in results]
    head = "| method | n | " + " | ".join(m.replace("recall", "Recall").replace("ndcg", "NDCG") for m in metrics) + " |"
    sep = "|---|---:|" + "---:|" * len(metrics)
    lines = [head, sep]
    for r in rows:
        cells = []
        for m in metrics:
            v = r.metrics[m]
            lo, hi = r.ci.get(m, (float("nan"), float("nan")))
            if ci == "pm":
                cells.append(f"{v:.{digits}f} ± {(hi - lo) / 2:.{digits}f}")
            elif ci == "interval":
                cells.append(f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
            else:
                cells.append(f"{v:.{digits}f}")
        lines.append(f"| {r.method} | {r.n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(comparisons: Sequence[dict], metrics: Sequence[str] = TABLE_METRICS, digits: int = 4) -> str:
    """One row per (comparison, metric): A, B, A − B and its paired bootstrap 95% CI (from :func:`compare`)."""
    lines = ["| A | B | n | metric | A | B | A − B | 95% CI (paired) |", "|---|---|---:|---|---:|---:|---:|---|"]
    for c in comparisons:
        for m in metrics:
            d = c[m]
            sig = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
            lines.append(
                f"| {c['a']} | {c['b']} | {c['n']} | {m} | {d['a']:.{digits}f} | {d['b']:.{digits}f} | "
                f"{d['diff']:+.{digits}f} | [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]{sig} |"
            )
    return "\n".join(lines)


def memorization_table(results: Sequence[EvalResult | dict], metrics: Sequence[str] = ("recall@1", "recall@10", "ndcg@10")) -> str:
    """Share of memorized top-1 recommendations and metrics on covered / uncovered test samples."""
    head = ["method", "memorized top-1", "covered n"] + [f"covered {m}" for m in metrics]
    head += ["uncovered n"] + [f"uncovered {m}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in map(_as_result, results):
        mem = r.memorization
        if not mem:
            continue
        cells = [r.method, f"{mem['memorized_top1_share']:.4f}", str(mem["covered"]["n"])]
        cells += [f"{mem['covered'][m]:.4f}" for m in metrics]
        cells += [str(mem["uncovered"]["n"])] + [f"{mem['uncovered'][m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MEMORY_BINS: tuple[tuple[int, int | None], ...] = ((0, 20), (21, 60), (61, None))


def memory_size_table(results: Sequence[EvalResult | dict], k_short: int,
                      metrics: Sequence[str] = ("recall@10", "ndcg@10"),
                      bins: Sequence[tuple[int, int | None]] = MEMORY_BINS) -> str:
    """Metrics per bin of the user's memory size (history items before the K short-term ones): the
    memory can only matter where the history is longer than the prompt."""
    from model.eval.metrics import per_sample_metrics

    rows = [r for r in map(_as_result, results) if r.history_len is not None]
    if not rows:
        return ""
    label = lambda lo, hi: f"{lo}–{hi}" if hi is not None else f"> {lo - 1}"  # noqa: E731
    head = ["method"] + [f"{label(lo, hi)} ({m})" for lo, hi in bins for m in ("n", *metrics)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        mem = (r.history_len - k_short).clip(min=0)
        ps = per_sample_metrics(r.ranks)
        cells = [r.method]
        for lo, hi in bins:
            sel = (mem >= lo) & ((mem <= hi) if hi is not None else True)
            cells.append(str(int(sel.sum())))
            cells += [f"{ps[m][sel].mean():.4f}" if sel.any() else "–" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["results_table", "comparison_table", "memorization_table", "memory_size_table", "TABLE_METRICS",
           "METRICS", "MEMORY_BINS"]
