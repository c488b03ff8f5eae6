"""The federation configuration: everything a training job is, as one validated document.

Baselines are configurations of the same machinery: each tier says whether it exists and, per
factor (A, B, head), whether the coordinator aggregates it, the client keeps it local, or it stays
frozen at version 0. ``aggregation`` says how aggregated factors are combined.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.manifest import AdapterManifest
from shared.preprocess import Preprocessing

FactorPolicy = Literal["aggregate", "local", "frozen"]
MAX_SEED = 2**32 - 1  # numpy and torch both take it; a negative seed failed only once the scheduler used it
MAX_MODEL_KWARGS_BYTES = 16_384
MAX_MODEL_KWARGS_DEPTH = 4
MAX_REFINE_ROUNDS = 100


def _json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_json_depth(v) for v in value), default=0)
    return 0


class TierPolicy(BaseModel):
    """How one tier trains and travels. The leaf is always local (it never leaves the client)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    A: FactorPolicy = "aggregate"
    B: FactorPolicy = "aggregate"
    head: FactorPolicy = "aggregate"
    aggregation: Literal["product_svd", "factor_avg"] = "product_svd"
    clip_norm: float | None = Field(
        default=None, gt=0,
        description="robust aggregation (docs/security.md): each client's update relative to the round's "
                    "input version is scaled down to this L2 norm when longer; measured in product space "
                    "(B A) for product_svd tiers, on the factors for factor_avg, head included; null: off")
    clip_relative: float | None = Field(
        default=3.0, ge=1, le=1e6,
        description="robust aggregation (docs/security.md): each client's update is scaled down to this multiple "
                    "of the median update norm of the round's accepted uploads when longer (a minority cannot move "
                    "the median, and unlike clip_norm it needs no absolute scale, so it holds for any backbone); "
                    "with clip_norm too, the smaller bound wins; null: off")
    max_weight_ratio: float | None = Field(
        default=10.0, ge=1, le=1e6,
        description="robust aggregation (docs/security.md): a client's aggregation weight (the num_samples "
                    "it reports) is capped at this multiple of the median weight of the round's accepted "
                    "uploads, so no client can claim a dominating share; null: off")
    max_abs_value: float = Field(
        default=1e4, gt=0, le=1e30,
        description="an upload of this tier with any value of magnitude above this is refused (422 "
                    "out_of_range): LoRA factors and head weights of a trained adapter are of order 1, and "
                    "with every value within 1e4 a rank-r product B A and its sum over any number of clients "
                    "stay far inside the float32 range the adapters are stored in (docs/security.md)")

    @model_validator(mode="after")
    def _check(self) -> "TierPolicy":
        if self.aggregation == "product_svd" and (self.A == "aggregate") != (self.B == "aggregate"):
            raise ValueError("product_svd aggregation needs both A and B aggregated; "
                             "use factor_avg to aggregate only one factor")
        if self.head == "frozen":
            raise ValueError("a tier's head is trained: use 'aggregate' or 'local'")
        return self

    def uploaded_factors(self) -> tuple[str, ...]:
        """Factors a client uploads for this tier: exactly the aggregated ones."""
        return tuple(f for f in ("A", "B", "head") if getattr(self, f) == "aggregate")

    def trained_factors(self) -> tuple[str, ...]:
        return tuple(f for f in ("A", "B", "head") if getattr(self, f) != "frozen")


def _leaf_default() -> TierPolicy:
    return TierPolicy(A="local", B="local", head="local")


