"""Round overhead of a real FedIT federation (issue 18): how much of a round is training, and where
the rest goes.

    python bench/fedit_rounds.py                      # 18 clients, 2 workers, 10 rounds, --long-poll 20
    python bench/fedit_rounds.py --long-poll 0        # the worker sleeps retry_after between polls
    python bench/fedit_rounds.py --quick --json       # 3 rounds (the smoke test)
    python bench/fedit_rounds.py --no-background-reports   # each task reported before the next lease
    python bench/fedit_rounds.py --evaluate-every 5   # the received root evaluated in rounds 1 and 6 only

The federation is what ``hilora bench -m fedit --transport http`` runs (``hilora.bench``'s own
``prepare`` and ``method_config``: the cached demo ViT, FedIT's factor-averaged root, the demo's
training settings), at rank 8 with 2 local epochs, on the built-in ``demo`` digits partition with
no client held out (3 latent groups of 6: 18 training clients; ``--clients N`` spreads N over the
3 groups). A real ``hilora coordinator`` (uvicorn on 127.0.0.1, SQLite and blobs in a temp folder,
scheduler interval ``--scheduler-interval``, default the product's) and ``--workers`` real
``hilora worker`` processes (``--threads 1``, ``--long-poll S``), the clients dealt round robin
(9 each), registered beforehand by this script (as ``hilora bench`` does) so that training starts
when the workers come up.

After the run it reads the coordinator's database (``coordinator.models``): per root round its
``created_at`` and ``closed_at``, and per task its lease time (``lease_expires_at`` minus the
schedule's ``lease_seconds``: the lease is 600 s and the heartbeat comes every 200 s, so no task
of under a second extends it), its ``finished_at`` (completion), its worker and the phase times the
worker reported with its metrics (``worker.daemon.PhaseTimer``: ``time_data``, ``time_fetch``,
``time_eval``, ``time_compute``, ``time_upload``).

Per round:

- **wall** = closed_at - created_at;
- **floor** = the round's ``time_compute`` (training alone) summed over its tasks / workers;
- **ratio** = wall / floor; the target is <= 1.1.

The split: each worker's timeline from the round's opening to its closing is (its first task's
start - open) + its tasks (start -> completion) + the gaps between them + (close - its last
completion), exactly. A task starts when it is leased, or, when the worker got it while running
another (its held lease requests answer together when a round opens), when that one completed.
Averaged over the workers, wall = floor + the other task phases / workers + ``in_task_other`` (the
part of start -> completion no phase covers: the lease answer, packing the upload, the completion
request) + ``first_lease`` + ``between_tasks`` (completion -> the next lease: the worker's loop and
the lease request) + ``imbalance`` (a worker done before the other) + ``close`` (last completion ->
round closed: the scheduler's wake-up, aggregation, the next round's rows; it can be a few ms
negative, the tick's clock being read before the last completion commits). With background
reports (the worker's default) a task's upload and completion overlap the next task: its
completion comes after the next one started, so the split is that of the serial timeline (a task
starts at the later of its lease and the previous completion) and only wall, floor and ratio
compare directly with ``--no-background-reports``. Components are seconds
per round (means over workers); the result gives them per round and their medians over rounds.

Round 1 includes the workers' start (torch import, model build, first backbone download) and is
reported but left out of the medians (``--include-first`` keeps it). CPU: the coordinator's and
workers' CPU seconds (/proc) and the whole machine's (/proc/stat) over the measured rounds, so the
share other processes on the machine took is in the result too. ``--profile DIR`` attaches
``py-spy record -f raw --idle --nonblocking`` to the coordinator and every worker (DIR/<process>.txt,
collapsed stacks, waiting threads included: wall time, not only CPU; with ``--profile-gil``,
``--gil`` instead: only the thread holding the GIL, where each process's Python CPU goes); a
profiled run is slower and
its numbers are not the reference ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _common import load, machine  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PHASES = ("data", "fetch", "eval", "compute", "upload")
QUICK_ROUNDS = 3


def default_scheduler_interval() -> float:
    """The product's default (``HILORA_SCHEDULER_INTERVAL``, coordinator.settings)."""
    from coordinator.settings import Settings

    return float(Settings.model_fields["scheduler_interval"].default)


