"""CI smoke run of ``hilora bench``: the tiny partition (with one unseen client per group), one round
per stage, hilora and two baselines, report and plots. No accuracy gates: the numbers are checked
for shape and range only (docs/benchmarks.md holds the measured runs). Then ``--resume``: a run
killed after its first method resumes from the report it wrote and gives the uninterrupted run's
numbers without running that method again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

METHODS = ("hilora", "flexlora", "local")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    env["OMP_NUM_THREADS"] = "1"
    if "HILORA_CACHE_DIR" in os.environ:                        # reuse the cached demo backbone
        env["HILORA_CACHE_DIR"] = os.environ["HILORA_CACHE_DIR"]
    return env


@pytest.fixture(scope="module")
def tiny_partition(tmp_path_factory):
    spec = json.loads(resources.files("worker.partitions").joinpath("tiny.json").read_text())
    spec.update(name="tiny-unseen", unseen_fraction=0.34)      # 3 clients per group -> 1 unseen each
    partition = tmp_path_factory.mktemp("partition") / "tiny-unseen.json"
    partition.write_text(json.dumps(spec))
    return partition


def _smoke_command(partition, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hilora.cli", "bench", "--quick", "--device", "cpu", "--threads", "1",
            "--partition", str(partition), "--methods", ",".join(METHODS), "--rounds", "1/1/1",
            "--unseen-leaf-rounds", "1", *extra]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_partition):
    folder = tmp_path_factory.mktemp("bench")
    report, plots = folder / "report.json", folder / "plots"
    proc = subprocess.run(_smoke_command(tiny_partition, "--report", str(report), "--plots", str(plots)),
                          capture_output=True, text=True, timeout=220, env=_env(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(report.read_text()), plots


def _in_unit_range(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_prints_the_table(smoke):
    proc, _, _ = smoke
    header = next(line for line in proc.stdout.splitlines() if line.startswith("method"))
    for column in ("mean", "p10", "worst", "uploaded", "seconds"):
        assert column in header
    for name in METHODS:
        assert any(line.startswith(name) for line in proc.stdout.splitlines())
    # not a terminal: no progress bars, the log lines as they were
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "[" in proc.stderr and "hilora: final leaf mean" in proc.stderr


def test_report_has_every_number_the_issue_asks_for(smoke):
    _, report, _ = smoke
    assert report["rounds"]["total"] == 3 and report["seeds"] == [0]
    for name in METHODS:
        m = report["methods"][name]
        for key in ("mean", "p10", "worst"):
            assert _in_unit_range(m[key]), (name, key, m[key])
        assert m["p10"] <= m["mean"] + 1e-9 and m["worst"] <= m["p10"] + 1e-9
        assert len(m["rounds"]) == 3 and all(_in_unit_range(r["mean"]) for r in m["rounds"])
        assert m["seconds"] > 0
    assert report["methods"]["local"]["bytes_uploaded"] == 0
    assert report["methods"]["hilora"]["bytes_uploaded"] > 0 and report["methods"]["flexlora"]["bytes_uploaded"] > 0
    assert [r["stage"] for r in report["methods"]["hilora"]["rounds"]] == ["root", "cluster", "leaf"]
    assert [r["stage"] for r in report["methods"]["flexlora"]["rounds"]] == ["root"] * 3
    for name in ("hilora", "flexlora"):
        assert report["unseen"][name]["n"] == 2
        assert _in_unit_range(report["unseen"][name]["zero_shot"])
        assert _in_unit_range(report["unseen"][name]["after_leaf"])
    clustering = report["hilora"]["clustering"]
    assert -1.0 <= clustering["ari"] <= 1.0 and clustering["k"] >= 1 and clustering["planted_groups"] == 2
    for tier in ("root", "cluster", "leaf"):
        assert _in_unit_range(report["hilora"]["tiers"][tier]["mean"])
        assert _in_unit_range(report["hilora"]["tiers"][tier]["p10"])


def test_plots_are_png_files(smoke):
    from PIL import Image

    _, _, plots = smoke
    for name in ("accuracy_by_method.png", "accuracy_by_round.png", "hilora_tiers.png", "lsac_affinity.png"):
        path = plots / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100


def test_another_timm_model_on_disk_data_from_the_command_line(tmp_path):
    """``--model`` / ``--model-kwargs`` / ``--data-root`` / ``--rank`` on a tiny CIFAR-100 folder: the
    backbone is sized from the data (100 classes, 3 x 32 x 32) and recorded in the report."""
    from support.datasets import write_fake_cifar

    write_fake_cifar(tmp_path / "cifar")
    partition = tmp_path / "cifar-small.json"
    partition.write_text(json.dumps({"name": "cifar-small", "dataset": "cifar100", "root": "elsewhere",
                                     "scheme": "gldir", "clients": 4, "dirichlet_alpha": 1.0}))
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    env.update(OMP_NUM_THREADS="1", HILORA_CACHE_DIR=str(tmp_path / "cache"))
    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    proc = subprocess.run([sys.executable, "-m", "hilora.cli", "bench", "--quick", "--device", "cpu",
                           "--partition", str(partition), "--data-root", str(tmp_path / "cifar"),
                           "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--rank", "2",
                           "--methods", "hilora,fedit", "--rounds", "1/1/1", "--report", str(report)],
                          capture_output=True, text=True, timeout=200, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(report.read_text())
    backbone = doc["backbone"]
    assert backbone["model"] == "vit_tiny_patch16_224" and backbone["weights"] == "random" and backbone["rank"] == 2
    assert {k: backbone["model_kwargs"][k] for k in ("num_classes", "img_size", "in_chans", "embed_dim")} == {
        "num_classes": 100, "img_size": 32, "in_chans": 3, "embed_dim": 32}
    cached = list((tmp_path / "cache" / "bench-backbones").glob("*.safetensors"))
    assert len(cached) == 1 and doc["backbone_sha256"] == backbone["sha256"]
    for name in ("hilora", "fedit"):
        assert _in_unit_range(doc["methods"][name]["mean"])
    assert doc["options"]["data_root"] == str(tmp_path / "cifar")


def _without_run_specifics(value):
    """A report or run without what differs between two runs of the same bench: wall times, the
    federation ids of the service that ran them, and where it ran (workdir)."""
    if isinstance(value, dict):
        return {k: _without_run_specifics(v) for k, v in value.items() if k not in ("seconds", "federation_id", "workdir")}
    if isinstance(value, list):
        return [_without_run_specifics(v) for v in value]
    return value


def test_resume_after_a_kill_runs_only_what_is_missing(smoke, tiny_partition, tmp_path):
    """The report is rewritten after every method; a run killed (SIGKILL) after its first method
    resumes with --resume: the finished method is not run again (its entry is kept byte for byte)
    and the final report has the uninterrupted run's numbers."""
    _, uninterrupted, _ = smoke
    report = tmp_path / "report.json"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_smoke_command(tiny_partition, "--report", str(report), "--workdir",
                                               str(tmp_path / "work")), stdout=log, stderr=subprocess.STDOUT,
                                env=_env())
        try:
            deadline = time.monotonic() + 200
            while not report.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert report.exists(), (tmp_path / "killed.log").read_text()
    partial_text = report.read_text()
    partial = json.loads(partial_text)
    finished = [run["method"] for run in partial["runs"]]
    assert partial["complete"] is False and partial["planned"] == {"methods": list(METHODS), "seeds": [0]}
    assert 1 <= len(finished) < len(METHODS) and finished == list(METHODS[:len(finished)])
    assert list(partial["methods"]) == finished          # the summary of what is finished so far
    kept = {run["method"]: json.dumps(run, sort_keys=True) for run in partial["runs"]}

    resumed = subprocess.run(_smoke_command(tiny_partition, "--resume", str(report)), capture_output=True, text=True,
                             timeout=200, env=_env(), check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"seed 0: {', '.join(finished)} taken from the report being resumed" in resumed.stderr
    for name in METHODS:
        assert (f"{name}: trained" in resumed.stderr) == (name not in finished), name
    final = json.loads(report.read_text())
    assert final["complete"] is True and [run["method"] for run in final["runs"]] == list(METHODS)
    for run in final["runs"]:
        if run["method"] in kept:
            assert json.dumps(run, sort_keys=True) == kept[run["method"]]     # not run again, not rewritten
    assert _without_run_specifics(final) == _without_run_specifics(uninterrupted)


def test_resuming_a_finished_report_runs_nothing_and_writes_it_again(smoke, tiny_partition, tmp_path):
    _, _, plots = smoke
    source = (plots.parent / "report.json").read_text()
    report = tmp_path / "report.json"           # a copy: the fixture's report stays as it is
    report.write_text(source)
    again = subprocess.run(_smoke_command(tiny_partition, "--resume", str(report)), capture_output=True, text=True,
                           timeout=200, env=_env(), check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trained" not in again.stderr and "hilora, flexlora, local taken from the report" in again.stderr
    assert report.read_text() == source         # every run and number as it was, byte for byte


@pytest.mark.parametrize(("args", "message"), [
    (["--rounds", "2/1/1"], "the report was made with other options (root_rounds: 1 there, 2 now)"),
    (["--probe-loss", "ce"], "the report was made with other options (probe_loss: 'balanced' there, 'ce' now)"),
    (["--partition", "demo"], "the report was made on partition 'tiny-unseen', this run's is 'demo'"),
])
def test_resume_refuses_a_report_of_other_options(smoke, tiny_partition, tmp_path, args, message):
    _, uninterrupted, _ = smoke
    report = tmp_path / "report.json"
    report.write_text(json.dumps(uninterrupted))
    command = _smoke_command(tiny_partition, "--resume", str(report))
    if args[0] == "--rounds":
        command[command.index("--rounds") + 1] = args[1]
    elif args[0] == "--partition":
        command[command.index("--partition") + 1] = args[1]
    else:
        command += args
    proc = subprocess.run(command, capture_output=True, text=True, timeout=200, env=_env(), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume {report}: {message}: run with the same "
                      f"{'options' if 'options' in message else 'partition'}, or without --resume"]
    assert json.loads(report.read_text()) == uninterrupted             # left as it was
