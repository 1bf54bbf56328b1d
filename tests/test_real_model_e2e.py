"""The real model once, end to end: real ML-100K data, the real SmolLM2, a few tuning steps, one
recommendation served over HTTP.

Skipped only when the embedded assets are missing (``automr assets fetch``; ``make test`` fetches them
first, so CI runs it). Kept small for CI's CPUs: a slice of ML-100K (its 100 most popular items and 30 users
with 25 to 60 interactions on them, as RecBole atomic files), 3 optimizer steps of packed tuning of the
generator, the catalogue index built over the slice, and one beam-searched answer (4 beams).

What is checked: the tuning loss is finite; the service loads what the offline stages wrote (the tuned
upper layers under ARTEFACTS/generator, the index built and saved on first start, the prepared data
seeded into the embedded Redis) and answers ``/recommend`` with k real catalogue items, none of them in
the user's history, from the LLM path (no popularity fallback).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import pytest

from model.artefacts import save_popularity
from model.checkpoint import save_upper
from model.assets import asset_paths
from model.baselines.popularity import popularity_counts
from tests.redis_fixtures import memory_store, redis_server, redis_url  # noqa: F401
from tests.test_service import serve, threads1  # noqa: F401

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not asset_paths().ready(),
                       reason=f"embedded assets not fetched under {asset_paths().home} (automr assets fetch)"),
]

N_ITEMS = 100  # the most popular ML-100K items ...
N_USERS = 30  # ... and the first users (by id) with 25 to 60 interactions on them
K_REC = 5


def _write_slice(src: Path, dst: Path) -> set[str]:
    """RecBole ``ml-100k.inter`` / ``.item`` restricted to the slice (their lines copied unchanged) under
    ``dst``; returns the original item ids of the slice."""
    head, *lines = [ln for ln in (src / "ml-100k.inter").read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = [ln.split("\t") for ln in lines]
    top = {i for i, _ in Counter(r[1] for r in rows).most_common(N_ITEMS)}
    per_user = Counter(r[0] for r in rows if r[1] in top)
    users = set(sorted((u for u, n in per_user.items() if 25 <= n <= 60), key=int)[:N_USERS])
    dst.mkdir(parents=True)
    keep = [ln for ln, r in zip(lines, rows) if r[0] in users and r[1] in top]
    (dst / "ml-100k.inter").write_text("\n".join([head, *keep]) + "\n", encoding="utf-8")
    head, *lines = (src / "ml-100k.item").read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines if ln.split("\t", 1)[0] in top]
    (dst / "ml-100k.item").write_text("\n".join([head, *keep]) + "\n", encoding="utf-8")
    return top


@pytest.fixture(scope="module")
def real_world(tmp_path_factory, threads1):
    """Prepared slice + a generator tuned for a few steps and saved as ARTEFACTS/generator. One intra-op
    thread for the module (``threads1``): on a 2-core machine shared with another job, 2 threads made the
    tuning ~3x slower (25 s against 7 s)."""
    import torch

    from model import artefacts
    from model.data.prepared import prepare
    from model.data.protocol import ProtocolConfig
    from model.llm import auto_dtype
    from model.train.generator import GeneratorTrainConfig, train_generator

    root = tmp_path_factory.mktemp("real")
    raw_ids = _write_slice(asset_paths().ml100k_dir, root / "raw")
    ds = prepare("ml-100k", root / "raw", root / "data", ProtocolConfig(), progress=False)
    assert ds.name == "ml-100k" and ds.domain == "movie"
    assert 50 < len(ds.catalogue) <= N_ITEMS and len(ds.split("train")) > 100
    assert set(ds.catalogue.item_ids) <= raw_ids

    dtype = auto_dtype()  # bfloat16 where the CPU has native bf16, else float32 (what the service resolves)
    cached = set(artefacts._LM_CACHE)
    t0 = time.perf_counter()
    lm = artefacts.load_lm(cut=20, dtype=dtype)
    t_load = time.perf_counter() - t0
    assert lm.n_layers == 30 and lm.cut == 20
    cfg = GeneratorTrainConfig(recipe="packed", template="list", n_train=24, subset="latest", n_valid=4,
                               epochs=1, batch_size=2, micro_batch_size=1, chunk_targets=8,
                               master_weights=lm.dtype == torch.bfloat16, progress=False)
    t0 = time.perf_counter()
    try:
        report = train_generator(lm, ds, cfg)
        art = root / "art"
        save_upper(lm, art / "generator", extra={"template": "list", "train_report": report.to_json()})
        save_popularity(art, popularity_counts(ds.split("train"), len(ds.catalogue)))  # the beams' prior
    finally:
        # the cached base model was tuned in place: never hand it to anything else in this process
        for key in set(artefacts._LM_CACHE) - cached:
            artefacts._LM_CACHE.pop(key, None)
    t_train = time.perf_counter() - t0
    print(f"\nreal model: load {t_load:.1f}s, tuning {t_train:.1f}s ({report.train_targets} targets, "
          f"{report.n_train} rows, {dtype})")
    yield {"ds": ds, "root": root, "art": art, "dtype": dtype, "report": report}
    for key in set(artefacts._LM_CACHE) - cached:  # the service's copy
        artefacts._LM_CACHE.pop(key, None)


def test_tuning_steps_give_a_finite_loss(real_world):
    r = real_world["report"]
    assert r.epochs_run == 1 and r.n_valid == 4
    assert r.train_targets == 24 and r.n_train >= 3  # packed rows of <= 8 targets: 2+ optimizer steps
    assert len(r.train_losses) == 1 and math.isfinite(r.train_losses[0]) and r.train_losses[0] > 0
    assert len(r.valid_losses) == 2 and all(math.isfinite(v) for v in r.valid_losses)
    assert (real_world["art"] / "generator" / "upper.safetensors").is_file()


@pytest.mark.anyio
async def test_serves_one_recommendation_from_the_tuned_real_model(real_world, memory_store, redis_url, tmp_path):
    from service.settings import Settings

    ds, art = real_world["ds"], real_world["art"]
    cat = ds.catalogue
    # the user of the newest test sample: history = every interaction of theirs in the prepared data
    user = max(ds.split("test"), key=lambda s: (s.timestamp, s.user_id)).user_id
    inter = ds.interactions
    seen = {cat.item_ids[int(i)] for u, i in zip(inter.user.astype(str), inter.item) if u == str(user)}
    assert 20 <= len(seen) <= 100  # the store keeps the newest 100 events: all of them here

    settings = Settings(home=tmp_path, data_dir=ds.root, artefacts_dir=art, cut_layer=20, dtype=real_world["dtype"],
                        redis_url=redis_url, num_beams=4, encode_on_write=False, seed_store=True)
    t0 = time.perf_counter()
    async with serve(settings, None, wait=False) as (client, state):
        await state.wait_ready(600)  # nothing injected: load_components reads the artefacts from disk
        t_ready = time.perf_counter() - t0
        ready = (await client.get("/readyz")).json()
        assert ready["slot_policy"] == "none"  # no retriever artefact
        t0 = time.perf_counter()
        r = await client.post("/recommend", json={"user_id": str(user), "k": K_REC, "mode": "bigrec"})
        t_rec = time.perf_counter() - t0
    print(f"\nservice: ready {t_ready:.1f}s, one /recommend {t_rec:.1f}s")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] is None and body["mode"] == "bigrec" and body["slot_policy"] == "none"
    assert isinstance(body["generated"], str) and body["generated"].strip()
    # the tuned upper layers were loaded (not the base model's), no retriever
    assert "-gen:base-" not in body["model_version"] and "-ret:none-" in body["model_version"]
    items = body["items"]
    assert len(items) == K_REC
    ids = [it["item_id"] for it in items]
    assert len(set(ids)) == K_REC
    for it in items:
        assert it["title"] == cat.titles[cat.index_of(it["item_id"])]  # a real catalogue item (KeyError if not)
        assert math.isfinite(it["score"])
    assert not set(ids) & seen  # exclude_seen: nothing the user already watched
    assert (art / "index" / "index.json").is_file()  # built over the slice on first start and saved
