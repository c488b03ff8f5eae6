"""Long polling for leases (``POST /v1/clients/{id}/lease?wait=S``).

A held lease request is an ``asyncio.Event`` in this process's event loop: it holds no database
connection and no threadpool thread while it waits. One background task per process (``LeaseWaiters``)
wakes the held requests of clients that have a task to lease:

- at once when this process changed tasks (the scheduler after a tick that did something, a
  released lease: ``poke``, callable from any thread), and
- otherwise every ``interval`` seconds, so that tasks another replica opened are seen too (one
  short query for the clients with a pending task, whatever the number of held requests).

A woken request tries to lease again; it answers as soon as it gets a task, when the federation is
paused or the client revoked, when its ``wait`` is over, or when the server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from coordinator.models import Task
from coordinator.services.tasks import task_status_may_become
from shared.states import TaskStatus

log = logging.getLogger("hilora.coordinator")


class LeaseWaiters:
    def __init__(self, session_factory, interval: float, closing: Callable[[], bool] = lambda: False) -> None:  # noqa: ANN001
        self._session_factory = session_factory
        self.interval = interval
        self._closing = closing
        self._waiting: dict[int, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poked: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
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

    def poke(self) -> None:
        """Something changed tasks: check the held requests now. Safe from any thread."""
        loop, poked = self._loop, self._poked
        if loop is None or poked is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(poked.set)
        except RuntimeError:  # the loop closed meanwhile
            pass

    @property
    def held(self) -> int:
        return sum(len(v) for v in self._waiting.values())

    async def wait(self, client_id: int, timeout: float) -> bool:
        """Hold until the client may have a task (True), or the timeout passes or the server is
        closing (False)."""
        if self._task is None or self.closed or timeout <= 0:
            return False
        event = asyncio.Event()
        self._waiting.setdefault(client_id, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return not self.closed
        except TimeoutError:
            return False
        finally:
            events = self._waiting.get(client_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[client_id]

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
            self._poked.clear()
            if self._closing():
                self._close()
            if self.closed or not self._waiting:
                continue
            try:
                ready = await run_in_threadpool(self._clients_with_tasks, list(self._waiting))
            except Exception:  # a database hiccup: the held requests time out or the next check finds them
                log.warning("long polling: could not read the clients with tasks", exc_info=True)
                continue
            for client_id in ready.intersection(self._waiting):
                for event in self._waiting[client_id]:
                    event.set()