# ------------------------------------------------------------------------------ the federation

def write_partition(folder: Path, clients: int) -> Path:
    """The built-in ``demo`` partition with no client held out and ``clients`` spread over its
    groups (18: the demo's 3 groups of 6, the same clients and data), as a partition file."""
    from worker.data import load_partition

    demo = load_partition("demo")
    n = len(demo.groups)
    sizes = [clients // n + (1 if i < clients % n else 0) for i in range(n)]
    groups = [g.model_copy(update={"clients": s}) for g, s in zip(demo.groups, sizes) if s > 0]
    spec = demo.model_copy(update={"name": f"demo-all-{clients}", "unseen_fraction": 0.0, "groups": groups})
    path = folder / f"demo-all-{clients}.json"
    path.write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
    return path


def prepare_federation(partition: Path, rounds: int, rank: int, local_epochs: int, say: Any = None,
                       evaluate_every: int = 1) -> tuple[Any, Any]:
    """``hilora bench``'s set-up (backbone, data, manifest) and FedIT's federation config for it:
    the quick preset's training settings, ``rank``, ``rounds`` root rounds and nothing else
    (``schedule.evaluate_every`` as given)."""
    from hilora.bench.methods import method_config, preset
    from hilora.bench.setup import prepare
    from shared.config import FederationConfig

    opts = replace(preset("quick"), partition=str(partition), rank=rank, local_epochs=local_epochs,
                   root_rounds=rounds, cluster_rounds=0, leaf_rounds=0, threads=1, transport="http")
    setup = prepare(opts, say)
    cfg = method_config("fedit", opts)
    doc = cfg.federation_config(setup.backbone(), setup.manifest, name=f"fedit-rounds-{len(setup.train)}",
                                min_clients=len(setup.train)).model_dump()
    doc["schedule"]["evaluate_every"] = evaluate_every
    return setup, FederationConfig.model_validate(doc)


# ------------------------------------------------------------------------------ processes

def start_worker(cluster: Any, name: str, config: dict, long_poll: float, max_seconds: float,
                 background_reports: bool = True) -> subprocess.Popen:
    """``hilora worker`` as ``LocalCluster.start_worker`` starts it (1 thread, cpu, --exit-when-idle),
    with ``--long-poll``."""
    config_path = cluster.workdir / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=1))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    log = open(cluster.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "hilora.cli", "worker", "--coordinator", cluster.url, "--config", str(config_path),
         "--state-dir", str(cluster.workdir / "state"), "--threads", "1", "--device", "cpu", "--exit-when-idle",
         "--max-seconds", str(max_seconds), "--worker-id", name, "--long-poll", f"{long_poll:g}",
         "--background-reports" if background_reports else "--no-background-reports"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    proc.hilora_name = name  # type: ignore[attr-defined]
    cluster.workers.append(proc)
    return proc


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all cores)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


