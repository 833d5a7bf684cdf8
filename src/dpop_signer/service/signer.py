"""`ServiceSigner`: the service's view of the key, which outlives an HSM outage.

A library caller that loses its HSM gets an exception and decides what to do; a long-running
service must answer 503 while the token is away and sign again when it is back, without a
restart. `ServiceSigner` wraps the real signer (`Pkcs11Signer`, `PemSigner`) and:

- times every signature for the ``dpop_sign_seconds`` histogram;
- on `SignerUnavailableError` or `SigningFailedError` (device, session or module lost; the
  backend has already tried to reopen once) drops the broken signer and opens a fresh one on a
  later request, at most once per ``retry_interval`` so a dead HSM is not hammered;
- refuses a reopened key whose public JWK differs from the one the service started with: the
  tokens it holds are bound to that key's thumbprint (RFC 9449 §6);
- never reopens after a `PinError`: real tokens lock after a few wrong PINs.

It implements the `Signer` and `AsyncSigner` protocols, so `DPoPProofBuilder` and `DPoPAuth`
are built once on top of it and keep their caches across an outage.

Inline or offloaded: `sign_async` decides per signature whether to sign on the event loop or in
a worker thread. DESIGN.md's rule is that async callers never block the loop on a network HSM;
the hop to a thread that honours it is not free: here (2-core VM, SoftHSM2) a signature took
0.07 ms called directly and 0.36 ms through the executor (submit, thread wake-up, self-pipe
wake-up of the loop), which held ``/v1/proof`` at 0.34x of ``/healthz``; signing inline took
``/v1/proof`` from ~1,430 to ~1,800-1,950 requests/s on one connection (``python -m bench
service``). So the service measures the key and picks:

- it starts offloaded, in its own one-thread executor, timing each signature inside the worker
  thread (the backend's work without the hop);
- after `_WARMUP` such samples, while the moving average (EWMA, weight `_ALPHA`) of recent
  signatures is below `_INLINE_BELOW` (0.2 ms: a PEM key in ~0.03 ms or a local module like
  SoftHSM2 in ~0.08 ms; network HSMs and a YubiHSM 2 answer in milliseconds) and no offloaded
  signature is still running, it signs inline: the loop is busy a tenth of a millisecond, less
  than the hop adds to the request;
- one inline signature slower than `_STALL` (2 ms) sets the average to that time, so the next
  signatures go back to the thread; they return inline only once the token is fast again;
- while offloaded, one signature every `_PROBE_FIRST` seconds (doubling after each slow probe,
  up to `_PROBE_MAX`) is made inline as a probe, and its time replaces the average; the probe
  first lets the signatures already in the thread finish (new ones wait with it), so it is
  not timed with a wait for the module lock. Timings
  taken in the worker thread include the wait for the GIL, which under load (8 connections,
  SoftHSM2) read 1.5 ms for a 0.1 ms signature, so a fast key stayed offloaded for the rest
  of the run at two thirds of the inline rate; the probe brings it back within 0.1 s. A slow
  key costs the loop one signature's time per probe: a 5 ms stall after 0.1 s, then after
  0.2, 0.4, ... and at most once a minute.

Why blocking is bounded: the service is the only user of its signer, an inline signature starts
only when none of its own is in flight (so no module lock is held by its worker), and every
inline signature is timed. What the rule cannot see is another thread of the process signing
with a different key behind the same PKCS#11 module file (a separate ``--assertion-key``): the
loop may then wait for that one signature on the module lock, at most once per token request.
After an outage the reopened key starts offloaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dpop_signer.errors import (
    PinError,
    SignerError,
    SignerUnavailableError,
    SigningFailedError,
)
from dpop_signer.jwk import EcPublicJwk
from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import Metrics
from dpop_signer.signers.base import Signer, close_signer

__all__ = ["ServiceSigner"]

_INLINE_BELOW = 0.0002
"""Sign on the event loop while recent signatures average less than this many seconds."""
_STALL = 0.002
"""An inline signature slower than this (seconds) sends the next ones back to the thread."""
_ALPHA = 0.2
"""Weight of the newest signature in the moving average."""
_WARMUP = 8
"""Signatures timed in the worker thread before the first inline one."""
_PROBE_FIRST = 0.1
"""Seconds an offloaded key waits for its first inline probe; doubled after each slow one."""
_PROBE_MAX = 60.0
"""Longest wait between two probes of a key that stays slow."""


class ServiceSigner:
    """A signer that recovers from HSM outages and counts what it signs."""

    def __init__(
        self,
        opener: Callable[[], Signer],
        *,
        metrics: Metrics | None = None,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open the key now (a misconfigured key must stop the service at start, not later).

        Args:
            opener: opens the real signer (e.g. ``lambda: build_signer(settings)``); called
                again, in a worker thread, after an outage.
            metrics: where signatures are counted and timed.
            retry_interval: least number of seconds between two reopen attempts.
            clock: monotonic clock, for tests.
        """
        self._opener = opener
        self._metrics = metrics or Metrics()
        self._retry_interval = retry_interval
        self._clock = clock
        self._inner: Signer | None = opener()
        self._broken: Signer | None = None
        self._jwk: EcPublicJwk = self._inner.public_jwk
        self._algorithm = self._inner.algorithm
        self._last_attempt = -float("inf")
        self._last_error: SignerError | None = None
        self._fatal: SignerError | None = None
        self._reopen_lock = asyncio.Lock()
        self._sync_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._average = float("inf")  # EWMA of signing seconds, without the thread hop
        self._samples = 0
        self._offloaded = 0  # signatures running in the worker thread now
        self._probe_wait = _PROBE_FIRST
        self._next_probe = clock() + _PROBE_FIRST
        # Futures of callers waiting for the worker to empty before an inline probe.
        self._drain_waiters: list[asyncio.Future[None]] = []

    @property
    def signs_inline(self) -> bool:
        """Whether the next `sign_async` runs on the event loop (see the module docstring)."""
        return self._samples >= _WARMUP and self._average < _INLINE_BELOW and not self._offloaded

    @property
    def algorithm(self) -> str:
        """The JWS ``alg`` of the key: ``"ES256"``."""
        return self._algorithm

    @property
    def public_jwk(self) -> EcPublicJwk:
        """The public JWK the service started with (kept through outages)."""
        return dict(self._jwk)  # type: ignore[return-value]

    @property
    def available(self) -> bool:
        """False while the key is known to be unreachable."""
        return self._inner is not None

    def sign(self, message: bytes) -> bytes:
        """Sign synchronously (for callers without a loop); same recovery rules."""
        with self._sync_lock:
            inner = self._inner or self._reopen_blocking()
        started = time.perf_counter()
        try:
            signature = inner.sign(message)
        except (SignerUnavailableError, SigningFailedError) as exc:
            self._drop(inner, exc)
            raise
        self._metrics.observe_signature(time.perf_counter() - started)
        return signature

    async def sign_async(self, message: bytes) -> bytes:
        """Sign inline or in the worker thread (module docstring); reopen a lost key first."""
        inner = self._inner
        if inner is None:
            async with self._reopen_lock:
                inner = self._inner
                if inner is None:
                    inner = await asyncio.get_running_loop().run_in_executor(
                        None, self._reopen_blocking
                    )
        if self._drain_waiters:
            # A probe is waiting for the worker to empty: wait with it rather than refill the
            # worker, then decide afresh (the probe will have run first).
            await self._drained()
        started = time.perf_counter()
        try:
            if self.signs_inline:
                signature = inner.sign(message)
                elapsed = time.perf_counter() - started
                self._learn(elapsed)
                if elapsed >= _STALL:
                    # Back to the thread: the next probe is a full wait away, not due at once.
                    self._next_probe = self._clock() + self._probe_wait
            elif self._probe_due():
                if self._offloaded:
                    # Under load something is nearly always in the thread; let it finish so
                    # the probe neither waits on the module lock nor is timed with that wait.
                    await self._drained()
                    started = time.perf_counter()
                signature = inner.sign(message)
                elapsed = time.perf_counter() - started
                self._probed(elapsed)
            else:
                signature = await self._offload(inner, message)
                elapsed = time.perf_counter() - started
        except (SignerUnavailableError, SigningFailedError) as exc:
            self._drop(inner, exc)
            raise
        self._metrics.observe_signature(elapsed)
        return signature

    async def _offload(self, inner: Signer, message: bytes) -> bytes:
        executor = self._executor
        if executor is None:
            # One thread: the service's offloaded signatures queue here rather than on the
            # module lock (Pkcs11Signer.sign takes it), as they did on the module's own executor.
            executor = self._executor = ThreadPoolExecutor(1, thread_name_prefix="dpop-sign")
        self._offloaded += 1
        try:
            signature, seconds = await asyncio.get_running_loop().run_in_executor(
                executor, _timed_sign, inner, message
            )
        finally:
            self._offloaded -= 1
            if not self._offloaded:
                waiters, self._drain_waiters = self._drain_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        if inner is self._inner:
            self._learn(seconds)
        return signature

    async def _drained(self) -> None:
        """Return once no signature of ours is in the worker thread."""
        if not self._offloaded:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _probe_due(self) -> bool:
        if self._samples < _WARMUP:
            return False  # not measured yet
        now = self._clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self._probe_wait
        return True

    def _probed(self, seconds: float) -> None:
        # Measured on the loop, without a GIL wait: trusted over the thread's average.
        self._average = seconds
        if seconds < _INLINE_BELOW:
            self._probe_wait = _PROBE_FIRST
        else:
            self._probe_wait = min(self._probe_wait * 2, _PROBE_MAX)
            self._next_probe = self._clock() + self._probe_wait

    def _learn(self, seconds: float) -> None:
        if self._samples == 0 or seconds >= _STALL:
            self._average = seconds
        else:
            self._average += _ALPHA * (seconds - self._average)
        self._samples += 1

    def _reopen_blocking(self) -> Signer:
        if self._fatal is not None:
            raise self._fatal
        if self._inner is not None:
            return self._inner
        now = self._clock()
        if now - self._last_attempt < self._retry_interval and self._last_error is not None:
            # Fail fast between attempts: the HSM is not asked again for every request.
            raise SignerUnavailableError(
                f"the signing key is unavailable ({self._last_error.message}); "
                f"retrying every {self._retry_interval:g} s"
            )
        self._last_attempt = now
        broken, self._broken = self._broken, None
        if broken is not None:
            # Close before reopening: closing a PKCS#11 session that holds the login logs out
            # every session of the process, the new one included.
            _close(broken)
        try:
            inner = self._opener()
        except PinError as exc:
            # Never retried: a real token locks after a few wrong PINs.
            self._fatal = exc
            log_event("signer_fatal", error=exc.message)
            raise
        except SignerError as exc:
            self._last_error = exc
            log_event("signer_reopen_failed", error=exc.message)
            raise
        if inner.public_jwk != self._jwk:
            _close(inner)
            self._fatal = SignerUnavailableError(
                "the reopened key is not the key the service started with; tokens are bound "
                "to the old key's thumbprint, so restart the service to switch keys"
            )
            log_event("signer_fatal", error=self._fatal.message)
            raise self._fatal
        self._inner = inner
        self._last_error = None
        # A reopened key is measured again before it is trusted to sign on the loop.
        self._average, self._samples = float("inf"), 0
        self._probe_wait = _PROBE_FIRST
        self._next_probe = self._clock() + _PROBE_FIRST
        log_event("signer_recovered")
        return inner

    def _drop(self, inner: Signer, exc: SignerError) -> None:
        if self._inner is inner:
            self._inner = None
            self._broken = inner
            self._last_error = exc
            self._last_attempt = self._clock()
            log_event("signer_unavailable", error=exc.message)

    def close(self) -> None:
        """Close the real signer (at shutdown)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for signer in (self._inner, self._broken):
            if signer is not None:
                _close(signer)
        self._inner = self._broken = None

    def __repr__(self) -> str:
        return f"ServiceSigner(kid={self._jwk['x'][:8]}..., available={self.available})"


def _timed_sign(signer: Signer, message: bytes) -> tuple[bytes, float]:
    # Timed in the worker thread: the backend's own latency, which decides inline or not.
    started = time.perf_counter()
    signature = signer.sign(message)
    return signature, time.perf_counter() - started


def _close(signer: Signer) -> None:
    # A broken signer may fail to close too; the service goes on with a fresh one.
    with contextlib.suppress(Exception):
        close_signer(signer)
