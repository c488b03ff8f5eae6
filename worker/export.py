"""Taking the model out: a client's merged model file, and prediction with any merged model file.

``export_client_model`` composes each tier the way the worker daemon does (``worker/daemon.py``):
the coordinator's newest version of the tier, then, where the federation keeps some of that tier's
factors on the client (e.g. FedSA's B), the client's ``local-<tier>.safetensors`` over it; the leaf
is the client's ``leaf.safetensors``. The tiers are folded into the backbone with
``shared.merge.merge_lora`` and written (atomically) as one safetensors file whose metadata says
how to build the model. Exporting needs no torch; ``load_merged_model``/``predict_images`` do.

Images for prediction are preprocessed the way the demo data is (``worker/data.py``): grey (or RGB
for a 3-channel model), resized to the model's input size with nearest-neighbour sampling (the
digits' 8 x 8 -> 16 x 16 upsampling is pixel repetition) and scaled to [0, 1], no normalisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.manifest import AdapterManifest
from shared.merge import leaf_file_mix, merge_lora, model_metadata, pack_model, read_model_metadata, served_leaf
from shared.tensors import TensorValidationError, unpack_tensors
from worker.client import CoordinatorClient
from worker.files import atomic_write
from worker.state import ClientFiles

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    bytes: int
    tiers: list[str]
    versions: dict[str, Any] = field(default_factory=dict)


def _read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    try:
        return unpack_tensors(path.read_bytes())
    except TensorValidationError as exc:
        raise ValueError(f"{path}: {exc.message}") from None


def compose_tier(manifest: AdapterManifest, tier: str, received: Mapping[str, np.ndarray],
                 local_file: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """A tier as the worker uses it: the coordinator's tensors with the client's local factors (if
    ``local_file`` exists) over them. Returns the tensors and the names taken from the local file.

    Raises:
        ValueError: the local file holds names or shapes the manifest does not have for this tier.
    """
    tensors = dict(received)
    if not local_file.exists():
        return tensors, []
    local = _read_tensor_file(local_file)
    expected = manifest.tier_shapes(tier)
    for name, value in local.items():
        if name not in expected:
            raise ValueError(f"{local_file}: {name!r} is not a tensor of the {tier} tier")
        if tuple(value.shape) != tuple(expected[name]):
            raise ValueError(f"{local_file}: {name} has shape {tuple(value.shape)}, the manifest expects "
                             f"{tuple(expected[name])}")
    tensors.update(local)
    return tensors, sorted(local)



def export_client_model(client: CoordinatorClient, state_dir: str | os.PathLike, federation_id: int,
                        client_name: str, out: str | os.PathLike, include_leaf: bool = True) -> ExportResult:
    """Fetch the backbone and the client's newest root and cluster versions, add its local factors
    and (unless ``include_leaf`` is False) its leaf, merge, and write the model file to ``out``.

    Raises:
        ValueError: missing credentials or leaf, unreadable or mismatched local files, or a
            backbone that does not fit the manifest.
        worker.client.CoordinatorError / CoordinatorUnavailable: the coordinator refused or is down.
    """
    files = ClientFiles.of(state_dir, federation_id, client_name)
    client_id, token = files.read_credentials()
    cfg = client.federation_config(federation_id, token)
    refs = client.client_adapters(client_id, token)
    if refs.root is None:
        raise ValueError(f"federation {federation_id} has no root adapter version yet")
    tiers: dict[str, dict[str, np.ndarray]] = {}
    versions: dict[str, Any] = {}
    local: dict[str, list[str]] = {}
    for tier, ref in (("root", refs.root), ("cluster", refs.cluster)):
        if ref is None:
            continue
        received = unpack_tensors(client.adapter(ref.id, token, ref.sha256))
        tiers[tier], from_local = compose_tier(cfg.manifest, tier, received, files.local(tier))
        versions[tier] = ref.model_dump()
        if from_local:
            local[tier] = from_local
    if include_leaf:
        leaf_file = files.leaf
        if not leaf_file.exists():
            raise ValueError(f"client {client_name} has no leaf yet ({leaf_file} does not exist): wait for its "
                             f"leaf rounds, or export without it (--no-leaf)")
        data = leaf_file.read_bytes()
        tiers["leaf"] = _read_tensor_file(leaf_file)
        try:
            mix = leaf_file_mix(data)   # the share of its leaf the client's model takes (training.leaf_mix)
        except ValueError as exc:
            raise ValueError(f"{leaf_file}: {exc}") from None
        versions["leaf"] = {"sha256": hashlib.sha256(data).hexdigest(), "mix": mix}
    checkpoint = client.backbone(federation_id, token, cfg.backbone.sha256)
    try:
        backbone = unpack_tensors(checkpoint)
    except TensorValidationError as exc:
        raise ValueError(f"the backbone checkpoint cannot be read: {exc.message}") from None
    if "leaf" in tiers and versions["leaf"]["mix"] < 1.0:
        # the leaf as the client's model uses it (training.leaf_mix), as the worker evaluates it:
        # its change taken part of the way from the head below it (the highest tier's that carries
        # one, else the backbone's own)
        below = next((tiers[t] for t in ("cluster", "root") if t in tiers and "head.weight" in tiers[t]), backbone)
        try:
            tiers["leaf"] = served_leaf(tiers["leaf"], below, versions["leaf"]["mix"])
        except ValueError as exc:
            raise ValueError(f"client {client_name}'s leaf cannot be mixed into its model: {exc}") from None
    merged = merge_lora(backbone, cfg.manifest, tiers)
    metadata = model_metadata(model=cfg.backbone.model, model_kwargs=cfg.backbone.model_kwargs,
                              tiers=list(tiers), versions=versions, federation_id=federation_id,
                              federation=cfg.name, client=client_name, client_id=client_id,
                              local_factors=local or None, backbone_sha256=cfg.backbone.sha256,
                              classes=cfg.classes, training_augment=cfg.training.augment,
                              preprocessing=cfg.preprocessing.model_dump(mode="json") if cfg.preprocessing else None)
    body = pack_model(merged, metadata)
    atomic_write(out, body)
    return ExportResult(path=Path(out), sha256=hashlib.sha256(body).hexdigest(), bytes=len(body),
                        tiers=list(tiers), versions=versions)


# ---------------------------------------------------------------------- prediction (torch)

def read_model_file_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a merged model file.

    Raises:
        ValueError: not a readable safetensors file or not a hilora merged model.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length <= 0 or length > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise ValueError(f"model file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file")
    return read_model_metadata(header.get("__metadata__"))


def load_merged_model(path: str | os.PathLike):  # noqa: ANN201 - a torch module
    """The timm model of a merged model file (built from its metadata, ``pretrained=False``, the
    file's state dict loaded strictly), in eval mode, and the metadata."""
    from worker.backbone import build_backbone

    meta = read_model_file_metadata(path)
    return build_backbone(meta["model"], meta.get("model_kwargs") or {}, path), meta


def model_input_spec(model) -> tuple[int, tuple[int, int]]:  # noqa: ANN001
    """(channels, (height, width)) of a timm ViT's input."""
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    size = getattr(patch_embed, "img_size", None)
    if proj is not None and size is not None:
        return int(proj.in_channels), (int(size[0]), int(size[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return int(c), (int(h), int(w))
    raise ValueError("cannot tell the model's input size (no patch_embed.img_size or pretrained_cfg)")


def image_files(directory: str | os.PathLike) -> list[Path]:
    """The PNG and JPEG files directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no PNG or JPEG images in {directory}")
    return files


def load_image(path: str | os.PathLike, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as model input (channels, height, width) float32 in [0, 1] (see the module doc)."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported (1 or 3)")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            height, width = size
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.NEAREST)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def load_prepared_image(path: str | os.PathLike, pipeline: Any) -> np.ndarray:
    """One image through the federation's preprocessing (a ``shared.preprocess.Preprocessing``),
    normalised: exactly what the workers' model saw (``worker.datasets.prepare_image``, then the
    model's ``(x - mean) / std``)."""
    from PIL import Image, UnidentifiedImageError

    from worker.datasets import prepare_image

    try:
        with Image.open(path) as img:
            array = prepare_image(img, pipeline)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    mean = np.asarray(pipeline.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pipeline.std, dtype=np.float32).reshape(-1, 1, 1)
    return (array - mean) / std


def predict_images(model, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(classes, probabilities of those classes) for a batch of inputs (N, C, H, W)."""
    import torch

    model.eval()
    classes, probabilities = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = model(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
            probs = torch.softmax(logits.float(), dim=1)
            p, c = probs.max(dim=1)
            classes.append(c.numpy())
            probabilities.append(p.numpy())
    return np.concatenate(classes), np.concatenate(probabilities)


def predict_directory(model_path: str | os.PathLike, directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Predict every image of ``directory`` with a merged model file: ``[{file, class, probability}]``,
    plus ``name`` (the class's name) when the federation listed its classes."""
    from shared.preprocess import Preprocessing

    model, meta = load_merged_model(model_path)
    channels, size = model_input_spec(model)
    files = image_files(directory)
    if meta.get("preprocessing"):   # the federation's pipeline, as its workers trained with it
        pipeline = Preprocessing.model_validate(meta["preprocessing"])
        x = np.stack([load_prepared_image(f, pipeline) for f in files])
    else:
        x = np.stack([load_image(f, channels, size) for f in files])
    classes, probabilities = predict_images(model, x)
    names = meta.get("classes")
    return [{"file": f.name, "class": int(c), **({"name": names[int(c)]} if names else {}), "probability": float(p)}
            for f, c, p in zip(files, classes, probabilities)]
