"""Which coordinator-supplied models a worker builds (no torch here: the daemon imports it early).

A federation's config names a timm model and its ``model_kwargs``, and the worker passes them to
``timm.create_model``. Some names and keys make timm open a local file or reach a hub, so the
worker builds only plain model names with architecture settings unless its own config
(``allow_hub_models``, ``allow_model_kwargs``) says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# model_kwargs a coordinator may hand a worker: the shape of the architecture, nothing that names a
# file, a URL or a hub (``checkpoint_path``, ``pretrained_cfg``, ``pretrained_cfg_overlay``,
# ``cache_dir`` would make timm open a local file or reach the network). A worker's own config can
# allow more (``allow_model_kwargs``).
ARCHITECTURE_KWARGS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "no_embed_class", "reg_tokens", "pre_norm",
    "fc_norm", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate",
    "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "embed_dims", "depths", "window_size",
})
_PLAIN_MODEL_NAME = re.compile(r"^[A-Za-z0-9_]{1,128}(\.[A-Za-z0-9_]{1,128})?$")


class ModelRefused(ValueError):
    """The coordinator asked this worker to build a model its config does not allow."""


def check_remote_model(model: str, model_kwargs: Mapping[str, Any] | None, *, allow_kwargs: Iterable[str] = (),
                       allow_hub: bool = False) -> None:
    """Refuse a coordinator-supplied model a worker should not build: a name that is not a plain
    timm name (``hf-hub:org/model``, ``local-dir:/path``: a hub or a local directory) unless
    ``allow_hub``, and model_kwargs outside ``ARCHITECTURE_KWARGS`` and ``allow_kwargs``.

    Raises:
        ModelRefused: naming what was refused and the worker config key that would allow it.
    """
    if not allow_hub and not _PLAIN_MODEL_NAME.match(model or ""):
        raise ModelRefused(f"the federation's backbone {model[:200]!r} is not a plain timm model name (a hub or local "
                         f"directory reference); set allow_hub_models in this worker's config to build it")
    allowed = ARCHITECTURE_KWARGS | set(allow_kwargs)
    refused = sorted(k for k in (model_kwargs or {}) if k not in allowed)
    if refused:
        raise ModelRefused(f"the federation's backbone model_kwargs {refused[:10]} are not architecture settings this "
                         f"worker passes to timm; list them in allow_model_kwargs of this worker's config to allow them")
