"""`Pkcs11Signer`: JWS signatures with a key that stays inside a PKCS#11 token.

Works with any PKCS#11 module (network HSMs, YubiHSM 2, SoftHSM2 in CI, tpm2-pkcs11); nothing
here assumes SoftHSM, and no slot number is ever used. The signer layer is laid out one concept
per module, the way python-pkcs11 and crypto11 lay out theirs:

- `cryptoki`: the few PKCS#11 calls python-pkcs11 does not expose (``C_Login`` and friends);
- `pkcs11_errors`: python-pkcs11's exceptions as one-line `dpop_signer.errors` messages;
- `pkcs11_library`: one loaded module per process, its lock and deadline, refused PINs, fork;
- `pkcs11_login`: the one logged-in session per (module, token), shared by its signers;
- `pkcs11_keys`: finding, checking, proving and generating the key;
- this module: the signer over them, and `open_pkcs11_signer` / `generate_pkcs11_key`.

**Hash on the host, sign with CKM_ECDSA.** SoftHSM 2.6 has no CKM_ECDSA_SHA256 and the big HSMs
hash on the host anyway; the token returns r||s already (RFC 7518 §3.4), checked to be exactly
64 bytes for ES256 (the default). The algorithm follows the key: EC P-384/P-521 sign ES384/ES512
the same way with SHA-384/SHA-512, Ed25519 signs EdDSA with CKM_EDDSA over the message, and an
RSA key signs PS256 (SHA-256 on the host, CKM_RSA_PKCS_PSS) or, when the URI says ``alg=RS256``
(or ``alg="RS256"`` is passed), RS256 with CKM_SHA256_RSA_PKCS; `pkcs11_keys.SignScheme` holds
each one. Every signature is checked to have its algorithm's exact length.

**Recover once.** A lost session, stale handle or device error reopens the login
session, logs in again, finds the key again, proves it is the same key, and retries once. A
refused PIN is never sent again: real tokens lock. docs/pkcs11.md says what an operator sees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

from pkcs11 import Attribute
from pkcs11 import exceptions as p11x
from pkcs11.types import SignMixin

from dpop_signer.algorithms import DEFAULT_ALGORITHM, get_algorithm
from dpop_signer.errors import (
    ConfigError,
    KeyChangedError,
    KeyNotFoundError,
    SignerError,
    SignerTimeoutError,
    SignerUnavailableError,
    SigningFailedError,
    UnsupportedKeyError,
)
from dpop_signer.jwk import PublicJwk, jwk_signature_size
from dpop_signer.signers import pkcs11_library
from dpop_signer.signers.base import check_signature
from dpop_signer.signers.pin import resolve_pin
from dpop_signer.signers.pkcs11_errors import ckr, forked_error, recoverable
from dpop_signer.signers.pkcs11_keys import (
    SignScheme,
    attribute,
    find_private_key,
    generate_key_pair,
    key_algorithm,
    prove_same_key,
    public_jwk_of,
    scheme_for,
    signs_for,
)
from dpop_signer.signers.pkcs11_library import Pkcs11Module, pkcs11_module
from dpop_signer.signers.pkcs11_login import LoginSession, acquire_login
from dpop_signer.signers.pkcs11_pool import SessionPool, check_concurrent_module
from dpop_signer.signers.pkcs11_uri import (
    Pkcs11Uri,
    parse_pkcs11_uri,
    resolve_module,
)
from dpop_signer.signers.worker import Deadlines

__all__ = [
    "DEFAULT_SIGN_TIMEOUT",
    "Pkcs11Module",
    "Pkcs11Signer",
    "generate_pkcs11_key",
    "open_pkcs11_signer",
    "pkcs11_module",
]

logger = logging.getLogger("dpop_signer.pkcs11")

DEFAULT_SIGN_TIMEOUT = 5.0
"""Seconds a caller waits for the module before `SignerTimeoutError` (setting ``sign_timeout``)."""
_MISSING_FIRST = 1.0
"""Seconds before a key that was not found is looked for again; doubled each time it is not."""
_MISSING_MAX = 30.0


class Pkcs11Signer:
    """Signs with a private key inside a PKCS#11 token, in the algorithm the key says.

    ES256 (EC P-256), ES384, ES512, EdDSA or PS256; RS256 for an RSA key opened with ``alg=RS256``.

    Open it with `open_pkcs11_signer` (or `dpop_signer.load_signer`) and close it when done;
    it is a context manager. Any number of threads may call `sign` at once, and event loops
    call `sign_async`; every call reaches the token holding the module's one lock.

    What it promises while the token changes under it:

    * the key it signs with is the key whose JWK it publishes: whenever the key is found again
      (after a lost session, handle or device), its public point is compared with the JWK and
      one test signature is verified before anything else is signed (`KeyChangedError`);
    * a refused PIN is never sent again (`PinError` at once, no ``C_Login``);
    * a key that has gone is looked for again at most once per back-off interval (1 s,
      doubling to 30 s), not on every signature;
    * no caller waits longer than ``sign_timeout`` for a stuck module (`SignerTimeoutError`);
      `sign_async` gives up at the deadline while the stuck call finishes in the module's
      thread. A thread calling `sign` makes the call itself (handing it to another thread
      costs a third of the signing rate), so the one thread inside a stuck call waits for it;
      every other caller fails within the deadline;
    * once `close` returns, no signature succeeds and no session of this signer remains.

    >>> with open_pkcs11_signer("pkcs11:token=dpop-dev;object=dpop-es256") as s:  # doctest: +SKIP
    ...     len(s.sign(b"header.claims"))
    64
    """

    def __init__(
        self,
        *,
        module: Pkcs11Module,
        anchor: LoginSession,
        selector: Pkcs11Uri,
        key: SignMixin,
        jwk: PublicJwk,
        scheme: SignScheme,
        label: str,
        key_id: bytes,
        sign_timeout: float | None = DEFAULT_SIGN_TIMEOUT,
    ) -> None:
        """Wrap an opened, checked key; use `open_pkcs11_signer` instead."""
        self._module = module
        self._module_lock = module._lock
        self._anchor = anchor
        self._selector = selector
        self._key = key
        self._generation = anchor.generation
        self._jwk = jwk
        # The scheme's parts as attributes of their own: `sign` reads them once per signature.
        self._scheme = scheme
        self._algorithm = scheme.algorithm.name
        self._hasher = scheme.hasher
        self._mechanism = scheme.mechanism
        self._param = scheme.param
        self._digest_size = scheme.digest_size
        self._sig_size = jwk_signature_size(jwk)
        self._label = label
        self._id = key_id
        self._closed = False
        self._timeout = sign_timeout
        self._what = f"key {selector.key_description} in {anchor.where}"
        self._source = f"PKCS#11 {self._what}"
        self._changed: KeyChangedError | None = None
        self._missing: SignerError | None = None  # the key's last lookup failed with this
        self._missing_until = 0.0
        self._missing_wait = _MISSING_FIRST
        # Per event loop: the deadlines of this signer's signatures in the module's worker.
        self._deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
            weakref.WeakKeyDictionary()
        )
        self._pool: SessionPool | None = None  # sessions=N > 1: sessions that sign at once
        self._pool_threads: ThreadPoolExecutor | None = None

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        pin: str | None = None,
        sign_timeout: float | None = DEFAULT_SIGN_TIMEOUT,
        alg: str | None = None,
    ) -> Pkcs11Signer:
        """Open the key an RFC 7512 URI names; see `open_pkcs11_signer`."""
        timeout = _check_timeout(sign_timeout)
        parsed = _with_alg(parse_pkcs11_uri(uri), alg)
        _require_key_name(parsed)
        secret = resolve_pin(parsed, pin)
        sessions = parsed.sessions or 1
        path = resolve_module(parsed)
        check_concurrent_module(path, sessions, pkcs11_library.loaded_module_names().values())
        module = pkcs11_module(path)
        where = f"PKCS#11 module {module.display}"
        signer = module.call_within(timeout, where, _open_locked, module, parsed, secret)
        signer._timeout = timeout
        if sessions > 1:
            signer._pool = SessionPool(sessions)
            try:
                module.call_within(timeout, where, signer._rebuild_pool)
            except BaseException:
                signer.close()
                raise
        return signer

    @property
    def algorithm(self) -> str:
        """The JWS ``alg`` of the key: ES256, ES384, ES512, EdDSA, PS256 or RS256."""
        return self._algorithm

    @property
    def public_jwk(self) -> PublicJwk:
        """The public JWK (exactly the RFC 7638 members), read once at open; a fresh copy."""
        return dict(self._jwk)  # type: ignore[return-value]

    @property
    def uri(self) -> str:
        """The key's URI without any PIN: token label, key label, id, module, pin-source."""
        return dataclasses.replace(
            self._selector,
            token=self._anchor.label,
            object=self._label or None,
            id=self._id or None,
            module_path=self._module.display,
            pin_value=None,
        ).redacted()

    @property
    def module(self) -> Pkcs11Module:
        """The loaded module and its lock (for diagnostics and tests)."""
        return self._module

    @property
    def sign_timeout(self) -> float | None:
        """Seconds a caller waits for the module at most (None: no deadline)."""
        return self._timeout

    @property
    def sessions(self) -> int:
        """How many sessions sign at once (the URI's ``sessions=``, 1 by default)."""
        return self._pool.size if self._pool is not None else 1

    @property
    def stalled(self) -> bool:
        """Whether a call has been inside the module for longer than the signing deadline."""
        timeout = self._timeout
        if timeout is None:
            return False
        pool = self._pool
        return bool(self._module.stalled_for(timeout) or (pool and pool.stalled_for(timeout)))

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``; ES256: SHA-256 here, CKM_ECDSA in the token, 64 bytes r||s.

        Raises:
            SignerUnavailableError: the session or device was lost and one reopen did not help,
                or the signer was closed.
            KeyChangedError: the token now holds a different key under this key's name.
            SignerTimeoutError: the module did not answer within ``sign_timeout``.
            KeyNotFoundError: the key has gone from the token.
            PinError: logging in again after a lost session failed on the PIN (never retried).
            SigningFailedError: the token refused to sign or returned a malformed signature.
        """
        if self._closed or self._module.pid != pkcs11_library.pid:
            self._check_open()
        hasher = self._hasher
        digest = hasher(message).digest() if hasher is not None else message
        if self._pool is not None:
            return self._sign_pooled(digest)
        module = self._module
        timeout = self._timeout
        # Pkcs11Module.call_within inlined: the hot path is one timed acquire and two stores.
        if timeout is not None:
            if module.busy_since and module.stalled_for(timeout):
                raise module.timeout_error(self._source, timeout, module.stalled_for(0.0))
            if not self._module_lock.acquire(True, timeout):
                raise module.timeout_error(self._source, timeout, module.stalled_for(0.0))
        else:
            self._module_lock.acquire()
        try:
            module.busy_since = time.monotonic()
            return self._sign_digest(digest)
        finally:
            module.busy_since = 0.0
            self._module_lock.release()

    async def sign_async(self, message: bytes) -> bytes:
        """Like `sign`, from the module's worker thread, so the event loop never blocks.

        At the deadline the caller gets `SignerTimeoutError`; a call already inside the module
        finishes in the worker thread, and a queued one is dropped before it reaches the token.
        """
        self._check_open()
        hasher = self._hasher
        digest = hasher(message).digest() if hasher is not None else message
        module = self._module
        timeout = self._timeout
        if self._pool is not None:
            return await self._sign_pooled_async(digest)
        if timeout is None:
            return await module.worker.run(module.call, self._sign_digest, digest)
        stuck = module.stalled_for(timeout)
        if stuck:
            raise module.timeout_error(self._source, timeout, stuck)
        future: asyncio.Future[bytes] = module.worker.run(
            module.call_within, timeout, self._source, self._sign_digest, digest
        )
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines.get(loop)
        if deadlines is None:
            deadlines = self._deadlines[loop] = Deadlines(loop, timeout)
        deadlines.add(future, self._timed_out)
        return await future

    def _timed_out(self) -> SignerTimeoutError:
        stuck = self._module.stalled_for(0.0)
        return self._module.timeout_error(self._source, self._timeout or 0, stuck)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a digest computed by the caller (ES256: SHA-256, 32 bytes; 64 bytes r||s back).

        Raises:
            SigningFailedError: ``digest`` is not the algorithm's digest length, the algorithm
                signs the message itself (EdDSA, RS256), or as `sign`.
        """
        self._check_open()
        if self._hasher is None:
            raise SigningFailedError(
                f"{self._source} signs {self._algorithm} over the message itself; call sign()"
            )
        return self._module.call_within(self._timeout, self._source, self._sign_digest, digest)

    def close(self) -> None:
        """Release the token; the last signer on a token logs out and closes its session.

        Waits for a signature in progress; once it returns no signature succeeds.
        """
        if self._closed:
            return
        self._closed = True
        if self._module.pid != os.getpid():
            return  # the parent owns the session; the child must not touch it
        if self._pool_threads is not None:
            self._pool_threads.shutdown(wait=False)
        # A close during interpreter shutdown may fail with RuntimeError; the process ends anyway.
        with suppress(RuntimeError):
            try:
                self._module.call_within(self._timeout, self._source, self._release)
            except SignerTimeoutError as exc:
                # A stuck module must not hold up a shutdown or a reload: the session stays
                # open, and the module drops it when the process ends.
                logger.warning("%s; closed without logging out", exc.message)

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"Pkcs11Signer({self.uri!r}{state})"

    def _check_open(self) -> None:
        if self._closed:
            raise SignerUnavailableError(f"{self._source} was closed; open it again")
        if self._module.pid != os.getpid():
            raise forked_error(self._module.display)

    def _sign_pooled(self, digest: bytes) -> bytes:
        """Sign on a free session of the pool, without the module lock (sessions=N)."""
        pool = self._pool
        assert pool is not None
        timeout = self._timeout
        if pool.broken or pool.generation != self._anchor.generation:
            self._module.call_within(timeout, self._source, self._rebuild_pool)
        slot = pool.take(timeout)
        if slot is None:
            raise self._module.timeout_error(self._source, timeout or 0, pool.stalled_for(0.0))
        try:
            if self._closed:
                raise SignerUnavailableError(f"{self._source} was closed; open it again")
            if len(digest) != self._digest_size and self._hasher is not None:
                raise self._wrong_digest(digest)
            signature = slot.key.sign(
                digest, mechanism=self._mechanism, mechanism_param=self._param
            )
        except p11x.PKCS11Error as exc:
            pool.broken = True
            logger.warning("%s: %s on a pooled session; signing on the main one", self._source,
                           ckr(exc))  # fmt: skip
            # The serialized path recovers (reopens, finds and proves the key) and signs once.
            return self._module.call_within(timeout, self._source, self._sign_digest, digest)
        finally:
            pool.give(slot)
        return self._checked(signature)

    def _checked(self, signature: bytes) -> bytes:
        return check_signature(
            signature, source=self._source, size=self._sig_size, algorithm=self._algorithm
        )

    def _wrong_digest(self, digest: bytes) -> SigningFailedError:
        assert self._hasher is not None
        name = self._hasher(b"").name.upper().replace("SHA", "SHA-")
        return SigningFailedError(
            f"{self._source} was given a {len(digest)}-byte digest; {self._algorithm} signs a "
            f"{self._digest_size}-byte {name} digest"
        )

    async def _sign_pooled_async(self, digest: bytes) -> bytes:
        # The module's one worker thread would serialize the pool: one thread per session.
        if self._pool_threads is None:
            self._pool_threads = ThreadPoolExecutor(self.sessions, thread_name_prefix="pkcs11")
        future = asyncio.get_running_loop().run_in_executor(
            self._pool_threads, self._sign_pooled, digest
        )
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            assert self._pool is not None
            raise self._module.timeout_error(
                self._source, self._timeout or 0, self._pool.stalled_for(0.0)
            ) from None

    # Everything below runs holding the module lock.

    def _rebuild_pool(self) -> None:
        pool = self._pool
        assert pool is not None
        if self._closed:
            raise SignerUnavailableError(f"{self._source} was closed; open it again")
        if not pool.close(self._timeout):
            raise self._module.timeout_error(self._source, self._timeout or 0, pool.stalled_for(0))
        self._current_key()  # the login session alive, the key found again and proved
        pool.build(self._anchor, self._selector, self._jwk, self._scheme, self._what)

    def _release(self) -> None:
        if self._pool is not None and not self._pool.close(self._timeout):
            logger.warning("%s: a pooled session is stuck; left open", self._source)
        self._anchor.release()

    def _current_key(self) -> SignMixin:
        """The key handle for the anchor's current session, found again (and proved) if stale."""
        anchor = self._anchor
        if self._changed is not None:
            raise self._changed  # for good: only opening the key again (a rotation) changes it
        if self._missing is not None and time.monotonic() < self._missing_until:
            raise self._missing  # looked for recently and not found: not searched per call
        if anchor.session is None:
            anchor.reopen()
        if self._generation != anchor.generation:
            assert anchor.session is not None
            try:
                key = find_private_key(anchor.session, self._selector, self._what)
                prove_same_key(anchor.session, key, self._jwk, self._scheme, self._what)
            except KeyChangedError as exc:
                self._changed = exc
                raise
            except (KeyNotFoundError, UnsupportedKeyError) as exc:
                self._missing = exc
                self._missing_until = time.monotonic() + self._missing_wait
                self._missing_wait = min(self._missing_wait * 2, _MISSING_MAX)
                raise
            self._key = key
            self._generation = anchor.generation
            self._missing, self._missing_wait = None, _MISSING_FIRST
        return self._key

    def _sign_digest(self, digest: bytes) -> bytes:
        if self._closed:
            # Checked under the lock: a close() that ran since the caller's check has released
            # the session, and reopening it here would log in again behind the caller's back.
            raise SignerUnavailableError(f"{self._source} was closed; open it again")
        if len(digest) != self._digest_size and self._hasher is not None:
            # SoftHSM signs a digest of any length; a truncated one would verify nowhere.
            raise self._wrong_digest(digest)
        anchor = self._anchor
        try:
            # `_current_key` only when needed (it reopens or looks the key up again): the
            # usual case is an open session and a current handle, checked inline.
            if anchor.session is None or self._generation != anchor.generation:
                self._current_key()
            signature = self._key.sign(
                digest, mechanism=self._mechanism, mechanism_param=self._param
            )
        except p11x.PKCS11Error as exc:
            if not recoverable(exc):
                raise SigningFailedError(f"{self._source} failed to sign: {ckr(exc)}") from exc
            first = ckr(exc)
        else:
            if len(signature) == self._sig_size:
                return signature
            return self._checked(signature)
        logger.warning("%s: %s while signing; reopening the session once", self._source, first)
        try:
            self._anchor.reopen()
            key = self._current_key()
            signature = key.sign(digest, mechanism=self._mechanism, mechanism_param=self._param)
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"{self._source} is unavailable: {first}, then {ckr(exc)} after reopening the "
                "session; check that the token or HSM is connected"
            ) from exc
        logger.info("%s: session reopened, signing again", self._source)
        return self._checked(signature)


