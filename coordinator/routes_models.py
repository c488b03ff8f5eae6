"""Routes through which results leave the system: a client's newest adapter versions, and the
merged cluster-level (backbone + root + cluster) or root-only model as one safetensors file.

The merge is numpy (``shared.merge``); the coordinator still never imports torch. A merged model
is computed on request (nothing is stored); its bytes are a deterministic function of the backbone
checkpoint and the adapter versions, so the ETag names those inputs and a repeated request with
``If-None-Match`` is answered 304 without merging.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from sqlalchemy import select

from coordinator.blobs import BlobNotFound
from coordinator.errors import Conflict, Forbidden, NotFound
from coordinator.models import AdapterVersion, Cluster
from coordinator.routes import (
    MAX_ID,
    AdminAuth,
    DbId,
    SessionDep,
    Token,
    _errors,
    check_protocol,
)
from coordinator.services import federations, registration
from coordinator.services.adapters import latest_version, serving_version
from shared.merge import MODEL_FORMAT, merge_lora, model_metadata, pack_model
from shared.schemas import SHA256_HEADER, AdapterRef, ClientAdapters
from shared.tensors import TensorValidationError, unpack_tensors

router = APIRouter(prefix="/v1", dependencies=[Depends(check_protocol)], responses=_errors, tags=["models"])

_MODEL_RESPONSES = {200: {"content": {"application/octet-stream": {}},
                          "description": "the merged model as safetensors (metadata: model, model_kwargs, "
                                         "tiers, versions)"}}


def _ref(row: AdapterVersion | None) -> AdapterRef | None:
    if row is None:
        return None
    return AdapterRef(id=row.id, tier=row.tier, version=row.version, sha256=row.blob_sha256)


@router.get("/clients/{client_id}/adapters", response_model=ClientAdapters)
def client_adapters(client_id: DbId, session: SessionDep, token: Token) -> ClientAdapters:
    """The newest root version and the version the client's own cluster serves (its newest, or an
    admin's pin; null before clustering or without a cluster). Only the client's own token may ask."""
    with session.begin():
        client = registration.authenticate_client(session, token)
        if client.id != client_id:
            raise Forbidden(f"this token belongs to client {client.id}, not client {client_id}",
                            code="not_your_client")
        root = latest_version(session, client.federation_id, "root")
        cluster = (serving_version(session, session.get(Cluster, client.cluster_id))
                   if client.cluster_id is not None else None)
        return ClientAdapters(root=_ref(root), cluster=_ref(cluster))


def _merged_model(request: Request, session, federation_id: int, label: int | None,  # noqa: ANN001
                  if_none_match: str | None) -> Response:
    with session.begin():
        fed = federations.get_federation(session, federation_id)
        cfg = federations.federation_config(fed)
        root = latest_version(session, fed.id, "root")
        if root is None:
            raise NotFound(f"federation {federation_id} has no root adapter version", code="no_root_version")
        refs = {"root": _ref(root)}
        if label is not None:
            cluster = session.scalars(
                select(Cluster).where(Cluster.federation_id == fed.id, Cluster.label == label)).first()
            if cluster is None:
                raise NotFound(f"federation {federation_id} has no cluster with label {label}",
                               code="cluster_not_found")
            version = serving_version(session, cluster)
            if version is None:
                raise NotFound(f"cluster {label} of federation {federation_id} has no adapter version",
                               code="no_cluster_version")
            refs["cluster"] = _ref(version)
        backbone_sha = fed.backbone_sha256

    key = "/".join([MODEL_FORMAT, str(federation_id), backbone_sha, *(refs[t].sha256 for t in refs)])
    etag = f'"{hashlib.sha256(key.encode()).hexdigest()}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})

    blobs = request.app.state.blobs
    try:
        backbone = unpack_tensors(blobs.get_bytes(backbone_sha))
        tiers = {tier: unpack_tensors(blobs.get_bytes(ref.sha256)) for tier, ref in refs.items()}
    except BlobNotFound as exc:
        raise NotFound(f"blob {exc.args[0]} is recorded but missing from the blob store",
                       code="blob_missing") from exc
    except TensorValidationError as exc:
        raise Conflict(f"a stored checkpoint or adapter cannot be read: {exc.message}",
                       code="unreadable_blob") from exc
    try:
        merged = merge_lora(backbone, cfg.manifest, tiers)
    except ValueError as exc:
        raise Conflict(f"the backbone checkpoint does not fit the adapter manifest: {exc}",
                       code="backbone_mismatch") from exc
    metadata = model_metadata(
        model=cfg.backbone.model, model_kwargs=cfg.backbone.model_kwargs, tiers=list(refs),
        versions={t: r.model_dump() for t, r in refs.items()}, federation_id=federation_id,
        federation=fed.name, cluster_label=label, backbone_sha256=backbone_sha, classes=cfg.classes,
        preprocessing=cfg.preprocessing.model_dump(mode="json") if cfg.preprocessing else None)
    body = pack_model(merged, metadata)
    name = f"federation-{federation_id}-" + (f"cluster-{label}" if label is not None else "root")
    return Response(content=body, media_type="application/octet-stream",
                    headers={SHA256_HEADER: hashlib.sha256(body).hexdigest(), "ETag": etag,
                             "Content-Disposition": f'attachment; filename="{name}.safetensors"'})


@router.get("/federations/{federation_id}/clusters/{label}/model", responses=_MODEL_RESPONSES)
def cluster_model(federation_id: DbId, label: Annotated[int, Path(ge=0, le=MAX_ID)], request: Request, session: SessionDep, _admin: AdminAuth,
                  if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The cluster-level model: backbone + newest root + newest version of the cluster with this
    (stable) label, merged, with the cluster's head. Admin only."""
    return _merged_model(request, session, federation_id, label, if_none_match)


@router.get("/federations/{federation_id}/root/model", responses=_MODEL_RESPONSES)
def root_model(federation_id: DbId, request: Request, session: SessionDep, _admin: AdminAuth,
               if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The root-only model: backbone + newest root version, merged, with the root's head. Admin only."""
    return _merged_model(request, session, federation_id, None, if_none_match)
