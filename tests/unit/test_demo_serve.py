"""``hilora demo --serve``: after the demo, the coordinator keeps running and the dashboard's URL
and admin token are printed (the demo itself is replaced by a stub here)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import hilora.cli as cli
import hilora.demo as demo

pytestmark = pytest.mark.unit


class StubCoordinator:
    def __init__(self, alive_polls: int) -> None:
        self.alive_polls = alive_polls

    def poll(self):  # noqa: ANN201
        self.alive_polls -= 1
        return None if self.alive_polls >= 0 else 0


class StubCluster:
    url = "http://127.0.0.1:8799"
    admin_token = "dev-0123456789abcdef"

    def __init__(self) -> None:
        self.coordinator = StubCoordinator(alive_polls=3)


@pytest.mark.parametrize("serve", [True, False])
def test_demo_serve_keeps_the_coordinator_and_prints_the_dashboard(monkeypatch, tmp_path, serve):
    monkeypatch.setenv("HILORA_DEV", "0")  # the command sets it; monkeypatch restores it
    cluster = StubCluster()
    calls = []

    def stub_run_demo(opts, say, serve=None):  # noqa: ANN001, ANN202
        calls.append(serve is not None)
        summary = {"k": 3}
        if serve is not None:
            serve(summary, cluster)
            assert cluster.coordinator.alive_polls < 0  # it waited while the coordinator ran
        return summary

    monkeypatch.setattr(demo, "run_demo", stub_run_demo)
    monkeypatch.setattr(demo, "format_table", lambda summary: f"TABLE k={summary['k']}")
    monkeypatch.setattr("time.sleep", lambda _s: None)
    args = ["demo", "--report", str(tmp_path / "r.json")] + (["--serve"] if serve else [])
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert calls == [serve]
    assert result.output.count("TABLE k=3") == 1 and (tmp_path / "r.json").exists()
    if serve:
        assert f"dashboard:   {StubCluster.url}/dashboard" in result.output
        assert f"admin token: {StubCluster.admin_token}" in result.output
        assert result.output.index("TABLE") < result.output.index("dashboard:")
    else:
        assert "dashboard" not in result.output