def _check_timeout(sign_timeout: float | None) -> float | None:
    if sign_timeout is not None and not sign_timeout > 0:
        raise ConfigError(
            f"sign_timeout must be a positive number of seconds, not {sign_timeout!r}"
        )
    return sign_timeout


def _with_alg(uri: Pkcs11Uri, alg: str | None) -> Pkcs11Uri:
    """``uri`` with the caller's ``alg``; refused when the URI names another one."""
    if alg is None or alg == uri.alg:
        return uri
    if uri.alg is not None:
        raise ConfigError(
            f"the PKCS#11 URI says alg={uri.alg} but alg={alg!r} was passed; keep one of them"
        )
    get_algorithm(alg)
    return dataclasses.replace(uri, alg=alg)


def _require_key_name(uri: Pkcs11Uri) -> None:
    if uri.object is None and uri.id is None:
        raise ConfigError(
            "the PKCS#11 URI names no key; add object=<label> and/or id=<%-encoded bytes>"
        )


def _open_locked(module: Pkcs11Module, uri: Pkcs11Uri, pin: str | None) -> Pkcs11Signer:
    anchor = acquire_login(module, uri, pin)
    try:
        return _open_key(module, anchor, uri)
    except BaseException:
        anchor.release()
        raise


def _open_key(module: Pkcs11Module, anchor: LoginSession, uri: Pkcs11Uri) -> Pkcs11Signer:
    """`_checked_key`, recovering once if the shared session was lost since its last use."""
    try:
        try:
            return _checked_key(module, anchor, uri)
        except p11x.PKCS11Error as exc:
            if not recoverable(exc):
                raise
            logger.warning("%s: %s while opening a key; reopening once", anchor.where, ckr(exc))
            anchor.reopen()
            return _checked_key(module, anchor, uri)
    except p11x.PKCS11Error as exc:
        what = f"key {uri.key_description} in {anchor.where}"
        raise SignerUnavailableError(f"opening {what} failed: {ckr(exc)}") from exc


