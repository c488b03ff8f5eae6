"""``Clustering.algorithm`` and ``Clustering.ema`` (shared/config.py): defaults, refusals, and the
federation-level checks lsac-paper needs."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from shared.config import Clustering, FederationConfig
from shared.manifest import qv_targets

DIM, RANK = 8, 2


def federation(**overrides) -> dict:
    config = {
        "name": "fed",
        "backbone": {"model": "vit_tiny_patch16_224", "model_kwargs": {}, "sha256": "0" * 64},
        "manifest": {"targets": [t.model_dump() for t in qv_targets(2, DIM)],
                     "tiers": {t: {"rank": RANK, "alpha": RANK} for t in ("root", "cluster", "leaf")},
                     "head": {"in_features": DIM, "num_classes": 3}},
    }
    config.update(overrides)
    return config


def test_defaults_are_lsac_with_ema_0_9():
    c = Clustering()
    assert c.algorithm == "lsac" and c.ema == 0.9
    assert FederationConfig.model_validate(federation()).clustering.algorithm == "lsac"


@pytest.mark.parametrize("algorithm", ["lsac", "kmeans-flat", "lsac-paper"])
def test_every_algorithm_is_accepted_and_features_are_kept_as_given(algorithm):
    c = Clustering(algorithm=algorithm, features="update", ema=0.5)
    assert (c.algorithm, c.features, c.ema) == (algorithm, "update", 0.5)
    cfg = FederationConfig.model_validate(federation(clustering={"algorithm": algorithm, "features": "subspace"}))
    assert (cfg.clustering.algorithm, cfg.clustering.features) == (algorithm, "subspace")
    assert Clustering.model_validate(c.model_dump()) == c  # round trip through JSON-able data


def test_an_unknown_algorithm_is_refused_naming_the_choices():
    with pytest.raises(ValidationError) as err:
        Clustering(algorithm="spectral")
    text = str(err.value)
    assert "algorithm" in text and "'lsac'" in text and "'kmeans-flat'" in text and "'lsac-paper'" in text


@pytest.mark.parametrize("ema", [1.0, 1.5, -0.01, float("nan"), float("inf"), "often"])
def test_ema_outside_0_to_1_is_refused(ema):
    with pytest.raises(ValidationError) as err:
        Clustering(ema=ema)
    assert "ema" in str(err.value)


@pytest.mark.parametrize("ema", [0.0, 0.5, 0.999])
def test_ema_in_0_to_1_is_accepted(ema):
    assert Clustering(ema=ema).ema == ema


def test_lsac_paper_needs_root_b_uploaded_and_a_root_round():
    with pytest.raises(ValidationError, match="root.B is 'aggregate'"):
        FederationConfig.model_validate(federation(
            clustering={"algorithm": "lsac-paper"}, root={"B": "local", "aggregation": "factor_avg"}))
    with pytest.raises(ValidationError, match="root_rounds >= 1"):
        FederationConfig.model_validate(federation(clustering={"algorithm": "lsac-paper"},
                                                   schedule={"root_rounds": 0}))
    # the same settings are fine for the other algorithms, and for a federation without clusters
    for algorithm in ("lsac", "kmeans-flat"):
        FederationConfig.model_validate(federation(
            clustering={"algorithm": algorithm}, root={"B": "local", "aggregation": "factor_avg"}))
    FederationConfig.model_validate(federation(
        clustering={"algorithm": "lsac-paper"}, root={"B": "local", "aggregation": "factor_avg"},
        cluster={"enabled": False}))


def test_the_field_descriptions_document_the_algorithms():
    fields = Clustering.model_fields
    for word in ("lsac", "kmeans-flat", "lsac-paper"):
        assert word in fields["algorithm"].description
    assert "lambda" in fields["ema"].description


def test_manual_labels_keep_the_named_and_place_the_rest_by_mean_similarity():
    from shared.subspace import manual_labels

    names = ["a", "b", "c", "d", "e"]
    similarity = np.array([[1.0, 0.9, 0.1, 0.2, 0.8],
                           [0.9, 1.0, 0.2, 0.1, 0.7],
                           [0.1, 0.2, 1.0, 0.9, 0.3],
                           [0.2, 0.1, 0.9, 1.0, 0.4],
                           [0.8, 0.7, 0.3, 0.4, 1.0]])
    labels = manual_labels(names, {"a": 3, "b": 3, "c": 8, "zz": 1}, similarity)
    # slow reference: d and e join the named cluster of highest mean similarity to its named members
    expected = []
    for i, n in enumerate(names):
        given = {"a": 3, "b": 3, "c": 8}.get(n)
        if given is None:
            means = {lab: np.mean([similarity[i, j] for j, m in enumerate(names) if {"a": 3, "b": 3, "c": 8}.get(m) == lab])
                     for lab in (3, 8)}
            given = max(means, key=means.get)
        expected.append(given)
    assert labels.tolist() == expected == [3, 3, 8, 8, 3]
    # nobody named: everyone gets the smallest label given
    assert manual_labels(["x", "y"], {"a": 4, "b": 2}, np.eye(2)).tolist() == [2, 2]
    with pytest.raises(ValueError, match="non-empty"):
        manual_labels(["x"], {}, np.eye(1))


def test_manual_clustering_needs_its_assignment_and_only_it_takes_one():
    ok = Clustering(algorithm="manual", assignment={"site-a": 0, "site-b": 1})
    assert ok.assignment == {"site-a": 0, "site-b": 1}
    for bad, message in (({"algorithm": "manual"}, "needs an assignment"),
                         ({"algorithm": "manual", "assignment": {"a": -2}}, "labels must be integers"),
                         ({"algorithm": "manual", "assignment": {"": 0}}, "names 1-200"),
                         ({"algorithm": "lsac", "assignment": {"a": 0}}, "only for algorithm 'manual'")):
        with pytest.raises(ValidationError, match=message):
            Clustering.model_validate(bad)


def test_the_leaf_trains_a_personal_lora_and_head_or_a_personal_head_only():
    assert FederationConfig.model_validate(federation()).leaf.trained_factors() == ("A", "B", "head")
    head_only = FederationConfig.model_validate(federation(leaf={"A": "frozen", "B": "frozen", "head": "local"}))
    assert head_only.leaf.trained_factors() == ("head",) and head_only.leaf.uploaded_factors() == ()
    for leaf in ({"A": "aggregate", "B": "aggregate", "head": "local"}, {"A": "local", "B": "local", "head": "aggregate"},
                 {"A": "frozen", "B": "local", "head": "local"}):
        with pytest.raises(ValidationError, match="leaf tier is always local"):
            FederationConfig.model_validate(federation(leaf=leaf))


@pytest.mark.parametrize("fraction", [-0.1, 0.6])
def test_a_validation_fraction_outside_0_to_half_is_refused(fraction):
    with pytest.raises(ValidationError, match="validation_fraction"):
        FederationConfig.model_validate(federation(training={"validation_fraction": fraction}))


def test_k_rule_and_min_silhouette_are_checked():
    assert Clustering().k_rule == "silhouette" and Clustering(k_rule="eigengap").min_silhouette == 0.15
    # chosen on the family (issue 14): a class-balanced probe, spectral and average-linkage partitions
    assert Clustering().probe_loss == "balanced" and Clustering().partitions == "spectral+linkage"
    assert Clustering(partitions="spectral").partitions == "spectral"
    for bad in ({"k_rule": "gap"}, {"min_silhouette": 1.5}, {"min_silhouette": -2}, {"silhouette_tolerance": -0.1},
                {"silhouette_tolerance": 1.5}, {"partitions": "average"}):
        with pytest.raises(ValidationError):
            Clustering.model_validate(bad)


def test_alone_epochs_needs_a_validation_part():
    from shared.config import Training

    assert Training().alone_epochs == 0
    assert Training(alone_epochs=18, validation_fraction=0.2).alone_epochs == 18
    with pytest.raises(ValueError, match="needs training.validation_fraction"):
        Training(alone_epochs=18)
    with pytest.raises(ValueError):
        Training(alone_epochs=-1, validation_fraction=0.2)


def test_leaf_bias_fit_is_a_bounded_prior_width():
    from shared.config import Training

    assert Training(leaf_bias_fit=2.5).leaf_bias_fit == 2.5 and Training(leaf_bias_fit=0).leaf_bias_fit == 0
    for bad in (-0.5, 101, float("nan"), float("inf"), "wide"):
        with pytest.raises(ValueError, match="leaf_bias_fit"):
            Training(leaf_bias_fit=bad)


def test_leaf_bias_fit_skewed_is_a_bounded_prior_width():
    from shared.config import Training

    assert Training().leaf_bias_fit_skewed == 4.0
    assert Training(leaf_bias_fit_skewed=0).leaf_bias_fit_skewed == 0
    assert Training(leaf_bias_fit_skewed=2.5).leaf_bias_fit_skewed == 2.5
    for bad in (-0.5, 101, float("nan"), float("inf"), "wide"):
        with pytest.raises(ValueError, match="leaf_bias_fit_skewed"):
            Training(leaf_bias_fit_skewed=bad)


def test_leaf_mix_is_a_fraction_above_zero():
    from shared.config import Training

    assert Training().leaf_mix == 0.5
    assert Training(leaf_mix=1).leaf_mix == 1.0
    assert Training(leaf_mix=0.01).leaf_mix == 0.01
    for bad in (0, -0.5, 1.01, float("nan"), float("inf"), "half"):
        with pytest.raises(ValueError, match="leaf_mix"):
            Training(leaf_mix=bad)


def test_a_single_cluster_found_is_skipped_by_default_and_the_option_is_a_boolean():
    assert Clustering().skip_single_cluster is True
    assert Clustering(skip_single_cluster=False).skip_single_cluster is False
    with pytest.raises(ValueError, match="skip_single_cluster"):
        Clustering(skip_single_cluster="sometimes")
