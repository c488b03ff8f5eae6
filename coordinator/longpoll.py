"""Long polling for leases (``POST /v1/clients/{id}/lease?wait=S``).

A held lease request is an ``asyncio.Event`` in this process's event loop: it holds no database
connection and no threadpool thread while it waits. One background task per process (``LeaseWaiters``)
wakes the held requests of clients that have a task to lease:

- at once when this process changed tasks (the scheduler after a tick that did something:
  ``poke``, callable from any thread; when the tick says for which clients it opened or requeued
  tasks, those are leased for without asking the database who has one), and
- otherwise every ``interval`` seconds, so that tasks another replica opened are seen too (one
  short query for the clients with a pending task, whatever the number of held requests).

The clients found with a task are leased together, one held request each, in one transaction
(``grant``: ``tasks.lease_many``), ``grant_chunk`` requests per transaction, so that a round
opening for hundreds of held requests is a few database round trips and commits, not one per
request, and the first answers go out while the next chunk is leased. A woken request answers with what it was
granted (or, when the batch could not lease for it, tries to lease on its own); it answers as soon as
it has a task, when the federation is paused or the client revoked, when its ``wait`` is over, or
when the server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from coordinator.models import Task
from coordinator.services.tasks import task_status_may_become
from shared.states import TaskStatus

log = logging.getLogger("hilora.coordinator")


class LeaseWaiters:
    grant_chunk = 32   # held requests leased per transaction before their answers go out

    def __init__(self, session_factory, interval: float, closing: Callable[[], bool] = lambda: False,  # noqa: ANN001
                 grant: Callable[[dict[int, str]], dict[int, Any]] | None = None) -> None:
        self._session_factory = session_factory
        self.interval = interval
        self._closing = closing
        self._grant = grant
        self._waiting: dict[int, dict[asyncio.Event, str]] = {}  # client id -> held request -> worker id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poked: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._poke_time: float | None = None
        # the clients the pokes since the last pass made a task leasable for; None: a poke did not say
        self._poked_for: set[int] | None = set()
        self._woken: dict[asyncio.Event, tuple[float, Any]] = {}
        self._granting: set[asyncio.Event] = set()  # held requests a batch is leasing for right now
        self.closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background task (in the running event loop: the app's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._poked = asyncio.Event()
        self.closed = False
        self._task = asyncio.create_task(self._run(), name="hilora-lease-waiters")

    async def stop(self) -> None:
        self._close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _close(self) -> None:
        self.closed = True
        for events in self._waiting.values():
            for event in events:
                event.set()

    # ------------------------------------------------------------------ waking

    def poke(self, clients: set[int] | None = None) -> None:
        """Something changed tasks: check the held requests now. ``clients``: the only clients the
        change made a task leasable for (committed), so that they are leased for at once; None
        (not known): the database is asked which waiting clients have a task. Safe from any
        thread."""
        loop = self._loop
        if loop is None or self._poked is None or loop.is_closed():
            return
        noticed = time.perf_counter()  # the change was committed just before this call
        try:
            loop.call_soon_threadsafe(self._note_poke, noticed, None if clients is None else frozenset(clients))
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _note_poke(self, noticed: float, clients: frozenset[int] | None = None) -> None:
        if self._poke_time is None:
            self._poke_time = noticed
        if clients is None:
            self._poked_for = None
        elif self._poked_for is not None:
            self._poked_for.update(clients)
        self._poked.set()

    async def wait(self, client_id: int, timeout: float, worker_id: str = "anonymous") -> tuple[float, Any] | None:
        """Hold until the client may have a task: (the ``time.perf_counter()`` at which the change
        that opened it was noticed, the answer leased for this request or None when it must lease
        on its own); None when the timeout passes or the server is closing."""
        if self._task is None or self.closed or timeout <= 0:
            return None
        event = asyncio.Event()
        self._waiting.setdefault(client_id, {})[event] = worker_id
        try:
            try:
                await self._hold(client_id, event, timeout)
            except TimeoutError:
                if event not in self._granting and event not in self._woken:  # (set just as it timed out)
                    return None
                await event.wait()  # a lease is being granted to this request right now: take it
            if self.closed and event not in self._woken:
                return None
            return self._woken.pop(event, (time.perf_counter(), None))
        finally:
            self._woken.pop(event, None)
            events = self._waiting.get(client_id)
            if events is not None:
                events.pop(event, None)
                if not events:
                    del self._waiting[client_id]

    async def _hold(self, client_id: int, event: asyncio.Event, timeout: float) -> None:  # noqa: ARG002
        """Wait for this held request's event; TimeoutError when its ``wait`` is over."""
        await asyncio.wait_for(event.wait(), timeout)

    def _clients_with_tasks(self, waiting: list[int]) -> set[int]:
        query = select(Task.client_id).distinct().where(task_status_may_become(TaskStatus.leased))
        if len(waiting) <= 500:  # else every client with a task: one query, no parameter limit
            query = query.where(Task.client_id.in_(waiting))
        with self._session_factory() as session:
            return set(session.scalars(query))

    async def _run(self) -> None:
        assert self._poked is not None
        while True:
            try:
                await asyncio.wait_for(self._poked.wait(), self.interval)
            except TimeoutError:
                pass
            poked = self._poked.is_set()
            self._poked.clear()
            since, self._poke_time = self._poke_time, None
            poked_for, self._poked_for = self._poked_for, set()
            if self._closing():
                self._close()
            if self.closed or not self._waiting:
                continue
            since = since if since is not None else time.perf_counter()
            if poked and poked_for is not None:
                # the change said whom it opened tasks for: lease for them (``grant`` reads whether
                # each still has one); the periodic pass still asks, for other replicas' changes
                ready = set(poked_for)
            else:
                try:
                    ready = await run_in_threadpool(self._clients_with_tasks, list(self._waiting))
                except Exception:  # a database hiccup: the held requests time out or the next check finds them
                    log.warning("long polling: could not read the clients with tasks", exc_info=True)
                    continue
            ready = ready.intersection(self._waiting)
            chosen = {cid: next(iter(self._waiting[cid])) for cid in ready}  # one held request per client
            if self._grant is None or not chosen:
                self._wake(ready, chosen, {}, since)
                continue
            # Leased in chunks, each answered as soon as its transaction commits: the event loop sends
            # the first answers while the threadpool leases the next chunk, instead of every request
            # waiting for the whole batch. Every chosen request counts as being granted until it is
            # woken, so that its timeout cannot drop what its chunk leases for it.
            self._granting.update(chosen.values())
            pending, workers = self._worker_by_worker(chosen)
            size = min(self.grant_chunk, workers)   # the first chunk: one task for each waiting worker
            try:
                while pending:
                    chunk, pending = pending[:size], pending[size:]
                    size = self.grant_chunk
                    answers: dict[int, Any] = {}
                    try:
                        answers = await run_in_threadpool(self._grant, {
                            cid: self._waiting[cid][chosen[cid]] for cid in chunk
                            if chosen[cid] in self._waiting.get(cid, ())})
                    except Exception:  # each woken request leases on its own
                        log.warning("long polling: leasing for the held requests failed", exc_info=True)
                    self._wake(chunk, chosen, answers, since)
                    self._granting.difference_update(chosen[cid] for cid in chunk)
            finally:
                self._granting.difference_update(chosen.values())

    def _worker_by_worker(self, chosen: dict[int, asyncio.Event]) -> tuple[list[int], int]:
        """The chosen clients in the order their leases are granted, and how many workers hold them:
        round robin over the workers, so that the first chunk gives every waiting worker one task
        to start on (a worker trains one task at a time; the rest of its tasks can come while it
        trains) and no worker's first task waits for another's whole batch."""
        by_worker: dict[str, list[int]] = {}
        for client_id, event in chosen.items():
            by_worker.setdefault(self._waiting[client_id].get(event, "anonymous"), []).append(client_id)
        queues = list(by_worker.values())
        order = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
        return order, len(queues)

    def _wake(self, client_ids, chosen: dict[int, asyncio.Event], answers: dict[int, Any], since: float) -> None:  # noqa: ANN001
        """Wake every held request of these clients: the chosen one with what was leased for it (None:
        it leases on its own), the others (a client holding several requests) to lease on their own."""
        for client_id in client_ids:
            for event in list(self._waiting.get(client_id, ())):
                answer = answers.get(client_id) if event is chosen[client_id] else None
                self._woken[event] = (since, answer)
                event.set()
