"""The one options type of ``hilora demo`` and ``hilora bench``.

Both run federations through the real coordinator and worker code; they differ only in which
fields they read: the demo runs the ``hilora`` method over HTTP with ``workers`` worker processes,
the bench runs every method it is asked for, in process by default. The defaults are the demo's
tuned settings (rank 4, learning rates, batch 32, 2 local and 2 probe epochs, 4/3/2 rounds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Transport = Literal["inprocess", "http"]
TRANSPORTS: tuple[str, ...] = ("inprocess", "http")


@dataclass
class RunOptions:
    # data
    partition: str = "demo"
    partition_seed: int | None = None   # override the partition file's data seed
    seed: int = 0                       # training, initialisation and clustering seed
    # schedule
    root_rounds: int = 4
    cluster_rounds: int = 3
    leaf_rounds: int = 2
    unseen_leaf_rounds: int = 2
    local_epochs: int = 2
    probe_epochs: int = 2
    # adapters and training
    rank: int = 4
    alpha: float | None = None
    lr: float = 3e-3
    head_lr: float = 3e-2
    batch_size: int = 32
    weight_decay: float = 0.0
    gamma_c: float = 0.1
    gamma_l: float = 0.1
    leaf_lr_scale: float = 0.1   # the leaf's learning rates scaled by this (chosen on the family)
    leaf_bias_fit: float = 1.0   # a new leaf's bias fitted to the client's labels (prior std; chosen on the family)
    leaf_bias_fit_skewed: float = 4.0   # ... with this prior std where its labels are not uniform (0: one width)
    leaf_mix: float = 0.5        # a client with uniform-looking labels takes its leaf this far (1: as trained)
    leaf: str = "all"            # what the leaf tier trains: "all" (LoRA A, B and head) or "head" (a personal head)
    validation_fraction: float = 0.0   # held out per client to choose its model (hierarchical methods)
    alone_epochs: int = 0              # a model each client trains alone, a candidate of that choice (0: none)
    clip_relative: float | None = 3.0      # root and cluster: updates clipped to this x the round's median norm
    max_weight_ratio: float | None = 10.0  # root and cluster: weights capped at this x the round's median
    # clustering
    features: str = "update"
    k_min: int = 1
    k_max: int = 10
    knn: int = 5
    contrast: float = 1.25
    k_rule: str = "silhouette"   # "silhouette" or "eigengap" (with the contrast test); chosen on the family
    min_silhouette: float = 0.15
    silhouette_tolerance: float = 0.0   # silhouette rule: the smallest K within this of the best
    force_k: int | None = None   # every hierarchical method but no-cluster (which forces 1)
    ema: float = 0.9             # lsac-paper: EMA factor lambda of the smoothed root-stage B
    probe_loss: str = "balanced"   # the probe's loss: "ce" or "balanced" (inverse class frequency); chosen on the family
    partitions: str = "spectral+linkage"   # silhouette rule: partitions tried per K; chosen on the family
    probe_steps: int | None = None   # the probe's length in optimizer steps (None: probe_epochs)
    head_weight: float = 1.0     # update features: the probe's head delta scaled by this
    classwise_weight: float = 0.5   # update features: weight of the class-wise head distance
    refine_rounds: int = 0       # refinement by loss after the first N cluster rounds (learned clusterings)
    refine_margin: float = 0.05  # refinement: a move needs a loss this much (relatively) lower
    refine_new_cluster: int = 0  # refinement: this many clients no cluster fits form a new one (0: never)
    onboard: str = "probe"       # late clients: "probe" (probe similarity) or "loss" (every cluster's loss)
    skip_single_cluster: bool = True   # K = 1 found: no cluster stage (chosen on the family)
    # where it runs
    threads: int = 1             # torch threads per process (the demo backbone is tiny)
    device: str = "cpu"
    transport: Transport = "inprocess"   # bench: the service in this process, or worker processes over HTTP
    workers: int = 3             # worker processes over HTTP (the demo; the bench with transport "http")
    timeout: float = 900.0       # seconds a federation may take to reach each milestone over HTTP
    workdir: str | None = None   # keep the coordinator's database, blobs, worker state and logs here
    keep: bool = False
    # the backbone
    backbone_epochs: int = 60
    cache_dir: str | None = None
    paper: str | None = None          # a bench paper set-up name: the partition, built over data_root
    data_root: str | None = None      # the data folder of a disk partition (overrides its ``root``)
    model: str | None = None          # a timm model name; None: the demo backbone (paper: ViT-B/16)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # beyond num_classes / img_size / in_chans
    checkpoint: str | None = None     # None: random init (seeded); "pretrained": timm's weights; or a file
    data_cache_bytes: int = 8 << 30   # client arrays kept in memory (least recently used are dropped)

    @property
    def total_rounds(self) -> int:
        return self.root_rounds + self.cluster_rounds + self.leaf_rounds

    @property
    def demo_backbone(self) -> bool:
        """No model and no paper set-up named: the cached demo ViT."""
        return self.model is None and self.paper is None


# Options whose default is not what hilora did before the option existed: a report or results
# folder written then (without the key) is read as having run with this value, not the default.
VALUE_BEFORE_IT_EXISTED: dict[str, object] = {"partitions": "spectral", "leaf_bias_fit": 0.0,
                                              "skip_single_cluster": False, "leaf_bias_fit_skewed": 0.0,
                                              "leaf_mix": 1.0}


def recorded_defaults() -> dict[str, object]:
    """Every option's default as a run recorded before the option existed did it."""
    return {**asdict(RunOptions()), **VALUE_BEFORE_IT_EXISTED}
