"""Proofs made ahead of time: the next request for a (method, URL) finds its proof signed.

A DPoP proof (RFC 9449 §4.2) needs ``htm``, ``htu``, the token's ``ath``, the origin's nonce,
a fresh ``jti`` and ``iat``. For the calls services make (the same method and URL again and
again, one token for minutes, a nonce that changes rarely) all of that is known before the next
call starts, so when a response for (method, URL) arrives the flow (`dpop_signer.flow`) asks
for the next proof for that pair and the signature is made while the caller does other work:
with a PKCS#11 key the HSM round trip leaves the request's critical path (python-pkcs11
releases the GIL during ``C_Sign``).

`ProofsAhead` is the cache; `SignAhead` and `TakeAhead` are the two steps the flow yields for
it, which the drivers carry out (`drive_sync` on this cache's one signing thread, `drive_async`
as a task on the running loop through `dpop_signer.signers.sign_async`, which for a PKCS#11
key is the module's worker thread). The rules, each one there so that a proof made ahead is
never weaker than one made on demand:

- **Only for pairs seen before.** A (method, URL) is remembered when its first response
  arrives and gets a proof ahead only from its second response on: a pair that is never
  requested again costs no signature, and a client whose every call goes to a new URL keeps
  the HSM free for the proofs it does need.
- **Used at most once.** `ProofsAhead.take` removes the proof before anything else can see
  it, so its ``jti`` is never sent twice (§11.1).
- **Matched exactly.** It is used only with the very token it was made for (a renewal or a
  key rotation makes a new `CachedToken`, so a proof for the old one is dropped), with the
  nonce the request would send (§8, §9), with the clock offset the request would use, and while
  it is younger than ``max_age`` (2 s by default, well inside servers' ``iat`` windows; §11.1).
  Anything else is discarded and the request signs as it would have without the cache.
- **Retries sign afresh.** A nonce demand or an ``invalid_token`` renewal never takes a proof
  from here (the flow asks only for a request's first send).
- **Bounded.** At most ``size`` (method, URL) pairs, least recently used dropped first, and at
  most ``size`` signatures queued; a signer that is stalled (its ``stalled`` property) gets no
  work ahead of time.
- **Never logged.** Neither the proof nor its signature appears in a log line or a ``repr``.

A proof whose signature is still being made when its request comes is waited for (it is ahead
of that request in the HSM's queue anyway), at most until it ages out; a signature made ahead
that failed or timed out (`SignerTimeoutError`) is dropped and the request signs afresh, so it
gets the signer's error exactly as it would have.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, NamedTuple

from dpop_signer.proof import PreparedProof
from dpop_signer.signers.base import Signer, sign_async

if TYPE_CHECKING:
    from dpop_signer.tokens import CachedToken

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_SIZE",
    "PendingProof",
    "ProofsAhead",
    "SignAhead",
    "TakeAhead",
    "proofs_ahead_default",
]

logger = logging.getLogger("dpop_signer")

DEFAULT_MAX_AGE = 2.0
"""Seconds a proof made ahead may wait for its request (servers accept ``iat`` for minutes)."""
DEFAULT_SIZE = 64
"""(method, URL) pairs remembered, and signatures queued, at most."""
_IDLE = 5.0
"""Seconds the signing thread waits for work before it ends (the next job starts it again)."""


def proofs_ahead_default(signer: Signer) -> bool:
    """Whether proofs are made ahead by default for ``signer``: yes for a PKCS#11 key.

    An HSM signature is a round trip worth taking off the critical path; an in-memory PEM
    signature holds the GIL, so signing it on another thread saves nothing measurable.
    """
    # By class name: importing the PKCS#11 backend here would load python-pkcs11 for PEM users.
    return any(cls.__name__ == "Pkcs11Signer" for cls in type(signer).__mro__)


class PendingProof:
    """One proof made ahead for a (method, URL): its unsigned half and its signature to come.

    ``repr`` names the pair and the ``jti`` only: the proof never appears in a log.
    """

    __slots__ = ("entry", "made", "method", "nonce", "offset", "prepared", "signature", "signer")

    def __init__(
        self,
        method: str,
        entry: CachedToken,
        nonce: str | None,
        prepared: PreparedProof,
        made: float,
    ) -> None:
        self.method = method
        self.entry = entry
        """The token (and so the key) it was made for: used with exactly this one."""
        self.nonce = nonce
        self.offset = entry.proofs.clock_offset
        self.prepared = prepared
        self.made = made
        self.signer = entry.proofs.signer
        self.signature: Future[bytes] = Future()
        """Set by the signing thread or task; cancelled when the proof is discarded."""

    def discard(self) -> None:
        """Drop it: a signature not started yet is never made."""
        self.signature.cancel()

    def sign_now(self) -> None:
        """Make the signature in this thread (the signing thread's job)."""
        if not self.signature.set_running_or_notify_cancel():
            return  # discarded before its turn: the HSM is not asked
        try:
            result = self.signer.sign(self.prepared.signing_input.encode("ascii"))
        except BaseException as exc:  # handed to the request that takes it; it signs afresh
            self.signature.set_exception(exc)
        else:
            self.signature.set_result(result)

    async def sign_async(self) -> None:
        """Make the signature through the signer's async path (a task of the running loop)."""
        if not self.signature.set_running_or_notify_cancel():
            return
        try:
            result = await sign_async(self.signer, self.prepared.signing_input.encode("ascii"))
        except BaseException as exc:
            self.signature.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancelled with its loop: the request that takes it signs afresh
        else:
            self.signature.set_result(result)

    def __repr__(self) -> str:
        return f"PendingProof({self.method} jti={self.prepared.jti})"


class SignAhead(NamedTuple):
    """Flow step: start signing ``pending`` in the background; the driver replies None."""

    pending: PendingProof
    owner: ProofsAhead

    def start(self) -> None:
        """From a thread (`drive_sync`): queue it for the cache's signing thread."""
        self.owner.submit(self.pending)

    def start_async(self) -> None:
        """From an event loop (`drive_async`): a task that signs through `sign_async`."""
        self.owner.spawn(self.pending)


class TakeAhead(NamedTuple):
    """Flow step: the signature of ``pending``; the driver replies the 64 bytes, or None.

    None (sign afresh) when it failed, was cancelled, or is not ready within ``wait`` seconds.
    """

    pending: PendingProof
    wait: float

    def result(self) -> bytes | None:
        """Wait for the signature in this thread (`drive_sync`)."""
        future = self.pending.signature
        try:
            return future.result(None if future.done() else max(0.0, self.wait))
        except Exception:  # failed, cancelled (discarded) or not ready in time (a timeout)
            _dropped(self.pending, future)
            return None
        except BaseException:
            if not future.done():
                raise  # KeyboardInterrupt while waiting
            _dropped(self.pending, future)  # a signing task cancelled with its loop
            return None

    async def result_async(self) -> bytes | None:
        """Wait for the signature without blocking the loop (`drive_async`)."""
        future = self.pending.signature
        if not future.done():
            # shield: a timeout here must not cancel the signature (another thread sets it).
            waiter = asyncio.wrap_future(future)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, self.wait))
            except TimeoutError:
                _dropped(self.pending, future)
                return None
            except BaseException:
                if not future.done():
                    raise  # this request was cancelled
        return self.result()


