"""Local training and evaluation of one tier of a ``TieredLoRAModel`` on one client's data.

The frozen backbone runs in eval mode throughout (no dropout), so training is a deterministic
function of the model state, the data and the seed on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from shared.manifest import TIERS
from worker.data import ClientData
from worker.lora import TieredLoRAModel
from worker.stream import batches as stream_batches
from worker.stream import is_lazy


class TrainingStopped(Exception):
    """``train_tier`` stopped early because its ``should_stop`` callback said so (the worker is
    shutting down, or the task's lease was lost). The model's tier is then partly trained."""


def tiers_up_to(tier: str) -> tuple[str, ...]:
    """The tiers active when ``tier`` trains: every tier up to and including it."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers are {list(TIERS)}")
    return TIERS[: TIERS.index(tier) + 1]


def resolve_precision(requested: str, device: str | torch.device) -> str:
    """The precision a worker trains in on ``device`` for ``training.precision`` = ``requested``:
    'auto' is bf16 on a CUDA device that supports it, fp16 on one that does not, fp32 on a CPU.

    Raises:
        ValueError: fp16 off CUDA (its loss scaling is CUDA's), bf16 on a GPU without it, or an
            unknown precision.
    """
    kind = torch.device(device).type
    if requested == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and kind != "cuda":
        raise ValueError(f"training.precision 'fp16' needs a CUDA device (loss scaling is CUDA's); this worker "
                         f"trains on {device}: the federation can use 'auto', 'bf16' or 'fp32'")
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"training.precision 'bf16': the GPU {device} does not support bfloat16; use 'auto' or 'fp16'")
    if requested not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown training.precision {requested!r} (auto, fp32, bf16, fp16)")
    return requested


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type,
                          dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where ``train_tier`` keeps its progress (the trainable factors, the optimizer's state, the
    steps done and the running loss) and how often: every ``every`` optimizer steps (0: only when
    stopped) and whenever ``should_stop`` stops it. A file whose ``key`` differs (another task, or
    another attempt at different inputs) is ignored and replaced. Resuming replays the shuffling
    generator, so a resumed run ends with the same bytes as one never interrupted."""

    path: Path
    key: str
    every: int = 0


def _save_checkpoint(ck: Checkpointing, model: TieredLoRAModel, tier: str, trainable: Sequence[str],
                     optimizer: torch.optim.Optimizer, scaler: object, done: int, total: torch.Tensor,
                     seen: int) -> None:
    from safetensors.torch import save

    from worker.files import atomic_write

    tensors = {f"factor.{name}": torch.from_numpy(value)
               for name, value in model.export_tier(tier, factors=tuple(trainable)).items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["loss_total"] = total.detach().cpu().reshape(1)
    meta = {"key": ck.key, "done": str(done), "seen": str(seen), "param_groups": json.dumps(state["param_groups"]),
            "scaler": json.dumps(scaler.state_dict() if scaler is not None else None)}
    atomic_write(ck.path, save(tensors, metadata=meta))


def _load_checkpoint(ck: Checkpointing, model: TieredLoRAModel, tier: str, optimizer: torch.optim.Optimizer,
                     scaler: object, device: str | torch.device) -> tuple[int, torch.Tensor, int] | None:
    """(steps done, running loss total, samples seen in the current pass) from ``ck.path``, with the
    factors and the optimizer restored; None without a checkpoint of this ``ck.key``."""
    from safetensors import safe_open

    if not ck.path.is_file():
        return None
    try:
        with safe_open(str(ck.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != ck.key:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no items
    except Exception:  # noqa: BLE001 - a torn or foreign file: start afresh
        return None
    model.load_tier(tier, {k[len("factor."):]: v for k, v in tensors.items() if k.startswith("factor.")},
                    partial=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    scaler_state = json.loads(meta.get("scaler", "null"))
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return int(meta["done"]), tensors["loss_total"].reshape(()).to(device), int(meta["seen"])


def augment_batch(x: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """``training.augment`` on a batch (N, C, H, W) before the model: 'flip' mirrors each image
    left-right with probability 1/2; 'crop_flip' first crops each to a random 60-100 % of its area
    (aspect ratio log-uniform in [3/4, 4/3]) and resizes it back (bilinear). Drawn from ``seed``
    alone (CPU generator), so the same batch of the same step is augmented alike anywhere."""
    if mode == "none":
        return x
    generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    n, _, height, width = x.shape
    if mode == "crop_flip":
        out = torch.empty_like(x)
        for i in range(n):
            area = float(torch.empty(()).uniform_(0.6, 1.0, generator=generator)) * height * width
            log_ratio = float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
            ratio = math.exp(log_ratio)
            w = min(width, max(1, round(math.sqrt(area * ratio))))
            h = min(height, max(1, round(math.sqrt(area / ratio))))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            crop = x[i:i + 1, :, top:top + h, left:left + w]
            out[i:i + 1] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        x = out
    elif mode != "flip":
        raise ValueError(f"unknown training.augment {mode!r} (none, flip, crop_flip)")
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: object = None) -> None:
    """One step on ``loss``: gradients cleared, backward, step; through ``scaler`` (a GradScaler,
    fp16's loss scaling) when given."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def _as_tensor(array: object, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def train_tier(model: TieredLoRAModel, tier: str, data: ClientData, epochs: int, lr: float, head_lr: float,
               batch_size: int, weight_decay: float, gamma_c: float, gamma_l: float, seed: int,
               trainable: Sequence[str] = ("A", "B", "head"), device: str | torch.device = "cpu",
               should_stop: Callable[[], bool] | None = None, steps: int | None = None,
               class_balanced: bool = False, precision: str = "fp32",
               checkpoint: Checkpointing | None = None, augment: str = "none") -> dict[str, float | int]:
    """Train the ``trainable`` factors of ``tier`` on ``data.x_train``/``data.y_train``.

    Active tiers are all tiers up to and including ``tier``; everything else is frozen. AdamW with
    ``lr`` for the LoRA factors and ``head_lr`` for the head (both with ``weight_decay``); the loss
    is cross entropy plus ``model.orthogonality_loss(tier, gamma_c, gamma_l)``. Mini-batches are
    shuffled with a generator seeded by ``seed``. Every parameter is frozen again afterwards.
    ``should_stop``, when given, is called before every mini-batch; when it returns true training
    stops at once with ``TrainingStopped``. ``steps``, when given, replaces ``epochs``: exactly that
    many optimizer steps, the data cycled in freshly shuffled passes (the last one cut short).
    ``class_balanced`` weights each sample's cross entropy by ``n / (k * count[class])`` (``k``:
    the classes the client holds), so every class the client holds weighs the same in the loss.
    ``precision`` ('fp32', 'bf16', 'fp16'; see ``resolve_precision``): forward passes and the loss
    run under autocast; parameters, gradients and the optimizer stay float32; fp16 scales the loss.
    ``augment``: ``augment_batch`` on every training batch, seeded by (``seed``, step).
    ``checkpoint``: save progress as it says and resume from a checkpoint of the same key (the
    returned ``steps`` count the steps before the resume too; ``resumed_at_step`` says where it
    resumed).

    Returns:
        ``{"train_loss": mean loss over the last epoch's samples, "steps": optimizer steps}``.

    Raises:
        ValueError: no training samples, epochs < 1, batch_size < 1 or nothing trainable.
        TrainingStopped: ``should_stop`` returned true.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    trainable = tuple(trainable)
    if not trainable:
        raise ValueError("nothing to train: trainable is empty")
    lazy = is_lazy(data.x_train)   # images on disk: decoded batch by batch (worker.stream)
    x = data.x_train if lazy else _as_tensor(data.x_train, torch.float32, device)
    y = _as_tensor(data.y_train, torch.int64, device)
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("the client has no training samples")
    _to_device(model, device)
    model.eval()
    model.set_active_tiers(tiers_up_to(tier))
    model.set_trainable(tier, trainable)
    groups = []
    lora = model.tier_parameters(tier, [f for f in trainable if f in ("A", "B")])
    if lora:
        groups.append({"params": lora, "lr": lr})
    if "head" in trainable:
        groups.append({"params": model.tier_parameters(tier, ["head"]), "lr": head_lr})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    weight: torch.Tensor | None = None
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    batches = -(-n // batch_size)
    passes = epochs if steps is None else -(-steps // batches)
    budget = passes * batches if steps is None else steps
    done = 0
    epoch_loss = 0.0
    resumed = (_load_checkpoint(checkpoint, model, tier, optimizer, scaler, device)
               if checkpoint is not None else None)
    skip = resumed[0] if resumed is not None else 0
    step_index = 0  # optimizer steps met so far, the skipped ones of a resumed run included
    try:
        for _ in range(passes):
            order = torch.randperm(n, generator=generator).to(device)
            total = torch.zeros((), device=device)
            seen = 0
            if lazy:  # this pass's batches that will train, decoded ahead in the same order
                starts = range(0, n, batch_size)
                streamed = stream_batches(x, [order[start:start + batch_size] for k, start in enumerate(starts)
                                              if skip <= step_index + k < budget], device)
            for start in range(0, n, batch_size):
                if step_index >= budget:
                    break
                if step_index < skip:  # done before the checkpoint: replayed, not trained
                    step_index += 1
                    if step_index == skip:
                        done, total, seen = resumed
                    continue
                if should_stop is not None and should_stop():
                    if checkpoint is not None:
                        _save_checkpoint(checkpoint, model, tier, trainable, optimizer, scaler, done, total, seen)
                    raise TrainingStopped(f"stopped after {done} steps")
                index = order[start:start + batch_size]
                inputs = augment_batch(next(streamed) if lazy else x[index], augment, seed * 1_000_003 + step_index)
                with autocast(device, precision):
                    logits = model(inputs)
                    if class_balanced and weight is None:
                        weight = _class_weights(y, int(logits.shape[1]))
                    loss = (F.cross_entropy(logits.float(), y[index], weight=weight)
                            + model.orthogonality_loss(tier, gamma_c, gamma_l).float())
                optimizer_step(loss, optimizer, scaler)
                done += 1
                step_index += 1
                seen += int(index.shape[0])
                total += loss.detach() * index.shape[0]
                if checkpoint is not None and checkpoint.every and done % checkpoint.every == 0 and done < budget:
                    _save_checkpoint(checkpoint, model, tier, trainable, optimizer, scaler, done, total, seen)
            epoch_loss = float(total) / max(seen, 1)
    finally:
        model.freeze_all()
    out: dict[str, float | int] = {"train_loss": epoch_loss, "steps": done}
    if skip:
        out["resumed_at_step"] = skip
    return out


def _class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights (``num_classes``,) ``n / (k * count[c])`` for the ``k`` classes present in
    ``y`` (0 for the absent ones), so that every present class carries the same total weight."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    present = counts > 0
    weight = torch.zeros_like(counts)
    weight[present] = float(y.shape[0]) / (float(present.sum()) * counts[present])
    return weight


def _to_device(model: torch.nn.Module, device: str | torch.device) -> None:
    """``model.to(device)`` unless every parameter and buffer is there already: a scan costs about
    a quarter of ``to``'s walk (0.2 against 0.8 ms on the demo ViT), paid by every task."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None and torch.cuda.is_available():
        target = torch.device("cuda", torch.cuda.current_device())
    if any(t.device != target for t in model.parameters()) or any(t.device != target for t in model.buffers()):
        model.to(device)


