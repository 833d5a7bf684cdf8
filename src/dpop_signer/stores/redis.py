"""`RedisStore`: a `TokenStore` on a Redis server, shared by processes on many hosts.

``redis://[user:password@]host:port/db`` or ``rediss://...`` for TLS, with ``?ca=/path/ca.pem``
(or ``ca_file=``) naming the CA that signed the server's certificate; without it the system's
trust store is used. The ``redis`` client from PyPI is an optional extra
(``pip install 'dpop-signer[redis]'``), imported only when a Redis store is opened.

Keys live under ``dpop-signer:v1:`` (``tok:``, ``lease:``, ``fail:`` + the token key's hash,
``nonce:`` + the origin); every one carries a TTL, so the server never keeps a stale entry:

- the fetch lease is ``SET key id NX PX ttl``, the one way Redis gives exactly one winner, and
  it is released by a Lua script that deletes the key only while it still holds the caller's
  id (a holder whose lease expired must not delete the next holder's);
- a token write and the removal of the failure record are one ``MULTI``;
- `snapshot` is one ``MGET`` of token, failure and lease.

The client is the synchronous ``redis.Redis`` (see `dpop_signer.stores.base` for why), with
short socket timeouts and no retries of its own: a stopped server must cost a request one
refused connection, after which `FallbackStore` stops asking for a few seconds. Every
``redis`` error becomes `StoreUnavailable`. The URL's password never appears in ``repr``,
``url`` or a message.
"""

from __future__ import annotations

import contextlib
import importlib
import secrets
import time
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from dpop_signer.errors import ConfigError
from dpop_signer.redaction import redact_url, scrub
from dpop_signer.stores.base import (
    Snapshot,
    StoredFailure,
    StoredToken,
    StoreUnavailable,
    checked_nonce,
    checked_ttl,
    decode_token,
    encode_token,
    failure_ttl,
)

__all__ = ["RedisStore"]

PREFIX = "dpop-signer:v1:"
"""Every key this store writes starts with this (a shared server may hold other data)."""

EXTRA_HINT = "pip install 'dpop-signer[redis]'"

# Compare-and-delete: only the holder of the lease id releases it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def import_redis() -> ModuleType:
    """The ``redis`` package, or a one-line `ConfigError` naming the extra to install."""
    try:
        return importlib.import_module("redis")
    except ImportError as exc:
        raise ConfigError(
            f"a redis:// or rediss:// token store needs the redis client: {EXTRA_HINT}"
        ) from exc


class RedisStore:
    """A `TokenStore` on the Redis server at ``url`` (see the module doc).

    Args:
        url: ``redis://[user:password@]host[:port][/db]`` or ``rediss://...[?ca=PATH]``.
        ca_file: The CA bundle for ``rediss://`` (instead of ``?ca=``).
        timeout: Seconds to connect, and to wait for each reply.

    Raises:
        ConfigError: the URL is malformed, or the ``redis`` package is not installed.
    """

    def __init__(self, url: str, *, ca_file: str | None = None, timeout: float = 1.0) -> None:
        self._url = redact_url(url)
        options = _parse(url, ca_file)
        redis = import_redis()
        retry = importlib.import_module("redis.retry")
        backoff = importlib.import_module("redis.backoff")
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client: Any = redis.Redis(
            **options,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # No retries inside the client: a down server must fail fast (see the module doc).
            retry=retry.Retry(backoff.NoBackoff(), 0),
            decode_responses=True,
        )
        self._release = self._client.register_script(_RELEASE)

    @property
    def url(self) -> str:
        """The URL with user info masked and the query shown by length only."""
        return self._url

    def get(self, key: str) -> StoredToken | None:
        """See `TokenStore.get`."""
        return decode_token(self._call(self._client.get, PREFIX + "tok:" + key))

    def put(self, key: str, token: StoredToken, ttl: float) -> None:
        """See `TokenStore.put` (token write and failure removal in one ``MULTI``)."""
        ttl_ms = _ms(checked_ttl(ttl))

        def write() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(PREFIX + "tok:" + key, encode_token(token), px=ttl_ms)
            pipe.delete(PREFIX + "fail:" + key)
            pipe.execute()

        self._call(write)

    def try_lease(self, key: str, ttl: float) -> str | None:
        """See `TokenStore.try_lease`: ``SET NX PX``."""
        lease = secrets.token_urlsafe(16)
        won = self._call(
            self._client.set, PREFIX + "lease:" + key, lease, nx=True, px=_ms(checked_ttl(ttl))
        )
        return lease if won else None

    def release(self, key: str, lease: str) -> None:
        """See `TokenStore.release`: compare-and-delete in Lua; never raises."""
        with contextlib.suppress(StoreUnavailable):
            self._call(self._release, keys=[PREFIX + "lease:" + key], args=[lease])

    def record_failure(self, key: str, failure: StoredFailure) -> None:
        """See `TokenStore.record_failure`."""
        now = time.time()
        self._call(
            self._client.set,
            PREFIX + "fail:" + key,
            failure.to_json(),
            px=_ms(failure_ttl(failure, now)),
        )

    def snapshot(self, key: str) -> Snapshot:
        """See `TokenStore.snapshot`: one ``MGET``."""
        token, failure, lease = self._call(
            self._client.mget,
            [PREFIX + "tok:" + key, PREFIX + "fail:" + key, PREFIX + "lease:" + key],
        )
        return Snapshot(
            decode_token(token),
            StoredFailure.from_json(failure),
            lease if isinstance(lease, str) else None,
        )

    def get_nonce(self, origin: str) -> str | None:
        """See `TokenStore.get_nonce`."""
        return checked_nonce(self._call(self._client.get, PREFIX + "nonce:" + origin))

    def put_nonce(self, origin: str, nonce: str, ttl: float) -> None:
        """See `TokenStore.put_nonce` (a value that is not a nonce is ignored)."""
        ttl_ms = _ms(checked_ttl(ttl))
        if checked_nonce(nonce) is None:
            return
        self._call(self._client.set, PREFIX + "nonce:" + origin, nonce, px=ttl_ms)

    def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(*self._errors):
            self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r})"

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except self._errors as exc:
            raise StoreUnavailable(
                f"token store {self._url}: {type(exc).__name__}: {scrub(str(exc))}; check that "
                "the Redis server is up and reachable and the URL's credentials and TLS "
                "settings are right"
            ) from exc


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parse(url: str, ca_file: str | None) -> dict[str, Any]:
    """Connection arguments for ``redis.Redis`` from a ``redis://`` or ``rediss://`` URL."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"token store {shown}: the URL must start with redis:// or rediss://")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(f"token store {shown}: the port is not a number 1-65535") from exc
    if not parts.hostname:
        raise ConfigError(f"token store {shown}: the URL names no host (redis://host:port/db)")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"token store {shown}: the database must be a number (redis://host/0)")
    if parts.fragment:
        raise ConfigError(f"token store {shown}: a Redis URL takes no #fragment")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"ca"})
    if unknown:
        raise ConfigError(
            f"token store {shown}: unknown URL option {unknown[0]!r} (the one option is ?ca=PATH)"
        )
    ca = ca_file if ca_file is not None else query.get("ca")
    tls = parts.scheme == "rediss"
    if ca is not None and not tls:
        raise ConfigError(f"token store {shown}: a CA file (ca) needs a rediss:// URL")
    options: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "db": int(path or 0),
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
    }
    if tls:
        options.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True)
        if ca:
            options["ssl_ca_certs"] = ca
    return options
