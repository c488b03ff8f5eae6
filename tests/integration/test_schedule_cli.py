"""``hilora admin schedule`` against a real coordinator (uvicorn on loopback): shows the schedule,
changes fields of a live federation (JSON values, dotted parts, strings), and every bad input is
a one-line error that changes nothing."""

from __future__ import annotations

import json

import pytest
from conftest import create_federation_over_http  # tests/ is on sys.path
from typer.testing import CliRunner

from hilora.cli import app as cli_app
from hilora.cli import parse_schedule_sets
from hilora.launcher import LocalCluster
from worker.client import CoordinatorClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args))
    return result.exit_code, result.output


@pytest.mark.unit
def test_parse_schedule_sets():
    assert parse_schedule_sets(["root_rounds=30", "clients_per_round.fraction=0.3", "clients_per_round.max=null",
                                "round_deadline_seconds=auto", "max_consecutive_failures=null"]) == {
        "root_rounds": 30, "clients_per_round": {"fraction": 0.3, "max": None},
        "round_deadline_seconds": "auto", "max_consecutive_failures": None}
    for bad in (["root_rounds"], ["=3"], ["a.b.c=1"], ["a.=1"], ["x=1", "x=2"], ["c=1", "c.f=2"]):
        with pytest.raises(ValueError):
            parse_schedule_sets(bad)


def test_show_and_change_a_live_schedule_through_the_cli(tmp_path):
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.start_coordinator()
    try:
        admin = ["--coordinator", cluster.url, "--admin-token", cluster.admin_token]
        with CoordinatorClient(cluster.url) as http:
            fid = create_federation_over_http(http, cluster.admin_token, "live")

            code, out = _cli("admin", "schedule", *admin, "--federation", str(fid), "--json")
            assert code == 0, out
            assert json.loads(out)["round_deadline_seconds"] == "auto"

            code, out = _cli("admin", "schedule", *admin, "--federation", str(fid), "--set", "root_rounds=7",
                             "--set", "clients_per_round.fraction=0.25", "--set", "round_deadline_seconds=600",
                             "--reason", "cheaper rounds", "--json")
            assert code == 0, out
            body = json.loads(out)
            assert body["changes"]["root_rounds"][1] == 7 and body["changes"]["round_deadline_seconds"] == ["auto", 600]
            assert body["schedule"]["clients_per_round"] == {"fraction": 0.25, "min": 2, "max": None}
            config = http.request("GET", f"/v1/federations/{fid}/config", token=cluster.admin_token).json()
            assert config["schedule"]["root_rounds"] == 7

            for bad, words in ((["--set", "root_rounds=-2"], "root_rounds"), (["--set", "nonsense"], "FIELD=VALUE"),
                               (["--set", "clients_per_round.fraction=2"], "fraction")):
                code, out = _cli("admin", "schedule", *admin, "--federation", str(fid), *bad)
                assert code != 0 and words in out and "Traceback" not in out, out
            assert http.request("GET", f"/v1/federations/{fid}/config",
                                token=cluster.admin_token).json()["schedule"] == config["schedule"]
            code, out = _cli("admin", "schedule", *admin, "--federation", "999", "--set", "root_rounds=3")
            assert code == 1 and "999" in out and len(out.strip().splitlines()) == 1, out
    finally:
        cluster.stop()