def _dropped(pending: PendingProof, future: Future[bytes]) -> None:
    if not future.done():
        pending.discard()
    elif not future.cancelled() and future.exception() is not None:
        # The class only: the request signs afresh and gets the signer's error itself.
        logger.debug(
            "a proof made ahead (jti=%s) was not signed: %s; signing afresh",
            pending.prepared.jti, type(future.exception()).__name__,
        )  # fmt: skip


class ProofsAhead:
    """The proofs made ahead of time, one per (method, URL) pair, for one `DPoPFlow`.

    Args:
        max_age: Seconds a proof made ahead stays usable (by ``clock``).
        size: (method, URL) pairs remembered at most (least recently used dropped first), and
            signatures queued for the signing thread at most.
        clock: Seconds since the epoch: the flow's clock, the one ``iat`` comes from.

    Thread- and task-safe. ``made``, ``used`` and ``discarded`` count proofs, for tests and
    the benchmarks.
    """

    def __init__(
        self,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_age = max_age
        self.size = size
        self._clock = clock
        self._lock = threading.Lock()
        # (method, htu) -> its proof made ahead, or None: seen, nothing made (yet).
        self._table: OrderedDict[tuple[str, str], PendingProof | None] = OrderedDict()
        self._jobs: deque[PendingProof] = deque()
        self._wake = threading.Condition(threading.Lock())
        self._running = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until they end
        self.made = self.used = self.discarded = 0

    def take(
        self, method: str, htu: str, entry: CachedToken, nonce: str | None
    ) -> TakeAhead | None:
        """The step that gets the proof made ahead for this request, or None: sign afresh.

        The proof leaves the cache here, whether it is used or not (at most once).
        """
        key = (method, htu)
        with self._lock:
            pending = self._table.get(key)
            if pending is None:
                return None
            self._table[key] = None
        age = self._clock() - pending.made
        if (
            pending.entry is not entry
            or pending.nonce != nonce
            or pending.offset != entry.proofs.clock_offset
            or not 0.0 <= age < self.max_age
        ):
            pending.discard()
            self.discarded += 1
            return None
        self.used += 1
        return TakeAhead(pending, self.max_age - age)

    def plan(
        self, method: str, htu: str, entry: CachedToken | None, nonce: str | None
    ) -> SignAhead | None:
        """After a response for (method, htu): the step that makes its next proof, or None.

        None for a pair seen for the first time (it is remembered), without a fresh token, or
        while the signer is stalled, and when a matching proof is waiting already.
        """
        if entry is None or getattr(entry.proofs.signer, "stalled", False):
            return None
        key = (method, htu)
        now = self._clock()
        with self._lock:
            table = self._table
            if key not in table:
                table[key] = None
                if len(table) > self.size:
                    _, evicted = table.popitem(last=False)
                    if evicted is not None:
                        evicted.discard()
                return None
            table.move_to_end(key)
            current = table[key]
            if (
                current is not None
                and current.entry is entry
                and current.nonce == nonce
                and current.offset == entry.proofs.clock_offset
                and now - current.made < self.max_age / 2
                and not current.signature.cancelled()
            ):
                return None  # one is waiting already and has most of its life ahead
            prepared = entry.proofs.prepare(
                method, htu, access_token=entry.token.value, nonce=nonce
            )
            pending = PendingProof(method, entry, nonce, prepared, now)
            table[key] = pending
            self.made += 1
        if current is not None:
            current.discard()
            self.discarded += 1
        return SignAhead(pending, self)

    def clear(self) -> None:
        """Drop every proof made ahead (the pairs seen stay remembered)."""
        with self._lock:
            dropped = [p for p in self._table.values() if p is not None]
            for key in self._table:
                self._table[key] = None
        for pending in dropped:
            pending.discard()
        self.discarded += len(dropped)

    @property
    def waiting(self) -> int:
        """Proofs waiting in the cache."""
        with self._lock:
            return sum(p is not None for p in self._table.values())

    @property
    def pairs(self) -> int:
        """(method, URL) pairs remembered."""
        with self._lock:
            return len(self._table)

    # -- signing off the request's path ---------------------------------------------------

    def submit(self, pending: PendingProof) -> None:
        """Queue ``pending`` for this cache's signing thread (started when needed)."""
        with self._wake:
            if len(self._jobs) >= self.size:
                pending.discard()  # the signer is far behind: no more work ahead of time
                return
            self._jobs.append(pending)
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name="dpop-proofs-ahead", daemon=True).start()
            else:
                self._wake.notify()

    def spawn(self, pending: PendingProof) -> None:
        """Sign ``pending`` in a task of the running event loop."""
        task = asyncio.get_running_loop().create_task(pending.sign_async())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._wake:
                if not jobs:
                    self._wake.wait(_IDLE)
                if not jobs:
                    self._running = False  # idle: end; `submit` starts a new thread
                    return
                pending = jobs.popleft()
            pending.sign_now()

    def __repr__(self) -> str:
        return f"ProofsAhead(max_age={self.max_age:g}, size={self.size}, waiting={self.waiting})"
