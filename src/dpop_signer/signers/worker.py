"""`SigningWorker`: one thread that signs for event loops and answers them in batches.

An HSM call must not block an event loop, so async callers hand their signature to a thread.
``loop.run_in_executor`` costs two thread wake-ups per signature (the worker, then the loop
through its self-pipe), which on SoftHSM2 was as much as the ``C_Sign`` itself: 64 tasks got
0.47x of one thread's raw signing rate. Here a busy worker takes the next job without sleeping,
and it wakes a loop only when that loop has no answer waiting already; the loop then settles
every answer that arrived since, in one callback. Under load that is one wake-up per batch
rather than two per signature; alone, a signature costs what it did.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["SigningWorker"]

_T = TypeVar("_T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]


class Deadlines:
    """Futures of one event loop that fail at a deadline, all on one timer per timeout.

    A timer per signature (``loop.call_later``, cancelled when the answer comes) leaves tens of
    thousands of cancelled handles in the loop's heap at a few thousand signatures a second
    with a 5 s deadline; ``await build_async`` from 64 tasks lost a third of its rate to them.
    Here futures with the same timeout are queued in the order they started, which is the order
    of their deadlines, and one timer, set for the oldest, fails those past due.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Deadlines ``timeout`` seconds after each `add`, on ``loop``."""
        self._loop = loop
        self._timeout = timeout
        self._pending: deque[tuple[float, asyncio.Future[Any], Callable[[], BaseException]]] = (
            deque()
        )
        self._timer: asyncio.TimerHandle | None = None

    def add(self, future: asyncio.Future[Any], error: Callable[[], BaseException]) -> None:
        """Fail ``future`` with ``error()`` if it is not done ``timeout`` seconds from now."""
        pending = self._pending
        while pending and pending[0][1].done():
            pending.popleft()  # answered already: the usual case, kept out of the queue
        pending.append((self._loop.time() + self._timeout, future, error))
        if self._timer is None:
            self._timer = self._loop.call_at(pending[0][0], self._expire)

    def _expire(self) -> None:
        self._timer = None
        pending = self._pending
        now = self._loop.time()
        while pending:
            deadline, future, error = pending[0]
            if future.done():
                pending.popleft()
            elif deadline <= now:
                pending.popleft()
                future.set_exception(error())
            else:
                self._timer = self._loop.call_at(deadline, self._expire)
                return


class SigningWorker:
    """A daemon thread running jobs for event loops, in the order they were submitted."""

    def __init__(self, name: str) -> None:
        """Name the thread; it starts with the first job."""
        self._name = name
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition(threading.Lock())
        self._idle = True
        self._thread: threading.Thread | None = None
        # Answers made but not yet settled, per loop; a loop is woken when its list was empty.
        self._answers: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        self._answers_lock = threading.Lock()

    def run(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``fn(*args)`` in the worker thread; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._wake:
            self._jobs.append((fn, args, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            elif self._idle:
                self._wake.notify()
        return future

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._wake:
                while not jobs:
                    self._idle = True
                    self._wake.wait()
                self._idle = False
                fn, args, future, loop = jobs.popleft()
            if future.done():
                continue  # its caller gave up (cancelled, or timed out) before the HSM was asked
            try:
                outcome: Any = fn(*args)
            except BaseException as exc:
                outcome = _Raised(exc)
            self._answer(loop, future, outcome)

    def _answer(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], outcome: Any
    ) -> None:
        with self._answers_lock:
            waiting = self._answers.setdefault(loop, [])
            waiting.append((future, outcome))
            if len(waiting) > 1:
                return  # the loop is already called to settle this list
        try:
            loop.call_soon_threadsafe(self._settle, loop)
        except RuntimeError:
            # The loop was closed: nobody waits for these answers any more.
            with self._answers_lock:
                self._answers.pop(loop, None)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._answers_lock:
            answers = self._answers.pop(loop, [])
        for future, outcome in answers:
            if future.done():
                continue  # cancelled while the signature was being made
            if isinstance(outcome, _Raised):
                future.set_exception(outcome.exc)
            else:
                future.set_result(outcome)


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
