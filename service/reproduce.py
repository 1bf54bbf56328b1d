"""``automr reproduce``: every published number from one command, resuming from cached stages.

data → generator tuning → labels + retriever → evaluation of every method on one seeded test subset
→ Table 1, Figures 2 and 3, memorization. Each stage is skipped when its output exists (delete the
file or folder to redo it); every stage's wall time is written to ``OUT/reproduce.json``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

METHODS = ("popularity", "sasrec", "bigrec-greedy", "bigrec", "full-history", "random", "semantic", "automr")
STAGES = ("data", "generator", "retriever")  # the stages before evaluation (``--until``)

# The quick budget preset (``automr reproduce --budget quick``): the service's quick start, within 15 min
# on 2 cores: the latest 6,000 train targets, one packed row per optimizer step.
# The paper preset is ``ReproduceConfig``'s defaults (``BUDGETS`` below the class).
QUICK_BUDGET = dict(generator_samples=6_000, generator_epochs=1, generator_valid=64, generator_batch=1,
                    generator_lr=3e-4, generator_warmup=20, label_train=48, label_valid=16)


@dataclass
class ReproduceConfig:
    dataset: str = "ml-100k"
    path: str | None = None  # raw data (ml-100k: the fetched copy)
    runs: Path = Path("runs")  # runs/<dataset>: prepared data, artefacts/ (with results/: its evaluations)
    docs: Path = Path("docs/results/quality")  # where the markdown and PNG reports go (DOCS/<dataset>)
    min_item: int = 5  # the protocol (docs/METHOD.md §1)
    min_user: int = 20
    k_short: int = 10
    titles: str = "as-is"  # as-is | natural (a trailing article moves to the front: BENCHMARKS §8)
    cut: int = 20
    dtype: str = "auto"
    # the LLM methods' generation options (RecommenderConfig fields; the CLI passes the service's,
    # Settings.generation); absent ones take RecommenderConfig's defaults
    generation: dict = field(default_factory=dict)
    model: str | None = None
    # the generator's tuning (model/train/generator.py). "packed": every train target, in packed rows of
    # the list template (model/train/packed.py); "sliding": BIGRec's one Alpaca prompt per sample
    generator_recipe: str = "packed"
    # train targets (None: all 71,864 of ML-100K, ~70 min per epoch on the 2-core CPU); which ones:
    # generator_subset. The preset keeps the whole of `reproduce` within ~2.5 h there (BENCHMARKS §2.2)
    generator_samples: int | None = 48_000
    generator_subset: str = "latest"  # "latest" (nearest the validation period) | "random" (seeded)
    generator_chunk: int = 32  # targets per packed row
    generator_epochs: int = 1
    generator_valid: int = 128  # valid samples for early stopping
    # packed rows (sliding: samples) per optimizer step: one row (~25 targets) gave as low a valid loss as
    # 8 rows of 64 targets, in 11x the steps and 0.8x the time (BENCHMARKS §2.2)
    generator_batch: int = 1
    generator_lr: float = 3e-4
    generator_warmup: int = 20  # linear warm-up steps (keep below the number of steps of a small budget)
    element: str = "item"  # memory element kind (window is the paper's; item: ~160x cheaper, no worse, BENCHMARKS §8)
    label_train: int = 128
    label_valid: int = 32
    per_user: int = 8
    tau: float = 1.0
    limit: int = 1000  # the seeded test subset, the same for every method
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    artefacts: Path | None = None  # default RUNS/<dataset>/artefacts
    until: str | None = None  # stop after this stage: "data", "generator" or "retriever" (no evaluation)
    timings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.until not in (None, *STAGES):
            raise ValueError(f"until must be one of {STAGES}, got {self.until!r}")


# Budget presets (``automr reproduce --budget``). "paper": the config's defaults (the latest 48,000 train
# targets, BENCHMARKS §2.2), which ``automr train generator|retriever`` also use.
BUDGETS: dict[str, dict] = {
    "paper": {k: getattr(ReproduceConfig, k) for k in QUICK_BUDGET},
    "quick": QUICK_BUDGET,
}


def _stage(cfg: ReproduceConfig, name: str, done: bool, fn) -> None:
    if done:
        log.info("stage %s: cached", name)
        print(f"[reproduce] {name}: cached")
        return
    print(f"[reproduce] {name} ...", flush=True)
    t0 = time.perf_counter()
    fn()
    cfg.timings[name] = round(time.perf_counter() - t0, 1)
    print(f"[reproduce] {name}: {cfg.timings[name]} s", flush=True)


def _check_prepared(ds, cfg: ReproduceConfig) -> None:
    """The cached data stage must be what this config prepares: every later stage would silently run
    on other data (another title style, other filters)."""
    wanted = {"min_item": cfg.min_item, "min_user": cfg.min_user, "k_short": cfg.k_short, "titles": cfg.titles}
    defaults = {"titles": "as-is"}  # prepared before the key existed
    differ = [f"{k}={ds.config.get(k, defaults.get(k))!r}, not {v!r}" for k, v in wanted.items()
              if ds.config.get(k, defaults.get(k)) != v]
    if differ:
        raise ValueError(f"{ds.root} holds data prepared with {'; '.join(differ)}: give another --runs folder "
                         f"(or delete that one)")


def _warn_budget(generator_dir: Path, cfg: ReproduceConfig) -> None:
    """A cached generator tuned on another budget is reused (stages are cached by their output), but say so."""
    meta = generator_dir / "upper.json"
    try:
        report = json.loads(meta.read_text()).get("extra", {}).get("train_report", {})
    except (OSError, ValueError):
        return
    tuned = report.get("config", {})
    wanted = {"n_train": cfg.generator_samples, "recipe": cfg.generator_recipe, "epochs": cfg.generator_epochs,
              "lr": cfg.generator_lr}
    differ = [f"{k}={tuned.get(k)!r} (asked: {v!r})" for k, v in wanted.items() if k in tuned and tuned[k] != v]
    if differ:
        print(f"[reproduce] note: the cached generator in {generator_dir} was tuned with {', '.join(differ)}: "
              f"delete that folder to tune again", flush=True)


def reproduce(cfg: ReproduceConfig) -> dict:
    from model.assets import fetch_assets
    from model.data.prepared import PreparedDataset, prepare_cmd
    from model.eval.evaluator import write_result_json
    from model.eval.run import run_evaluation
    from model.eval.paper_reports import figure2, figure3, table1
    from model.eval.report import memory_size_table
    from service.observability import git_sha

    sha = git_sha()  # the code this process loaded, read now: HEAD may move while the stages run
    data = cfg.runs / cfg.dataset
    art = cfg.artefacts or data / "artefacts"
    results = art / "results"  # the evaluations of these artefacts: other artefacts never reuse them
    llm_opts = {**cfg.generation, "cut": cfg.cut, "dtype": cfg.dtype, "element": cfg.element}
    if cfg.model:
        llm_opts["model"] = cfg.model
    t_all = time.perf_counter()

    if (cfg.dataset == "ml-100k" and cfg.path is None) or cfg.model is None:
        _stage(cfg, "assets", False, lambda: fetch_assets())
    _stage(cfg, "data", (data / "stats.json").is_file(),
           lambda: prepare_cmd(cfg.dataset, str(data), path=cfg.path, min_item=cfg.min_item,
                               min_user=cfg.min_user, k_short=cfg.k_short, titles=cfg.titles))
    ds = PreparedDataset.load(data)
    _check_prepared(ds, cfg)
    if cfg.until == "data":
        return {"timings_s": cfg.timings}

    def tune() -> None:
        from model.artefacts import load_lm
        from model.train.stages import tune_generator_stage

        tune_generator_stage(load_lm(cfg.model, cut=cfg.cut, dtype=cfg.dtype), ds, art,
                             recipe=cfg.generator_recipe, batch_size=cfg.generator_batch,
                             n_train=cfg.generator_samples, epochs=cfg.generator_epochs,
                             n_valid=cfg.generator_valid, seed=cfg.seed, lr=cfg.generator_lr,
                             warmup_steps=cfg.generator_warmup, chunk_targets=cfg.generator_chunk,
                             subset=cfg.generator_subset)

    gen_done = (art / "generator" / "upper.safetensors").is_file()
    if gen_done:
        _warn_budget(art / "generator", cfg)
    _stage(cfg, "generator", gen_done, tune)
    if cfg.until == "generator":
        return {"timings_s": cfg.timings}

    def retriever() -> None:
        from model.train.retriever import RetrieverTrainConfig
        from model.train.stages import LabelBudget, open_pipeline, train_retriever_stage

        pipe = open_pipeline(ds, art, model=cfg.model, cut=cfg.cut, dtype=cfg.dtype, element=cfg.element)
        train_retriever_stage(pipe, ds, art, LabelBudget(cfg.label_train, cfg.label_valid, cfg.per_user, cfg.seed),
                              RetrieverTrainConfig(tau=cfg.tau, seed=cfg.seed))

    if "automr" in cfg.methods or cfg.until == "retriever":
        _stage(cfg, "retriever", (art / "retriever" / "retriever.safetensors").is_file(), retriever)
    if cfg.until == "retriever":
        return {"timings_s": cfg.timings}

    for m in cfg.methods:
        out = results / f"{m}.json"
        opts = llm_opts if m not in ("popularity", "sasrec") else {}
        _stage(cfg, f"evaluate {m}", out.is_file(),
               lambda m=m, out=out, opts=opts: run_evaluation(data, m, limit=cfg.limit, seed=cfg.seed, out=out,
                                                              artefacts_dir=art, options=dict(opts)))

    found = [json.loads((results / f"{m}.json").read_text()) for m in cfg.methods if (results / f"{m}.json").is_file()]
    by = {r["method"]: r for r in found}
    docs = cfg.docs / cfg.dataset
    docs.mkdir(parents=True, exist_ok=True)
    for m, r in by.items():  # the per-sample results beside the report, gzipped: `automr compare` pairs them
        write_result_json(docs / f"{m}.json.gz", r)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "timings"},
              "git_sha": sha}  # the code the evaluations ran on (a dirty tree: its last commit)
    pairs = (("automr", "bigrec"), ("automr", "random"), ("bigrec", "popularity"), ("automr", "sasrec"),
             ("bigrec", "bigrec-greedy"), ("automr", "full-history"))
    by_mem = memory_size_table(found, k_short=cfg.k_short)
    (docs / "table1.md").write_text(table1(found, pairs=pairs, n_boot=1000, seed=cfg.seed) + "\n\n"
                                    + "Metrics by the user's memory size (history items before the K prompt titles):\n\n"
                                    + by_mem + "\n")
    if "automr" in by and "random" in by:
        report["figure2"] = figure2(by["automr"], by["random"], docs / "figure2.png", seed=cfg.seed)
    if "automr" in by and "bigrec" in by:
        report["figure3"] = figure3(by["automr"], by["bigrec"], docs / "figure3.png")
    cfg.timings["total"] = round(time.perf_counter() - t_all, 1)
    report["timings_s"] = cfg.timings
    (docs / "reproduce.json").write_text(json.dumps(report, indent=2, default=str))
    print((docs / "table1.md").read_text())
    return report
