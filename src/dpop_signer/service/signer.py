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
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from dpop_signer.errors import (
    PinError,
    SignerError,
    SignerUnavailableError,
    SigningFailedError,
)
from dpop_signer.jwk import EcPublicJwk
from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import Metrics
from dpop_signer.signers.base import Signer, sign_async

__all__ = ["ServiceSigner"]


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
        """Sign through the backend's async path; reopen the key first if it was lost."""
        inner = self._inner
        if inner is None:
            async with self._reopen_lock:
                inner = self._inner
                if inner is None:
                    inner = await asyncio.get_running_loop().run_in_executor(
                        None, self._reopen_blocking
                    )
        started = time.perf_counter()
        own_async = getattr(inner, "sign_async", None)
        try:
            # getattr, not sign_async(): isinstance() against a runtime-checkable Protocol
            # costs ~25 µs, a third of a SoftHSM2 signature, on every proof.
            if own_async is not None:
                signature: bytes = await own_async(message)
            else:
                signature = await sign_async(inner, message)
        except (SignerUnavailableError, SigningFailedError) as exc:
            self._drop(inner, exc)
            raise
        self._metrics.observe_signature(time.perf_counter() - started)
        return signature

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
        for signer in (self._inner, self._broken):
            if signer is not None:
                _close(signer)
        self._inner = self._broken = None

    def __repr__(self) -> str:
        return f"ServiceSigner(kid={self._jwk['x'][:8]}..., available={self.available})"


def _close(signer: Signer) -> None:
    close = getattr(signer, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()
