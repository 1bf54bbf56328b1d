"""The offline AutoMR stages end to end on a tiny prepared dataset: labels -> retriever -> the automr
evaluator method, all through the artefact folder (resumable)."""
from __future__ import annotations

import pytest
import torch

from model.data.prepared import prepare
from model.data.protocol import ProtocolConfig
from model.grounding import CatalogueIndex
from model.llm import SplitLM
from model.pipeline import Pipeline
from model.prompts import PromptBuilder
from model.retriever import Retriever
from model.train.labels import LabelSet
from model.train.retriever import RetrieverTrainConfig
from model.train.stages import LabelBudget, train_retriever_stage
from tests.conftest import build_tiny_lm, build_tiny_tokenizer, write_tiny_csv_dataset

K = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    raw = root / "raw"
    write_tiny_csv_dataset(raw, n_users=4, per_user=12, seed=3, step=1000)
    ds = prepare("csv", raw, root / "prepared", ProtocolConfig(min_item=1, min_user=1, k_short=K), domain="movie",
                 progress=False)
    return ds, root


def test_labels_then_retriever_then_automr_method(world, one_thread):
    ds, root = world
    tok = build_tiny_tokenizer()
    lm = SplitLM.from_model(build_tiny_lm(len(tok), seed=1), tok, cut=2)
    lm.snapshot_base_upper()
    builder = PromptBuilder.for_model(lm, domain="movie")
    index = CatalogueIndex.build(ds.catalogue.titles, lambda t: lm.embed_final(list(t)).numpy(), progress=False)
    pipe = Pipeline(lm=lm, builder=builder, titles=ds.catalogue.titles, index=index, retriever=None, k_short=K,
                    element="item")
    art = root / "artefacts"
    budget = LabelBudget(train=6, valid=3, per_user=None)
    cfg = RetrieverTrainConfig(max_epochs=3, patience=2, mlp_hidden=16, progress=False)
    report = train_retriever_stage(pipe, ds, art, budget, cfg, progress=False)
    assert report["train_samples"] == 6 and report["valid_samples"] == 3
    assert report["element"] == "item" and report["cut"] == 2

    # the labels and the retriever are on disk (Eq. 5 itself is checked by brute force in test_labels.py)
    labels = LabelSet.load(art / "labels" / "item" / "train")
    assert len(labels) == 6
    retriever = Retriever.load(art / "retriever")
    assert retriever.config.hidden_size == lm.hidden_size

    # a rerun resumes: the same labels come back without recomputation (files untouched)
    mtimes = {p: p.stat().st_mtime_ns for p in (art / "labels").rglob("*.safetensors")}
    train_retriever_stage(pipe, ds, art, budget, cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (art / "labels").rglob("*.safetensors")} == mtimes

    # the automr policy over these artefacts selects by the saved retriever's scores
    pipe.retriever = retriever
    rec = pipe.recommender("learned", max_new_tokens=4)
    enc = pipe.cached_memory_encoder(art / "memory")
    s = next(x for x in ds.split("test") if len(x.history) > K)
    _, mem = enc.memory_for_sample(s)
    from model.recommend import RecommendRequest

    r = rec.recommend([RecommendRequest(context=s.short_term(K), memory=mem, query=enc.query_for_sample(s))])[0]
    expect = int(torch.argmax(retriever.scores(enc.query_for_sample(s)[None], mem[None])[0]))
    assert r.memory_indices == [expect]
