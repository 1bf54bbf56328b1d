"""Tokens/s and targets/s of the two generator trainers, in one process, on the same model and data.

    python bench/bench_trainers.py --data runs/ml-100k --targets 512

Both tune layers L+1..N of the embedded model from its base weights for one pass over the same latest
``--targets`` train targets: "sliding" feeds one Alpaca prompt per target (BIGRec), "packed" the
list-template rows of model/train/packed.py. The model is reloaded between the two.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from model.artefacts import _LM_CACHE, load_lm
from model.data.prepared import PreparedDataset
from model.prompts import PromptBuilder
from model.train.generator import GeneratorTrainConfig, _subset, build_examples, train_on_examples, train_packed
from model.train.packed import build_chunks
from service.reproduce import ReproduceConfig


def run(recipe: str, data: str, n: int, cut: int, chunk: int, master: bool) -> dict:
    ds = PreparedDataset.load(data)
    _LM_CACHE.clear()  # a fresh base model for each trainer
    lm = load_lm(cut=cut)
    k = ds.k_short
    samples = _subset(ds.split("train"), n, 0, "latest")
    template = "list" if recipe == "packed" else "alpaca"
    builder = PromptBuilder.for_model(lm, domain=ds.domain, template=template)
    packed = recipe == "packed"
    # each trainer as `automr reproduce` runs it (service/reproduce.py)
    cfg = GeneratorTrainConfig(epochs=1, n_valid=0, progress=False, recipe=recipe, template=template,
                               batch_size=8 if packed else 32, micro_batch_size=4 if packed else 8,
                               chunk_targets=chunk, master_weights=master and packed and lm.dtype == torch.bfloat16)
    t0 = time.time()
    if recipe == "packed":
        rep = train_packed(lm, build_chunks(builder, samples, ds.catalogue.titles, k, cfg.chunk_targets), [], cfg)
    else:
        rep = train_on_examples(lm, build_examples(builder, samples, ds.catalogue.titles, k), [], cfg)
    return {"recipe": recipe, "targets": n, "tokens_per_target": round(rep.tokens_per_sample, 1),
            "tokens_per_s": round(rep.tokens_per_second, 1), "targets_per_s": round(rep.targets_per_second, 2),
            "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/ml-100k")
    ap.add_argument("--targets", type=int, default=512)
    ap.add_argument("--cut", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=ReproduceConfig.generator_chunk, help="targets per packed row")
    ap.add_argument("--no-master", action="store_true", help="bf16 autocast over float32 weights instead of "
                    "bf16 weights with float32 master copies")
    a = ap.parse_args()
    out = [run(r, a.data, a.targets, a.cut, a.chunk, not a.no_master) for r in ("packed", "sliding")]
    print(json.dumps(out, indent=1))
    print(f"packed / sliding targets/s: {out[0]['targets_per_s'] / out[1]['targets_per_s']:.1f}x")


if __name__ == "__main__":
    main()
