"""``Clustering.algorithm`` and ``Clustering.ema`` (shared/config.py): defaults, refusals, and the
federation-level checks lsac-paper needs."""

from __future__ import annotations

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
