"""Progress bars (hilora/progress.py) and what the bench engine counts for them: off when stderr is
not a terminal (the log lines unchanged, no escape codes), on a terminal the run names, counts and
an ETA from the speed so far; rounds counted as the service reports them."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from hilora.bench.engine import RoundCounter, expected_rounds
from hilora.bench.methods import preset
from hilora.progress import Bars, RunProgress, backbone_watcher, progress_wanted

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ESCAPE = re.compile(r"\x1b\[")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120, color_system=None), buffer


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_when_stderr_is_not_a_terminal(capsys):
    bars = Bars()                       # pytest captures stderr: not a terminal
    assert not bars.enabled
    lines = []
    with bars:
        run = RunProgress(bars, "bench")
        run.plan(10, 2)
        run.start_run("hilora seed 0", 6)
        run.rounds(3, "cluster")
        run.finish_run()
        watch = backbone_watcher(bars, lines.append)
        watch("backbone: pretraining vit_tiny for 60 epochs")
        watch("backbone: epoch 10/60 loss 1.0")
        bars.say("a line for stdout")
        bars.say("a line for stderr", err=True)
        assert bars.add("anything", 3) is None
    out, err = capsys.readouterr()
    assert out == "a line for stdout\n" and err == "a line for stderr\n"
    assert lines == ["backbone: pretraining vit_tiny for 60 epochs", "backbone: epoch 10/60 loss 1.0"]
    assert not ESCAPE.search(out + err)


def test_when_bars_are_wanted(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert progress_wanted(_Tty()) is True
    assert progress_wanted(_Tty(), enabled=False) is False        # --no-progress
    assert progress_wanted(io.StringIO()) is False                # a pipe or a file
    monkeypatch.setenv("TERM", "dumb")
    assert progress_wanted(_Tty()) is False
    assert Bars(enabled=False, console=_terminal()[0]).enabled is False


def test_a_terminal_shows_the_runs_their_rounds_and_an_eta():
    console, buffer = _terminal()
    clock = _Clock()
    bars = Bars(console=console, get_time=clock)
    assert bars.enabled
    run = RunProgress(bars, "bench")
    run.plan(10, 2)                     # two runs, 10 rounds in all
    run.start_run("hilora seed 0", 6)
    clock.now = 10.0
    run.rounds(1, "probe")
    clock.now = 20.0
    run.rounds(3, "cluster")            # 2 rounds in 10 s: 0.2 rounds per second
    tasks = {t.description: t for t in bars.progress.tasks}
    assert tasks["hilora seed 0: cluster"].completed == 3 and tasks["hilora seed 0: cluster"].total == 6
    assert tasks["bench (0/2 runs, rounds)"].completed == 3 and tasks["bench (0/2 runs, rounds)"].total == 10
    console.print(bars.progress.get_renderable())
    text = buffer.getvalue()
    assert "hilora seed 0: cluster" in text and "3/6" in text and "3/10" in text
    # the rest at the speed so far: 3 rounds of the run -> 15 s, 7 of all -> 35 s
    assert re.search(r"hilora seed 0: cluster .*ETA 0:00:15", text), text
    assert re.search(r"bench \(0/2 runs, rounds\) .*ETA 0:00:35", text), text

    clock.now = 30.0
    run.rounds(7, "unseen clients")     # more than expected: the run's bar grows, the overall counts 6
    assert bars.progress.tasks[-1].total == 7
    run.finish_run()                    # the run's bar goes, the overall bar counts it whole
    assert [t.description for t in bars.progress.tasks] == ["bench (1/2 runs, rounds)"]
    assert bars.progress.tasks[0].completed == 6


def test_the_demo_keeps_its_finished_bar_and_family_groups_have_theirs():
    console, _ = _terminal()
    bars = Bars(console=console, get_time=_Clock())
    demo = RunProgress(bars, overall=False)
    demo.start_run("demo tiny", 7)
    demo.rounds(6, "serving")
    demo.finish_run()
    (task,) = bars.progress.tasks
    assert task.completed == 7 and task.total == 7 and task.description == "demo tiny: serving"

    bars = Bars(console=console, get_time=_Clock())
    family = RunProgress(bars, "family smoke")
    family.plan(16, 4, fixed=True)
    family.plan(8, 2)                   # run_bench's own plan for one cell adds nothing: planned already
    family.group("cell a seed 0", 0, 2)
    family.group("cell b seed 0", 1, 2)
    overall, group = bars.progress.tasks
    assert overall.total == 16 and family.runs_planned == 4
    assert group.description == "cell b seed 0" and group.completed == 1 and group.total == 2


def test_the_backbone_bar_follows_the_pretraining_epochs():
    console, buffer = _terminal()
    bars = Bars(console=console, get_time=_Clock())
    said = []
    watch = backbone_watcher(bars, said.append)
    watch("backbone: pretraining vit_tiny_patch16_224 on upright digits for 60 epochs")
    watch("backbone: epoch 20/60 loss 0.2320 (5.0s)")
    (task,) = bars.progress.tasks
    assert task.description == "pretraining backbone (epochs)" and task.total == 60 and task.completed == 20
    assert said == ["backbone: pretraining vit_tiny_patch16_224 on upright digits for 60 epochs",
                    "backbone: epoch 20/60 loss 0.2320 (5.0s)"]
    console.print(bars.progress.get_renderable())
    assert "20/60" in buffer.getvalue()


def _round(stage: str, scope: str, number: int, status: str = "done") -> SimpleNamespace:
    return SimpleNamespace(stage=SimpleNamespace(value=stage), scope=scope, number=number, status=status, cycle=0)


def test_rounds_are_counted_as_the_service_runs_them():
    """The rounds a hilora and a flexlora federation ran at 1/1/1 with two unseen clients and one
    unseen leaf round (read from the bench's coordinator database): as many as expected."""
    opts = preset("quick")
    opts.root_rounds, opts.cluster_rounds, opts.leaf_rounds, opts.unseen_leaf_rounds = 1, 1, 1, 1
    hilora = [_round("root", "root", 1), _round("probe", "all", 1), _round("cluster", "cluster:1", 1),
              _round("cluster", "cluster:2", 1), _round("leaf", "leaf:1", 1), _round("leaf", "leaf:2", 1),
              _round("probe", "client:5", 1), _round("probe", "client:6", 1), _round("leaf", "client:5", 1),
              _round("leaf", "client:6", 1)]
    counter = RoundCounter()
    assert counter.update(SimpleNamespace(rounds=hilora[:3] + [_round("cluster", "cluster:2", 1, "open")])) == 3
    assert counter.update(SimpleNamespace(rounds=hilora)) == 6 == expected_rounds("hilora", opts, unseen=True)
    assert counter.update(SimpleNamespace(rounds=hilora[-2:])) == 6      # rounds seen before stay counted
    flexlora = [_round("root", "root", n) for n in (1, 2, 3)] + [
        _round("eval", "eval:none", 1), _round("leaf", "client:11", 1), _round("leaf", "client:12", 1)]
    assert RoundCounter().update(SimpleNamespace(rounds=flexlora)) == 5 == expected_rounds("flexlora", opts, True)
    assert expected_rounds("flexlora", opts, unseen=False) == 4
    assert expected_rounds("oracle", opts, unseen=False) == expected_rounds("hilora", opts, unseen=False) == 4
    opts.leaf_rounds, opts.refine_rounds = 0, 5        # no leaf rounds: the final evaluation; refine <= cluster
    assert expected_rounds("hilora", opts, unseen=False) == 1 + 1 + 1 + 1 + 1
