"""One-time, expiring invitations (issue 15), on SQLite and Postgres: each code registers exactly one
client of its own federation before it expires, unless revoked; the admin sees their states and
never their codes; the client cap and the rate limit bind them as they bind the shared secret."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation
from sqlalchemy import select

from coordinator.models import AuditEvent, Invitation
from coordinator.security import hash_secret

pytestmark = pytest.mark.api


def invite(api, fid: int, **body) -> list[dict]:
    r = api.post(f"/v1/federations/{fid}/invitations", json=body, headers=admin_headers())
    assert r.status_code == 201, r.text
    return r.json()["invitations"]


def register_with(api, fid: int, code: str, name: str):
    return api.post(f"/v1/federations/{fid}/clients", json={"name": name, "num_samples": 5}, headers=bearer(code))


def states(api, fid: int) -> dict[int, str]:
    r = api.get(f"/v1/federations/{fid}/invitations", headers=admin_headers())
    assert r.status_code == 200, r.text
    assert all("code" not in row for row in r.json())
    return {row["id"]: row["state"] for row in r.json()}


def test_a_code_registers_one_client_once(api, app):
    fid, _secret = create_federation(api, name="invited")
    (one, two) = invite(api, fid, count=2, note="site a and b")
    assert one["code"].startswith("hli_") and one["code"] != two["code"]
    r = register_with(api, fid, one["code"], "site-a")
    assert r.status_code == 201, r.text
    client_id = r.json()["client_id"]
    token = r.json()["token"]
    assert api.post(f"/v1/clients/{client_id}/lease", headers=bearer(token)).status_code == 200  # a real client
    r = register_with(api, fid, one["code"], "site-a2")
    assert (r.status_code, r.json()["error"]) == (401, "invitation_used"), r.text
    assert states(api, fid) == {one["id"]: "used", two["id"]: "open"}
    with app.state.session_factory() as s:
        row = s.get(Invitation, one["id"])
        assert row.client_id == client_id and row.code_hash == hash_secret(one["code"])
        assert one["code"] not in str([(r.note, r.code_hash) for r in s.scalars(select(Invitation))])
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "invite")).one()
        assert event.detail["count"] == 2 and event.detail["note"] == "site a and b"


def test_a_taken_name_does_not_consume_the_code(api):
    fid, secret = create_federation(api, name="taken")
    assert api.post(f"/v1/federations/{fid}/clients", json={"name": "x"}, headers=bearer(secret)).status_code == 201
    (code,) = invite(api, fid)
    r = register_with(api, fid, code["code"], "x")
    assert (r.status_code, r.json()["error"]) == (409, "client_exists")
    assert states(api, fid) == {code["id"]: "open"}
    assert register_with(api, fid, code["code"], "y").status_code == 201


def test_expired_revoked_and_foreign_codes_are_refused(api, clock):
    fid, _ = create_federation(api, name="home")
    other, _ = create_federation(api, name="abroad")
    (short,) = invite(api, fid, expires_in_seconds=60)
    (revoked,) = invite(api, fid)
    (foreign,) = invite(api, other)
    clock.advance(61)
    r = register_with(api, fid, short["code"], "late")
    assert (r.status_code, r.json()["error"]) == (401, "invitation_expired"), r.text
    r = api.delete(f"/v1/federations/{fid}/invitations/{revoked['id']}", headers=admin_headers())
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    r = register_with(api, fid, revoked["code"], "gone")
    assert (r.status_code, r.json()["error"]) == (401, "invitation_revoked")
    r = register_with(api, fid, foreign["code"], "stranger")
    assert (r.status_code, r.json()["error"]) == (401, "bad_invitation")
    r = register_with(api, fid, "hli_" + "x" * 43, "guess")
    assert (r.status_code, r.json()["error"]) == (401, "bad_invitation")
    assert states(api, fid) == {short["id"]: "expired", revoked["id"]: "revoked"}
    assert states(api, other) == {foreign["id"]: "open"}
    assert api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json() == []


def test_a_used_code_cannot_be_revoked_and_unknown_ids_are_404(api):
    fid, _ = create_federation(api, name="used")
    (code,) = invite(api, fid)
    assert register_with(api, fid, code["code"], "a").status_code == 201
    r = api.delete(f"/v1/federations/{fid}/invitations/{code['id']}", headers=admin_headers())
    assert (r.status_code, r.json()["error"]) == (409, "invitation_used")
    r = api.delete(f"/v1/federations/{fid}/invitations/999", headers=admin_headers())
    assert (r.status_code, r.json()["error"]) == (404, "invitation_not_found")
    assert api.get("/v1/federations/999/invitations", headers=admin_headers()).status_code == 404


@pytest.mark.parametrize("body", [{"count": 0}, {"count": 1001}, {"expires_in_seconds": 10},
                                  {"expires_in_seconds": 91 * 86400}, {"note": "x" * 201}, {"code": "hli_mine"}])
def test_bad_invitation_requests_are_refused(api, body):
    fid, _ = create_federation(api, name="bad-request")
    r = api.post(f"/v1/federations/{fid}/invitations", json=body, headers=admin_headers())
    assert r.status_code == 422, r.text
    assert states(api, fid) == {}


def test_the_client_cap_binds_invitations_too(api):
    fid, secret = create_federation(api, name="cap", schedule={"min_clients": 1, "max_clients": 1})
    assert api.post(f"/v1/federations/{fid}/clients", json={"name": "a"}, headers=bearer(secret)).status_code == 201
    (code,) = invite(api, fid)
    r = register_with(api, fid, code["code"], "b")
    assert (r.status_code, r.json()["error"]) == (409, "federation_full")
    assert states(api, fid) == {code["id"]: "open"}


def test_only_the_admin_creates_or_lists_invitations(api):
    fid, secret = create_federation(api, name="authz")
    for headers in ({}, bearer(secret), bearer("hli_" + "y" * 43)):
        assert api.post(f"/v1/federations/{fid}/invitations", json={}, headers=headers).status_code == 401
        assert api.get(f"/v1/federations/{fid}/invitations", headers=headers).status_code == 401
