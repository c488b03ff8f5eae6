"""What a worker checks when it starts hosting clients, before it asks for any task (issue 17),
against the real app: the label space and the precision. A worker starting on ImageFolder data in a
federation with ``classes``: its clients' labels are mapped by name before any task; a site holding a class the
federation does not list stops the worker with that message before it leases anything; the
federation's classes are in its config, and a federation file without them is refused for
ImageFolder data at worker start, not silently trained."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import admin_headers, create_federation, tick, tiny_config
from test_fake_worker import ThroughTestClient
from support.datasets import RED
from support.datasets import imagefolder_site as site

from worker.client import CoordinatorClient
from worker.daemon import WorkerConfig, WorkerDaemon

pytestmark = pytest.mark.api

CLASSES = ["eel", "dog", "cat"]


def daemon(api, tmp_path, fid, secret, clients: dict[str, str]) -> WorkerDaemon:
    http = CoordinatorClient(str(api.base_url), transport=ThroughTestClient(api), max_retries=0)
    config = WorkerConfig(federation_id=fid, enrollment_secret=secret, clients=[
        {"name": name, "data": {"partition": str(spec), "client": name}} for name, spec in clients.items()])
    return WorkerDaemon(http, config, tmp_path / "state")


def task_statuses(app, fid) -> list[str]:
    from sqlalchemy import select

    from coordinator.models import Task

    with app.state.session_factory() as session:
        return list(session.scalars(select(Task.status).where(Task.federation_id == fid)))


def test_sites_are_mapped_to_the_federations_classes_before_any_task(api, app, tmp_path):
    fid, secret = create_federation(api, classes=CLASSES, schedule={"min_clients": 5})
    assert api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json()["classes"] == CLASSES
    a = site(tmp_path / "machine-a", "site-a", {"train": {"cat": 2, "dog": 1}, "test": {"cat": 1}})
    b = site(tmp_path / "machine-b", "site-b", {"train": {"dog": 1, "eel": 2}, "test": {"eel": 1}})
    worker = daemon(api, tmp_path, fid, secret, {"site-a": a, "site-b": b})
    worker.setup()
    by_name = {slot.spec.name: worker.client_data(slot) for slot in worker.slots}
    assert by_name["site-a"].y_train.tolist() == [2, 2, 1] and by_name["site-a"].y_test.tolist() == [2]
    assert by_name["site-b"].y_train.tolist() == [1, 0, 0] and by_name["site-b"].y_test.tolist() == [0]
    for data in by_name.values():
        for x, y in zip(np.asarray(data.x_train), data.y_train):
            assert x[0].max() * 255 == pytest.approx(RED[CLASSES[int(y)]])


def test_a_site_with_an_unknown_class_stops_the_worker_before_any_lease(api, app, tmp_path):
    fid, secret = create_federation(api, classes=CLASSES, schedule={"min_clients": 1})
    good = site(tmp_path / "machine-a", "site-a", {"train": {"cat": 1}, "test": {"cat": 1}})
    bad = site(tmp_path / "machine-b", "site-b", {"train": {"dog": 1, "fox": 1}, "test": {"dog": 1}})
    worker = daemon(api, tmp_path, fid, secret, {"site-a": good, "site-b": bad})
    with pytest.raises(ValueError, match="client site-b holds classes the federation does not list: 'fox'"):
        worker.setup()
    tick(app)   # the clients registered (a federation of min_clients 1 starts): their tasks wait, unleased
    statuses = task_statuses(app, fid)
    assert statuses and set(statuses) == {"pending"}


def test_imagefolder_data_in_a_federation_without_classes_is_refused(api, app, tmp_path):
    fid, secret = create_federation(api, schedule={"min_clients": 1})
    assert api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json()["classes"] is None
    a = site(tmp_path / "machine-a", "site-a", {"train": {"cat": 1}, "test": {"cat": 1}})
    with pytest.raises(ValueError, match="federation lists no classes"):
        daemon(api, tmp_path, fid, secret, {"site-a": a}).setup()


def test_classes_that_do_not_match_the_head_are_refused_at_creation(api):
    from conftest import upload_backbone

    sha = upload_backbone(api)
    r = api.post("/v1/federations", json={"config": tiny_config("x", sha, classes=["a", "b"])},
                 headers=admin_headers())
    assert r.status_code == 422 and "head has 3 outputs" in r.text


def test_a_cpu_worker_refuses_a_federation_in_fp16_before_any_lease(api, app, tmp_path):
    """training.precision fp16 needs CUDA: a worker on a CPU stops at start with that message (the
    same check as the label space: after registering, before asking for work)."""
    fid, secret = create_federation(api, schedule={"min_clients": 1}, training={"precision": "fp16"})
    worker = daemon(api, tmp_path, fid, secret, {"upright-00": "tiny"})
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        worker.setup()
    tick(app)
    assert set(task_statuses(app, fid)) == {"pending"}
    r = api.post("/v1/federations", json={"config": tiny_config("bad", "0" * 64, training={"precision": "fp8"})},
                 headers=admin_headers())
    assert r.status_code == 422 and "precision" in r.text


def test_one_organisation_one_folder_needs_no_partition_file(api, app, tmp_path):
    """``{"imagefolder": DIR}``: DIR/train and DIR/test hold the class folders; the client's classes
    are mapped to the federation's like any other site's."""
    fid, secret = create_federation(api, classes=CLASSES, schedule={"min_clients": 5})
    site(tmp_path / "m", "hospital", {"train": {"dog": 2, "cat": 1}, "test": {"cat": 1}})
    http = CoordinatorClient(str(api.base_url), transport=ThroughTestClient(api), max_retries=0)
    config = WorkerConfig(federation_id=fid, enrollment_secret=secret, clients=[
        {"name": "hospital", "data": {"imagefolder": str(tmp_path / "m" / "hospital"), "image_size": 4}}])
    worker = WorkerDaemon(http, config, tmp_path / "state")
    worker.setup()
    data = worker.client_data(worker.slots[0])
    assert data.y_train.tolist() == [2, 1, 1] and data.y_test.tolist() == [2] and data.x_train.shape == (3, 3, 4, 4)
    for x, y in zip(np.asarray(data.x_train), data.y_train):
        assert x[0].max() * 255 == pytest.approx(RED[CLASSES[int(y)]])
    rows = api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()
    assert [(r["name"], r["num_samples"]) for r in rows] == [("hospital", 3)]
    missing = WorkerConfig(federation_id=fid, enrollment_secret=secret, clients=[
        {"name": "clinic", "data": {"imagefolder": str(tmp_path / "nowhere")}}])
    with pytest.raises(ValueError, match="data folder .*nowhere does not exist"):
        WorkerDaemon(http, missing, tmp_path / "state").setup()


@pytest.mark.parametrize(("data", "message"), [
    ({"imagefolder": "/d", "partition": "tiny"}, "not both"),
    ({"partition": "tiny"}, "imagefolder"),
    ({"partition": "tiny", "client": "a", "image_size": 8}, "go with .imagefolder."),
    ({"imagefolder": "/d", "channels": 2}, "channels"),
])
def test_bad_data_specs_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig(federation_id=1, clients=[{"name": "x", "data": data}])
