"""Smoke run of ``bench/fedit_rounds.py --quick``: a real coordinator and two real worker processes
train the 18-client FedIT federation for 3 rounds, and the bench reads every round's wall time,
compute floor and overhead split back from the coordinator's database. No timing gates (the
numbers are in docs/benchmarks.md, "Round overhead"): the values must be real and consistent."""

from __future__ import annotations

import json
import math

import pytest

from support import run_bench_script

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

def test_quick_fedit_rounds_bench(tmp_path):
    out = run_bench_script("fedit_rounds.py", "--quick", "--json", "--workdir", str(tmp_path / "run"),
                           "--evaluate-every", "2", "--timeout", "240", timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    res = json.loads(out.stdout)

    clients, workers, rounds = 18, 2, 3
    assert res["options"]["clients"] == clients and res["options"]["workers"] == workers
    assert res["options"]["long_poll"] == 20 and res["options"]["rank"] == 8 and res["options"]["local_epochs"] == 2
    assert res["options"]["evaluate_every"] == 2
    fed = res["federation"]
    assert fed["root_rounds"] == rounds and fed["root_rounds_done"] == rounds      # every round closed
    assert fed["root_tasks"] == fed["root_tasks_done"] == clients * rounds
    assert fed["eval_round_wall"] is not None and fed["eval_round_wall"] > 0       # the final evaluation ran

    assert [r["round"] for r in res["rounds"]] == list(range(1, rounds + 1))
    for r in res["rounds"]:
        assert r["tasks_done"] == r["tasks"] == clients
        assert sum(r["tasks_per_worker"].values()) == clients
        assert r["wall"] > 0 and r["floor"] > 0 and math.isfinite(r["ratio"])
        # a round cannot be shorter than its training spread perfectly over the workers
        assert r["ratio"] > 1 / workers
        # the split adds up to the round's wall time (each worker's timeline, averaged)
        assert r["split_sum"] == pytest.approx(r["wall"], rel=1e-6, abs=1e-6)
        assert r["per_task_median"]["time_compute"] > 0 and r["per_task_median"]["upload_bytes"] > 0
        # schedule.evaluate_every 2: the received root is evaluated in rounds 1 and 3, not in round 2
        assert (r["split"]["eval"] > 0) is (r["round"] != 2), r["split"]

    assert res["rounds_measured"] == [2, 3]                      # round 1 (worker start-up) left out
    assert res["median_floor"] > 0 and res["median_wall"] > 0
    assert math.isfinite(res["ratio"]) and res["ratio"] > 1 / workers
    assert res["ratio"] == pytest.approx(res["median_wall"] / res["median_floor"])
    assert res["target_met"] == (res["median_wall"] <= 1.1 * res["median_floor"])
    cpu = res["cpu_during_measured_rounds"]
    assert cpu["cores"]["coordinator"] > 0 and cpu["workers_cores"] > 0
    assert cpu["load_1min"]["max"] >= cpu["load_1min"]["min"] >= 0
    assert (tmp_path / "run" / "coordinator.db").is_file()          # --workdir keeps the run
