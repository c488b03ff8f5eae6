"""Schemathesis over the coordinator's OpenAPI schema, in process over ASGI, on SQLite and Postgres.

Every operation gets positive and negative data (100 examples each on SQLite, 20 on Postgres),
sent with every kind of credential (none, a wrong token, client a, client b, the enrollment secret,
the admin token) and, half the time, with the ids of objects that exist (so the generated requests
get past "not found" into the handlers). Checks: no 5xx, and status code, content type, headers and
body conform to the schema. A stateful run walks register -> lease -> heartbeat -> upload ->
complete with generated data in between.

``HILORA_FUZZ_SEED=random`` explores new examples (CI is derandomized, so it is repeatable).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, bearer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from support.hostile import CREDENTIALS, build_world, valid_root_upload

from shared.tensors import pack_tensors

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.api

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = {"sqlite": 100, "postgres": 20}
DERANDOMIZE = os.environ.get("HILORA_FUZZ_SEED", "") != "random"
METHODS = ("get", "put", "post", "delete", "patch")


def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in the schema, read once at collection."""
    from coordinator.app import create_app
    from coordinator.settings import Settings

    with tempfile.TemporaryDirectory() as d:
        app = create_app(Settings(database_url=f"sqlite:///{d}/schema.db", blob_dir=Path(d) / "blobs",
                                  admin_token=ADMIN_TOKEN, run_scheduler=False, migrate_on_start=False))
        spec = app.openapi()
        app.state.engine.dispose()
    return sorted((m.upper(), p) for p, item in spec["paths"].items() for m in item if m in METHODS)


OPERATIONS = _operations()


@pytest.fixture
def app(app):
    """The conftest app with held lease requests capped at 0.2 s: a generated ``?wait=10`` must not
    hold a request for the whole read timeout (under schemathesis's in-process ASGI calls a held
    request is woken by nothing but its own timeout). Long polling has its own tests."""
    app.state.settings = app.state.settings.model_copy(update={"long_poll_max_seconds": 0.2})
    return app


