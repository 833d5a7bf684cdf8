"""`ServiceSigner`'s recovery rules, in process, around a real `PemSigner`.

The end-to-end faults (a SoftHSM2 token re-keyed, its PIN changed, its key deleted, its module
stalled behind ``p11-kit server``, under the running service) are in
tests/test_signer_lifecycle_service.py; these tests pin the rules around them: a different key
after reopening, a PIN refused on reopen (never tried again), the reopen back-off, and the
state that ``/healthz`` reports.
"""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer.errors import (
    KeyChangedError,
    KeyNotFoundError,
    PinError,
    SignerTimeoutError,
    SignerUnavailableError,
)
from dpop_signer.jwk import PublicJwk
from dpop_signer.service.metrics import Metrics
from dpop_signer.service.signer import ServiceSigner
from dpop_signer.signers.pem import PemSigner
from tests.oracle import verify_es256


class Switchable:
    """A real PEM key that can be 'unplugged': sign raises like a lost HSM session."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.inner = PemSigner(key)
        self.plugged = True
        self.closed = False

    @property
    def algorithm(self) -> str:
        return self.inner.algorithm

    @property
    def public_jwk(self) -> PublicJwk:
        return self.inner.public_jwk

    def sign(self, message: bytes) -> bytes:
        if not self.plugged:
            raise SignerUnavailableError("token 'test' is gone")
        return self.inner.sign(message)

    def close(self) -> None:
        self.closed = True


class Opener:
    def __init__(self, *results: object) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self) -> Switchable:
        self.calls += 1
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, Switchable)
        return result


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())


def _sign(signer: ServiceSigner, message: bytes = b"header.claims") -> bytes:
    return asyncio.run(signer.sign_async(message))


def test_signs_with_the_key_and_counts_each_signature():
    metrics = Metrics()
    signer = ServiceSigner(Opener(Switchable(KEY)), metrics=metrics)
    signature = _sign(signer)
    verify_es256(dict(signer.public_jwk), b"header.claims", signature)
    assert metrics.signatures == 1
    assert "dpop_sign_seconds_count 1" in metrics.render()


def test_an_outage_fails_fast_then_recovers_after_the_retry_interval():
    first, second = Switchable(KEY), Switchable(KEY)
    unavailable = SignerUnavailableError("still gone")
    opener = Opener(first, unavailable, second)
    clock = Clock()
    signer = ServiceSigner(opener, retry_interval=1.0, clock=clock)
    first.plugged = False
    with pytest.raises(SignerUnavailableError):
        _sign(signer)
    assert not signer.available
    with pytest.raises(SignerUnavailableError, match=r"trying again in 1\.0 s"):
        _sign(signer)  # within the interval: the HSM is not asked
    assert opener.calls == 1
    clock.now += 1.5
    with pytest.raises(SignerUnavailableError, match="still gone"):
        _sign(signer)  # one reopen attempt, which fails
    assert opener.calls == 2
    assert first.closed  # the broken signer was released before reopening
    clock.now += 1.5  # the wait doubled to 2 s after the failed attempt
    with pytest.raises(SignerUnavailableError, match=r"trying again in 0\.5 s"):
        _sign(signer)
    clock.now += 0.5
    verify_es256(dict(signer.public_jwk), b"m", _sign(signer, b"m"))
    assert opener.calls == 3
    assert signer.available


def test_a_different_key_after_reopening_is_refused_for_good():
    first = Switchable(KEY)
    clock = Clock()
    opener = Opener(first, Switchable(OTHER), Switchable(KEY))
    signer = ServiceSigner(opener, clock=clock)
    jwk = signer.public_jwk
    first.plugged = False
    with pytest.raises(SignerUnavailableError):
        _sign(signer)
    clock.now += 2
    with pytest.raises(SignerUnavailableError, match="not the key the service started with"):
        _sign(signer)
    clock.now += 2
    with pytest.raises(KeyChangedError, match="reload the service"):
        _sign(signer)
    assert opener.calls == 2  # never opened again
    assert signer.public_jwk == jwk
    assert signer.state == "key_changed"


def test_a_pin_refused_on_reopen_is_never_tried_again():
    first = Switchable(KEY)
    clock = Clock()
    opener = Opener(first, PinError("wrong PIN for token 'test'"), Switchable(KEY))
    signer = ServiceSigner(opener, clock=clock)
    first.plugged = False
    with pytest.raises(SignerUnavailableError):
        _sign(signer)
    for _ in range(3):
        clock.now += 10
        with pytest.raises(PinError):
            _sign(signer)
    assert opener.calls == 2
    assert signer.state == "pin_refused"
    assert signer.reason == "wrong PIN for token 'test'"


def test_a_failure_at_start_is_raised_at_once():
    with pytest.raises(PinError):
        ServiceSigner(Opener(PinError("wrong PIN")))


class Raising(Switchable):
    """A real PEM key whose next signature raises a chosen backend error."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(key)
        self.error: Exception | None = None
        self.stalled = False
        self.calls = 0

    def sign(self, message: bytes) -> bytes:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return super().sign(message)


