"""Client registration (enrollment secret or a one-time invitation -> client id + token), invitations,
and client authentication."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from datetime import timedelta

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Forbidden, NotFound, Unauthorized
from coordinator.models import Client, Invitation
from coordinator.security import hash_secret, new_secret, secret_matches
from coordinator.services.federations import federation_config, get_federation
from shared.states import ClientStatus, Cohort, FederationState, Machine, Onboarding, enter


def register_client(session: Session, federation_id: int, enrollment_secret: str, name: str,
                    num_samples: int, now: datetime, throttle: Callable[[], None] | None = None) -> tuple[Client, str]:
    """Register a client. MUST fail (Unauthorized) for a wrong secret, (Conflict) for a name that
    is already registered in this federation. A client registered once training has begun (the
    federation left 'enrolling') is in the 'late' cohort: it joins no root, probe or cluster round
    and is onboarded when the federation serves, so the enrollment secret cannot add members to a
    running training cohort. The exception: a federation still training whose training clients were
    all revoked or deleted has no cohort left to protect, and a new client joins it as a training
    client (the stage's next round opens for it)."""
    fed = get_federation(session, federation_id)
    invitation = None
    if enrollment_secret.startswith(INVITATION_PREFIX):
        invitation = _open_invitation(session, federation_id, enrollment_secret, now)
    elif not secret_matches(enrollment_secret, fed.enrollment_secret_hash):
        raise Unauthorized("the enrollment secret is wrong for this federation", code="bad_secret")
    if throttle is not None:
        throttle()  # the registration rate limit (429), for holders of the secret only
    exists = session.scalars(
        select(Client).where(Client.federation_id == federation_id, Client.name == name)
    ).first()
    if exists is not None:
        raise Conflict(f"client {name!r} is already registered in federation {federation_id}",
                       code="client_exists")
    cap = federation_config(fed).schedule.max_clients
    count = session.scalar(select(func.count()).select_from(Client).where(Client.federation_id == federation_id))
    if (count or 0) >= cap:
        raise Conflict(f"federation {federation_id} has {count} clients, its schedule.max_clients; ask its admin "
                       f"to delete clients that left", code="federation_full")
    early = fed.state == FederationState.enrolling or (
        fed.state != FederationState.serving and not session.scalar(select(func.count()).select_from(Client).where(
            Client.federation_id == federation_id, Client.status == ClientStatus.active,
            Client.cohort == Cohort.train)))
    token = new_secret("hlc")
    client = Client(federation_id=federation_id, name=name, token_hash=hash_secret(token),
                    status=enter(Machine.client, ClientStatus.active),
                    cohort=Cohort.train if early else Cohort.late, num_samples=num_samples,
                    onboarding=enter(Machine.onboarding, Onboarding.none if early else Onboarding.waiting),
                    created_at=now, last_seen_at=now)
    session.add(client)
    session.flush()
    if invitation is not None:  # consumed exactly once, even by two registrations racing with it
        used = session.execute(update(Invitation).where(
            Invitation.id == invitation.id, Invitation.used_at.is_(None), Invitation.revoked_at.is_(None))
            .values(used_at=now, client_id=client.id)).rowcount
        if used != 1:
            raise Unauthorized("this invitation was used or revoked meanwhile", code="invitation_used")
    return client, token


INVITATION_PREFIX = "hli_"


def _open_invitation(session: Session, federation_id: int, code: str, now: datetime) -> Invitation:
    """The unused, unexpired, unrevoked invitation of this federation with this code, else 401
    (``bad_invitation`` for an unknown code or another federation's, ``invitation_used``,
    ``invitation_expired``, ``invitation_revoked``)."""
    found = session.scalars(select(Invitation).where(Invitation.code_hash == hash_secret(code))).first()
    if found is None or found.federation_id != federation_id or not secret_matches(code, found.code_hash):
        raise Unauthorized("this invitation code is not one of this federation's", code="bad_invitation")
    if found.used_at is not None:
        raise Unauthorized("this invitation was already used: each registers one client", code="invitation_used")
    if found.revoked_at is not None:
        raise Unauthorized("this invitation was revoked by the federation's admin", code="invitation_revoked")
    if found.expires_at <= now:
        raise Unauthorized(f"this invitation expired at {found.expires_at.isoformat()}", code="invitation_expired")
    return found


def create_invitations(session: Session, federation_id: int, count: int, expires_in_seconds: float, note: str,
                       now: datetime) -> list[tuple[Invitation, str]]:
    """``count`` new one-time codes (shown once: only their hashes are kept)."""
    get_federation(session, federation_id)
    out = []
    for _ in range(count):
        code = new_secret(INVITATION_PREFIX.rstrip("_"))
        row = Invitation(federation_id=federation_id, code_hash=hash_secret(code), note=note, created_at=now,
                         expires_at=now + timedelta(seconds=expires_in_seconds))
        session.add(row)
        out.append((row, code))
    session.flush()
    return out


def invitation_state(row: Invitation, now: datetime) -> str:
    if row.used_at is not None:
        return "used"
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if row.expires_at <= now else "open"


def list_invitations(session: Session, federation_id: int) -> list[Invitation]:
    get_federation(session, federation_id)
    return list(session.scalars(select(Invitation).where(Invitation.federation_id == federation_id)
                                .order_by(Invitation.id)))


def revoke_invitation(session: Session, federation_id: int, invitation_id: int, now: datetime) -> Invitation:
    row = session.get(Invitation, invitation_id)
    if row is None or row.federation_id != federation_id:
        raise NotFound(f"invitation {invitation_id} is not in federation {federation_id}", code="invitation_not_found")
    if row.used_at is not None:
        raise Conflict(f"invitation {invitation_id} was used by client {row.client_id}; revoke the client instead",
                       code="invitation_used")
    if row.revoked_at is None:
        row.revoked_at = now
    return row


def authenticate_client(session: Session, token: str) -> Client:
    """The active client holding this token. MUST fail (Unauthorized) for an unknown token and
    (Forbidden) for a revoked client."""
    client = session.scalars(_BY_TOKEN_HASH, {"token_hash": hash_secret(token)}).first()
    return check_client(client, token)


# built once: every worker request authenticates, and building the statement costs more than its
# cached compilation
_BY_TOKEN_HASH = select(Client).where(Client.token_hash == bindparam("token_hash"))


def check_client(client: Client | None, token: str) -> Client:
    """The checks of ``authenticate_client`` on a client row found by the token's hash."""
    if client is None or not secret_matches(token, client.token_hash):
        raise Unauthorized("unknown client token", code="bad_token")
    if client.status != ClientStatus.active:
        raise Forbidden("this client has been revoked", code="revoked")
    return client
