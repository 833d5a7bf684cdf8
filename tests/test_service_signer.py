"""`ServiceSigner`'s recovery rules, in process, around a real `PemSigner`.

The end-to-end outage (a SoftHSM2 token deleted and restored under the running service) is in
tests/test_service.py; these tests pin the rules that outage cannot reach: a different key
after reopening, a PIN refused on reopen (never tried again), the reopen rate limit, and where
signatures run (a fast key inline after being measured, a slow or stalled one never on the loop).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer.errors import PinError, SignerUnavailableError
from dpop_signer.jwk import EcPublicJwk
from dpop_signer.service import signer as service_signer
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


class Timed(Switchable):
    """A real PEM key that records which thread signed, and can be made slow like a network HSM."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(key)
        self.delay = 0.0
        # Extra time in the worker thread only: what a GIL wait adds to a thread's timing.
        self.off_loop_delay = 0.0
        self.loop_thread = threading.get_ident()
        self.threads: list[int] = []

    def sign(self, message: bytes) -> bytes:
        self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.off_loop_delay and threading.get_ident() != self.loop_thread:
            time.sleep(self.off_loop_delay)
        return super().sign(message)


def _sign_many(signer: ServiceSigner, count: int, *, until_inline: bool = False) -> int:
    """Sign up to ``count`` messages on one loop, each checked; returns how many were made."""

    async def run() -> int:
        for number in range(1, count + 1):
            message = b"header.claims%d" % number
            verify_es256(dict(signer.public_jwk), message, await signer.sign_async(message))
            if until_inline and signer.signs_inline:
                return number
        return count

    return asyncio.run(run())


def test_a_fast_key_is_measured_off_the_loop_first_then_signed_inline():
    key = Timed(KEY)
    metrics = Metrics()
    signer = ServiceSigner(Opener(key), metrics=metrics)
    loop_thread = threading.get_ident()
    try:
        assert not signer.signs_inline  # an unmeasured key starts in the worker thread
        made = _sign_many(signer, 500, until_inline=True)
        assert signer.signs_inline, "an in-memory key never qualified for inline signing"
        assert loop_thread not in key.threads[:8]  # the warm-up samples came from the thread
        before = len(key.threads)
        _sign_many(signer, 20)
        inline = key.threads[before:]
        assert inline.count(loop_thread) >= 1
        assert metrics.signatures == made + 20  # inline or not, every signature is counted
    finally:
        signer.close()


def test_a_slow_key_is_signed_off_the_event_loop_between_probes():
    key = Timed(KEY)
    key.delay = 0.005  # a network HSM round trip: well above the inline threshold
    # A clock that stands still: no probe falls due (probes have their own tests below).
    signer = ServiceSigner(Opener(key), clock=Clock())
    try:
        _sign_many(signer, 20)
        assert not signer.signs_inline
        assert threading.get_ident() not in key.threads
    finally:
        signer.close()


def test_a_stall_sends_signatures_back_to_the_thread():
    key = Timed(KEY)
    signer = ServiceSigner(Opener(key))
    loop_thread = threading.get_ident()
    try:
        _sign_many(signer, 500, until_inline=True)
        assert signer.signs_inline
        key.delay = 0.005
        before = len(key.threads)
        _sign_many(signer, 5)
        after_stall = key.threads[before:]
        # At most the one signature that revealed the stall ran on the loop.
        assert after_stall.count(loop_thread) <= 1
        assert after_stall[-1] != loop_thread
        assert not signer.signs_inline
        key.delay = 0.0
        _sign_many(signer, 500, until_inline=True)
        assert signer.signs_inline  # fast again: back to inline
    finally:
        signer.close()


def test_a_reopened_key_is_measured_again_before_inline_signing():
    first, second = Timed(KEY), Timed(KEY)
    clock = Clock()
    signer = ServiceSigner(Opener(first, second), clock=clock)
    try:
        _sign_many(signer, 500, until_inline=True)
        assert signer.signs_inline
        first.plugged = False
        with pytest.raises(SignerUnavailableError):
            _sign(signer)
        clock.now += 2
        _sign(signer)  # reopens
        assert not signer.signs_inline
        assert second.threads
        assert second.threads[0] != threading.get_ident()
    finally:
        signer.close()


