"""Token stores: one client_credentials token shared by many workers, replicas and hosts.

``open_store`` takes the ``token_store`` setting (or a store object):

- ``memory``: this process only (the default, as without a store);
- ``sqlite:PATH``: the processes of one host, in a private SQLite file (`SqliteStore`);
- ``redis://[user:password@]host:port/db`` or ``rediss://...?ca=PATH``: many hosts, on a Redis
  server (`RedisStore`; needs ``pip install 'dpop-signer[redis]'``).

A shared store is wrapped in `FallbackStore`, so that a store that goes away never fails a
request: the process carries on from memory with one warning and shares again when it is
back. What the stores hold, and why the API is synchronous: `dpop_signer.stores.base`.

>>> store = open_store("memory")
>>> store.put(token_key("https://as.example/token", "svc", jkt="j"), StoredToken(
...     "at", "DPoP", None), ttl=60)
>>> store.get(token_key("https://as.example/token", "svc", jkt="j")).token_type
'DPoP'
"""

from __future__ import annotations

from dpop_signer.errors import ConfigError
from dpop_signer.redaction import redact_url
from dpop_signer.stores.base import (
    Outcome,
    Snapshot,
    StoredFailure,
    StoredToken,
    StoreUnavailable,
    TokenStore,
    await_outcome,
    token_key,
    wait_for_outcome,
)
from dpop_signer.stores.fallback import FallbackStore
from dpop_signer.stores.memory import MemoryStore
from dpop_signer.stores.sqlite import SqliteStore

__all__ = [
    "FallbackStore",
    "MemoryStore",
    "Outcome",
    "Snapshot",
    "SqliteStore",
    "StoreUnavailable",
    "StoredFailure",
    "StoredToken",
    "TokenStore",
    "await_outcome",
    "open_store",
    "token_key",
    "wait_for_outcome",
]

_FORMS = "memory, sqlite:PATH, redis://[user:password@]host:port/db or rediss://...?ca=PATH"


def open_store(
    url_or_store: str | TokenStore,
    *,
    ca_file: str | None = None,
    fallback: bool = True,
) -> TokenStore:
    """The `TokenStore` for a ``token_store`` setting, or the store object given.

    Nothing is connected or created here: a store that is down at start-up does not stop the
    caller from starting (it falls back to memory at its first use).

    Args:
        url_or_store: ``memory``, ``sqlite:PATH``, ``redis://...``, ``rediss://...``, or a
            store object (returned as is when it is a `MemoryStore` or `FallbackStore`).
        ca_file: The CA bundle for a ``rediss://`` URL (instead of its ``?ca=``).
        fallback: Wrap a shared store in `FallbackStore` (off: `StoreUnavailable` reaches
            the caller, for tools that must report the store itself).

    Raises:
        ConfigError: the URL is not one of the forms above, or needs an extra not installed.
    """
    if not isinstance(url_or_store, str):
        if not isinstance(url_or_store, TokenStore):
            raise ConfigError(
                f"token_store must be a URL ({_FORMS}) or a TokenStore, "
                f"not {type(url_or_store).__name__}"
            )
        if not fallback or isinstance(url_or_store, MemoryStore | FallbackStore):
            return url_or_store
        return FallbackStore(url_or_store)
    text = url_or_store.strip()
    store: TokenStore
    if text == "memory":
        if ca_file is not None:
            raise ConfigError("a CA file is for a rediss:// token_store, not memory")
        return MemoryStore()
    if text.startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if path.startswith("//"):  # sqlite:///var/lib/x.db, as SQLAlchemy spells it
            path = path[2:]
        if not path:
            raise ConfigError("token_store sqlite: needs a file path (sqlite:/var/lib/dpop/t.db)")
        if ca_file is not None:
            raise ConfigError("a CA file is for a rediss:// token_store, not sqlite:")
        store = SqliteStore(path)
    elif text.lower().startswith(("redis://", "rediss://")):
        from dpop_signer.stores.redis import RedisStore  # imports the optional client

        store = RedisStore(text, ca_file=ca_file)
    else:
        raise ConfigError(f"token_store must be {_FORMS}, not {redact_url(text)!r}")
    return FallbackStore(store) if fallback else store
