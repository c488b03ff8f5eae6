"""LeaseWaiters leases held requests chunk by chunk and answers each chunk as soon as it is leased;
a request whose wait ends while its chunk waits its turn still gets what is leased for it."""
from __future__ import annotations

import asyncio
import threading

import pytest

from coordinator.longpoll import LeaseWaiters

pytestmark = pytest.mark.unit


def test_held_requests_are_leased_and_answered_chunk_by_chunk():
    calls: list[tuple[list[int], int]] = []
    client_8_timed_out = threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        first_chunk_started = asyncio.Event()

        class Waiters(LeaseWaiters):
            async def _hold(self, client_id, event, timeout):
                if client_id != 8:
                    return await super()._hold(client_id, event, timeout)
                # client 8's wait ends while the first chunk is being leased: ordered by events, not by a
                # short timeout racing the batch (which a slow machine loses)
                await first_chunk_started.wait()
                client_8_timed_out.set()
                raise TimeoutError

        def grant(wanted: dict[int, str]) -> dict[int, str]:
            calls.append((sorted(wanted), len(waiters._granting)))
            if len(calls) == 1:
                loop.call_soon_threadsafe(first_chunk_started.set)
                assert client_8_timed_out.wait(60)
            return {cid: f"lease for {cid} ({worker})" for cid, worker in wanted.items()}

        waiters = Waiters(None, interval=300.0, grant=grant)
        waiters.grant_chunk = 3
        waiters._clients_with_tasks = lambda waiting: set(waiting)     # every held client has a task
        waiters.start()
        try:
            held = [asyncio.create_task(waiters.wait(cid, 120.0, f"w{cid}")) for cid in range(1, 9)]
            await asyncio.sleep(0)                                        # every request is held
            assert sorted(waiters._waiting) == list(range(1, 9))
            waiters.poke()
            return await asyncio.wait_for(asyncio.gather(*held), 240)
        finally:
            await waiters.stop()

    answers = asyncio.run(main())
    assert client_8_timed_out.is_set()
    # 8 clients in chunks of 3; before each chunk, the chunks already leased were answered (no longer granting)
    assert [len(chunk) for chunk, _ in calls] == [3, 3, 2]
    assert sorted(c for chunk, _ in calls for c in chunk) == list(range(1, 9))
    assert [granting for _, granting in calls] == [8, 5, 2]
    # client 8's wait ended while the first chunk was leased: it still takes its own lease
    assert [answer for _, answer in answers] == [f"lease for {cid} (w{cid})" for cid in range(1, 9)]


def test_a_failed_chunk_lets_its_requests_lease_on_their_own_and_the_rest_go_on():
    async def main():
        calls = []

        def grant(wanted: dict[int, str]) -> dict[int, str]:
            calls.append(sorted(wanted))
            if len(calls) == 1:
                raise RuntimeError("database hiccup")
            return {cid: "leased" for cid in wanted}

        waiters = LeaseWaiters(None, interval=300.0, grant=grant)
        waiters.grant_chunk = 2
        waiters._clients_with_tasks = lambda waiting: set(waiting)
        waiters.start()
        try:
            held = [asyncio.create_task(waiters.wait(cid, 120.0)) for cid in (1, 2, 3, 4)]
            await asyncio.sleep(0)
            waiters.poke()
            answers = await asyncio.wait_for(asyncio.gather(*held), 240)
        finally:
            await waiters.stop()
        return calls, answers, waiters

    calls, answers, waiters = asyncio.run(main())
    # one worker ("anonymous"): its first task alone, then chunks of 2
    assert calls == [[1], [2, 3], [4]]
    by_client = dict(zip((1, 2, 3, 4), (a for _, a in answers)))
    assert sorted(cid for cid, a in by_client.items() if a is None) == calls[0]     # lease on their own
    assert sorted(cid for cid, a in by_client.items() if a == "leased") == calls[1] + calls[2]
    assert not waiters._granting and not waiters._waiting


def test_the_first_chunk_gives_every_waiting_worker_one_task_and_the_rest_go_round_robin():
    """Workers A (clients 1-4) and B (5, 6) hold requests when tasks open: the first transaction
    leases one task for each worker (each can start training at once), the next ones alternate."""
    async def main():
        calls = []

        def grant(wanted: dict[int, str]) -> dict[int, str]:
            calls.append(list(wanted.items()))
            return {cid: f"leased by {worker}" for cid, worker in wanted.items()}

        waiters = LeaseWaiters(None, interval=300.0, grant=grant)
        waiters.grant_chunk = 3
        waiters._clients_with_tasks = lambda waiting: set(waiting)
        waiters.start()
        try:
            worker = {1: "A", 2: "A", 3: "A", 4: "A", 5: "B", 6: "B"}
            held = [asyncio.create_task(waiters.wait(cid, 120.0, worker[cid])) for cid in worker]
            await asyncio.sleep(0)
            waiters.poke()
            answers = await asyncio.wait_for(asyncio.gather(*held), 240)
        finally:
            await waiters.stop()
        return calls, answers

    calls, answers = asyncio.run(main())
    assert calls == [[(1, "A"), (5, "B")], [(2, "A"), (6, "B"), (3, "A")], [(4, "A")]]
    assert [a for _, a in answers] == ["leased by A"] * 4 + ["leased by B"] * 2


def test_a_poke_that_names_its_clients_leases_for_them_without_asking_the_database():
    """The scheduler's poke says for which clients its tick opened tasks: those held requests are
    leased for without the query for clients with a task; a poke that names none asks the database,
    and pokes that come together add up (one not naming its clients makes the pass ask)."""
    async def main():
        queried: list[list[int]] = []
        granted: list[list[int]] = []

        def grant(wanted: dict[int, str]) -> dict[int, str]:
            granted.append(sorted(wanted))
            return {cid: f"leased {cid}" for cid in wanted}

        def clients_with_tasks(waiting: list[int]) -> set[int]:
            queried.append(sorted(waiting))
            return {4}

        waiters = LeaseWaiters(None, interval=300.0, grant=grant)
        waiters._clients_with_tasks = clients_with_tasks
        waiters.start()
        try:
            held = {cid: asyncio.create_task(waiters.wait(cid, 120.0)) for cid in (1, 2, 3, 4, 5)}
            await asyncio.sleep(0)
            waiters.poke({2, 3, 9})                        # 9 holds no request: left out
            first = await asyncio.wait_for(asyncio.gather(held[2], held[3]), 60)
            assert queried == [] and granted == [[2], [3]]    # one worker: its first task alone, then the rest
            assert not held[1].done() and not held[4].done()
            # two pokes before the next pass: one names client 1, one does not: the pass asks
            waiters._loop.call_soon(waiters._note_poke, 0.0, frozenset({1}))
            waiters._loop.call_soon(waiters._note_poke, 0.0, None)
            fourth = await asyncio.wait_for(held[4], 60)
            assert queried == [[1, 4, 5]]                  # the database said: client 4
            assert not held[1].done() and not held[5].done()
            return first, fourth, granted
        finally:
            await waiters.stop()

    first, fourth, granted = asyncio.run(main())
    assert [answer for _, answer in first] == ["leased 2", "leased 3"]
    assert fourth[1] == "leased 4" and granted[-1] == [4]
