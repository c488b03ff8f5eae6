"""Test-only fault injection: ``HILORA_FAULT_AT=<point>[:<n>]`` kills the coordinator process with
SIGKILL the n-th time (default 1) execution reaches ``fault_point(<point>)``.

Crash-recovery tests use it to stop the process at an exact place instead of guessing with
timings. Points:

- ``round_open``: a round and its tasks were inserted; the transaction has not committed.
- ``after_accept``: an upload was accepted and its transaction committed.
- ``during_aggregation``: the new adapter blob is in the store; its row is not committed.

Unset (the default), ``fault_point`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("hilora.coordinator")

POINTS = ("round_open", "after_accept", "during_aggregation")

_lock = threading.Lock()
_target: tuple[str, int] | None = None
_hits: dict[str, int] = {}


def parse(spec: str | None) -> tuple[str, int] | None:
    """``'after_accept:3'`` -> ('after_accept', 3); None or '' -> None; anything else: ValueError."""
    if not spec:
        return None
    point, _, count = spec.strip().partition(":")
    if point not in POINTS:
        raise ValueError(f"HILORA_FAULT_AT: unknown point {point!r}; points are {', '.join(POINTS)}")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"HILORA_FAULT_AT: the count after ':' must be a positive integer, got {count!r}")
    return point, int(count) if count else 1


def configure(spec: str | None) -> None:
    global _target
    with _lock:
        _target = parse(spec)
        _hits.clear()


def fault_point(point: str) -> None:
    if _target is None or _target[0] != point:
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        due = _hits[point] == _target[1]
    if due:
        log.error("HILORA_FAULT_AT=%s:%d reached: killing the coordinator (test fault injection)", *_target)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
