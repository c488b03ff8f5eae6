"""The admin's federation file (JSON): a FederationConfig without the computed parts.

``hilora admin create --config FILE`` reads it, builds the adapter manifest for the timm model
(torch-free from ``shared.vit_shapes`` where it can, so a coordinator-only install creates
federations too; or takes an explicit ``manifest``), uploads the backbone checkpoint and creates the
federation::

    {
      "name": "my-federation",
      "backbone": {"model": "vit_base_patch16_224", "model_kwargs": {"num_classes": 100},
                   "checkpoint": "/data/vit_b16_in21k.safetensors"},
      "adapter": {"rank": 8, "alpha": 8},
      "schedule": {"root_rounds": 20, "cluster_rounds": 20, "leaf_rounds": 10, "local_epochs": 2},
      "training": {"lr": 0.003}, "clustering": {"features": "update"}
    }

``"checkpoint": "demo"`` uses the cached demo backbone (pretrained on the digits on first use;
``"demo-mnist5k"``: the same model pretrained on MNIST-5k's pretraining pool, for the mnist5k
partitions);
``"checkpoint": "pretrained"`` asks timm for the model's published weights (network needed on the
admin's machine only: workers get the checkpoint from the coordinator).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import Backbone, FederationConfig
from shared.manifest import AdapterManifest
from shared.preprocess import Preprocessing, table_preprocessing, timm_preprocessing
from shared.validation import describe_validation_error


# The cached demo backbones a federation file may name, by the offline dataset each is pretrained on.
DEMO_CHECKPOINTS = {"demo": "digits", "demo-mnist5k": "mnist5k"}


class BackboneSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str = Field(description="path to a safetensors checkpoint, 'pretrained' (timm's weights), 'demo' or "
                                        "'demo-mnist5k'")


class AdapterShape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, gt=0)
    alpha: float | None = Field(default=None, gt=0)
    ranks: dict[str, int] | None = None


class FederationFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    backbone: BackboneSource
    adapter: AdapterShape = Field(default_factory=AdapterShape)
    manifest: AdapterManifest | None = None
    root: dict[str, Any] | None = None
    cluster: dict[str, Any] | None = None
    leaf: dict[str, Any] | None = None
    schedule: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    clustering: dict[str, Any] = Field(default_factory=dict)
    preprocessing: Preprocessing | Literal["none"] | None = Field(default=None, description=(
        "the backbone's image preprocessing (shared/preprocess.py); default: resolved from the model's "
        "pretrained config (timm's data-config helpers where timm is installed, else a table of the supported "
        "models), none for the demo backbones; 'none': images as the data loader makes them, no normalisation"))
    classes: list[str] | None = Field(default=None, description=(
        "class names in label order, one per output of the model's head (FederationConfig.classes); "
        "needed when the clients hold ImageFolder data"))


def load_federation_file(path: str | Path) -> FederationFile:
    try:
        return FederationFile.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError as exc:
        raise ValueError(f"federation file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"federation file {path} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, f"federation file {path}")) from None


def resolve_checkpoint(source: BackboneSource) -> tuple[bytes, str, dict[str, Any]]:
    """The checkpoint bytes, the timm model name and kwargs to record in the federation."""
    if source.checkpoint in DEMO_CHECKPOINTS:
        try:
            from worker.backbone import pretrain_demo_backbone
        except ImportError as exc:   # a coordinator-only install
            raise ValueError(f"\"checkpoint\": \"{source.checkpoint}\" is the demo backbone, which needs torch and "
                             f"timm to build: pip install \"hilora[worker]\" (or give a safetensors checkpoint "
                             f"file)") from exc

        artifact = pretrain_demo_backbone(dataset=DEMO_CHECKPOINTS[source.checkpoint])
        return Path(artifact.path).read_bytes(), artifact.model, dict(artifact.model_kwargs)
    if source.checkpoint == "pretrained":
        return _timm_pretrained_checkpoint(source), source.model, dict(source.model_kwargs)
    path = Path(source.checkpoint)
    if not path.is_file():
        raise ValueError(f"backbone checkpoint {path} does not exist")
    return path.read_bytes(), source.model, dict(source.model_kwargs)


def _timm_pretrained_checkpoint(source: BackboneSource) -> bytes:
    """timm's published weights for the model (downloaded by timm, once, on the admin's machine),
    re-serialised as the safetensors blob that workers verify by sha256."""
    try:
        import timm
        from safetensors.torch import save
    except ImportError as exc:
        raise ValueError("\"checkpoint\": \"pretrained\" needs torch and timm: pip install \"hilora[worker]\" "
                         "(or give a safetensors checkpoint file)") from exc
    try:
        model = timm.create_model(source.model, pretrained=True, **source.model_kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown model, no network, no published weights
        raise ValueError(f"timm could not provide pretrained weights for {source.model!r}: {exc}") from exc
    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def build_manifest(file: FederationFile, model: str, model_kwargs: dict[str, Any],
                   checkpoint: str | Path | bytes | None = None) -> AdapterManifest:
    """The federation's adapter manifest: the file's own ``manifest``, else computed for the model.

    Without torch (a coordinator-only install) it comes from ``shared.vit_shapes``: its table of
    timm ViTs, else the checkpoint's safetensors header (a file path: only its header is read); both
    give what ``worker.backbone.manifest_for_model`` gives (tests/unit/test_vit_shapes.py). A model
    the table does not know is built with timm where torch is installed. Either way a checkpoint
    whose header does not fit the model is refused here, not on every worker.

    Raises:
        ValueError: a model nothing here can describe (naming the ways out), a malformed checkpoint,
            or one that does not fit the model.
    """
    from shared.vit_shapes import (
        UnknownVit,
        VitShape,
        check_checkpoint_fits,
        read_checkpoint_header,
        table_vit_shape,
        vit_manifest,
    )

    if file.manifest is not None:
        return file.manifest
    shape = dict(rank=file.adapter.rank, alpha=file.adapter.alpha, ranks=file.adapter.ranks)
    try:
        table_vit_shape(model, model_kwargs)
        known = True
    except UnknownVit:
        known = False
    if known or _torch_missing():
        # the table (checked against the checkpoint's header), else the header; UnknownVit if neither
        return vit_manifest(model, model_kwargs, checkpoint=checkpoint, **shape)
    header = read_checkpoint_header(checkpoint) if checkpoint is not None else None
    manifest = torch_manifest(model, model_kwargs, **shape)
    if header is not None:
        check_checkpoint_fits(header, VitShape.of_manifest(manifest), model, model_kwargs)
    return manifest


def _torch_missing() -> bool:
    from importlib.util import find_spec

    return find_spec("torch") is None or find_spec("timm") is None


def torch_manifest(model: str, model_kwargs: dict[str, Any], rank: int = 8, alpha: float | None = None,
                   ranks: dict[str, int] | None = None) -> AdapterManifest:
    """The manifest of the model timm builds (``worker.backbone.manifest_for_model``): needs torch."""
    try:
        from worker.backbone import build_backbone, manifest_for_model
    except ImportError as exc:  # a coordinator-only install
        raise ValueError(f"building the adapter manifest of model {model!r} with timm needs torch and timm "
                         f"(pip install \"hilora[worker]\"), or give an explicit \"manifest\"") from exc
    try:
        backbone = build_backbone(model, model_kwargs, None)
    except (AssertionError, TypeError) as exc:   # timm's checks of the kwargs, an unknown kwarg
        raise ValueError(f"cannot build timm model {model!r} with model_kwargs {model_kwargs}: {exc}") from exc
    return manifest_for_model(backbone, rank=rank, alpha=alpha, ranks=ranks)


def resolve_preprocessing(file: FederationFile, model: str, model_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The federation's ``preprocessing``: the file's, else none for a demo backbone, else the
    model's pretrained data config (timm where installed, else ``shared.preprocess``'s table).

    Raises:
        ValueError: a model neither knows, with what to write instead.
    """
    if file.preprocessing == "none" or (file.preprocessing is None and file.backbone.checkpoint in DEMO_CHECKPOINTS):
        return None
    if isinstance(file.preprocessing, Preprocessing):
        return file.preprocessing.model_dump(mode="json")
    found = timm_preprocessing(model, model_kwargs) or table_preprocessing(model, model_kwargs)
    if found is None:
        raise ValueError(f"no image preprocessing is known for model {model!r} (not in timm's pretrained configs "
                         f"here, nor in shared/preprocess.py's table): give \"preprocessing\": {{\"input_size\": "
                         f"[3, 224, 224], \"interpolation\": \"bicubic\", \"mean\": [...], \"std\": [...], "
                         f"\"crop_pct\": 0.9}} in the federation file, or \"none\"")
    return found.model_dump(mode="json")