class ClientsPerRound(BaseModel):
    """Partial participation (``shared.sampling``): the share of eligible clients a root or cluster
    round trains."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fraction: float = Field(default=1.0, gt=0, le=1,
                            description="share of the eligible clients drawn (rounded up); 1: every one")
    min: int = Field(default=2, ge=1, le=1_000_000, description="draw at least this many (all if fewer are eligible)")
    max: int | None = Field(default=None, ge=1, le=1_000_000, description="draw at most this many; null: no cap")

    @model_validator(mode="after")
    def _check(self) -> "ClientsPerRound":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"clients_per_round: max ({self.max}) is below min ({self.min})")
        return self

    @property
    def samples(self) -> bool:
        return self.fraction < 1 or self.max is not None


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_clients: int = Field(default=2, ge=1, description="training starts once this many clients registered")
    max_clients: int = Field(
        default=10_000, ge=1, le=1_000_000,
        description="registrations beyond this many clients (revoked ones included) are refused (409 "
                    "federation_full): the enrollment secret is shared, and this bounds what it can mint")
    root_rounds: int = Field(default=20, ge=0)
    cluster_rounds: int = Field(default=20, ge=0)
    leaf_rounds: int = Field(default=10, ge=0)
    unseen_leaf_rounds: int = Field(default=5, ge=0, description="leaf rounds of a client onboarded while serving")
    local_epochs: int = Field(default=1, ge=1)
    probe_epochs: int = Field(default=1, ge=1)
    tau_rel: float = Field(default=0.0, ge=0, description="root stage stops early when rho <= tau_rel")
    lease_seconds: float = Field(default=120.0, gt=0, le=7 * 86400)
    max_attempts: int = Field(default=3, ge=1, le=1000)
    retry_after_seconds: float = Field(default=1.0, gt=0, le=3600)
    quorum_min_clients: int = Field(
        default=1, ge=1,
        description="a root, cluster or probe round aggregates only with at least this many accepted "
                    "uploads (capped at the round's number of clients, so a small cluster can aggregate)")
    quorum_min_fraction: float = Field(
        default=0.0, ge=0, le=1,
        description="... and at least this fraction of the round's clients (rounded up)")
    round_deadline_seconds: Annotated[float, Field(gt=0, le=366 * 86400)] | Literal["auto"] | None = Field(
        default="auto",
        description="a round is decided at this age even if tasks are still open: aggregated if the "
                    "quorum is met (open tasks are cancelled), else failed and reopened. 'auto' (the default): "
                    "a deadline derived from the schedule and from how long this federation's tasks take "
                    "(shared.deadlines: at least lease_seconds x (max_attempts + 1), and 4 x the longest a done task "
                    "of the last rounds took, or 3 x the time half of this round's tasks took), so a client "
                    "that heartbeats and never uploads cannot hold a round open for ever while slow GPU tasks "
                    "are not cut; null: no deadline (federations stored before 'auto' existed keep null)")
    clients_per_round: ClientsPerRound = Field(
        default_factory=ClientsPerRound,
        description="root and cluster rounds train a drawn subset of their eligible clients (per cluster in "
                    "cluster rounds), by a seed recorded on the round; quorum and deadline apply to the drawn "
                    "set. Probe, leaf and evaluation rounds ask every eligible client")
    max_consecutive_failures: int | None = Field(
        default=3, ge=1, le=1000,
        description="a client whose tasks end without an upload (failed, cancelled, never leased) in this many "
                    "rounds in a row is marked inactive (not revoked): no further task is opened for it until it "
                    "asks for work again. Rounds it was not drawn for do not count; null: never")
    cycle_every_seconds: float | None = Field(
        default=None, gt=0, le=366 * 86400,
        description="cycles (docs/operations.md, \"Cycles\"): once the federation serves, a new cycle (optional "
                    "root rounds, a fresh probe of every active client, reclustering with stable cluster ids, cluster "
                    "rounds, leaf rounds for clients whose cluster changed or who are new, an evaluation) starts this "
                    "many seconds after the last one ended; null: not on a timer")
    cycle_min_new_clients: int | None = Field(
        default=None, ge=1, le=10**6,
        description="cycles: a new cycle starts once this many clients wait for one (registered since the last "
                    "cycle and not yet onboarded, or fitting no cluster); null: not by arrivals")
    cycle_root_rounds: int = Field(
        default=0, ge=0, le=10_000,
        description="cycles: root rounds each cycle runs first (all active clients, newcomers included), before "
                    "its probe; 0: the probe starts from the current root")

    evaluate_every: int = Field(
        default=1, ge=1, le=10_000,
        description="root and cluster training tasks evaluate the adapters they receive on the client's data "
                    "before training (acc_root, acc_cluster: the per-round curves) in the first round of each "
                    "stage and scope and every evaluate_every-th after it (rounds 1, 1+k, 1+2k, ...); the other "
                    "rounds only train. 1: every round. The final evaluation round always runs (protocol 7)")

    def evaluates_received(self, round_number: int) -> bool:
        """Whether a root or cluster training task of round ``round_number`` (1-based, per stage and
        scope) evaluates the adapters it receives before training (``evaluate_every``)."""
        return (round_number - 1) % self.evaluate_every == 0

    def quorum(self, num_tasks: int) -> int:
        """Accepted uploads a round of ``num_tasks`` clients needs before it may aggregate."""
        return max(1, min(self.quorum_min_clients, num_tasks), math.ceil(self.quorum_min_fraction * num_tasks - 1e-9))


class Training(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(default=3e-3, gt=0)
    head_lr: float = Field(default=3e-3, gt=0)
    augment: Literal["none", "flip", "crop_flip"] = Field(
        default="none",
        description="train-time augmentation of each training batch (evaluation never augments): 'flip' mirrors "
                    "each image left-right with probability 1/2; 'crop_flip' also takes a random crop of 60 to 100 % "
                    "of its area (aspect 3/4 to 4/3) resized back to the input size; drawn from the task's seed and "
                    "step, so a resumed task augments alike. Recorded in exported models' metadata")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="the arithmetic of training and evaluation (autocast; the factors, the optimizer and every "
                    "upload stay float32): 'auto' lets each worker choose by its device (CUDA: bf16 where the GPU "
                    "supports it, else fp16 with loss scaling; CPU: fp32), 'fp32', 'bf16' (also on CPU), 'fp16' "
                    "(CUDA only: a CPU worker refuses to start)")
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=32, ge=1)
    gamma_c: float = Field(default=0.1, ge=0)
    gamma_l: float = Field(default=0.1, ge=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="training seed (root initialisation, the "
                      "workers' per-client seeds)")
    leaf_lr_scale: float = Field(
        default=0.1, gt=0, le=10,
        description="the leaf tier trains with lr and head_lr multiplied by this: a leaf starts from the cluster "
                    "model with a fresh optimizer, and on a few dozen images Adam's first steps at the shared "
                    "learning rates move it away from what the cluster learned (docs/method.md)")
    leaf_bias_fit: float = Field(
        default=1.0, ge=0, le=100,
        description="a new leaf's head bias starts shifted by the per-class logit shift that fits the client's own "
                    "training labels best under the model it starts from (root + cluster), with a Gaussian prior of "
                    "this standard deviation per class (Newton's method, forward passes only; shared/calibration.py): "
                    "the client's label proportions, which the shared model cannot know, before the leaf trains "
                    "(default 1, chosen on the partition family: docs/method.md). 0: off")
    leaf_bias_fit_skewed: float = Field(
        default=4.0, ge=0, le=100,
        description="with leaf_bias_fit > 0: the prior's standard deviation for a client whose training labels a "
                    "chi-square test rejects as uniform over the federation's classes at 5 % (Monte Carlo p-value, "
                    "seeded: shared/calibration.py): a client with a label mix of its own follows it more closely, "
                    "a client whose labels look uniform keeps leaf_bias_fit's narrower prior (default 4, chosen on "
                    "the partition family: docs/method.md). 0: leaf_bias_fit for every client")
    leaf_mix: float = Field(
        default=0.5, gt=0, le=1,
        description="a client whose training labels look uniform over the federation's classes (the chi-square test "
                    "of leaf_bias_fit_skewed does not reject them at 5 %) takes its leaf this fraction of the way from "
                    "the model below it (root + cluster): the leaf's LoRA change and head weight scaled toward the "
                    "tier below's, its head bias (the bias fit and what training added) kept whole "
                    "(shared/merge.py served_leaf); a client whose labels have a mix of their own keeps its leaf "
                    "whole. The leaf's file keeps what it trained and records the client's share, which evaluation, "
                    "selection and `hilora export` use (default 0.5, chosen on the partition family: "
                    "docs/method.md). 1: the leaf as trained for every client")
    validation_fraction: float = Field(
        default=0.0, ge=0, le=0.5,
        description="share of each client's training data held out (drawn once per client, seeded) to choose its "
                    "model: every tier trains on the rest, and each evaluation also scores root, +cluster and "
                    "+leaf on the held-out part and reports the best (ties: the smaller model) as 'selected' "
                    "with its test accuracy 'acc_selected'; 0: off (every model trains on all the data; the "
                    "client's model is its highest tier). Ignored by a federation with a root tier only")
    alone_epochs: int = Field(
        default=0, ge=0, le=100_000,
        description="with validation_fraction > 0: at its first leaf task each client also trains a model alone "
                    "(a fresh root-shaped LoRA and head on its own training part, this many epochs, one "
                    "optimizer; kept on its worker) and the candidates it chooses from on its held-out part are "
                    "root, +cluster, +leaf and this one (ties go to the federation's model): a client whose "
                    "data the federation does not help keeps what it would have had alone. 0: off")

    @model_validator(mode="after")
    def _check_alone(self) -> "Training":
        if self.alone_epochs and self.validation_fraction <= 0:
            raise ValueError("training.alone_epochs needs training.validation_fraction > 0: the model trained alone "
                             "is only a candidate the client chooses on its held-out part")
        return self


ClusteringAlgorithm = Literal["lsac", "kmeans-flat", "lsac-paper", "manual"]
MAX_MANUAL_ASSIGNMENT = 100_000


def approximate_refusal(algorithm: str, clients: int, limit: int) -> str:
    return (f"clustering.algorithm {algorithm!r} runs on the exact pairwise distances of the probes, which "
            f"{clients} clients are too many for (clustering.approximate_above = {limit}): use 'lsac', whose "
            f"approximate path serves large federations, or raise clustering.approximate_above")


class Clustering(BaseModel):
    """How the coordinator clusters the training clients at the root-to-cluster switch, reruns
    that on an admin's recluster, and joins late clients to a cluster (docs/method.md,
    "Clustering algorithms")."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    algorithm: ClusteringAlgorithm = Field(
        default="lsac",
        description="'lsac': LSAC (self-tuning affinity, eigengap K, contrast test) on the probe uploads "
                    "(features, knn, contrast, force_k); 'kmeans-flat': LSAC as for 'lsac' chooses K, then "
                    "k-means on the flattened probe updates B A - B_root A_root gives the labels; "
                    "'lsac-paper': LSAC as the paper writes it (median-sigma affinity, eigengap K over "
                    "[k_min, k_max], no contrast test) on the subspace distance of each client's EMA (factor "
                    "ema) of its unit-norm root-stage B, kept on the coordinator during the root stage; needs "
                    "root.B aggregated and root_rounds >= 1; features, knn and contrast are unused, "
                    "force_k fixes K (at most n - 1); 'manual': the clusters are given by 'assignment' "
                    "(client name -> cluster label), for sites whose grouping is known in advance; a "
                    "clustered client it does not name joins the named clients' cluster its probe is "
                    "closest to (features)")
    assignment: dict[str, int] | None = Field(
        default=None,
        description="'manual' only: client name -> cluster label (an integer >= 0); the labels become the "
                    "clusters' labels; late clients it names join that cluster without a probe comparison")
    ema: float = Field(
        default=0.9, ge=0, lt=1,
        description="lsac-paper: EMA factor lambda over the root rounds; each root round, a client's "
                    "EMA becomes lambda * EMA + (1 - lambda) * its uploaded B scaled to unit Frobenius norm "
                    "per target (its first upload sets it); 0: the last upload only")
    features: Literal["update", "subspace"] = "update"
    probe_loss: Literal["ce", "balanced"] = Field(
        default="balanced",
        description="the probe round's loss: 'ce' (cross entropy, as every other round) or 'balanced' (each "
                    "sample weighted by the inverse frequency of its class in the client's training data, so that "
                    "the probe update says how the client maps inputs to labels rather than which labels it "
                    "happens to hold; the default since issue 14, chosen on the family: docs/method.md, \"Probe "
                    "options\")")
    probe_steps: int | None = Field(
        default=None, ge=1, le=100_000,
        description="the probe trains exactly this many optimizer steps (mini-batches; the data is cycled), "
                    "whatever the client's size, so that every client's probe update is of the same length; "
                    "null: schedule.probe_epochs epochs")
    head_weight: float = Field(
        default=1.0, ge=0, le=1e3,
        description="'update' features: the probe's head delta is scaled by this before it joins the flattened "
                    "LoRA update (0: LoRA only; larger: the head counts more)")
    classwise_weight: float = Field(
        default=0.5, ge=0, le=1,
        description="'update' features: the weight w of the class-wise head distance (the cosine of each class's "
                    "head-row delta, averaged over the classes both clients hold or both lack) in the distance "
                    "LSAC clusters, (1 - w) x update distance + w x class-wise distance; it keeps label skew from "
                    "hiding groups that map inputs to labels differently (docs/method.md, \"Class-wise head "
                    "distance\"). 0: the update distance alone. The approximate path (above approximate_above "
                    "clients) uses the update distance alone")
    k_min: int = Field(default=1, ge=1)
    k_max: int = Field(default=10, ge=1)
    knn: int = Field(default=5, ge=1)
    contrast: float = Field(default=1.25, gt=0, description="accept K>1 only if between/within distance >= contrast")
    k_rule: Literal["eigengap", "silhouette"] = Field(
        default="silhouette",
        description="how LSAC ('lsac', 'kmeans-flat', and 'manual' for its record) chooses K: 'eigengap' (the "
                    "largest eigengap, accepted if the contrast test passes) or 'silhouette' (every K in "
                    "[max(2, k_min), k_max] is tried; the partition with the highest mean silhouette wins if it "
                    "reaches min_silhouette, else K = 1; contrast unused)")
    min_silhouette: float = Field(
        default=0.15, ge=-1, le=1,
        description="k_rule 'silhouette': the mean silhouette a partition into K >= 2 clusters needs")
    silhouette_tolerance: float = Field(
        default=0.0, ge=0, le=1,
        description="k_rule 'silhouette': take the smallest K whose mean silhouette is at least (1 - this) times "
                    "the best one (and reaches min_silhouette), since splitting a group in two often scores about as "
                    "well as keeping it whole; 0: the best K")
    partitions: Literal["spectral", "spectral+linkage"] = Field(
        default="spectral+linkage",
        description="k_rule 'silhouette': the partitions tried for each K: 'spectral' (spectral clustering of the "
                    "self-tuning affinity) or 'spectral+linkage' (also average-linkage clustering of the distances; "
                    "the higher mean silhouette wins, spectral on ties), which finds groups smaller than knn + 1 "
                    "clients that the affinity blurs into a neighbour (docs/method.md, \"Partitions tried\"). The "
                    "approximate path (above approximate_above clients) tries spectral partitions only")
    force_k: int | None = Field(default=None, ge=1)
    skip_single_cluster: bool = Field(
        default=True,
        description="when the federation's first clustering finds a single cluster (K = 1 chosen by its rule: not "
                    "forced by force_k, not a manual assignment) and no refinement follows (refine_rounds 0), the "
                    "cluster stage is skipped: the cluster adapter stays at its version 0, which is the root's model, "
                    "and the leaf stage follows the probe (a cycle's reclustering keeps its cluster rounds: its one "
                    "cluster starts from the adapters it merges). Chosen on the partition family (docs/method.md, "
                    "\"One cluster\"): the one cluster's rounds trained a second adapter for everyone, which ended "
                    "within a few tenths of the root, and the final accuracy was level or a little lower for 35-40 % "
                    "more time. false: the single cluster trains schedule.cluster_rounds rounds like any other")
    approximate_above: int = Field(
        default=1000, ge=3, le=10_000_000,
        description="with more clients than this, 'lsac' runs its approximate path (shared.lsac_scale: "
                    "random sketches of the probe updates read target by target from the stored uploads, "
                    "a sparse kNN affinity, the same K rules), whose time and memory grow about linearly with "
                    "the clients instead of quadratically; the other algorithms are refused above it. No "
                    "distance or affinity matrix is stored for such a run")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seed of the clustering's k-means")
    refine_rounds: int = Field(
        default=0, ge=0, le=MAX_REFINE_ROUNDS,
        description="refinement after clustering (docs/method.md, \"Refinement\"): after each of the first "
                    "refine_rounds cluster rounds, every training client reports the loss of the root and of root + "
                    "each cluster adapter on its own training data (forward passes only; a 'refine' round), and the "
                    "coordinator moves each client whose loss is clearly lower in another cluster (refine_margin) "
                    "and marks one that no cluster fits better than the root as unassigned (root + its own leaf); "
                    "at most schedule.cluster_rounds; 0: off")
    refine_margin: float = Field(
        default=0.05, ge=0, lt=1,
        description="refinement: a client moves from its cluster c to cluster b only when its loss with b is below "
                    "(1 - refine_margin) x its loss with c (an unassigned client compares with the root's loss), so "
                    "that noise does not shuffle clients between equally good clusters")
    onboard: Literal["probe", "loss"] = Field(
        default="probe",
        description="how a late client is assigned while serving: 'probe' (it trains a probe from the final root "
                    "and joins the cluster whose members' probes are most similar, method.md section 5) or 'loss' "
                    "(it reports the loss of the root and of every cluster adapter on its own training data, "
                    "forward passes only, and joins the lowest unless the root is not clearly worse "
                    "(refine_margin): then it fits no cluster and is served root + its own leaf)")
    refine_new_cluster: int = Field(
        default=0, ge=0, le=MAX_MANUAL_ASSIGNMENT,
        description="refinement: when at least this many clients fit no cluster (no cluster's loss is below the "
                    "root's) and more cluster rounds follow, they form a new cluster, started from the root (the "
                    "model that served them best), trained by the next cluster rounds and offered to every client "
                    "at the next refinement; 0: they stay unassigned")

    @model_validator(mode="after")
    def _check(self) -> "Clustering":
        if self.k_max < self.k_min:
            raise ValueError("k_max must be >= k_min")
        if self.algorithm == "manual":
            if not self.assignment:
                raise ValueError("algorithm 'manual' needs an assignment: {client name: cluster label}")
            if len(self.assignment) > MAX_MANUAL_ASSIGNMENT:
                raise ValueError(f"assignment names {len(self.assignment)} clients; at most {MAX_MANUAL_ASSIGNMENT}")
            bad = sorted(name for name, label in self.assignment.items()
                         if not 0 <= label <= MAX_MANUAL_ASSIGNMENT or not 1 <= len(name) <= 200)
            if bad:
                raise ValueError(f"assignment: labels must be integers 0..{MAX_MANUAL_ASSIGNMENT} and names 1-200 "
                                 f"characters; not so for {bad[:5]}")
        elif self.assignment is not None:
            raise ValueError(f"assignment is only for algorithm 'manual' (this one is {self.algorithm!r})")
        return self


