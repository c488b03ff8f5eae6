"""Federations: creation (with version 0 of the root adapter), lookup, admin start."""

from __future__ import annotations

import functools
import json
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobNotFound, BlobStore
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import Blob, Federation
from coordinator.security import hash_secret, new_secret
from coordinator.services.adapters import backbone_head, initial_tier_tensors, write_version
from shared.config import FederationConfig
from shared.states import FederationState, Machine, enter


def create_federation(session: Session, blobs: BlobStore, config: FederationConfig,
                      now: datetime) -> tuple[Federation, str]:
    """Create a federation in state ``enrolling`` and its root adapter version 0.

    MUST fail (Conflict) if the name is taken, (Invalid) if the backbone blob was not uploaded
    first or is not a safetensors checkpoint."""
    if session.scalars(select(Federation).where(Federation.name == config.name)).first() is not None:
        raise Conflict(f"a federation named {config.name!r} exists", code="name_taken")
    if session.get(Blob, config.backbone.sha256) is None:
        raise Invalid(f"backbone blob {config.backbone.sha256} is not in the store: upload it first "
                      f"(PUT /v1/blobs/<sha256>)", code="backbone_missing")
    try:
        backbone = blobs.get_bytes(config.backbone.sha256)
    except BlobNotFound as exc:
        raise Invalid("backbone blob is recorded but missing from the blob store",
                      code="backbone_missing") from exc
    head = backbone_head(config.manifest, backbone)
    secret = new_secret("hle")
    fed = Federation(name=config.name, config=config.model_dump(mode="json"),
                     state=enter(Machine.federation, FederationState.enrolling),
                     enrollment_secret_hash=hash_secret(secret),
                     backbone_sha256=config.backbone.sha256, created_at=now, updated_at=now)
    session.add(fed)
    session.flush()
    # seeded by the federation's training seed alone (not its id): two federations with the same
    # seed start from the same root, so a benchmark's methods start alike whatever their order
    tensors = initial_tier_tensors(config.manifest, "root", head, ("root", config.training.seed))
    write_version(session, blobs, federation_id=fed.id, tier="root", scope="root", cluster_id=None,
                  version=0, tensors=tensors, now=now)
    return fed, secret


def get_federation(session: Session, federation_id: int, lock: bool = False) -> Federation:
    """The federation; ``lock`` takes its row lock (Postgres ``FOR UPDATE``) for the transaction,
    so that state transitions of one federation never run concurrently on two replicas."""
    fed = session.get(Federation, federation_id, with_for_update=lock or None)
    if fed is None:
        raise NotFound(f"federation {federation_id} does not exist", code="federation_not_found")
    return fed


def federation_config(fed: Federation) -> FederationConfig:
    """The federation's parsed config. Parsed once per distinct config: the upload and lease paths
    ask for it on every request (the key is the stored JSON itself, so two databases that reuse a
    federation id never share an entry)."""
    return _parse_config(json.dumps(fed.config, sort_keys=True, separators=(",", ":")))


def config_from_text(stored: str) -> FederationConfig:
    """The parsed config from its stored JSON text (the lease path reads the column as text)."""
    return _parse_config(stored)


@functools.lru_cache(maxsize=256)
def _parse_config(canonical: str) -> FederationConfig:
    return FederationConfig.model_validate_json(canonical)


def list_federations(session: Session) -> list[Federation]:
    return list(session.scalars(select(Federation).order_by(Federation.id)))