def _labels(y: object) -> np.ndarray:
    """Labels (a tensor or an array) as an int64 numpy array."""
    return np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64, copy=False)


def _outputs(model: TieredLoRAModel, x: object, tiers: Iterable[str], device: str | torch.device,
             batch_size: int) -> Iterable[torch.Tensor]:
    """The model's logits of ``x``, batch by batch, with exactly ``tiers`` active (call under no_grad)."""
    _to_device(model, device)
    model.eval()
    model.set_active_tiers(tiers)
    return (model(inputs) for inputs in _input_batches(x, batch_size, device))


@torch.no_grad()
def predict(model: TieredLoRAModel, x: object, tiers: Iterable[str], device: str | torch.device = "cpu",
            batch_size: int = 256) -> np.ndarray:
    """Predicted labels (N,) with exactly ``tiers`` active."""
    out = [logits.argmax(dim=1).cpu() for logits in _outputs(model, x, tiers, device, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def _input_batches(x: object, batch_size: int, device: str | torch.device) -> Iterable[torch.Tensor]:
    """``x`` in consecutive batches on ``device`` (streamed from disk when it is ``LazyImages``)."""
    if is_lazy(x):
        n = len(x)
        return stream_batches(x, [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)],
                              device)
    inputs = _as_tensor(x, torch.float32, device)
    return (inputs[start:start + batch_size] for start in range(0, inputs.shape[0], batch_size))


@torch.no_grad()
def logits_of(model: TieredLoRAModel, x: object, tiers: Iterable[str], device: str | torch.device = "cpu",
              batch_size: int = 256) -> np.ndarray:
    """The logits (N, classes) of ``x`` with exactly ``tiers`` active (forward passes only), float32."""
    out = [logits.float().cpu() for logits in _outputs(model, x, tiers, device, batch_size)]
    if not out:
        raise ValueError("cannot compute logits of zero samples")
    return torch.cat(out).numpy()


@torch.no_grad()
def fit_leaf_bias(model: TieredLoRAModel, data: ClientData, below: Sequence[str], prior_std: float,
                  device: str | torch.device = "cpu", skewed_prior_std: float = 0.0) -> np.ndarray:
    """``training.leaf_bias_fit``: shift the new leaf head's bias by the per-class logit shift that
    fits this client's training labels best under the model of ``below`` (root, or root + cluster;
    ``shared.calibration.fit_logit_shift``), with a prior of ``prior_std``, or of
    ``skewed_prior_std`` (``training.leaf_bias_fit_skewed``, when > 0) for a client whose labels
    are not uniform over the classes (``shared.calibration.leaf_prior_width``). Returns the shift
    (classes,)."""
    from shared.calibration import fit_logit_shift, leaf_prior_width

    labels = _labels(data.y_train)
    bias = model.heads["leaf"].bias
    width = leaf_prior_width(labels, int(bias.shape[0]), prior_std, skewed_prior_std)
    delta = fit_logit_shift(logits_of(model, data.x_train, below, device), labels, width)
    bias.add_(torch.as_tensor(delta, dtype=bias.dtype, device=bias.device))
    return delta


def client_leaf_mix(model: TieredLoRAModel, data: ClientData, mix: float) -> float:
    """``training.leaf_mix`` for this client: ``mix`` when its training labels look uniform over the
    model's classes, 1 when they have a mix of their own (``shared.calibration.leaf_mix_for``)."""
    from shared.calibration import leaf_mix_for

    return leaf_mix_for(_labels(data.y_train), int(model.heads["leaf"].bias.shape[0]), mix)


@contextlib.contextmanager
def leaf_as_served(model: TieredLoRAModel, tiers: Iterable[str], mix: float) -> Iterator[None]:
    """``training.leaf_mix``: inside the block the model's leaf is the one the client's model uses
    (``shared.merge.served_leaf``: its LoRA change and head weight ``mix`` of the way from the tier
    below to the trained leaf, its own head bias); the trained leaf is back on exit, whatever
    happens inside. Nothing changes with ``mix`` = 1 or without a leaf in ``tiers``."""
    present = set(tiers)
    tiers = [t for t in TIERS if t in present]
    if mix >= 1.0 or "leaf" not in tiers:
        yield
        return
    from shared.merge import served_leaf

    trained = model.export_tier("leaf")
    model.load_tier("leaf", served_leaf(trained, model.export_tier(tiers[-2], ("head",)), mix))
    try:
        yield
    finally:
        model.load_tier("leaf", trained)


@torch.no_grad()
def mean_loss(model: TieredLoRAModel, x: object, y: object, tiers: Iterable[str], device: str | torch.device = "cpu",
              batch_size: int = 256) -> float:
    """Mean cross entropy on (x, y) with exactly ``tiers`` active (forward passes only): what a
    refine task reports for the root and for root + each candidate cluster adapter."""
    labels = _as_tensor(y, torch.int64, device)
    if labels.shape[0] == 0:
        raise ValueError("cannot compute a loss on zero samples")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start, logits in zip(range(0, labels.shape[0], batch_size), _outputs(model, x, tiers, device, batch_size)):
        total += F.cross_entropy(logits, labels[start:start + batch_size], reduction="sum").to(torch.float64)
    return float(total) / int(labels.shape[0])


def evaluate(model: TieredLoRAModel, x: object, y: object, tiers: Iterable[str], device: str | torch.device = "cpu",
             batch_size: int = 256) -> float:
    """Accuracy on (x, y) with exactly ``tiers`` active (the highest active tier's head predicts)."""
    labels = _labels(y)
    if labels.shape[0] == 0:
        raise ValueError("cannot evaluate on zero samples")
    return float((predict(model, x, tiers, device, batch_size) == labels).mean())


def evaluate_tiers(model: TieredLoRAModel, data: ClientData, tiers_available: Iterable[str],
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Test accuracy per available tier T, with every available tier up to T active.

    Keys ``acc_root`` (root), ``acc_cluster`` (root + cluster, cluster head) and ``acc_leaf``
    (root + cluster + leaf, leaf head), each only when that tier is available.
    """
    available = [t for t in TIERS if t in set(tiers_available)]
    metrics: dict[str, float] = {}
    for i, tier in enumerate(available):
        metrics[f"acc_{tier}"] = evaluate(model, data.x_test, data.y_test, available[: i + 1], device)
    return metrics


TIER_INDEX = {tier: float(i) for i, tier in enumerate(TIERS)}   # the ``selected`` metric: 0 root, 1 cluster, 2 leaf


@dataclasses.dataclass(frozen=True)
class ValidationSplit:
    """A client's training data cut once into the part every tier trains on (``fit``, a
    ``ClientData`` whose test arrays are the client's own test set) and a held-out part
    (``x``, ``y``) on which the client chooses its model."""

    fit: ClientData
    x: np.ndarray
    y: np.ndarray


def split_validation(data: ClientData, fraction: float, seed: int) -> ValidationSplit | None:
    """Hold out ``round(fraction * n)`` (at least 1) of the ``n`` training samples, drawn by a
    generator seeded with ``seed``; the rest (at least 1) is the fit part. None when ``fraction``
    is 0 or the client has fewer than 2 training samples (nothing to hold out)."""
    n = int(np.asarray(data.y_train).shape[0])
    if fraction <= 0 or n < 2:
        return None
    held = min(n - 1, max(1, int(round(fraction * n))))
    order = np.random.default_rng(int(seed)).permutation(n)
    val, fit = np.sort(order[:held]), np.sort(order[held:])
    fit_data = dataclasses.replace(data, x_train=data.x_train[fit], y_train=data.y_train[fit],
                                   train_indices=np.asarray(data.train_indices)[fit])
    return ValidationSplit(fit=fit_data, x=data.x_train[val], y=data.y_train[val])


CANDIDATES = TIERS + ("alone",)  # what a client chooses from on its validation part, smallest first
CANDIDATE_INDEX = {name: float(i) for i, name in enumerate(CANDIDATES)}  # ``selected``: ... 3 alone


def select_tier(validation: Mapping[str, float]) -> str:
    """The candidate whose model scores best on the validation part (``val_<tier>`` accuracies of
    the models with every tier up to it active, and ``alone``: the model the client trained by
    itself); a tie goes to the earlier one in ``CANDIDATES`` (the smaller federation model first)."""
    if not validation:
        raise ValueError("no validation accuracy to select on")
    present = [t for t in CANDIDATES if t in validation]
    return max(present, key=lambda t: (validation[t], -CANDIDATES.index(t)))


def evaluate_with_selection(model: TieredLoRAModel, data: ClientData, tiers_available: Iterable[str],
                            split: ValidationSplit | None, device: str | torch.device = "cpu") -> dict[str, float]:
    """``evaluate_tiers`` on the test set and, with a validation ``split``, each tier's accuracy on
    the held-out part (``val_root``, ...), the tier chosen on it (``selected``: 0 root, 1 cluster,
    2 leaf; ``select_tier``) and that model's test accuracy (``acc_selected``)."""
    metrics = evaluate_tiers(model, data, tiers_available, device)
    if split is None:
        return metrics
    available = [t for t in TIERS if t in set(tiers_available)]
    validation = {t: evaluate(model, split.x, split.y, available[: i + 1], device) for i, t in enumerate(available)}
    chosen = select_tier(validation)
    metrics.update({f"val_{t}": v for t, v in validation.items()})
    metrics.update(selected=TIER_INDEX[chosen], acc_selected=metrics[f"acc_{chosen}"])
    return metrics


def add_alone_candidate(metrics: dict[str, float], model: TieredLoRAModel, data: ClientData,
                        split: ValidationSplit, device: str | torch.device = "cpu") -> dict[str, float]:
    """With the client's model trained alone loaded as the ``root`` tier of ``model``: its test and
    validation accuracy (``acc_alone``, ``val_alone``) join ``metrics`` (of ``evaluate_with_selection``)
    and the choice is made again over root, +cluster, +leaf and alone. Returns ``metrics``."""
    metrics["acc_alone"] = evaluate(model, data.x_test, data.y_test, ("root",), device)
    metrics["val_alone"] = evaluate(model, split.x, split.y, ("root",), device)
    validation = {t: metrics[f"val_{t}"] for t in CANDIDATES if f"val_{t}" in metrics}
    chosen = select_tier(validation)
    metrics.update(selected=CANDIDATE_INDEX[chosen], acc_selected=metrics[f"acc_{chosen}"])
    return metrics
