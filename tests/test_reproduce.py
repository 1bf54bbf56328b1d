"""`automr reproduce` end to end on a tiny CSV dataset and a tiny HF-directory model: every stage runs,
the reports are written, and a second run resumes from the cached stages."""
from __future__ import annotations

import json

import pytest

from model.data.prepared import PreparedDataset
from model.data.text import natural_title
from model.eval.evaluator import read_result_json
from service.cli import build_parser
from service.reproduce import BUDGETS, ReproduceConfig, reproduce
from service.settings import Settings
from tests.conftest import build_tiny_lm, build_tiny_tokenizer, write_tiny_csv_dataset


def _tiny_inputs(tmp_path, n_users: int, per_user: int, seed: int):
    """A tiny CSV dataset in tmp_path/raw and a tiny HF-directory model; returns the model's folder."""
    write_tiny_csv_dataset(tmp_path / "raw", n_users=n_users, per_user=per_user, seed=seed)
    tok = build_tiny_tokenizer()
    model_dir = tmp_path / "tiny-model"
    build_tiny_lm(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def test_reproduce_runs_every_stage_and_resumes(tmp_path, one_thread, capsys):
    model_dir = _tiny_inputs(tmp_path, n_users=6, per_user=15, seed=5)
    cfg = dict(dataset="csv", path=str(tmp_path / "raw"), runs=tmp_path / "runs", docs=tmp_path / "docs",
               min_item=1, min_user=1, k_short=3,
               cut=2, dtype="float32", model=str(model_dir), generator_samples=8, generator_epochs=1,
               label_train=4, label_valid=2, per_user=2, limit=6,
               methods=("popularity", "bigrec", "full-history", "random", "semantic", "automr"),
               generation=Settings(draft_tokens=3, draft_max_rows=4, max_new_tokens=5).generation())
    report = reproduce(ReproduceConfig(**cfg))
    art = tmp_path / "runs" / "csv" / "artefacts"
    assert (art / "generator" / "upper.safetensors").is_file()
    assert (art / "retriever" / "retriever.safetensors").is_file()
    table = (tmp_path / "docs" / "csv" / "table1.md").read_text()
    for m in cfg["methods"]:
        res = json.loads((art / "results" / f"{m}.json").read_text())
        assert res["n"] == 6 and f"| {m} |" in table
        assert read_result_json(tmp_path / "docs" / "csv" / f"{m}.json.gz") == res  # published beside the report
        if m != "popularity":  # the LLM methods generate as the given service settings say
            info = res["info"]
            assert (info["draft_tokens"], info["draft_max_rows"], info["max_new_tokens"]) == (3, 4, 5)
    assert "automr | bigrec" in table and "automr | random" in table
    assert (tmp_path / "docs" / "csv" / "figure2.png").is_file() and (tmp_path / "docs" / "csv" / "figure3.png").is_file()
    assert {"data", "generator", "retriever", "evaluate automr"} <= set(report["timings_s"])

    capsys.readouterr()
    again = reproduce(ReproduceConfig(**cfg))
    assert set(again["timings_s"]) == {"total"}  # every stage cached
    assert "generator: cached" in capsys.readouterr().out


def test_reproduce_until_retriever_trains_into_the_given_folder_and_evaluates_nothing(tmp_path, one_thread, capsys):
    """The service's quick start: `--until retriever --artefacts DIR` (Makefile `artefacts`)."""
    model_dir = _tiny_inputs(tmp_path, n_users=5, per_user=14, seed=2)
    quick = tmp_path / "quick"
    cfg = dict(dataset="csv", path=str(tmp_path / "raw"), runs=tmp_path / "runs", docs=tmp_path / "docs",
               min_item=1, min_user=1, k_short=3, cut=2, dtype="float32", model=str(model_dir),
               generator_samples=6, generator_epochs=1, generator_valid=4, label_train=3, label_valid=2,
               per_user=2, artefacts=quick, until="retriever")
    report = reproduce(ReproduceConfig(**cfg))
    assert set(report["timings_s"]) == {"data", "generator", "retriever"}
    assert (quick / "generator" / "upper.safetensors").is_file()
    assert (quick / "retriever" / "retriever.safetensors").is_file()
    assert not (tmp_path / "runs" / "csv" / "artefacts").exists()  # nothing written to the default folder
    assert not (quick / "results").exists() and not (tmp_path / "docs").exists()
    upper = json.loads((quick / "generator" / "upper.json").read_text())
    assert upper["extra"]["train_report"]["n_train"] == 6

    capsys.readouterr()
    cfg["generator_samples"] = 7  # another budget: the cached generator is reused, and that is said
    again = reproduce(ReproduceConfig(**cfg))
    assert set(again["timings_s"]) == set()
    out = capsys.readouterr().out
    assert "n_train=6 (asked: 7)" in out and "retriever: cached" in out


def test_reproduce_natural_titles_reach_the_data_and_a_mismatched_cache_is_refused(tmp_path, one_thread):
    """`--titles natural` prepares the data with natural titles (what every later stage reads); a runs
    folder prepared with the other title style is not silently reused."""
    raw = tmp_path / "raw"
    write_tiny_csv_dataset(raw, n_users=4, per_user=6, seed=1)
    items = (raw / "items.csv").read_text().splitlines()
    (raw / "items.csv").write_text("\n".join(items[:1] + ["1,\"Fugitive, The (1993)\""] + items[2:]) + "\n")
    cfg = dict(dataset="csv", path=str(raw), runs=tmp_path / "runs", docs=tmp_path / "docs", min_item=1,
               min_user=1, k_short=3, until="data")
    reproduce(ReproduceConfig(**cfg, titles="natural"))
    ds = PreparedDataset.load(tmp_path / "runs" / "csv")
    assert ds.config["titles"] == "natural" and "The Fugitive (1993)" in ds.catalogue.titles
    assert all(t == natural_title(t) for t in ds.catalogue.titles)
    with pytest.raises(ValueError, match="titles='natural', not 'as-is'"):
        reproduce(ReproduceConfig(**cfg))
    with pytest.raises(ValueError, match="min_user=1, not 2"):  # any preparation setting, not only titles
        reproduce(ReproduceConfig(**{**cfg, "min_user": 2}, titles="natural"))


def test_single_stage_commands_default_to_what_reproduce_runs():
    """`automr train generator|retriever` run alone, without flags, train what `automr reproduce` (paper
    budget) trains: a retriever trained on other label budgets gets another hash."""
    paper, rc = BUDGETS["paper"], ReproduceConfig(**BUDGETS["paper"])
    assert paper == dict(generator_samples=48_000, generator_epochs=1, generator_valid=128, generator_batch=1,
                         generator_lr=3e-4, generator_warmup=20, label_train=128, label_valid=32)  # BENCHMARKS §2.2
    g = build_parser().parse_args(["train", "generator", "--data", "d"])
    assert (g.budget, g.valid_budget, g.epochs, g.lr, g.batch_size, g.warmup, g.seed) == (
        paper["generator_samples"], paper["generator_valid"], paper["generator_epochs"], paper["generator_lr"],
        paper["generator_batch"], paper["generator_warmup"], rc.seed)
    assert (g.recipe, g.chunk_targets, g.subset) == (rc.generator_recipe, rc.generator_chunk, rc.generator_subset)
    r = build_parser().parse_args(["train", "retriever", "--data", "d"])
    assert (r.budget, r.valid_budget, r.per_user, r.tau, r.element, r.seed) == (
        paper["label_train"], paper["label_valid"], rc.per_user, rc.tau, rc.element, rc.seed)


def _write_format(folder, fmt: str, n_users: int = 5, per_user: int = 12, seed: int = 3) -> str:
    """The same kind of tiny interaction log in one loader format; returns the dataset name to pass."""
    import random

    from tests.conftest import TINY_TITLES

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = [(f"u{u}", 1 + i, 1_000_000 + 100 * j + u) for u in range(n_users)
            for j, i in enumerate(rng.sample(range(len(TINY_TITLES)), per_user))]
    if fmt == "movielens-csv":
        (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
            f'{i},"{t}",Drama\n' for i, t in enumerate(TINY_TITLES, start=1)))
        (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
            f"{u[1:]},{i},4.0,{ts}\n" for u, i, ts in rows))
        return "movielens-csv"
    if fmt == "amazon":
        (folder / "meta_Toys.json").write_text("".join(
            json.dumps({"asin": f"B{i:05d}", "title": t}) + "\n" for i, t in enumerate(TINY_TITLES, start=1)))
        (folder / "reviews_Toys_5.json").write_text("".join(
            json.dumps({"reviewerID": u, "asin": f"B{i:05d}", "overall": 5.0, "unixReviewTime": ts}) + "\n"
            for u, i, ts in rows))
        return "amazon"
    write_tiny_csv_dataset(folder, n_users=n_users, per_user=per_user, seed=seed)
    return "csv"


