"""A living federation over real HTTP with real worker processes (issue 16): three cycles while the
population changes. Cycle 0 trains two planted groups; then one client leaves (its worker stops),
a new latent group of three arrives and its arrival starts cycle 1 by itself
(``cycle_min_new_clients``); the absent client's rounds end at their automatic deadline and it is
marked inactive; it comes back and an admin asks for cycle 2 (``hilora admin cycle``). Throughout,
every client that ever had a model keeps one (root + its cluster, its leaf on its worker); at the
end the new group has its own cluster, the returning client is back in its group's, and every
cluster is trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hilora.launcher import LocalCluster, wait_for
from worker.client import CoordinatorClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

GROUPS = {"upright": 4, "perm-a": 4, "perm-b": 4}


@pytest.fixture(scope="module")
def demo_backbone():
    from worker.backbone import pretrain_demo_backbone

    return pretrain_demo_backbone()


def _partition(path: Path) -> Path:
    seeds = {"perm-a": 1, "perm-b": 2}
    path.write_text(json.dumps({
        "name": "living", "dataset": "digits", "seed": 0, "train_per_client": 60, "test_per_client": 30,
        "dirichlet_alpha": 1.0, "unseen_fraction": 0.0,
        "groups": [{"name": g, "clients": n,
                    "transforms": [{"kind": "permute_labels", "seed": seeds[g]}] if g in seeds else []}
                   for g, n in GROUPS.items()]}))
    return path


def _federation_file() -> dict:
    from worker.backbone import DEMO_BACKBONE_KWARGS, DEMO_BACKBONE_MODEL

    return {"name": "living", "backbone": {"model": DEMO_BACKBONE_MODEL, "model_kwargs": DEMO_BACKBONE_KWARGS,
                                           "checkpoint": "demo"},
            "adapter": {"rank": 4},
            # short leases so that the automatic deadline (lease x (attempts + 1)) cuts an absent
            # client's tasks after 12 s; the deadline itself stays the default, "auto"
            "schedule": {"min_clients": 8, "root_rounds": 2, "cluster_rounds": 2, "leaf_rounds": 1,
                         "unseen_leaf_rounds": 1, "local_epochs": 2, "probe_epochs": 2, "lease_seconds": 6,
                         "max_attempts": 1, "retry_after_seconds": 0.25, "max_consecutive_failures": 2,
                         "cycle_min_new_clients": 4},
            "training": {"head_lr": 3e-2},
            "clustering": {"knn": 2, "k_max": 4}}


class Watch:
    """Polls the coordinator as admin and as each client (with the token its worker saved): every
    client that has had a leaf keeps a root, a cluster (unless it fits none) and its leaf file."""

    def __init__(self, cluster: LocalCluster, http: CoordinatorClient, fid: int):
        self.cluster, self.http, self.fid = cluster, http, fid
        self.state = cluster.workdir / "state" / f"federation-{fid}"
        self.checks = 0
        self.problems: list[str] = []
        self.served: set[str] = set()

    def admin(self, path: str):
        return self.http.request("GET", path, self.cluster.admin_token).json()

    def clients(self) -> dict[str, dict]:
        return {c["name"]: c for c in self.admin(f"/v1/federations/{self.fid}/clients")}

    def status(self) -> dict:
        return self.admin(f"/v1/federations/{self.fid}")

    def __call__(self) -> None:
        self.cluster.check_workers()
        table = self.clients()
        for folder in sorted(self.state.glob("*")) if self.state.exists() else []:
            name = folder.name
            if not (folder / "leaf.safetensors").exists() and name not in self.served:
                continue
            self.served.add(name)
            creds = json.loads((folder / "credentials.json").read_text())
            adapters = self.http.client_adapters(creds["client_id"], creds["token"])
            self.checks += 1
            row = table[name]
            if adapters.root is None or (adapters.cluster is None and not row["unassigned"]) \
                    or not (folder / "leaf.safetensors").exists():
                self.problems.append(f"{name}: root {adapters.root}, cluster {adapters.cluster}, "
                                     f"row {row}, leaf file {(folder / 'leaf.safetensors').exists()}")

    def settled(self, cycle: int) -> bool:
        self()
        s = self.status()
        return (s["state"] == "serving" and s["cycle"] == cycle and s["onboarding_pending"] == 0
                and all(r["status"] != "open" for r in s["rounds"]))


def _groups_of(clusters: list[dict]) -> list[list[str]]:
    return sorted(sorted(c["members"]) for c in clusters if c["members"])


def _planted(names) -> list[list[str]]:
    by = {}
    for n in names:
        by.setdefault(n.rsplit("-", 1)[0], []).append(n)
    return sorted(sorted(v) for v in by.values())


def test_three_cycles_while_clients_join_leave_and_come_back(tmp_path, demo_backbone):
    from hilora.federation_file import FederationFile, build_federation_config

    partition = str(_partition(tmp_path / "living.json"))
    names = {g: [f"{g}-{i:02d}" for i in range(n)] for g, n in GROUPS.items()}
    hosted = lambda *ns: {"clients": [{"name": n, "data": {"partition": partition, "client": n}} for n in ns]}  # noqa: E731
    config, checkpoint = build_federation_config(FederationFile.model_validate(_federation_file()))
    cluster = LocalCluster(tmp_path / "run")
    leaver = names["perm-a"][3]
    try:
        cluster.start_coordinator()
        with CoordinatorClient(cluster.url) as http:
            http.put_blob(cluster.admin_token, checkpoint)
            created = http.create_federation(cluster.admin_token, config)
            fid = created.federation_id
            join = {"federation_id": fid, "enrollment_secret": created.enrollment_secret}
            workers = {"w0": hosted(*names["upright"]), "w1": hosted(*names["perm-a"][:3]), "wl": hosted(leaver)}
            procs = {w: cluster.start_worker(w, {**join, **spec}, exit_when_idle=False, max_seconds=560)
                     for w, spec in workers.items()}
            watch = Watch(cluster, http, fid)

            # cycle 0: the two planted groups, each its own cluster
            assert wait_for(lambda: watch.settled(0), 200, interval=1.0), cluster.tail("w0.log")
            first = watch.status()
            assert _groups_of(first["clusters"]) == _planted(names["upright"] + names["perm-a"])

            # one client leaves (its worker stops, with nothing leased); a new group arrives and its
            # third client starts cycle 1
            procs["wl"].terminate()
            assert procs["wl"].wait(timeout=30) == 0
            procs["w2"] = cluster.start_worker("w2", {**join, **hosted(*names["perm-b"])}, exit_when_idle=False,
                                               max_seconds=560)
            assert wait_for(lambda: watch.status()["cycle"] == 1, 120, interval=1.0, on_tick=watch), \
                cluster.tail("w2.log")
            assert wait_for(lambda: watch.settled(1), 240, interval=1.0), cluster.tail("coordinator.log")
            table = watch.clients()
            # the absent client missed its rounds and is inactive; nobody else is
            assert table[leaver]["inactive_since"] is not None and table[leaver]["missed_rounds"] >= 2
            assert all(row["inactive_since"] is None for n, row in table.items() if n != leaver)
            present = [n for g in names.values() for n in g if n != leaver]
            second = watch.status()

            # it comes back (the same state directory: the same client), and an admin asks for cycle 2
            procs["wl2"] = cluster.start_worker("wl2", {**join, **hosted(leaver)}, exit_when_idle=False,
                                                max_seconds=400)
            assert wait_for(lambda: watch.clients()[leaver]["inactive_since"] is None, 60, interval=0.5,
                            on_tick=watch), cluster.tail("wl2.log")
            cli = subprocess.run(
                [sys.executable, "-m", "hilora.cli", "admin", "cycle", "--coordinator", cluster.url,
                 "--admin-token", cluster.admin_token, "--federation", str(fid), "--reason", "a client is back"],
                env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0, cli.stdout + cli.stderr
            assert wait_for(lambda: watch.settled(2), 240, interval=1.0), cluster.tail("coordinator.log")

            final = watch.status()
            runs = http.request("GET", f"/v1/federations/{fid}/clustering-runs", cluster.admin_token).json()
            report = http.federation_report(cluster.admin_token, fid)
            audit = [e for e in http.request("GET", f"/v1/federations/{fid}/audit", cluster.admin_token).json()
                     if e["action"] == "cycle_start"]
        # the new group has its own cluster, and the returning client is back with its group
        why = [(r["cycle"], r["k"], r["eigengaps"]) for r in runs]
        # cycle 1 gave the new group a cluster of its own; the absent client stayed with its group
        assert _groups_of(second["clusters"]) == _planted(present + [leaver]), why
        # stable ids: the two first groups keep the labels cycle 0 gave them
        label_of = lambda s, n: next(c["label"] for c in s["clusters"] if n in c["members"])  # noqa: E731
        for n in (names["upright"][0], names["perm-a"][0]):
            assert label_of(first, n) == label_of(second, n) == label_of(final, n)
        assert _groups_of(final["clusters"]) == _planted(present + [leaver]), why
        assert sorted(e["detail"]["trigger"] for e in audit) == ["admin", "arrivals"]
        # every cluster that exists is trained; the new group's one in the cycles it existed
        assert all(c["adapter_version"] >= 1 for c in final["clusters"])
        # each cycle evaluated everyone present; the last one everyone, with real accuracies
        evals = {}
        for r in report.rounds:
            if r.stage == "eval":
                evals.setdefault(r.cycle, 0)
                evals[r.cycle] += r.tasks_done
        assert evals.get(1) == len(present) and evals.get(2) == len(present) + 1
        assert {r.cycle for r in report.rounds} == {0, 1, 2}
        for c in report.clients:
            assert 0.0 <= c.metrics["acc_leaf"] <= 1.0 and c.cluster_label is not None
        # nobody was ever without a model: checked at every poll, for every client that had one
        assert watch.problems == [] and watch.checks > 50
        assert watch.served == set(present) | {leaver}
    finally:
        cluster.stop()
