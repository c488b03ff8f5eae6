"""Worker config files: what a daemon accepts and what it refuses, with reasons."""

from __future__ import annotations

import json

import pytest

from worker.daemon import WorkerConfig, load_worker_config, task_seed

pytestmark = pytest.mark.unit


def _client(name: str, **extra) -> dict:
    return {"name": name, "data": {"partition": "tiny", "client": "upright-00"}, **extra}


def test_valid_config_round_trips(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"federation_id": 3, "enrollment_secret": "hle_x",
                                "clients": [_client("a"), _client("b", client_id=7, token="hlc_y")]}))
    cfg = load_worker_config(path)
    assert cfg.federation_id == 3 and [c.name for c in cfg.clients] == ["a", "b"]
    assert cfg.clients[1].client_id == 7 and cfg.clients[0].token is None


@pytest.mark.parametrize("doc, message", [
    ({"federation_id": 1, "clients": []}, "at least 1"),
    ({"federation_id": 0, "clients": [_client("a")]}, "greater than or equal to 1"),
    ({"federation_id": 1, "clients": [_client("a"), _client("a")]}, "unique"),
    ({"federation_id": 1, "clients": [_client("a", token="hlc_y")]}, "needs its client_id"),
    ({"federation_id": 1, "clients": [_client("bad name")]}, "pattern"),
    ({"federation_id": 1, "clients": [_client("a")], "surprise": 1}, "Extra inputs"),
])
def test_invalid_configs_are_refused_with_a_reason(doc, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig.model_validate(doc)


def test_task_seed_is_stable_and_distinct():
    assert task_seed(0, "root", 1, 5) == task_seed(0, "root", 1, 5)
    assert len({task_seed(0, "root", r, c) for r in range(5) for c in range(5)}) == 25