class Backbone(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(max_length=200, description="timm model name, e.g. 'vit_base_patch16_224' or 'vit_tiny_digits'")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the safetensors checkpoint blob")

    @field_validator("model_kwargs")
    @classmethod
    def _plain_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:  # NaN or Infinity would be stored, and PostgreSQL's JSON refuses them
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"model_kwargs must be plain JSON with finite numbers: {exc}") from None
        if len(text) > MAX_MODEL_KWARGS_BYTES:
            raise ValueError(f"model_kwargs is {len(text)} bytes of JSON; at most {MAX_MODEL_KWARGS_BYTES}")
        if _json_depth(value) > MAX_MODEL_KWARGS_DEPTH:
            raise ValueError(f"model_kwargs nests deeper than {MAX_MODEL_KWARGS_DEPTH} levels")
        return value


MAX_CLASSES = 100_000
MAX_CLASS_NAME = 200


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200)
    backbone: Backbone
    manifest: AdapterManifest
    root: TierPolicy = Field(default_factory=TierPolicy)
    cluster: TierPolicy = Field(default_factory=TierPolicy)
    leaf: TierPolicy = Field(default_factory=_leaf_default)
    schedule: Schedule = Field(default_factory=Schedule)
    training: Training = Field(default_factory=Training)
    clustering: Clustering = Field(default_factory=Clustering)
    preprocessing: Preprocessing | None = Field(
        default=None,
        description="the backbone's own image preprocessing (shared/preprocess.py), resolved when the federation "
                    "is created: input size, interpolation, crop and per-channel mean/std; every worker and "
                    "hilora predict prepare images with it (protocol 6). null: images as the data loader makes "
                    "them, in [0, 1], no normalisation (the demo backbone's pipeline)")
    classes: list[str] | None = Field(
        default=None, max_length=MAX_CLASSES,
        description="the federation's label space: class names in label order (label i is classes[i]), one per "
                    "output of the model's head. Every worker maps its clients' data to it by name and refuses "
                    "to start on a class it does not list or on data with no class in common (protocol 6). "
                    "Needed for ImageFolder data, whose class folders differ between sites; built-in datasets "
                    "(digits, mnist5k, cifar100, domainnet) carry their own list and may leave it null")

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("classes must name at least one class (or be null)")
        for i, name in enumerate(value):
            if not name or name != name.strip() or len(name) > MAX_CLASS_NAME or any(ord(ch) < 32 for ch in name):
                raise ValueError(f"classes[{i}] {name[:60]!r}: a class name is 1 to {MAX_CLASS_NAME} printable "
                                 f"characters without surrounding spaces")
        seen: dict[str, int] = {}
        for i, name in enumerate(value):
            if name in seen:
                raise ValueError(f"classes[{i}] {name!r} repeats classes[{seen[name]}]: class names are unique")
            seen[name] = i
        return value

    @model_validator(mode="after")
    def _check(self) -> "FederationConfig":
        if self.classes is not None and len(self.classes) != self.manifest.head.num_classes:
            raise ValueError(f"classes names {len(self.classes)} classes but the model's head has "
                             f"{self.manifest.head.num_classes} outputs: give one name per output (the head's size "
                             f"comes from the backbone, e.g. model_kwargs num_classes)")
        if self.leaf.head != "local" or {self.leaf.A, self.leaf.B} - {"local", "frozen"} or self.leaf.A != self.leaf.B:
            raise ValueError("the leaf tier is always local: its factors never leave the client; its A and B are "
                             "both 'local' (a personal LoRA and head) or both 'frozen' (a personal head only)")
        if self.clustering.algorithm == "lsac-paper" and self.cluster.enabled:
            if self.root.B != "aggregate":
                raise ValueError("clustering.algorithm 'lsac-paper' clusters on the clients' root-stage B, "
                                 "which they upload only when root.B is 'aggregate'")
            if self.schedule.root_rounds < 1:
                raise ValueError("clustering.algorithm 'lsac-paper' needs schedule.root_rounds >= 1: its "
                                 "features are built during the root rounds")
        c = self.clustering
        if self.cluster.enabled and c.algorithm != "lsac" and self.schedule.min_clients > c.approximate_above:
            raise ValueError(approximate_refusal(c.algorithm, self.schedule.min_clients, c.approximate_above))
        if self.clustering.refine_rounds > self.schedule.cluster_rounds:
            raise ValueError(f"clustering.refine_rounds ({self.clustering.refine_rounds}) must be at most "
                             f"schedule.cluster_rounds ({self.schedule.cluster_rounds}): a refinement follows a "
                             f"cluster round")
        return self

    def tier_policy(self, tier: str) -> TierPolicy:
        return {"root": self.root, "cluster": self.cluster, "leaf": self.leaf}[tier]
