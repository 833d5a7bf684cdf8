"""`ServiceSigner`: the service's view of the key, which outlives an HSM outage.

A library caller that loses its HSM gets an exception and decides what to do; a long-running
service must answer 503 while the token is away, say why at ``/healthz``, and sign again when
it is back, without a restart. `ServiceSigner` wraps the real signer (`Pkcs11Signer`,
`PemSigner`) and:

- signs through the signer layer's one policy for event loops (`signers.base.sign_async`): a
  PKCS#11 key on its module's worker thread with the signing deadline, a PEM key inline;
- times every signature for the ``dpop_sign_seconds`` histogram and counts every failure by
  its reason (``dpop_signer_failures_total``);
- knows the key's state (`state`): ``available``; ``stalled`` while a call has been inside
  the module for longer than the signing deadline (it clears by itself when the call returns);
  ``key_missing`` or ``unavailable`` while the key cannot be reached; ``pin_refused`` and
  ``key_changed`` until the configuration is reloaded (``SIGHUP`` opens a new `ServiceSigner`,
  see `dpop_signer.service.reload`);
- after a lost key (`SignerUnavailableError`, `KeyNotFoundError`, `SigningFailedError`: the
  backend has already tried to reopen once) drops the broken signer and opens a fresh one on a
  later request, at most once per back-off interval (``retry_interval``, doubling up to
  ``retry_max``) so a dead HSM or a deleted key is not searched for on every request;
- never opens again after a `PinError` (real tokens lock after a few wrong PINs) or a
  `KeyChangedError`, and refuses a reopened key whose public JWK differs from the one the
  service started with: the tokens it holds are bound to that key's thumbprint (RFC 9449 §6).

A service that is not asked for proofs would never notice that its key went away, so
`keep_probing` signs a probe message when no signature has succeeded for a while (``interval``,
5 s by default): ``/healthz`` then tells the truth within about one interval plus the signing
deadline, at the cost of at most one signature per interval while idle.

It implements the `Signer` and `AsyncSigner` protocols, so `DPoPProofBuilder` and `DPoPAuth`
are built once on top of it and keep their caches across an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Literal

from dpop_signer.errors import (
    KeyChangedError,
    KeyNotFoundError,
    PinError,
    SignerError,
    SignerTimeoutError,
)
from dpop_signer.jwk import PublicJwk
from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import Metrics
from dpop_signer.signers.base import Signer, close_signer, sign_async

__all__ = ["PROBE_INTERVAL", "ServiceSigner", "SignerState", "failure_reason", "keep_probing"]

PROBE_INTERVAL = 5.0
"""Seconds without a successful signature after which `keep_probing` signs a probe."""
_PROBE_MESSAGE = b"dpop-signer health probe"

SignerState = Literal[
    "available", "stalled", "key_missing", "unavailable", "pin_refused", "key_changed"
]
"""What ``/healthz`` reports about the key."""


def failure_reason(exc: SignerError) -> SignerState:
    """The state a signer error puts the key in (also the metric's ``reason`` label)."""
    if isinstance(exc, PinError):
        return "pin_refused"
    if isinstance(exc, KeyChangedError):
        return "key_changed"
    if isinstance(exc, SignerTimeoutError):
        return "stalled"
    if isinstance(exc, KeyNotFoundError):
        return "key_missing"
    return "unavailable"


class ServiceSigner:
    """A signer that recovers from HSM outages, reports its state and counts what it signs."""

    def __init__(
        self,
        opener: Callable[[], Signer],
        *,
        metrics: Metrics | None = None,
        retry_interval: float = 1.0,
        retry_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open the key now (a misconfigured key must stop the service at start, not later).

        Args:
            opener: opens the real signer (e.g. ``lambda: build_signer(settings)``); called
                again, in a worker thread, after an outage.
            metrics: where signatures and failures are counted and timed.
            retry_interval: least number of seconds between two reopen attempts; doubled
                after each failed attempt, up to ``retry_max``.
            retry_max: longest wait between two reopen attempts.
            clock: monotonic clock, for tests.
        """
        self._opener = opener
        self._metrics = metrics or Metrics()
        self._retry_interval = retry_interval
        self._retry_max = retry_max
        self._clock = clock
        self._inner: Signer | None = opener()
        self._broken: list[Signer] = []
        self._jwk: PublicJwk = self._inner.public_jwk
        self._algorithm = self._inner.algorithm
        self._wait = retry_interval
        self._next_attempt = -float("inf")
        self._last_error: SignerError | None = None
        self._fatal: SignerError | None = None
        self._reopen_lock = asyncio.Lock()
        self._sync_lock = threading.Lock()
        self.last_success = time.monotonic()
        """`time.monotonic` of the last signature that succeeded (start-up counts as one)."""

    @property
    def algorithm(self) -> str:
        """The JWS ``alg`` of the key: ``"ES256"``."""
        return self._algorithm

    @property
    def public_jwk(self) -> PublicJwk:
        """The public JWK the service started with (kept through outages)."""
        return dict(self._jwk)  # type: ignore[return-value]

    @property
    def state(self) -> SignerState:
        """The key's state now (see the module docstring)."""
        if self._fatal is not None:
            return failure_reason(self._fatal)
        inner = self._inner
        if inner is None:
            return failure_reason(self._last_error) if self._last_error else "unavailable"
        if getattr(inner, "stalled", False):
            return "stalled"
        return "available"

    @property
    def reason(self) -> str | None:
        """One line saying why the key is not available (None while it is)."""
        if self._fatal is not None:
            return self._fatal.message
        if self._inner is None:
            return self._last_error.message if self._last_error else None
        if getattr(self._inner, "stalled", False):
            return "a call into the PKCS#11 module has not returned within the signing deadline"
        return None

    @property
    def available(self) -> bool:
        """True while the key can sign."""
        return self.state == "available"

    def sign(self, message: bytes) -> bytes:
        """Sign synchronously (for callers without a loop); same recovery rules."""
        with self._sync_lock:
            inner = self._inner or self._reopen_blocking()
        started = time.perf_counter()
        try:
            signature = inner.sign(message)
        except SignerError as exc:
            self._failed(inner, exc)
            raise
        self._metrics.observe_signature(time.perf_counter() - started)
        self.last_success = time.monotonic()
        return signature

    async def sign_async(self, message: bytes) -> bytes:
        """Sign without blocking the event loop; reopen a lost key first (at most per interval)."""
        inner = self._inner
        if inner is None:
            async with self._reopen_lock:
                inner = self._inner
                if inner is None:
                    inner = await asyncio.get_running_loop().run_in_executor(
                        None, self._reopen_blocking
                    )
        started = time.perf_counter()
        try:
            signature = await sign_async(inner, message)
        except SignerError as exc:
            self._failed(inner, exc)
            raise
        self._metrics.observe_signature(time.perf_counter() - started)
        self.last_success = time.monotonic()
        return signature

    async def probe(self) -> bool:
        """Sign a probe message (not a proof) so the state is current; True if it signed."""
        try:
            await self.sign_async(_PROBE_MESSAGE)
        except SignerError:
            return False  # the failure is recorded in the state and the metrics
        return True

    def _reopen_blocking(self) -> Signer:
        if self._fatal is not None:
            raise self._fatal
        if self._inner is not None:
            return self._inner
        now = self._clock()
        if now < self._next_attempt and self._last_error is not None:
            # Fail fast between attempts: the HSM is not asked again for every request.
            raise type(self._last_error)(
                f"{self._last_error.message}; trying again in {self._next_attempt - now:.1f} s"
            )
        broken, self._broken = self._broken, []
        for signer in broken:
            # Close before reopening: closing a PKCS#11 session that holds the login logs out
            # every session of the process, the new one included.
            _close(signer)
        try:
            inner = self._opener()
        except SignerError as exc:
            self._failed(None, exc)
            raise
        if inner.public_jwk != self._jwk:
            _close(inner)
            changed = KeyChangedError(
                "the reopened key is not the key the service started with; tokens are bound "
                "to the old key's thumbprint, so reload the service (SIGHUP) to switch keys"
            )
            self._failed(None, changed)
            raise changed
        self._inner = inner
        self._last_error = None
        self._wait = self._retry_interval
        log_event("signer_recovered")
        return inner

    def _failed(self, inner: Signer | None, exc: SignerError) -> None:
        reason = failure_reason(exc)
        self._metrics.signer_failures[reason] += 1
        if isinstance(exc, SignerTimeoutError):
            return  # the stuck call finishes in its own thread; the key is still the key
        if isinstance(exc, PinError | KeyChangedError):
            # Never opened again until a reload: a refused PIN locks real tokens, and a changed
            # key would sign proofs for tokens bound to another thumbprint.
            if self._fatal is None:
                self._fatal = exc
                log_event("signer_fatal", reason=reason, error=exc.message)
            if inner is not None and self._inner is inner:
                self._inner = None
                self._broken.append(inner)
            return
        if inner is not None:
            if self._inner is not inner:
                return  # another caller dropped it already
            self._inner = None
            self._broken.append(inner)
        self._last_error = exc
        self._next_attempt = self._clock() + self._wait
        self._wait = min(self._wait * 2, self._retry_max)
        log_event("signer_unavailable", reason=reason, error=exc.message)

    def close(self) -> None:
        """Close the real signer and any it replaced (at shutdown)."""
        signers = [*self._broken, *([self._inner] if self._inner is not None else [])]
        self._inner, self._broken = None, []
        for signer in signers:
            _close(signer)

    def __repr__(self) -> str:
        return f"ServiceSigner({self._algorithm}, state={self.state})"


def _close(signer: Signer) -> None:
    # A broken signer may fail to close too; the service goes on with a fresh one.
    with contextlib.suppress(Exception):
        close_signer(signer)


async def keep_probing(
    current: Callable[[], ServiceSigner], interval: float = PROBE_INTERVAL
) -> None:
    """Probe the current signer whenever it has not signed for ``interval`` seconds.

    Runs until cancelled (the service's lifespan starts and cancels it); ``current`` returns
    the signer in use now, which a reload may have swapped.
    """
    while True:
        await asyncio.sleep(interval / 4)
        signer = current()
        if time.monotonic() - signer.last_success >= interval:
            await signer.probe()
