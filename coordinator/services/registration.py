"""Client registration (enrollment secret -> client id + token) and client authentication."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Forbidden, Unauthorized
from coordinator.models import Client
from coordinator.security import hash_secret, new_secret, secret_matches
from coordinator.services.federations import federation_config, get_federation
from shared.states import ClientStatus, Cohort, FederationState, Machine, Onboarding, enter


def register_client(session: Session, federation_id: int, enrollment_secret: str, name: str,
                    num_samples: int, now: datetime, throttle: Callable[[], None] | None = None) -> tuple[Client, str]:
    """Register a client. MUST fail (Unauthorized) for a wrong secret, (Conflict) for a name that
    is already registered in this federation. A client registered once the probe stage has begun
    is in the 'late' cohort and is onboarded when the federation serves."""
    fed = get_federation(session, federation_id)
    if not secret_matches(enrollment_secret, fed.enrollment_secret_hash):
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
    early = fed.state in (FederationState.enrolling, FederationState.root)
    token = new_secret("hlc")
    client = Client(federation_id=federation_id, name=name, token_hash=hash_secret(token),
                    status=enter(Machine.client, ClientStatus.active),
                    cohort=Cohort.train if early else Cohort.late, num_samples=num_samples,
                    onboarding=enter(Machine.onboarding, Onboarding.none if early else Onboarding.waiting),
                    created_at=now, last_seen_at=now)
    session.add(client)
    session.flush()
    return client, token


def authenticate_client(session: Session, token: str) -> Client:
    """The active client holding this token. MUST fail (Unauthorized) for an unknown token and
    (Forbidden) for a revoked client."""
    client = session.scalars(select(Client).where(Client.token_hash == hash_secret(token))).first()
    if client is None or not secret_matches(token, client.token_hash):
        raise Unauthorized("unknown client token", code="bad_token")
    if client.status != ClientStatus.active:
        raise Forbidden("this client has been revoked", code="revoked")
    return client