def _backend(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite") else "postgres"


def _known_ids(world) -> dict[str, list]:
    return {
        "federation_id": [world.federation_id, world.enrolling_federation_id],
        "client_id": [world.client_a, world.client_b, world.victims[0][0]],
        "task_id": [world.task_a, world.task_b],
        "round_id": [world.round_id],
        "version_id": [world.root_version_id],
        "run_id": [1],
        "label": [0],
        "sha256": [world.backbone_sha],
    }


def _known_paths(operation, world) -> list[dict]:
    """Every combination of existing ids for the operation's path parameters ([] if it has one we
    do not know)."""
    names = [p.name for p in operation.path_parameters]
    known = _known_ids(world)
    if not names or not all(n in known for n in names):
        return []
    combos: list[dict] = [{}]
    for n in names:
        combos = [{**c, n: v} for c in combos for v in known[n]]
    return combos


def _run(operation, world, mode: GenerationMode, examples: int) -> None:
    tokens = {c: world.token(c) for c in CREDENTIALS}
    generated = operation.as_strategy(generation_mode=mode)
    query = {"lease_id": world.lease_a} if operation.path.endswith("/upload") else None
    known_paths = _known_paths(operation, world)
    with_ids = (st.one_of([operation.as_strategy(generation_mode=mode, path_parameters=p, query=query)
                           for p in known_paths]) if known_paths else generated)

    @settings(max_examples=examples, deadline=None, derandomize=DERANDOMIZE, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(generated, with_ids), credential=st.sampled_from(CREDENTIALS))
    def fuzz(case, credential):
        token = tokens[credential]
        headers = dict(case.headers or {})
        if token is not None and (mode == GenerationMode.POSITIVE or "authorization" not in
                                  {h.lower() for h in headers}):
            headers["Authorization"] = f"Bearer {token}"
        case.headers = headers
        response = case.call()
        case.validate_response(response, checks=CHECKS)

    try:
        fuzz()
    except Unsatisfiable:
        # nothing of this operation can be made invalid (e.g. only optional string headers)
        assert mode == GenerationMode.NEGATIVE, "positive data must always be possible"


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_survives_fuzzing(api, app, database_url, method, path):
    world = build_world(api, app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operation = schema[path][method]
    examples = EXAMPLES[_backend(database_url)]
    try:
        _run(operation, world, GenerationMode.POSITIVE, examples)
        _run(operation, world, GenerationMode.NEGATIVE, examples)
    finally:
        from schemathesis.python.asgi import shutdown_lifespans

        shutdown_lifespans()


# ---------------------------------------------------------------- stateful: register -> lease -> ...

class Protocol(RuleBasedStateMachine):
    """A worker's life with generated noise in between: every answer must be < 500 and conform."""

    api = None
    app = None
    schema = None

    @initialize()
    def start(self):
        self.world = build_world(self.api, self.app, victims=0)  # a fresh federation per example
        self.clients: list[tuple[int, str]] = []
        self.leases: list[dict] = []
        self.names = 0

    def _op(self, method: str, path: str):
        return self.schema[path][method]

    def _check(self, method: str, path: str, response) -> None:
        assert response.status_code < 500, (method, path, response.status_code, response.text)
        documented = self.app.openapi()["paths"][path][method]["responses"]
        assert str(response.status_code) in documented, (method, path, response.status_code, response.text)
        self._op(method, path).validate_response(response)  # the body conforms to the schema

    @rule()
    def register(self):
        self.names += 1
        r = self.api.post(f"/v1/federations/{self.world.federation_id}/clients",
                          json={"name": f"late{self.names}", "num_samples": self.names},
                          headers=bearer(self.world.secret))
        self._check("post", "/v1/federations/{federation_id}/clients", r)
        assert r.status_code == 201
        self.clients.append((r.json()["client_id"], r.json()["token"]))

    @rule(data=st.data())
    def lease(self, data):
        pool = self.clients + [(self.world.client_a, self.world.token_a), (self.world.client_b, self.world.token_b)]
        cid, token = data.draw(st.sampled_from(pool))
        r = self.api.post(f"/v1/clients/{cid}/lease", headers=bearer(token))
        self._check("post", "/v1/clients/{client_id}/lease", r)
        if r.status_code == 200 and r.json()["task"] is not None:
            self.leases.append({**r.json()["task"], "token": token})

    @rule(data=st.data())
    def heartbeat(self, data):
        if not self.leases:
            return
        task = data.draw(st.sampled_from(self.leases))
        lease_id = data.draw(st.one_of(st.just(task["lease_id"]), st.text(max_size=70)))
        r = self.api.post(f"/v1/tasks/{task['task_id']}/heartbeat", json={"lease_id": lease_id},
                          headers=bearer(task["token"]))
        self._check("post", "/v1/tasks/{task_id}/heartbeat", r)

    @rule(data=st.data())
    def upload(self, data):
        if not self.leases:
            return
        task = data.draw(st.sampled_from(self.leases))
        body = data.draw(st.one_of(st.just(pack_tensors(valid_root_upload(task["task_id"]))),
                                   st.binary(max_size=512)))
        r = self.api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                         content=body, headers=bearer(task["token"]))
        self._check("put", "/v1/tasks/{task_id}/upload", r)

    @rule(data=st.data())
    def complete(self, data):
        if not self.leases:
            return
        task = data.draw(st.sampled_from(self.leases))
        r = self.api.post(f"/v1/tasks/{task['task_id']}/complete",
                          json={"lease_id": task["lease_id"], "num_samples": data.draw(st.integers(1, 10**9)),
                                "metrics": {"loss": 0.5}}, headers=bearer(task["token"]))
        self._check("post", "/v1/tasks/{task_id}/complete", r)
        if r.status_code == 200:
            self.leases.remove(task)
            from conftest import tick

            tick(self.app)

    @rule(data=st.data())
    def noise(self, data):
        """Any operation with generated data and a random credential."""
        method, path = data.draw(st.sampled_from(OPERATIONS))
        operation = self._op(method.lower(), path)
        case = data.draw(operation.as_strategy(generation_mode=data.draw(
            st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))))
        token = self.world.token(data.draw(st.sampled_from(CREDENTIALS)))
        if token is not None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = case.call()
        case.validate_response(response, checks=CHECKS)

    @invariant()
    def coordinator_is_ready(self):
        if self.api is not None:
            assert self.api.get("/v1/readyz").status_code == 200


def test_stateful_register_lease_heartbeat_upload(api, app, database_url):
    Protocol.api, Protocol.app = api, app
    Protocol.schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    examples = 25 if _backend(database_url) == "sqlite" else 8
    try:
        run_state_machine_as_test(Protocol, settings=settings(
            max_examples=examples, stateful_step_count=25, deadline=None, derandomize=DERANDOMIZE,
            database=None, suppress_health_check=list(HealthCheck)))
    finally:
        from schemathesis.python.asgi import shutdown_lifespans

        shutdown_lifespans()
        Protocol.api = Protocol.app = Protocol.schema = None
