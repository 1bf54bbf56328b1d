"""Schemathesis over the service's own OpenAPI document: generated requests, valid and invalid, for
every operation, sent in-process over ASGI to the real app (tiny model, real Redis, seeded store,
background encoding on); no answer may be a 5xx (``not_a_server_error``).

One pytest test per operation (the list is read from the OpenAPI document of an app that is never
started); examples are bounded and derandomized (the same cases every run) so that the file stays
well under a minute on a loaded 2-core machine.
"""
from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as st_asgi

from memory_store import MemoryStore
from service.app import create_app
from service.settings import Settings
from tests.redis_fixtures import redis_server  # noqa: F401
from tests.test_service import USERS, _settings
from tests.test_service_prod import comp, world  # noqa: F401

MAX_EXAMPLES = 40  # per operation: valid, invalid and grounded requests together
ITEM_IDS = [str(i) for i in range(1, 19)]  # the tiny catalogue (TINY_TITLES)
OPERATIONS = [f"{method.upper()} {path}" for path, ops in create_app(Settings()).openapi()["paths"].items()
              for method in ops]


class OneLifespan:
    """The app behind an ASGI wrapper whose lifespan runs once for the whole module: schemathesis'
    pytest plugin ends ASGI lifespans after every test (and starts them again on the next request),
    but an ``AppState`` is not restartable, and reloading per operation would cost seconds each."""

    def __init__(self, app):
        self.app = app
        self._context = None
        self.final = False  # set by the fixture's teardown: the next shutdown is the real one

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._context is None:
                    self._context = self.app.router.lifespan_context(self.app)
                    await self._context.__aenter__()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.final and self._context is not None:
                    await self._context.__aexit__(None, None, None)
                    self._context = None
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.fixture(scope="module")
def api_schema(comp, redis_server, tmp_path_factory):  # noqa: F811
    MemoryStore.from_url(redis_server.url).client.flushall()
    app = create_app(_settings(redis_server.url, tmp_path_factory.mktemp("schemathesis"), encode_on_write=True,
                               log_json=False), components=comp)
    wrapped = OneLifespan(app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", wrapped)  # starts the lifespan on schemathesis' loop
    state = app.state.automr
    deadline = time.monotonic() + 30
    while not state.ready:
        assert state.phase != "failed", state.error
        assert time.monotonic() < deadline, f"not ready: {state.phase} {state.error}"
        time.sleep(0.02)
    yield schema
    with st_asgi.get_client(wrapped):  # (re)enters the wrapper's lifespan, then the real shutdown
        wrapped.final = True
    st_asgi.shutdown_lifespans()
    assert wrapped._context is None and state.phase == "stopping"


def test_every_operation_is_covered():
    assert {"POST /recommend", "POST /interactions", "GET /users/{user_id}/history", "DELETE /users/{user_id}",
            "GET /healthz", "GET /readyz", "GET /metrics", "GET /version"} <= set(OPERATIONS)


def ground(pair) -> schemathesis.Case:
    """A valid generated case with its ids replaced by known ones (seeded users, catalogue items), so
    that requests reach the model and the stored memory rather than only the 404/422 paths."""
    case, rnd = pair
    user = lambda: rnd.choice([*USERS, "fresh-user"])  # noqa: E731
    if case.path_parameters and "user_id" in case.path_parameters:
        case.path_parameters["user_id"] = user()
    body = case.body if isinstance(case.body, dict) else None
    if body is not None and "user_id" in body:  # POST /recommend
        body["user_id"] = user()
        if isinstance(body.get("recent_items"), list):
            body["recent_items"] = [rnd.choice(ITEM_IDS) for _ in body["recent_items"]]
    if body is not None and isinstance(body.get("events"), list):  # POST /interactions
        for e in body["events"]:
            if isinstance(e, dict):
                e.update(user_id=user(), item_id=rnd.choice(ITEM_IDS), event_id=f"ev-{rnd.randrange(10**6)}",
                         timestamp=rnd.randrange(-(2**40), 2**40))
    return case


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_server_errors(api_schema, operation):
    method, path = operation.split(" ", 1)
    op = api_schema[path][method]
    cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE),
                      st.tuples(op.as_strategy(GenerationMode.POSITIVE), st.randoms(use_true_random=False)).map(ground))
    statuses: list[int] = []

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        statuses.append(case.call_and_validate(checks=[not_a_server_error]).status_code)

    run()
    assert statuses and max(statuses) < 500
    assert any(200 <= s < 300 for s in statuses)  # the grounded cases reach the working paths
