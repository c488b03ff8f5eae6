"""Progress bars with an ETA for ``hilora demo``, ``hilora bench`` and ``hilora pretrain-demo-backbone``.

The bars (rich) are drawn on stderr only when stderr is a terminal (and ``TERM`` is not ``dumb``),
and never with ``--no-progress``. Otherwise nothing is drawn and every log line is printed exactly
as before, so logs, pipes and CI output stay plain text. While bars are shown, the commands' log
lines are printed above them (a line meant for stdout goes to stdout as before when stdout is not
the terminal, e.g. redirected to a file).

- ``Bars``: the bars themselves (or nothing), and ``say`` for log lines;
- ``RunProgress``: what the bench engine and the demo report: runs (one federation each) counted
  in rounds, an overall bar over every run planned and one bar for the run in progress;
- ``backbone_watcher``: the demo backbone's pretraining epochs, read from its progress lines.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import IO, Any

import click


def progress_wanted(stream: IO[str] | None = None, enabled: bool | None = None) -> bool:
    """Bars are drawn when ``stream`` (default stderr) is a terminal, unless ``enabled`` is False or
    ``TERM=dumb``."""
    if enabled is False:
        return False
    stream = sys.stderr if stream is None else stream
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # a closed or odd stream
        return False


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Bars:
    """rich progress bars on stderr when it is a terminal, else nothing at all.

    ``enabled``: None (the default) decides by ``progress_wanted``; False never draws. ``console``
    (tests): draw on this rich console instead, whatever it is. ``get_time``: rich's clock (tests).
    Use as a context manager; every method is a no-op when the bars are off."""

    def __init__(self, enabled: bool | None = None, console: Any = None,
                 get_time: Callable[[], float] | None = None) -> None:
        self.enabled = (enabled is not False) if console is not None else progress_wanted(None, enabled)
        self.progress: Any = None
        self._live = False
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if console is None:
            console = Console(file=sys.stderr)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False, get_time=get_time,
            # stderr is the bars' own terminal; stdout is only redirected when it is that terminal too
            redirect_stdout=_is_terminal(sys.stdout), redirect_stderr=True)

    def __enter__(self) -> Bars:
        if self.enabled:
            self.progress.start()
            self._live = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._live:
            self.progress.stop()
            self._live = False

    def add(self, description: str, total: float | None) -> int | None:
        """A new bar; its id (None when the bars are off)."""
        if not self.enabled:
            return None
        return self.progress.add_task(description, total=total)

    def update(self, task: int | None, **fields: Any) -> None:
        """``completed``, ``advance``, ``total``, ``description`` of one bar (rich's ``update``)."""
        if self.enabled and task is not None:
            self.progress.update(task, **fields)

    def remove(self, task: int | None) -> None:
        if self.enabled and task is not None:
            self.progress.remove_task(task)

    def say(self, message: str, err: bool = False) -> None:
        """A log line: above the bars while they are shown, else printed as before (``click.echo``)."""
        target = sys.stderr if err else sys.stdout
        if self._live and (err or _is_terminal(target)):
            self.progress.console.print(message, markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:
            click.echo(message, err=err)

    def sayer(self, err: bool = False) -> Callable[[str], None]:
        """``say`` as a one-argument callable (to stdout, or stderr with ``err``) that carries these
        bars as ``.bars``, so a function handed only a ``say`` (``hilora.demo.run_demo``) draws on them."""
        return _Sayer(self, err)


class _Sayer:
    def __init__(self, bars: Bars, err: bool) -> None:
        self.bars, self.err = bars, err

    def __call__(self, message: str) -> None:
        self.bars.say(message, err=self.err)


_PRETRAIN_START = re.compile(r"pretraining (.+) for (\d+) epochs")
_PRETRAIN_EPOCH = re.compile(r"epoch (\d+)/(\d+)")


def backbone_watcher(bars: Bars, say: Callable[[str], None]) -> Callable[[str], None]:
    """A ``progress`` callback for ``worker.backbone.pretrain_demo_backbone`` (lines possibly
    prefixed, e.g. ``backbone: ``): each line goes on to ``say``, and a bar follows the epochs
    ("pretraining ... for N epochs", then "epoch k/N" now and then)."""
    state: dict[str, Any] = {"task": None}

    def watch(message: str) -> None:
        say(message)
        if not bars.enabled:
            return
        started = _PRETRAIN_START.search(message)
        if started is not None and state["task"] is None:
            state["task"] = bars.add("pretraining backbone (epochs)", int(started.group(2)))
            return
        epoch = _PRETRAIN_EPOCH.search(message)
        if epoch is not None and state["task"] is not None:
            bars.update(state["task"], completed=int(epoch.group(1)), total=int(epoch.group(2)))

    return watch


class RunProgress:
    """Federations run one after another, counted in rounds: one overall bar (every run planned;
    its ETA is the rest of the rounds at the speed so far) and one bar for the run in progress,
    named after it and its stage. ``expected`` rounds are an estimate (the root stage may stop
    early): a run's bar grows if it does more, and a finished run counts as its expected rounds.

    The bench engine calls ``plan`` (unless the caller planned already: ``fixed``), ``start_run``,
    ``rounds`` and ``finish_run``; ``hilora bench --family`` also ``group``, the demo only the run."""

    def __init__(self, bars: Bars, label: str = "all runs", overall: bool = True) -> None:
        self.bars = bars
        self.total = 0
        self.base = 0          # rounds of the runs finished
        self.fixed = False     # the total was planned by the caller: the engine's plan adds nothing
        self.runs_done = 0
        self.runs_planned = 0
        self.label = label
        self._overall = bars.add(label, None) if overall else None
        self._group: int | None = None
        self._run: int | None = None
        self._run_label = ""
        self._expected = 0

    def plan(self, rounds: int, runs: int, fixed: bool = False) -> None:
        """Add ``runs`` runs of ``rounds`` rounds in all to the overall bar (``fixed``: and ignore
        the engine's own plans, because the caller planned every run already)."""
        if self.fixed:
            return
        self.fixed = fixed
        self.total += int(rounds)
        self.runs_planned += int(runs)
        self._show_overall()

    def group(self, description: str, done: int, total: int) -> None:
        """A bar for a group of runs (``--family``: the cells and seeds)."""
        if self._group is None:
            self._group = self.bars.add(description, total)
        self.bars.update(self._group, description=description, completed=done, total=total)

    def start_run(self, label: str, expected: int) -> None:
        self._run_label, self._expected = label, max(1, int(expected))
        self._run = self.bars.add(label, self._expected)

    def rounds(self, done: int, stage: str | None = None) -> None:
        """``done`` rounds of the run in progress are over; ``stage`` is where it is now."""
        if self._run is None:
            return
        fields: dict[str, Any] = {"completed": done}
        if done > self._expected:
            fields["total"] = done
        if stage:
            fields["description"] = f"{self._run_label}: {stage}"
        self.bars.update(self._run, **fields)
        self._show_overall(min(done, self._expected))

    def finish_run(self) -> None:
        """The run is over: its bar goes (the overall bar counts it), or, without an overall bar
        (the demo), stays, full."""
        if self._run is not None:
            if self._overall is None:
                self.bars.update(self._run, completed=self._expected, total=self._expected)
            else:
                self.bars.remove(self._run)
            self._run = None
        self.base += self._expected
        self.runs_done += 1
        self._expected = 0
        self._show_overall()

    def _show_overall(self, current: int = 0) -> None:
        if self._overall is None:
            return
        self.bars.update(self._overall, completed=self.base + current, total=max(self.total, self.base + current, 1),
                         description=f"{self.label} ({self.runs_done}/{self.runs_planned} runs, rounds)")


__all__ = ["Bars", "RunProgress", "backbone_watcher", "progress_wanted"]
