"""``hilora admin invite`` / ``invitations`` against a real coordinator (uvicorn on loopback): codes
are printed once, a worker's client registers with one as it would with the enrollment secret,
and the admin sees the states and revokes an unused code."""

from __future__ import annotations

import json

import pytest
from conftest import create_federation_over_http  # tests/ is on sys.path
from typer.testing import CliRunner

from hilora.cli import app as cli_app
from hilora.launcher import LocalCluster
from worker.client import CoordinatorClient, CoordinatorError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args))
    return result.exit_code, result.output


def test_invite_register_list_and_revoke_through_the_cli(tmp_path):
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.start_coordinator()
    try:
        admin = ["--coordinator", cluster.url, "--admin-token", cluster.admin_token]
        with CoordinatorClient(cluster.url) as http:
            fid = create_federation_over_http(http, cluster.admin_token, "invited")

            code, out = _cli("admin", "invite", *admin, "--federation", str(fid), "--count", "2",
                             "--expires-hours", "2", "--note", "site-a, site-b", "--json")
            assert code == 0, out
            made = json.loads(out[out.index("{"):out.rindex("}") + 1])["invitations"]
            assert len(made) == 2 and all(m["code"].startswith("hli_") for m in made)
            assert "shown only once" in out

            registered = http.register(fid, made[0]["code"], "site-a", 12)  # what a worker does with it
            assert registered.name == "site-a" and registered.token.startswith("hlc_")
            with pytest.raises(CoordinatorError) as refused:
                http.register(fid, made[0]["code"], "site-a-again", 12)
            assert refused.value.status == 401 and refused.value.code == "invitation_used"

            code, out = _cli("admin", "invitations", *admin, "--federation", str(fid), "--revoke", str(made[1]["id"]),
                             "--json")
            assert code == 0 and json.loads(out)["state"] == "revoked", out
            code, out = _cli("admin", "invitations", *admin, "--federation", str(fid), "--json")
            rows = json.loads(out)
            assert [(r["id"], r["state"], r["client_id"]) for r in rows] == [
                (made[0]["id"], "used", registered.client_id), (made[1]["id"], "revoked", None)]
            assert made[0]["code"] not in out and made[1]["code"] not in out

            code, out = _cli("admin", "invite", "--coordinator", cluster.url, "--admin-token", "wrong-token-123456",
                             "--federation", str(fid))
            assert code == 1 and "bad_admin_token" in out
            code, out = _cli("admin", "invite", *admin, "--federation", "999")
            assert code == 1 and "999" in out and len(out.strip().splitlines()) == 1, out
    finally:
        cluster.stop()
