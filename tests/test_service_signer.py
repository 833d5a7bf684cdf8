"""`ServiceSigner`'s recovery rules, in process, around a real `PemSigner`.

The end-to-end outage (a SoftHSM2 token deleted and restored under the running service) is in
tests/test_service.py; these tests pin the rules that outage cannot reach: a different key
after reopening, a PIN refused on reopen (never tried again), and the reopen rate limit.
"""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer.errors import PinError, SignerUnavailableError
from dpop_signer.jwk import EcPublicJwk
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
    def public_jwk(self) -> EcPublicJwk:
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
    with pytest.raises(SignerUnavailableError, match="retrying every 1 s"):
        _sign(signer)  # within the interval: the HSM is not asked
    assert opener.calls == 1
    clock.now += 1.5
    with pytest.raises(SignerUnavailableError, match="still gone"):
        _sign(signer)  # one reopen attempt, which fails
    assert opener.calls == 2
    assert first.closed  # the broken signer was released before reopening
    clock.now += 1.5
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
    with pytest.raises(SignerUnavailableError, match="restart the service"):
        _sign(signer)
    assert opener.calls == 2  # never opened again
    assert signer.public_jwk == jwk


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


def test_a_failure_at_start_is_raised_at_once():
    with pytest.raises(PinError):
        ServiceSigner(Opener(PinError("wrong PIN")))
