"""The 'auto' round deadline (``Schedule.round_deadline_seconds = "auto"``), as pure functions.

A deadline has two jobs that pull apart: a client that heartbeats and never uploads must not hold
a round open for ever, and a slow but honest task (ViT-B on a big client, a worker hosting many
clients one after another) must not be cut. A fixed number of seconds does one or the other,
depending on the model and the hardware. So 'auto' reads the time from the federation itself:

- **floor**: a deadline is never less than ``lease_seconds x (max_attempts + 1)`` after the round
  opened: the time a task may take through all its attempts when every lease runs out, plus one
  lease for being leased at all (with exactly ``lease x attempts`` a task leased a moment after its
  round opened expired just after the deadline, so whether it ended failed or cancelled was a race).
- **history** (set when the round opens, if the federation has done rounds): ``HISTORY_FACTOR``
  times the longest any done task of the last ``HISTORY_ROUNDS`` done rounds took from its round's
  opening to its upload. Rounds of one federation do the same work (same model, data and local
  epochs), so four times the slowest recent task is a wide margin, while one withheld upload
  costs a bounded wait.
- **half** (for a round opened without history, set once half of its tasks, rounded up, are
  done): the rest get ``HALF_FACTOR`` times as long again as that half took. A round whose
  tasks are all held never reaches it: with no history there is nothing to say what is slow.

A deadline, once set, is never tightened again by the scheduler, so an admin's extension
(``POST /v1/rounds/R/deadline``) stands; a pause moves it back like any deadline. A deadline set
after the fact (a late tick, a resume) still gives open tasks one more lease.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

HISTORY_ROUNDS = 3
HISTORY_FACTOR = 4.0
HALF_FACTOR = 3.0


def floor_seconds(lease_seconds: float, max_attempts: int) -> float:
    """The least time any 'auto' deadline gives a round: every attempt of a task may use its lease,
    after up to one lease of waiting to be leased."""
    return float(lease_seconds) * (int(max_attempts) + 1)


def from_history(opened: datetime, longest_done_seconds: float | None, lease_seconds: float,
                 max_attempts: int) -> datetime | None:
    """The deadline of a round opened at ``opened`` when recent done tasks took at most
    ``longest_done_seconds`` from their round's opening; None without history."""
    if longest_done_seconds is None or not math.isfinite(longest_done_seconds):
        return None
    seconds = max(floor_seconds(lease_seconds, max_attempts), HISTORY_FACTOR * max(0.0, longest_done_seconds))
    return opened + timedelta(seconds=seconds)


def half_needed(num_tasks: int) -> int:
    """How many done tasks the 'half' rule waits for (0: the rule does not apply, one task)."""
    return math.ceil(num_tasks / 2) if num_tasks >= 2 else 0


def from_half(opened: datetime, half_done_at: datetime, now: datetime, lease_seconds: float,
              max_attempts: int) -> datetime:
    """The deadline of a round opened at ``opened`` whose half of tasks was done at ``half_done_at``,
    set at ``now``: at least ``HALF_FACTOR`` x that time after it (and the floor after opening), and
    never less than one lease from ``now``."""
    took = max(0.0, (half_done_at - opened).total_seconds())
    by_pace = half_done_at + timedelta(seconds=HALF_FACTOR * took)
    by_floor = opened + timedelta(seconds=floor_seconds(lease_seconds, max_attempts))
    return max(by_pace, by_floor, now + timedelta(seconds=float(lease_seconds)))