def _checked_key(module: Pkcs11Module, anchor: LoginSession, uri: Pkcs11Uri) -> Pkcs11Signer:
    """Find the key, check it, read its public JWK and prove the pair matches."""
    what = f"key {uri.key_description} in {anchor.where}"
    if not anchor.healthy():
        # Lost since its last use (or an earlier recovery failed): reopen before searching.
        logger.warning("%s: the shared session was lost; reopening it", anchor.where)
        anchor.reopen()
    session = anchor.session
    assert session is not None
    key = find_private_key(session, uri, what)
    alg = key_algorithm(key, uri.alg, what)
    scheme = scheme_for(alg)
    if attribute(key, Attribute.SIGN) is False:
        raise UnsupportedKeyError(f"{what} may not sign (CKA_SIGN is false)")
    if attribute(key, Attribute.SENSITIVE) is False:
        raise UnsupportedKeyError(
            f"{what} is not sensitive (CKA_SENSITIVE false): its private value can be read "
            "out of the token; generate a new key with 'dpop keygen'"
        )
    if attribute(key, Attribute.EXTRACTABLE):
        logger.warning("%s is extractable (CKA_EXTRACTABLE true): it can be wrapped out", what)
    missing = scheme.needs - anchor.mechanisms
    if missing:
        names = ", ".join(sorted(f"CKM_{m.name}" for m in missing))
        raise UnsupportedKeyError(f"{anchor.where} does not offer {names}, which {alg.name} needs")
    jwk = public_jwk_of(session, key, what)
    if not signs_for(key, jwk, scheme, what):
        raise UnsupportedKeyError(
            f"the public key stored with {what} does not match the private key; "
            "fix the CKA_ID/label of the token's objects"
        )
    label = str(attribute(key, Attribute.LABEL) or "")
    key_id = bytes(attribute(key, Attribute.ID) or b"")
    return Pkcs11Signer(
        module=module,
        anchor=anchor,
        selector=dataclasses.replace(uri, pin_value=None),
        key=key,
        jwk=jwk,
        scheme=scheme,
        label=label,
        key_id=key_id,
    )


