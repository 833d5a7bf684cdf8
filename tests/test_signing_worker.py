"""`SigningWorker`: jobs run in its thread, answers reach the right loop, errors and cancels too."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dpop_signer.signers.worker import SigningWorker


def test_jobs_run_in_the_worker_thread_and_answer_in_order() -> None:
    worker = SigningWorker("test-worker")
    ran_in: set[str] = set()

    def job(i: int) -> int:
        ran_in.add(threading.current_thread().name)
        return i * i

    async def main() -> list[int]:
        return list(await asyncio.gather(*(worker.run(job, i) for i in range(500))))

    assert asyncio.run(main()) == [i * i for i in range(500)]
    assert ran_in == {"test-worker"}


def test_an_exception_reaches_the_awaiting_task_and_the_worker_goes_on() -> None:
    worker = SigningWorker("test-worker")

    def fail() -> None:
        raise ValueError("token refused")

    async def main() -> int:
        with pytest.raises(ValueError, match="token refused"):
            await worker.run(fail)
        return await worker.run(lambda: 7)

    assert asyncio.run(main()) == 7


def test_the_event_loop_keeps_running_while_a_slow_job_runs() -> None:
    worker = SigningWorker("test-worker")

    async def main() -> int:
        ticks = 0
        job = worker.run(time.sleep, 0.2)
        while not job.done():
            ticks += 1
            await asyncio.sleep(0.01)
        await job
        return ticks

    assert asyncio.run(main()) >= 5


def test_a_job_cancelled_before_it_starts_is_never_run() -> None:
    worker = SigningWorker("test-worker")
    ran: list[str] = []
    gate = threading.Event()

    async def main() -> None:
        blocker = worker.run(gate.wait, 5)  # the worker is busy with this one
        skipped = worker.run(ran.append, "skipped")
        skipped.cancel()
        gate.set()
        await blocker
        await worker.run(ran.append, "after")

    asyncio.run(main())
    assert ran == ["after"]


def test_loops_in_several_threads_get_their_own_answers() -> None:
    worker = SigningWorker("test-worker")
    results: dict[int, list[int]] = {}

    def caller(n: int) -> None:
        async def main() -> list[int]:
            return list(
                await asyncio.gather(*(worker.run(lambda i=i: n * 1000 + i) for i in range(200)))
            )

        results[n] = asyncio.run(main())

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {n: [n * 1000 + i for i in range(200)] for n in range(4)}


def test_a_closed_loop_does_not_stop_the_worker() -> None:
    worker = SigningWorker("test-worker")
    gate = threading.Event()
    loop = asyncio.new_event_loop()
    # Submitted from a loop that is closed before the answer comes back.
    loop.run_until_complete(_submit(worker, gate))
    loop.close()
    gate.set()

    async def later() -> int:
        return await worker.run(lambda: 42)

    assert asyncio.run(later()) == 42


async def _submit(worker: SigningWorker, gate: threading.Event) -> None:
    worker.run(gate.wait, 5)


def test_deadlines_fail_only_the_futures_still_waiting_when_due() -> None:
    from dpop_signer.signers.worker import Deadlines

    class Late(Exception):
        pass

    async def main() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, 0.2)
        answered, waiting = loop.create_future(), loop.create_future()
        started = loop.time()
        deadlines.add(answered, Late)
        deadlines.add(waiting, Late)
        answered.set_result(b"sig")  # answered in time: never failed
        outcomes = []
        for future in (answered, waiting):
            try:
                await asyncio.wait_for(future, 5.0)
                outcomes.append("answered")
            except Late:
                outcomes.append("late")
        return outcomes, loop.time() - started

    outcomes, took = asyncio.run(main())
    assert outcomes == ["answered", "late"]
    assert 0.2 <= took < 1.0
