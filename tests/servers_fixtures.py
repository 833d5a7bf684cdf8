"""Fixtures for server-based tests: fresh local servers, and the oracle run over every proof.

Registered from ``tests/conftest.py`` (``pytest_plugins``).

- ``oracle_check`` (autouse): at the end of every test, each proof that any local server in this
  process received during the test (whoever started it: the fixture sets the servers' proof hook,
  `RecordingServer.on_proof`, on the class for the length of the test) is re-checked
  by the independent verifier ``tests/oracle.py`` (htm = method, url = URL as received, the
  access token sent with it, the nonce the server had issued, ``cnf.jkt`` of the token, the
  server's clock at receipt). Any failure fails the test. A proof the server refused for its
  ``iat`` (clock-skew tests) is checked on everything else, at its own ``iat``. A test that sends
  a bad proof on purpose says so with ``oracle_check.exempt(proof)`` or
  ``oracle_check.exempt_where(pred)``.
- ``local_servers``: a fresh AS + RS (`start_fault_servers` defaults, ``tests/fault_servers.py``:
  the shipped servers plus fault switches) on free ports, stopped after the test. Flip switches
  on ``.authorization_server`` / ``.resource_server``.
- ``local_servers_factory``: ``make(**switches)`` -> started `FaultServers`, all stopped after.
- ``HandKey``: proofs made by hand with ``cryptography`` (no dpop_signer code), for tests that
  must not trust our own builder.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dpop_signer.testing.servers import RecordingServer, SeenProof
from tests import oracle
from tests.fault_servers import FaultServers, start_fault_servers


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class HandKey:
    """A P-256 key that makes DPoP proofs and JWTs by hand: json, base64, cryptography only."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        self.jkt = oracle.thumbprint(self.jwk)

    # The three members of the Signer protocol, so verify.issue_access_token can use it.
    algorithm = "ES256"

    @property
    def public_jwk(self) -> Any:  # the Signer protocol's EcPublicJwk, built independently
        return dict(self.jwk)

    def sign(self, message: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def sign_jws(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        h = _b64(json.dumps(header, separators=(",", ":")).encode())
        c = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{h}.{c}.{_b64(self.sign(f'{h}.{c}'.encode()))}"

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
    ) -> str:
        """A proof; ``header``/``claims`` override or add members, ``drop`` removes claims."""
        h: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk}
        c: dict[str, Any] = {
            "jti": _b64(secrets.token_bytes(16)),
            "htm": htm,
            "htu": htu,
            "iat": int(time.time() if iat is None else iat),
        }
        if access_token is not None:
            c["ath"] = oracle.ath_of(access_token)
        if nonce is not None:
            c["nonce"] = nonce
        h.update(header or {})
        c.update(claims or {})
        for name in drop:
            c.pop(name, None)
        return self.sign_jws(h, c)

    def client_assertion(self, client_id: str, audience: str, **extra: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": _b64(secrets.token_bytes(16)),
            **extra,
        }
        return self.sign_jws({"alg": "ES256", "typ": "JWT"}, claims)


def _iat_of(proof: str, *, default: float) -> float:
    try:
        iat = json.loads(base64.urlsafe_b64decode(proof.split(".")[1] + "==="))["iat"]
    except (ValueError, KeyError, IndexError, TypeError):
        return default
    return float(iat) if isinstance(iat, int | float) else default


class OracleCheck:
    """Runs ``tests/oracle.check_proof`` over every proof local servers received in a test."""

    def __init__(self) -> None:
        self.seen: list[SeenProof] = []
        self._exempt: set[str] = set()
        self._predicates: list[Callable[[SeenProof], bool]] = []
        self.checked = 0

    def exempt(self, proof: str) -> None:
        """Do not check this proof (a test sent it broken on purpose)."""
        self._exempt.add(proof)

    def exempt_where(self, predicate: Callable[[SeenProof], bool]) -> None:
        """Do not check proofs for which ``predicate(seen)`` is true."""
        self._predicates.append(predicate)

    def failures(self) -> list[str]:
        """Check the proofs received so far; return one line per failure."""
        problems = []
        for seen in list(self.seen):
            if seen.proof in self._exempt or any(p(seen) for p in self._predicates):
                continue
            self.checked += 1
            now = seen.received_at
            if seen.error == "invalid_dpop_proof" and "iat is" in (seen.detail or ""):
                # Rejected for its iat (a clock-skew test): check everything else, at its iat.
                now = _iat_of(seen.proof, default=now)
            try:
                oracle.check_proof(
                    seen.proof,
                    htm=seen.method,
                    url=seen.url,
                    access_token=seen.access_token,
                    nonce=seen.nonce,
                    now=now,
                    expected_jkt=seen.jkt,
                )
            except oracle.OracleError as exc:
                problems.append(f"{seen.endpoint} {seen.method} {seen.url} -> {exc}")
        return problems


@pytest.fixture(autouse=True)
def oracle_check() -> Iterator[OracleCheck]:
    """Fail the test if any proof a local server received fails the independent oracle."""
    check = OracleCheck()

    def on_proof(server: RecordingServer, seen: SeenProof) -> None:
        check.seen.append(seen)  # list.append: safe from the server threads

    # On the class, so it sees every local server in the process (the fixtures', a test's own,
    # the demo's); a MonkeyPatch of its own takes it off again (and only it) before the check.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RecordingServer, "on_proof", on_proof)
        yield check
    problems = check.failures()
    if problems:
        pytest.fail(
            f"{len(problems)} DPoP proof(s) failed the independent oracle:\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


@pytest.fixture
def local_servers_factory() -> Iterator[Callable[..., FaultServers]]:
    """``make(**switches)``: start `start_fault_servers(**switches)`; all stopped after."""
    started: list[FaultServers] = []

    def make(**switches: Any) -> FaultServers:
        servers = start_fault_servers(**switches)
        started.append(servers)
        return servers

    yield make
    for servers in started:
        servers.stop()


@pytest.fixture
def local_servers(local_servers_factory: Callable[..., FaultServers]) -> FaultServers:
    """A fresh local AS + RS with default switches (flip them on the server objects)."""
    return local_servers_factory()


__all__ = [
    "HandKey",
    "OracleCheck",
    "local_servers",
    "local_servers_factory",
    "oracle_check",
]