class Sampler(threading.Thread):
    """Every ``interval`` s: wall clock, load average, the machine's busy CPU seconds and each
    process's CPU seconds (the last value is kept once a process is gone)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="fedit-rounds-sampler")
        self.pids, self.interval = dict(pids), interval
        self.samples: list[dict[str, Any]] = []
        self._stop_event = threading.Event()

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def sample(self) -> None:
        last = self.samples[-1]["cpu"] if self.samples else {}
        cpu = {}
        for name, pid in list(self.pids.items()):
            value = cpu_seconds(pid)
            cpu[name] = value if value is not None else last.get(name, 0.0)
        self.samples.append({"t": time.time(), "load": os.getloadavg()[0], "machine": machine_busy_seconds(),
                             "cpu": cpu})

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.sample()

    def at(self, t: float, key: str, name: str | None = None) -> float:
        """A cumulative value at time ``t``, linearly interpolated between samples."""
        def value(s: dict[str, Any]) -> float:
            return s[key] if name is None else s["cpu"].get(name, 0.0)
        xs = self.samples
        if t <= xs[0]["t"]:
            return value(xs[0])
        for a, b in zip(xs, xs[1:]):
            if a["t"] <= t <= b["t"]:
                f = (t - a["t"]) / max(b["t"] - a["t"], 1e-9)
                return value(a) + f * (value(b) - value(a))
        return value(xs[-1])

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """CPU (in cores: CPU seconds / wall seconds) and load average between two wall times."""
        span = max(t1 - t0, 1e-9)
        ours = {name: (self.at(t1, "cpu", name) - self.at(t0, "cpu", name)) / span for name in self.pids}
        everything = (self.at(t1, "machine") - self.at(t0, "machine")) / span
        loads = [s["load"] for s in self.samples if t0 <= s["t"] <= t1] or [self.samples[-1]["load"]]
        workers = sum(v for k, v in ours.items() if k.startswith("worker"))
        return {"seconds": span, "cores": {k: round(v, 3) for k, v in ours.items()},
                "workers_cores": round(workers, 3), "machine_cores": round(everything, 3),
                "others_cores": round(everything - sum(ours.values()), 3),
                "load_1min": {"min": min(loads), "max": max(loads), "mean": round(statistics.fmean(loads), 2)}}


def start_profiler(out_dir: Path, name: str, pid: int, gil: bool = False) -> subprocess.Popen:
    """py-spy on one process: every thread, waiting included (wall time), or with ``gil`` only the
    thread holding the GIL (where the process's Python CPU goes)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = ["--gil"] if gil else ["--idle"]
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking", *mode,
                             "--rate", "200", "--output", str(out_dir / f"{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=open(out_dir / f"{name}.py-spy.log", "wb"))  # noqa: SIM115


# ------------------------------------------------------------------------------ reading the run

def _federation_done(session_factory: Any, fid: int) -> bool:
    from sqlalchemy import select

    from coordinator.models import Federation, Round
    from shared.states import RoundStatus

    with session_factory() as session:
        state = session.scalar(select(Federation.state).where(Federation.id == fid))
        open_rounds = session.scalars(select(Round.id).where(Round.federation_id == fid,
                                                             Round.status == RoundStatus.open)).all()
    return str(getattr(state, "value", state)) == "serving" and not open_rounds


def read_rounds(session_factory: Any, fid: int, lease_seconds: float) -> tuple[list[dict], list[dict]]:
    """The federation's rounds and tasks as plain dicts (epoch seconds)."""
    from sqlalchemy import select

    from coordinator.models import Round, Task

    with session_factory() as session:
        rounds = session.scalars(select(Round).where(Round.federation_id == fid).order_by(Round.id)).all()
        tasks = session.scalars(select(Task).where(Task.federation_id == fid).order_by(Task.id)).all()
        rounds_out = [{"id": r.id, "stage": str(getattr(r.stage, "value", r.stage)), "number": r.number,
                       "status": str(getattr(r.status, "value", r.status)), "opened": r.created_at.timestamp(),
                       "closed": r.closed_at.timestamp() if r.closed_at else None,
                       "aggregation_seconds": r.aggregation_seconds} for r in rounds]
        tasks_out = [{"id": t.id, "round_id": t.round_id, "stage": str(getattr(t.stage, "value", t.stage)),
                      "status": str(getattr(t.status, "value", t.status)), "worker": t.worker_id,
                      "attempt": t.attempt, "upload_bytes": t.upload_bytes,
                      "leased": (t.lease_expires_at.timestamp() - lease_seconds) if t.lease_expires_at else None,
                      "finished": t.finished_at.timestamp() if t.finished_at else None,
                      "metrics": dict(t.metrics or {})} for t in tasks]
    return rounds_out, tasks_out


def round_split(rnd: dict, tasks: list[dict], workers: list[str]) -> dict[str, Any]:
    """One round's wall, floor and the split of the rest (seconds; means over ``workers``)."""
    done = [t for t in tasks if t["status"] == "done" and t["leased"] is not None and t["finished"] is not None]
    w = len(workers)
    wall = rnd["closed"] - rnd["opened"]
    phase = {p: sum(t["metrics"].get(f"time_{p}", 0.0) for t in done) / w for p in PHASES}
    last_done = max((t["finished"] for t in done), default=rnd["closed"])
    first_lease = between = imbalance = in_task = 0.0
    runs: list[float] = []   # each task from its start to its completion
    for name in workers:
        # in the order the worker ran them; a task starts when it is leased or, if it was leased
        # while another ran (held lease requests answer together), when the one before it ended
        mine = sorted((t for t in done if t["worker"] == name), key=lambda t: t["finished"])
        if not mine:
            first_lease += last_done - rnd["opened"]
            continue
        previous = None
        for t in mine:
            start = t["leased"] if previous is None else max(t["leased"], previous)
            if previous is None:
                first_lease += start - rnd["opened"]
            else:
                between += start - previous
            runs.append(t["finished"] - start)
            in_task += (t["finished"] - start) - sum(t["metrics"].get(f"time_{p}", 0.0) for p in PHASES)
            previous = t["finished"]
        imbalance += last_done - previous
    split = {"floor": phase["compute"], **{p: phase[p] for p in PHASES if p != "compute"},
             "in_task_other": in_task / w, "first_lease": first_lease / w, "between_tasks": between / w,
             "imbalance": imbalance / w, "close": rnd["closed"] - last_done}
    per_task = {f"time_{p}": statistics.median(t["metrics"].get(f"time_{p}", 0.0) for t in done) for p in PHASES} \
        if done else {}
    if done:
        per_task["start_to_completion"] = statistics.median(runs)
        per_task["upload_bytes"] = statistics.median(t["upload_bytes"] for t in done)
    return {"round": rnd["number"], "wall": wall, "floor": phase["compute"],
            "ratio": wall / phase["compute"] if phase["compute"] > 0 else float("inf"),
            "tasks_done": len(done), "tasks": len(tasks), "aggregation_seconds": rnd["aggregation_seconds"],
            "split": split, "split_sum": sum(split.values()), "per_task_median": per_task,
            "tasks_per_worker": {name: sum(1 for t in done if t["worker"] == name) for name in workers}}


def summarize(rows: list[dict], include_first: bool) -> dict[str, Any]:
    measured = rows if include_first or len(rows) < 2 else rows[1:]
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    wall, floor = med([r["wall"] for r in measured]), med([r["floor"] for r in measured])
    keys = list(measured[0]["split"])
    return {"rounds_measured": [r["round"] for r in measured], "median_wall": wall, "median_floor": floor,
            "ratio": wall / floor if floor > 0 else float("inf"),
            "median_ratio_per_round": med([r["ratio"] for r in measured]),
            "median_split": {k: med([r["split"][k] for r in measured]) for k in keys},
            "median_per_task": {k: med([r["per_task_median"][k] for r in measured])
                                for k in measured[0]["per_task_median"]},
            "target_met": wall <= 1.1 * floor}


# ------------------------------------------------------------------------------ the run

def run(rounds: int = 10, clients: int = 18, workers: int = 2, long_poll: float = 20.0, rank: int = 8,
        local_epochs: int = 2, scheduler_interval: float | None = None, include_first: bool = False,
        workdir: Path | None = None, profile: Path | None = None, profile_gil: bool = False,
        timeout: float = 900.0, say: Any = None, background_reports: bool = True, evaluate_every: int = 1) -> dict[str, Any]:
    """Run the federation and return its numbers (see the module docstring)."""
    from coordinator.db import make_engine, make_session_factory
    from hilora.bench.engine import register
    from hilora.launcher import LocalCluster
    from worker.client import CoordinatorClient

    say = say or (lambda msg: None)
    interval = default_scheduler_interval() if scheduler_interval is None else float(scheduler_interval)
    keep = workdir is not None
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="hilora-fedit-rounds-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    load_before = load()
    partition = write_partition(workdir, clients)
    setup, config = prepare_federation(partition, rounds, rank, local_epochs, say, evaluate_every)
    lease_seconds = float(config.schedule.lease_seconds)
    say(f"{len(setup.train)} clients, {workers} workers, {rounds} rounds, rank {rank}, {local_epochs} local epochs, "
        f"long poll {long_poll:g}s, scheduler interval {interval:g}s, in {workdir}")
    cluster = LocalCluster(workdir, scheduler_interval=interval)
    profilers: list[subprocess.Popen] = []
    sampler: Sampler | None = None
    engine = None
    try:
        cluster.start_coordinator()
        assert cluster.coordinator is not None
        sampler = Sampler({"coordinator": cluster.coordinator.pid})
        sampler.sample()
        sampler.start()
        with CoordinatorClient(cluster.url, worker_id="fedit-rounds-admin") as admin:
            admin.put_blob(cluster.admin_token, Path(setup.artifact.path).read_bytes())
            created = admin.create_federation(cluster.admin_token, config)
            fid = created.federation_id
            hosted = register(SimpleNamespace(admin=admin), setup, fid, created.enrollment_secret, setup.train,
                              partition)
        names = [f"worker-{w}" for w in range(min(workers, len(hosted)))]
        if profile is not None:
            profilers.append(start_profiler(profile, "coordinator", cluster.coordinator.pid, profile_gil))
        for w, name in enumerate(names):
            proc = start_worker(cluster, name, {"federation_id": fid, "clients": hosted[w::len(names)]},
                                long_poll, timeout, background_reports)
            sampler.add(name, proc.pid)
            if profile is not None:
                profilers.append(start_profiler(profile, name, proc.pid, profile_gil))
        engine = make_engine(f"sqlite:///{workdir / 'coordinator.db'}")
        session_factory = make_session_factory(engine)
        deadline = time.monotonic() + timeout
        while True:
            cluster.check_workers()
            if cluster.coordinator.poll() is not None:
                raise RuntimeError("the coordinator exited:\n" + cluster.tail("coordinator.log"))
            if _federation_done(session_factory, fid):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the federation did not finish within {timeout:.0f}s:\n"
                                   + "\n".join(cluster.tail(f"{n}.log", 10) for n in names))
            time.sleep(1.0)
        sampler.stop()
        all_rounds, all_tasks = read_rounds(session_factory, fid, lease_seconds)
    except Exception:
        keep = True
        say(f"failed; logs are in {workdir}")
        raise
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        cluster.stop()
        for p in profilers:   # py-spy ends when its process does; give it time to write
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=10)
        if engine is not None:
            engine.dispose()

    root_rounds = [r for r in all_rounds if r["stage"] == "root"]
    by_round: dict[int, list[dict]] = {}
    for t in all_tasks:
        by_round.setdefault(t["round_id"], []).append(t)
    rows = [round_split(r, by_round.get(r["id"], []), names) for r in root_rounds if r["closed"] is not None]
    summary = summarize(rows, include_first)
    measured = [r for r in root_rounds if r["number"] in summary["rounds_measured"]]
    cpu = sampler.window(min(r["opened"] for r in measured), max(r["closed"] for r in measured))
    cores = os.cpu_count() or 1
    per_round = {name: v * cpu["seconds"] / len(measured) for name, v in cpu["cores"].items()}
    cpu["cpu_seconds_per_round"] = {k: round(v, 4) for k, v in per_round.items()}
    # the coordinator's CPU per round spread over all the machine's cores, as a share of the floor:
    # the least it adds to a round on this machine even if it overlapped perfectly with training
    cpu["coordinator_share_of_floor"] = round(per_round["coordinator"] / cores / summary["median_floor"], 4)
    evals = [r for r in all_rounds if r["stage"] == "eval"]
    root_tasks = [t for t in all_tasks if t["stage"] == "root"]
    out = {
        "bench": "fedit_rounds", "machine": machine(), "load_before": load_before, "load_after": load(),
        "options": {"rounds": rounds, "clients": len(setup.train), "workers": len(names), "long_poll": long_poll,
                    "background_reports": background_reports, "evaluate_every": evaluate_every,
                    "rank": rank, "local_epochs": local_epochs, "scheduler_interval": interval,
                    "include_first": include_first, "lease_seconds": lease_seconds,
                    "retry_after_seconds": config.schedule.retry_after_seconds,
                    "train_per_client": setup.partition.train_per_client,
                    "batch_size": config.training.batch_size},
        "federation": {"id": fid, "root_rounds": len(root_rounds),
                       "root_rounds_done": sum(1 for r in root_rounds if r["status"] == "done"),
                       "root_tasks": len(root_tasks),
                       "root_tasks_done": sum(1 for t in root_tasks if t["status"] == "done"),
                       "root_task_attempts_over_1": sum(1 for t in root_tasks if t["attempt"] > 1),
                       "eval_round_wall": (evals[-1]["closed"] - evals[-1]["opened"])
                       if evals and evals[-1]["closed"] else None},
        **summary,
        "cpu_during_measured_rounds": cpu,
        "rounds": rows,
        "total_seconds": time.monotonic() - t_start,
    }
    if keep:
        out["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def format_report(res: dict[str, Any]) -> str:
    o = res["options"]
    lines = [f"FedIT, {o['clients']} clients, {o['workers']} workers x 1 thread, rank {o['rank']}, "
             f"{o['local_epochs']} local epochs, long poll {o['long_poll']:g}s, background reports "
             f"{'on' if o.get('background_reports', True) else 'off'}, evaluate every "
             f"{o.get('evaluate_every', 1)} rounds, scheduler interval "
             f"{o['scheduler_interval']:g}s; load {res['load_before']} -> {res['load_after']}",
             f"{'round':>5} {'wall':>7} {'floor':>7} {'ratio':>6}  " + " ".join(
                 f"{k:>13}" for k in res["rounds"][0]["split"] if k != "floor")]
    for r in res["rounds"]:
        lines.append(f"{r['round']:>5} {r['wall']:7.3f} {r['floor']:7.3f} {r['ratio']:6.2f}  " + " ".join(
            f"{v:13.3f}" for k, v in r["split"].items() if k != "floor"))
    lines.append(f"median over rounds {res['rounds_measured'][0]}-{res['rounds_measured'][-1]}: wall "
                 f"{res['median_wall']:.3f} s, floor {res['median_floor']:.3f} s, ratio {res['ratio']:.2f} "
                 f"(target <= 1.10: {'met' if res['target_met'] else 'missed'})")
    lines.append("median split (s/round): " + ", ".join(f"{k} {v:.3f}" for k, v in res["median_split"].items()))
    lines.append("median per task (s; bytes): " + ", ".join(f"{k} {v:.4g}" for k, v in res["median_per_task"].items()))
    c = res["cpu_during_measured_rounds"]
    lines.append(f"CPU in cores over the measured rounds: {c['cores']}, machine {c['machine_cores']}, "
                 f"others {c['others_cores']}; load {c['load_1min']}")
    lines.append(f"CPU seconds per round: {c['cpu_seconds_per_round']}; the coordinator's over all cores: "
                 f"{100 * c['coordinator_share_of_floor']:.1f}% of the floor")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="root rounds (default 10; --quick: 3)")
    ap.add_argument("--clients", type=int, default=18)
    ap.add_argument("--workers", type=int, default=2, help="worker processes, 1 thread each")
    ap.add_argument("--long-poll", type=float, default=20.0, metavar="SECONDS",
                    help="hilora worker --long-poll (default 20, the worker's default; 0: sleep retry_after)")
    ap.add_argument("--no-background-reports", dest="background_reports", action="store_false",
                    help="hilora worker --no-background-reports: report each task before leasing the next")
    ap.add_argument("--evaluate-every", type=int, default=1, metavar="K",
                    help="schedule.evaluate_every: the received root is evaluated before training in rounds "
                         "1, 1+K, ... (default 1: every round, the product's default)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--scheduler-interval", type=float, default=None,
                    help=f"HILORA_SCHEDULER_INTERVAL (default the product's, {default_scheduler_interval():g} s)")
    ap.add_argument("--include-first", action="store_true", help="count round 1 (worker start-up) in the medians")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds unless --rounds says otherwise")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the database, logs and worker state here")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy record -f raw of the coordinator and each worker into DIR")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: sample only the thread holding the GIL (each process's Python CPU) "
                         "instead of every thread, waiting included")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else 10)
    if rounds < 1 or args.clients < 1 or args.workers < 1 or args.evaluate_every < 1:
        ap.error("--rounds, --clients, --workers and --evaluate-every must be at least 1")
    if args.profile_gil and args.profile is None:
        ap.error("--profile-gil needs --profile DIR")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res = run(rounds=rounds, clients=args.clients, workers=args.workers, long_poll=args.long_poll, rank=args.rank,
              local_epochs=args.local_epochs, scheduler_interval=args.scheduler_interval,
              include_first=args.include_first, workdir=args.workdir, profile=args.profile,
              profile_gil=args.profile_gil, timeout=args.timeout, background_reports=args.background_reports, evaluate_every=args.evaluate_every,
              say=(lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=1, default=float) if args.json else format_report(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