def test_a_key_timed_slow_in_the_thread_is_probed_inline_and_stays_there():
    key = Timed(KEY)
    key.off_loop_delay = 0.001  # the thread's timings read 1 ms: a GIL wait under load
    clock = Clock()
    signer = ServiceSigner(Opener(key), clock=clock)
    loop_thread = threading.get_ident()
    try:
        _sign_many(signer, 30)
        assert not signer.signs_inline
        assert loop_thread not in key.threads  # no probe before its time
        clock.now += 1.5
        before = len(key.threads)
        _sign_many(signer, 10)
        assert key.threads[before] == loop_thread  # the probe, on the loop
        assert signer.signs_inline  # fast on the loop: it stays there
        assert key.threads[before:].count(loop_thread) == 10
    finally:
        signer.close()


def test_a_slow_key_is_probed_rarely_and_less_often_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whole seconds, so the clock's sums are exact; the rule is the same at 0.1 s.
    monkeypatch.setattr(service_signer, "_PROBE_FIRST", 1.0)
    key = Timed(KEY)
    key.delay = 0.003
    clock = Clock()
    signer = ServiceSigner(Opener(key), clock=clock)
    loop_thread = threading.get_ident()

    def on_loop_after(seconds: float) -> int:
        clock.now += seconds
        before = len(key.threads)
        _sign_many(signer, 5)
        return key.threads[before:].count(loop_thread)

    try:
        assert on_loop_after(0) == 0  # warm-up, in the thread
        assert on_loop_after(0) == 0
        assert on_loop_after(1.0) == 1  # the first probe: slow, so it goes on offloaded
        assert not signer.signs_inline
        assert on_loop_after(1.5) == 0  # the next one waits twice as long
        assert on_loop_after(0.5) == 1
        assert on_loop_after(3.9) == 0  # then four times
        assert on_loop_after(0.1) == 1
        assert not signer.signs_inline
    finally:
        signer.close()


def test_after_a_stall_the_next_probe_waits_its_turn():
    key = Timed(KEY)
    clock = Clock()
    signer = ServiceSigner(Opener(key), clock=clock)
    loop_thread = threading.get_ident()
    try:
        _sign_many(signer, 500, until_inline=True)
        clock.now += 10  # long after the first probe would have been due
        key.delay = 0.005
        _sign_many(signer, 1)  # the stall, inline
        before = len(key.threads)
        _sign_many(signer, 5)
        assert loop_thread not in key.threads[before:]  # no probe right after the stall
        clock.now += 1.0
        before = len(key.threads)
        _sign_many(signer, 5)
        assert key.threads[before:].count(loop_thread) == 1
    finally:
        signer.close()


def test_a_probe_happens_under_load_when_the_thread_is_never_empty():
    key = Timed(KEY)
    key.off_loop_delay = 0.001  # thread timings look slow, as with a GIL wait under load
    clock = Clock()
    signer = ServiceSigner(Opener(key), clock=clock)
    loop_thread = threading.get_ident()
    messages = [b"header.claims%d" % i for i in range(40)]

    async def burst() -> list[bytes]:
        first = [asyncio.ensure_future(signer.sign_async(m)) for m in messages[:20]]
        await asyncio.sleep(0)  # the first 20 are now queued in the thread (1 ms each)
        clock.now += 1.5  # the probe falls due while the thread is busy
        second = [asyncio.ensure_future(signer.sign_async(m)) for m in messages[20:]]
        return list(await asyncio.gather(*first, *second))

    try:
        _sign_many(signer, 20)
        assert not signer.signs_inline
        assert loop_thread not in key.threads
        before = len(key.threads)
        signatures = asyncio.run(burst())
        for message, signature in zip(messages, signatures, strict=True):
            verify_es256(dict(signer.public_jwk), message, signature)
        assert loop_thread in key.threads[before:]  # the probe ran, on the loop
        assert signer.signs_inline
    finally:
        signer.close()