def test_a_pin_refused_while_signing_is_fatal_and_the_signer_is_not_called_again():
    inner = Raising(KEY)
    opener = Opener(inner)
    signer = ServiceSigner(opener, clock=Clock())
    inner.error = PinError("wrong PIN for token 'test'")
    with pytest.raises(PinError):
        _sign(signer)
    inner.error = None  # even if the token would sign now, nothing reaches it
    for _ in range(5):
        with pytest.raises(PinError):
            _sign(signer)
    assert inner.calls == 1
    assert opener.calls == 1
    assert signer.state == "pin_refused"
    assert not signer.available


def test_a_missing_key_is_reported_and_looked_for_with_growing_back_off():
    inner = Raising(KEY)
    clock = Clock()
    gone = KeyNotFoundError("key 'k' in token 'test' does not exist")
    opener = Opener(inner, gone, gone, Switchable(KEY))
    metrics = Metrics()
    signer = ServiceSigner(opener, metrics=metrics, retry_interval=1.0, retry_max=4.0, clock=clock)
    inner.error = gone
    with pytest.raises(KeyNotFoundError):
        _sign(signer)
    assert signer.state == "key_missing"
    assert signer.reason is not None
    assert "does not exist" in signer.reason
    attempts = []
    # 12 requests, one each 0.5 s: the opener is asked after 1, then 2, then 4 s, not per request.
    for _ in range(12):
        clock.now += 0.5
        with pytest.raises(KeyNotFoundError):
            _sign(signer)
        attempts.append(opener.calls)
    assert attempts == [1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    clock.now += 4.0
    verify_es256(dict(signer.public_jwk), b"m", _sign(signer, b"m"))
    assert signer.available
    # Counted per attempt that reached the token (1 signature, 2 reopens), not per request.
    assert metrics.signer_failures["key_missing"] == 3
    assert 'dpop_signer_failures_total{reason="key_missing"} 3' in metrics.render()


def test_a_stalled_module_is_reported_while_it_lasts_and_the_signer_is_kept():
    inner = Raising(KEY)
    opener = Opener(inner)
    metrics = Metrics()
    signer = ServiceSigner(opener, metrics=metrics)
    inner.stalled = True
    inner.error = SignerTimeoutError("did not answer within the signing deadline of 5 s")
    assert signer.state == "stalled"
    with pytest.raises(SignerTimeoutError):
        _sign(signer)
    inner.stalled, inner.error = False, None
    verify_es256(dict(signer.public_jwk), b"m", _sign(signer, b"m"))
    assert signer.available
    assert opener.calls == 1  # never reopened: the stuck call finishes by itself
    assert metrics.signer_failures == {"stalled": 1}


def test_a_key_changed_under_the_signer_is_fatal():
    inner = Raising(KEY)
    signer = ServiceSigner(Opener(inner), clock=Clock())
    inner.error = KeyChangedError("key 'k' is no longer the key this signer was opened with")
    with pytest.raises(KeyChangedError):
        _sign(signer)
    inner.error = None
    with pytest.raises(KeyChangedError):
        _sign(signer)
    assert inner.calls == 1
    assert signer.state == "key_changed"