def open_pkcs11_signer(
    uri: str,
    pin: str | None = None,
    *,
    sign_timeout: float | None = DEFAULT_SIGN_TIMEOUT,
    alg: str | None = None,
) -> Pkcs11Signer:
    """Open the key an RFC 7512 URI names, and check it.

    Args:
        uri: ``pkcs11:token=...;object=...[;id=...][?module-path=...&pin-source=file:...]``;
            ``&alg=RS256`` makes an RSA key sign RS256 instead of PS256.
        pin: the user PIN; wins over ``pin-value``/``pin-source`` in the URI, which win over
            ``DPOP_PIN``. The module is ``module-path``, else ``DPOP_PKCS11_MODULE``, else the
            installed SoftHSM2.
        sign_timeout: seconds a caller waits for the module at most (`SignerTimeoutError`);
            None for no deadline.
        alg: the JWS algorithm, like the URI's ``alg=`` (both given: they must agree). It must
            fit the key; it is needed only to choose RS256 for an RSA key.

    Raises:
        ConfigError: the URI is malformed or names no key.
        SignerUnavailableError: module missing or unloadable, token absent (the message lists
            the tokens present).
        PinError: PIN missing or wrong (never retried).
        KeyNotFoundError: no key, or several keys, match.
        UnsupportedKeyError: secp256k1, RSA under 2048 bits, ``alg`` not fitting the key, not
            sensitive, public key only, or the algorithm's mechanism not offered.
        SignerTimeoutError: the module did not answer within ``sign_timeout``.
    """
    return Pkcs11Signer.open(uri, pin=pin, sign_timeout=sign_timeout, alg=alg)


