"""Two service instances over one Redis: the replicas are stateless, the store is the only state.

Each instance has its own components (the same tiny model, built twice from one seed), its own runner,
encoder and store connection, as two processes behind a load balancer would.
"""
from __future__ import annotations

import pytest
import torch

from service.components import Components
from tests.conftest import build_tiny_tokenizer
from tests.redis_fixtures import memory_store, redis_server, redis_url  # noqa: F401
from tests.test_service import _pipeline, _settings, prepared_world, serve

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return prepared_world(tmp_path_factory.mktemp("replicas"))


@pytest.fixture(scope="module")
def replicas(world):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = world["ds"]
    yield [Components.from_dataset(ds, _pipeline(ds, build_tiny_tokenizer(), cut=2, retriever=True),
                                   model_version="tiny-replica") for _ in range(2)]
    torch.set_num_threads(before)


def _answer(r) -> tuple:
    assert r.status_code == 200, r.text
    b = r.json()
    return ([(i["item_id"], round(i["score"], 4)) for i in b["items"]], b["generated"], b["memory"])


async def test_two_replicas_share_histories_and_memory(world, replicas, memory_store, redis_url, tmp_path):
    user = "u1"
    async with serve(_settings(redis_url, tmp_path / "a", encode_on_write=True), replicas[0]) as (a, _), \
            serve(_settings(redis_url, tmp_path / "b", encode_on_write=True), replicas[1]) as (b, _):
        body = {"user_id": user, "k": 5}
        first_a, first_b = _answer(await a.post("/recommend", json=body)), _answer(await b.post("/recommend", json=body))
        assert first_a == first_b and first_a[2]["used"]
        elements = first_a[2]["elements"]

        history = (await a.get(f"/users/{user}/history")).json()["events"]
        seen = {e["item_id"] for e in history}
        item = next(str(i) for i in range(1, 19) if str(i) not in seen)
        event = {"user_id": user, "item_id": item, "timestamp": history[-1]["timestamp"] + 10, "event_id": "replica-1"}
        r = await a.post("/interactions", json={"events": [event]})
        assert r.status_code == 200 and r.json()["added"] == 1

        # at once in the other replica's history and memory
        after_b = (await b.get(f"/users/{user}/history")).json()["events"]
        assert after_b[-1]["event_id"] == "replica-1" and len(after_b) == len(history) + 1
        second_b = _answer(await b.post("/recommend", json=body))
        assert second_b[2]["elements"] == elements + 1
        assert _answer(await a.post("/recommend", json=body)) == second_b

        # a retry through the other replica is a duplicate; nothing is stored twice
        r = await b.post("/interactions", json={"events": [event]})
        assert r.status_code == 200 and r.json()["duplicates"] == 1 and r.json()["added"] == 0
        assert len((await a.get(f"/users/{user}/history")).json()["events"]) == len(history) + 1

        # bad input through one replica changes nothing that the other sees
        bad = {"events": [{**event, "event_id": "replica-2", "item_id": "no-such-item"}]}
        assert (await b.post("/interactions", json=bad)).status_code in (400, 422)
        assert (await a.get(f"/users/{user}/history")).json()["events"] == after_b

        # an erasure through one replica is seen by the other
        assert (await a.delete(f"/users/{user}")).status_code == 204
        assert (await b.get(f"/users/{user}/history")).status_code == 404
