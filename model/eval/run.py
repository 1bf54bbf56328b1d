"""``automr evaluate`` end to end: a prepared dataset, one method, one split -> its result and table."""
from __future__ import annotations

from pathlib import Path

from model.data.prepared import PreparedDataset
from model.eval.evaluator import EvalResult, evaluate, get_method
from model.eval.report import results_table


def run_evaluation(
    data_dir: str | Path,
    method: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    artefacts_dir: str | Path | None = None,
    options: dict | None = None,
    split: str = "test",
    batch_size: int = 256,
    progress: bool = True,
) -> EvalResult:
    """Load the prepared dataset, build ``method``, evaluate it on ``split``, write ``out``, print the table.

    ``artefacts_dir`` defaults to ``<data_dir>/artefacts``; each method keeps its own subfolder there
    (e.g. the trained SASRec weights), so a later run reuses them.
    """
    data_dir = Path(data_dir)
    ds = PreparedDataset.load(data_dir)
    art = Path(artefacts_dir) if artefacts_dir is not None else data_dir / "artefacts"
    ranker = get_method(method, dataset=ds, options=options, artefact_dir=art / method, seed=seed, progress=progress)
    result = evaluate(
        ranker,
        ds.split(split),
        limit=limit,
        seed=seed,
        batch_size=batch_size,
        train_samples=ds.split("train"),
        split=split,
        progress=progress,
    )
    result.info.setdefault("dataset", ds.config.get("name", str(data_dir)))
    if out is not None:
        result.save(out)
    print(results_table([result]))
    return result