@pytest.mark.parametrize("fmt", ["movielens-csv", "amazon", "csv"])
def test_reproduce_end_to_end_in_each_loader_format(tmp_path, one_thread, fmt):
    """Nothing in the recipe is keyed to ML-100K: every stage and every method runs on a tiny log in
    each loader format, and Table 1 holds every row with the memory-size split."""
    name = _write_format(tmp_path / "raw", fmt)
    tok = build_tiny_tokenizer()
    model_dir = tmp_path / "tiny-model"
    build_tiny_lm(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = ReproduceConfig(dataset=name, path=str(tmp_path / "raw"), runs=tmp_path / "runs", docs=tmp_path / "docs",
                          min_item=1, min_user=1, k_short=3, cut=2, dtype="float32", model=str(model_dir),
                          generator_samples=None, generator_chunk=4, generator_batch=2, label_train=3,
                          label_valid=2, per_user=2, limit=5,
                          generation=Settings(num_beams=3, max_new_tokens=8).generation())
    report = reproduce(cfg)
    table = (tmp_path / "docs" / name / "table1.md").read_text()
    for m in cfg.methods:
        assert f"| {m} |" in table
    assert "memory size" in table and "0–20 (n)" in table
    upper = json.loads((tmp_path / "runs" / name / "artefacts" / "generator" / "upper.json").read_text())
    assert upper["extra"]["template"] == "list" and upper["extra"]["train_report"]["config"]["recipe"] == "packed"
    assert {"data", "generator", "retriever"} <= set(report["timings_s"])