def build_federation_config(file: FederationFile, source: str = "federation file") -> tuple[FederationConfig, bytes]:
    """The validated FederationConfig and the checkpoint bytes to upload; a config the file's fields
    do not make valid is a ValueError of one line, the fields named by their path after ``source``."""
    checkpoint, model, model_kwargs = resolve_checkpoint(file.backbone)
    on_disk = file.backbone.checkpoint not in DEMO_CHECKPOINTS and file.backbone.checkpoint != "pretrained"
    manifest = build_manifest(file, model, model_kwargs, Path(file.backbone.checkpoint) if on_disk else checkpoint)
    doc: dict[str, Any] = {
        "name": file.name,
        "backbone": Backbone(model=model, model_kwargs=model_kwargs,
                             sha256=hashlib.sha256(checkpoint).hexdigest()).model_dump(),
        "manifest": manifest.model_dump(),
        "schedule": file.schedule, "training": file.training, "clustering": file.clustering,
        "classes": file.classes,
    }
    for tier in ("root", "cluster", "leaf"):
        if getattr(file, tier) is not None:
            doc[tier] = getattr(file, tier)
    try:
        config = FederationConfig.model_validate(doc)   # the file's own mistakes first
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, source)) from None
    preprocessing = resolve_preprocessing(file, model, model_kwargs)
    return FederationConfig.model_validate({**config.model_dump(mode="json"), "preprocessing": preprocessing}), checkpoint
