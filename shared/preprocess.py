"""The backbone's own preprocessing (``FederationConfig.preprocessing``), resolved once when the
federation is created and stored in its config, so that every worker and ``hilora predict`` prepare
images exactly alike (issue 17). Pure data, no torch: a coordinator-only install resolves it from
``PREPROCESSING_TABLE`` (the values timm's data-config helpers give for the supported models,
checked against timm in ``tests/unit/test_preprocess.py``) or from the federation file.

The pipeline an image goes through (``worker.datasets.prepare_image``): converted to the model's
channels (grey "L" or "RGB"), its shorter side resized to ``floor(H / crop_pct)`` with
``interpolation``, a center crop of H x W, scaled to [0, 1]; then, inside the model
(``worker.lora.TieredLoRAModel``) and in ``hilora predict``, ``(x - mean) / std`` per channel.
A federation without ``preprocessing`` (the demo backbone, and every federation stored before it
existed) keeps the old pipeline: nearest-neighbour resizing to the partition's ``image_size``, no
normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.vit_shapes import VIT_MODELS

Interpolation = Literal["nearest", "bilinear", "bicubic"]


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input_size: tuple[int, int, int] = Field(description="(channels, height, width) the model takes")
    interpolation: Interpolation = Field(default="bicubic", description="how images are resized")
    mean: tuple[float, ...] = Field(description="per channel, subtracted from the [0, 1] pixels")
    std: tuple[float, ...] = Field(description="per channel, the [0, 1] pixels are divided by it after the mean")
    crop_pct: float = Field(default=1.0, gt=0, le=1, description=(
        "the shorter side is resized to floor(size / crop_pct), then the center size x size is kept"))

    @model_validator(mode="after")
    def _check(self) -> "Preprocessing":
        channels, height, width = self.input_size
        if channels not in (1, 3):
            raise ValueError(f"input_size: {channels} channels; images have 1 (grey) or 3 (RGB)")
        if not (1 <= height <= 4096 and 1 <= width <= 4096):
            raise ValueError(f"input_size: {height} x {width} is not an image size (1 to 4096)")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != channels:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {channels} channels")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    def resize_to(self) -> tuple[int, int]:
        """(height, width) the image is resized to before the center crop: the input size scaled up
        by 1 / crop_pct (timm's rule: ``floor(size / crop_pct)``)."""
        _, height, width = self.input_size
        return math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)


# timm 1.0's data config (``timm.data.resolve_data_config(pretrained_cfg=...)``) of the models a
# coordinator without torch can name; an untagged name means timm's default tag. Every ViT of
# timm's family shares this one; others are added here with a test against timm.
_VIT = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9}
_IMAGENET = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
             "std": (0.229, 0.224, 0.225), "crop_pct": 0.95}
_VIT_384 = {**_VIT, "input_size": (3, 384, 384), "crop_pct": 1.0}
_VIT_IMAGENET_STATS = {**_IMAGENET, "crop_pct": 0.9}            # the self-supervised tags (dino, mae)
_CLIP_STATS = {**_VIT, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
               "crop_pct": 1.0}
_EXCEPTIONS = {"vit_base_patch16_224.bamboo": _CLIP_STATS, "vit_base_patch16_224.dino": _VIT_IMAGENET_STATS,
               "vit_small_patch16_224.dino": _VIT_IMAGENET_STATS, "vit_base_patch16_224.mae": _VIT_IMAGENET_STATS,
               "vit_large_patch16_224.mae": _VIT_IMAGENET_STATS}
# Every ViT name shared.vit_shapes knows (so a coordinator without torch resolves both the manifest
# and the preprocessing of the same models), plus resnet50.
PREPROCESSING_TABLE: dict[str, dict[str, Any]] = {
    **{name: _EXCEPTIONS.get(name, _VIT_384 if "_384" in name else _VIT) for name in VIT_MODELS},
    "resnet50": _IMAGENET,
}


def with_model_kwargs(values: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the input size the model is built for: ``img_size`` (an int or (H, W)) and
    ``in_chans`` among ``model_kwargs`` override the pretrained input size (mean and std keep the
    pretrained first channel for a grey model)."""
    out = dict(values)
    channels, height, width = out["input_size"]
    size = model_kwargs.get("img_size")
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = int(size[0]), int(size[1])
    new_channels = int(model_kwargs.get("in_chans", channels))
    if new_channels != channels:
        out["mean"], out["std"] = tuple(out["mean"])[:1] * new_channels, tuple(out["std"])[:1] * new_channels
    out["input_size"] = (new_channels, height, width)
    return out


def table_preprocessing(model: str, model_kwargs: Mapping[str, Any]) -> Preprocessing | None:
    """The table's preprocessing for ``model`` (None when the table does not know it)."""
    values = PREPROCESSING_TABLE.get(model)
    return None if values is None else Preprocessing.model_validate(with_model_kwargs(values, model_kwargs))


def timm_preprocessing(model: str, model_kwargs: Mapping[str, Any]) -> Preprocessing | None:
    """What timm's data-config helpers give for ``model``'s pretrained config (None without timm or
    without a pretrained config for that name). Imports timm: never called by the coordinator."""
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:  # noqa: BLE001 - unknown name
        cfg = None
    if cfg is None:
        return None
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    values = {key: data[key] for key in ("input_size", "interpolation", "mean", "std", "crop_pct")}
    if values["interpolation"] not in ("nearest", "bilinear", "bicubic"):
        values["interpolation"] = "bicubic"
    return Preprocessing.model_validate(with_model_kwargs(values, model_kwargs))