def generate_pkcs11_key(
    uri: str, pin: str | None = None, *, alg: str | None = None
) -> Pkcs11Signer:
    """Generate a key pair for ``alg`` in the token and return its open signer.

    ``alg`` (or the URI's ``alg=``) is ES256 (EC P-256, the default), ES384 (P-384), ES512
    (P-521), EdDSA (Ed25519), or PS256/RS256 (RSA, 2048 bits). The token does not record the
    algorithm: an RS256 key is opened later with ``alg=RS256`` in its URI, which the returned
    signer's ``uri`` carries.

    The private key is a token object, private, sensitive, never extractable, allowed to sign
    and nothing else; the public key is a token object allowed to verify. The label is the
    URI's ``object``; the id is its ``id``, or 2 random bytes (the widest id a YubiHSM 2 keeps).

    Raises:
        ConfigError: no ``object=`` label, or an object with that label or id exists already
            (keys are never overwritten).
        SignerError: the token refused to generate the key (the message names why).
    """
    parsed = _with_alg(parse_pkcs11_uri(uri), alg)
    if parsed.object is None:
        raise ConfigError("generating a PKCS#11 key needs a label: add object=<label> to the URI")
    # Only RS256 stays in the URI: every other algorithm follows from the key itself.
    chosen = parsed.alg or DEFAULT_ALGORITHM
    parsed = dataclasses.replace(parsed, alg="RS256" if chosen == "RS256" else None)
    get_algorithm(chosen)
    secret = resolve_pin(parsed, pin)
    module = pkcs11_module(resolve_module(parsed))
    return module.call(_generate_locked, module, parsed, secret, chosen)


def _generate_locked(
    module: Pkcs11Module, uri: Pkcs11Uri, pin: str | None, alg: str
) -> Pkcs11Signer:
    anchor = acquire_login(module, uri, pin)
    try:
        key_id = generate_key_pair(anchor, uri, get_algorithm(alg))
        return _open_key(module, anchor, dataclasses.replace(uri, id=key_id))
    except BaseException:
        anchor.release()
        raise
