"""The partition family (hilora/bench/family.py): its fixed design covers every level the issue
names, every cell is a valid partition, the targets are checked as written, and a family run
resumes from the result files it finds."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from hilora.bench.family import (
    CORE,
    FAMILIES,
    FamilyCell,
    family_cells,
    family_report,
    format_family,
    result_path,
    targets,
)
from worker.data import parse_partition, partition_clients

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_core_design_covers_every_level():
    structured = [c for c in CORE if c.structured]
    flat = [c for c in CORE if not c.structured]
    assert len(structured) == 16 and len(flat) == 3
    assert Counter(c.train for c in structured) == {20: 4, 30: 4, 50: 4, 160: 4}
    assert {c.kind for c in structured} == {"perm", "rot", "inv", "subset", "mix"}
    assert {c.alpha for c in structured} == {0.3, 1.0, None}
    equal = [c for c in structured if len(set(c.sizes)) == 1]
    assert 0 < len(equal) < len(structured)
    sizes = [s for c in structured for s in c.sizes]
    assert min(sizes) == 2 and max(sizes) == 15
    assert all(c.kind == "none" and len(c.sizes) == 1 for c in flat)
    assert len({c.name for c in CORE}) == len(CORE)


@pytest.mark.parametrize("cell", [c for cells in FAMILIES.values() for c in cells], ids=lambda c: c.name)
def test_every_cell_is_a_valid_partition(cell):
    spec = parse_partition(cell.partition(seed=3))
    assert spec.seed == 3 and spec.dataset == "mnist5k" and spec.train_per_client == cell.train
    clients = partition_clients(spec)
    assert len(clients) == cell.clients and not any(c.unseen for c in clients)
    assert Counter(c.group for c in clients) == {g.name: n for g, n in zip(spec.groups, cell.sizes)}


def test_cell_names_say_what_they_hold():
    assert FamilyCell(30, "perm", (15, 15, 15, 15), 0.3).name == "n30-perm-4x15-d03"
    assert FamilyCell(20, "rot", (3, 6, 10), None).name == "n20-rot-3-6-10-uni"
    with pytest.raises(ValueError, match="only 2 groups"):
        FamilyCell(20, "inv", (2, 2, 2), None).partition()


def test_family_cells_refuses_unknown_names():
    assert [c.name for c in family_cells("core", ["n30-inv-4-12-d1"])] == ["n30-inv-4-12-d1"]
    with pytest.raises(ValueError, match="unknown family 'big'"):
        family_cells("big")
    with pytest.raises(ValueError, match="no cell 'n1-perm'"):
        family_cells("core", ["n1-perm"])


def _entry(mean, p10=None, k=None, ari=None, tiers=None, seeds=1):
    entry = {"mean": mean, "p10": mean - 0.1 if p10 is None else p10, "tiers": tiers or {"root": mean}}
    if k is not None:
        entry.update(k=k, ari=ari, k_per_seed=[k] * seeds, ari_per_seed=[ari] * seeds)
    return entry


def test_targets_flag_the_cells_that_miss():
    small = FamilyCell(30, "perm", (4, 4), None)        # <= 50 images, groups >= 4
    big = FamilyCell(160, "rot", (2, 6), None)
    none = FamilyCell(30, "none", (8,), None)
    tiers_ok = {"root": 0.5, "cluster": 0.8, "leaf": 0.85}
    flat = {b: _entry(0.60) for b in ("fedit", "flexlora", "fedsa", "ffa")}
    table = {
        small.name: {"hilora": _entry(0.85, 0.75, 2, 1.0, tiers_ok), "oracle": _entry(0.855, 0.75, 2, 1.0),
                     "local": _entry(0.70, 0.60), **flat},
        big.name: {"hilora": _entry(0.80, 0.70, 1, 0.0, {"root": 0.6, "cluster": 0.7, "leaf": 0.65}),
                   "oracle": _entry(0.83, 0.73, 2, 1.0), "local": _entry(0.815, 0.70)},
        none.name: {"hilora": _entry(0.8, 0.7, 2, 0.0, tiers_ok), "local": _entry(0.8, 0.7)},
    }
    checks = targets([small, big, none], table)
    assert checks["ari>=0.9 (>=30 images)"] == {"checked": 2, "missed": [big.name], "met": False}
    assert checks["K=1 (no structure)"] == {"checked": 1, "missed": [none.name], "met": False}
    assert checks["within 1 point of oracle"]["missed"] == [big.name]
    assert checks["+3 over best flat (<=50 images, groups >=4)"] == {"checked": 1, "missed": [], "met": True}
    assert checks["+3 over local where oracle leads by 4"] == {"checked": 1, "missed": [], "met": True}
    assert checks["never >1 point below local"]["missed"] == [big.name]
    assert checks["root <= +cluster <= +leaf"]["missed"] == [big.name]
    table[small.name]["hilora"]["p10"] = 0.52    # mean ahead, p10 not 3 points ahead of the best flat
    assert targets([small], table)["+3 over best flat (<=50 images, groups >=4)"]["missed"] == [small.name]


def test_report_reads_the_result_files(tmp_path):
    cell = FAMILIES["smoke"][0]
    for seed, mean in ((0, 0.8), (1, 0.9)):
        path = result_path(tmp_path, cell.name, seed, "local")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"method": "local", "seed": seed, "final": {"mean": mean, "p10": mean - 0.2},
                                    "tiers": {"root": {"mean": mean}}, "seconds": {"total": 2.0},
                                    "clustering": None}))
    report = family_report(tmp_path, "smoke", ["local", "hilora"], [0, 1])
    entry = report["table"][cell.name]["local"]
    assert entry["mean"] == pytest.approx(0.85) and entry["p10"] == pytest.approx(0.65)
    assert entry["seeds"] == [0, 1] and report["complete"] == 2 and report["expected"] == 8
    text = format_family(report)
    assert f"| {cell.name} | 85.0 / 65.0 |  |" in text and "2 of 8 runs present" in text


def test_a_results_folder_accepts_options_added_since_at_their_defaults(tmp_path):
    from dataclasses import replace

    from hilora.bench.family import run_settings, settings_to_record
    from hilora.options import RunOptions

    recorded = tmp_path / "settings.json"
    now = run_settings(RunOptions(), "core")
    assert settings_to_record(recorded, now, "core") == now  # a new folder keeps what it is given
    old = {k: v for k, v in now.items() if k not in ("clip_relative", "silhouette_tolerance")}  # an older hilora
    recorded.write_text(json.dumps(old))
    assert settings_to_record(recorded, now, "core") == now
    with pytest.raises(ValueError, match=r"other settings \(silhouette_tolerance"):
        settings_to_record(recorded, run_settings(replace(RunOptions(), silhouette_tolerance=0.1), "core"), "core")
    with pytest.raises(ValueError, match=r"other settings \(probe_loss"):
        settings_to_record(recorded, run_settings(replace(RunOptions(), probe_loss="ce"), "core"), "core")


@pytest.mark.parametrize(("key", "before"), [("partitions", "spectral"), ("leaf_bias_fit", 0.0),
                                             ("skip_single_cluster", False), ("leaf_bias_fit_skewed", 0.0),
                                             ("leaf_mix", 1.0)])
def test_a_folder_from_before_an_option_existed_ran_what_hilora_did_then(tmp_path, key, before):
    """clustering.partitions and training.leaf_bias_fit came in with defaults that are not what older
    runs did: a results folder recorded without one is read as having run the value before it
    ('spectral'; 0, no fitted bias), so today's default does not resume into it."""
    from dataclasses import replace

    from hilora.bench.family import run_settings, settings_to_record
    from hilora.options import VALUE_BEFORE_IT_EXISTED, RunOptions

    assert VALUE_BEFORE_IT_EXISTED[key] == before != getattr(RunOptions(), key)
    recorded = tmp_path / "settings.json"
    older = replace(RunOptions(), **{key: before})
    recorded.write_text(json.dumps({k: v for k, v in run_settings(older, "core").items() if k != key}))
    assert settings_to_record(recorded, run_settings(older, "core"), "core")[key] == before
    with pytest.raises(ValueError, match=rf"other settings \({key}: \{{'{key}': {before!r}\}}\)"):
        settings_to_record(recorded, run_settings(RunOptions(), "core"), "core")
