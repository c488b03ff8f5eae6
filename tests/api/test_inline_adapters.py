"""A lease answer that carries the task's input adapter versions inline (``TaskAssignment.
inline_adapters``) for a worker that says which versions it holds (``X-Hilora-Have-Adapters``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from datetime import datetime, timezone

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from test_fake_worker import ThroughTestClient
from test_quorum import finish

from coordinator.blobs import BlobStore, InlineAdapters
from coordinator.routes import _with_inline_adapters
from shared.config import Training
from worker.client import CoordinatorClient, inline_adapter
from shared.schemas import (
    HAVE_ADAPTERS_HEADER,
    MAX_HAVE_ADAPTERS,
    AdapterRef,
    FederationState,
    LeaseResponse,
    TaskAssignment,
    format_have_adapters,
    parse_have_adapters,
)

pytestmark = pytest.mark.api


def started(api, app, n: int = 2, **overrides):
    fid, secret = create_federation(api, schedule={"min_clients": n, "root_rounds": 2}, **overrides)
    clients = [register(api, fid, secret, f"c{i}") for i in range(n)]
    tick(app)
    return fid, clients


def lease(api, cid: int, token: str, have: str | None = None):
    headers = bearer(token) | ({} if have is None else {HAVE_ADAPTERS_HEADER: have})
    return api.post(f"/v1/clients/{cid}/lease", headers=headers)


def downloaded(api, version_id: int) -> bytes:
    r = api.get(f"/v1/adapters/{version_id}", headers=admin_headers())
    assert r.status_code == 200, r.text
    return r.content


def test_a_worker_that_holds_nothing_gets_the_root_inline(api, app):
    _, [(cid, token), _] = started(api, app)
    r = lease(api, cid, token, have="")
    assert r.status_code == 200, r.text
    task = r.json()["task"]
    root = task["root"]
    assert set(task["inline_adapters"]) == {str(root["id"])}
    data = base64.b64decode(task["inline_adapters"][str(root["id"])], validate=True)
    assert hashlib.sha256(data).hexdigest() == root["sha256"] and data == downloaded(api, root["id"])


def test_a_worker_that_holds_the_root_or_does_not_ask_gets_nothing_inline(api, app):
    _, [(c0, t0), (c1, t1)] = started(api, app)
    r = lease(api, c0, t0)   # no header: a worker that never inlines (older ones)
    assert r.status_code == 200 and r.json()["task"]["inline_adapters"] == {}
    root_id = r.json()["task"]["root"]["id"]
    r = lease(api, c1, t1, have=f"{root_id + 100}, {root_id}")
    assert r.status_code == 200 and r.json()["task"]["inline_adapters"] == {}


def test_the_next_round_inlines_the_new_version(api, app):
    _, clients = started(api, app)
    tasks = [lease(api, cid, token).json()["task"] for cid, token in clients]
    for (cid, token), task in zip(clients, tasks):
        finish(api, task, token, seed=cid)
    tick(app)
    first_root = tasks[0]["root"]["id"]
    cid, token = clients[0]
    task = lease(api, cid, token, have=str(first_root)).json()["task"]
    assert task["round_number"] == 2 and task["root"]["id"] != first_root
    data = base64.b64decode(task["inline_adapters"][str(task["root"]["id"])])
    assert data == downloaded(api, task["root"]["id"])


def test_the_worker_client_asks_for_and_checks_inline_versions(api, app):
    """``CoordinatorClient.lease`` with ``have`` through the app: the root comes inline and passes the
    worker's sha256 check; with ``have`` None (an older worker's call) nothing is inlined."""
    _, [(c0, t0), (c1, t1)] = started(api, app)
    http = CoordinatorClient(str(api.base_url), transport=ThroughTestClient(api), max_retries=0)
    task = http.lease(c0, t0, have=[]).task
    assert inline_adapter(task, task.root) == downloaded(api, task.root.id)
    assert http.lease(c1, t1).task.inline_adapters == {}


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1,,2", "1.5", "1;2", "9" * 19, ",".join(["7"] * (MAX_HAVE_ADAPTERS + 1))])
def test_a_bad_header_is_refused_and_leases_nothing(api, app, value):
    _, [(cid, token), _] = started(api, app)
    r = lease(api, cid, token, have=value)
    assert r.status_code == 422 and r.json()["error"] == "bad_have_adapters", r.text
    assert HAVE_ADAPTERS_HEADER in r.json()["detail"]
    r = lease(api, cid, token)   # the task is still there, at its first attempt
    assert r.status_code == 200 and r.json()["task"]["attempt"] == 1


@pytest.mark.parametrize("max_bytes", [0, 100])
def test_inlining_off_or_a_version_over_the_limit_is_downloaded(app, api, max_bytes):
    app.state.inline_adapters.max_bytes = max_bytes
    _, [(cid, token), _] = started(api, app)
    r = lease(api, cid, token, have="")
    assert r.status_code == 200 and r.json()["task"]["inline_adapters"] == {}


def _assignment(root: AdapterRef | None, cluster: AdapterRef | None) -> LeaseResponse:
    task = TaskAssignment(
        task_id=1, lease_id="l", attempt=1, lease_expires_at=datetime.now(timezone.utc), lease_seconds=60,
        federation_id=1, client_id=1, stage="cluster", round_number=1, scope="cluster:1", root=root, cluster=cluster,
        train_tier="cluster", epochs=1, trainable=["A"], upload=["A"], local=[], training=Training())
    return LeaseResponse(task=task, retry_after=0, federation_state=FederationState.cluster, client_state="training")


@pytest.mark.unit
def test_root_and_cluster_inline_each_once_read_once(tmp_path):
    asyncio.run(_root_and_cluster(tmp_path))


async def _root_and_cluster(tmp_path) -> None:
    blobs = BlobStore(tmp_path)
    small, large = b"root bytes" * 3, b"x" * 500
    refs = [AdapterRef(id=i, tier=t, version=1, sha256=blobs.put_bytes(d))
            for i, t, d in ((4, "root", small), (9, "cluster", large))]
    inline = InlineAdapters(blobs, max_bytes=1000)
    answer = await _with_inline_adapters(inline, _assignment(*refs), frozenset())
    assert {k: base64.b64decode(v) for k, v in answer.task.inline_adapters.items()} == {4: small, 9: large}
    blobs.path(refs[0].sha256).unlink()   # read once: the kept text answers from now on
    again = await _with_inline_adapters(inline, _assignment(*refs), frozenset({9}))
    assert {k: base64.b64decode(v) for k, v in again.task.inline_adapters.items()} == {4: small}
    inline.max_bytes = 100   # (a new limit applies to versions read from now on)
    inline._texts.clear()
    assert (await _with_inline_adapters(inline, _assignment(*refs), frozenset())).task.inline_adapters == {}
    # a version whose blob is gone is downloaded (and the download says so): nothing inline, no error
    assert inline.load(refs[0].sha256) == ""


@pytest.mark.unit
def test_the_kept_texts_are_bounded(tmp_path):
    blobs = BlobStore(tmp_path)
    inline = InlineAdapters(blobs, max_bytes=1000, keep=3)
    shas = [blobs.put_bytes(bytes([i]) * 10) for i in range(5)]
    for sha in shas:
        inline.load(sha)
    assert [inline.cached(sha) is not None for sha in shas] == [False, False, True, True, True]
    # and by their characters in all: 10 bytes are 16 base64 characters
    inline = InlineAdapters(blobs, max_bytes=1000, keep=16, keep_chars=40)
    for sha in shas:
        inline.load(sha)
    assert [inline.cached(sha) is not None for sha in shas] == [False, False, False, True, True]
    assert inline._chars == 32 == sum(len(inline.cached(sha)) for sha in shas[3:])


@pytest.mark.unit
@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", frozenset()), ("  ", frozenset()), ("3", frozenset({3})), ("3, 5,3", frozenset({3, 5})),
])
def test_the_header_parses(value, expected):
    assert parse_have_adapters(value) == expected


@pytest.mark.unit
@pytest.mark.parametrize("value", ["\uff11", "1 2", "+1", "0x10", "1,", "1e3"])
def test_a_bad_header_value_says_what_is_wrong(value):
    with pytest.raises(ValueError, match="positive integers"):
        parse_have_adapters(value)


@pytest.mark.unit
def test_the_header_names_the_newest_versions_and_round_trips():
    assert format_have_adapters([]) == ""
    ids = list(range(1, MAX_HAVE_ADAPTERS + 11))
    assert parse_have_adapters(format_have_adapters(ids)) == frozenset(ids[-MAX_HAVE_ADAPTERS:])
