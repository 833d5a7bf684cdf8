"""`SqliteStore`: a `TokenStore` in one SQLite file, shared by the processes of one host.

The embedded default for several workers (``sqlite:PATH``): nothing to run, the standard
library's ``sqlite3``. The file holds live tokens, so it is private: created ``0600`` in a
directory created ``0700`` when missing; SQLite gives its ``-wal`` and ``-shm`` files the
database file's mode. WAL journal mode lets readers go on while one process writes, and a busy
timeout makes a writer wait for another's short transaction instead of failing.

The fetch lease is one row per token key with an expiry, taken by a single UPSERT that only
overwrites an expired row: atomic under SQLite's write lock, so exactly one process wins, and
a holder killed mid-fetch (its row left behind) delays the others until the row expires.
Release deletes the row only while it still carries the holder's lease id.

Connections are opened lazily, one per process (re-opened after ``fork``: a SQLite connection
must never cross one) and shared by its threads behind a lock. Any ``sqlite3`` or OS error
raises `StoreUnavailable` and drops the connection, so the next call starts afresh.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dpop_signer.redaction import scrub
from dpop_signer.stores.base import (
    Snapshot,
    StoredFailure,
    StoredToken,
    StoreUnavailable,
    checked_failure,
    checked_nonce,
    checked_token,
    checked_ttl,
    failure_ttl,
)

__all__ = ["SqliteStore"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tokens (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
    "token_type TEXT NOT NULL, expires_at REAL, until REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, lease TEXT NOT NULL, "
    "until REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, kind TEXT NOT NULL, "
    "message TEXT NOT NULL, retry_at REAL NOT NULL, count INTEGER NOT NULL, error TEXT, "
    "error_description TEXT, status INTEGER, lease TEXT, until REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS nonces (origin TEXT PRIMARY KEY, nonce TEXT NOT NULL, "
    "until REAL NOT NULL)",
)


class SqliteStore:
    """A `TokenStore` in the SQLite database at ``path`` (see the module doc).

    Args:
        path: The database file; its directory is created ``0700`` if missing.
        busy_timeout: Seconds a write waits for another process's transaction.
        clock: Seconds since the epoch, for expiry (the same clock in every process).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = Path(path).expanduser().absolute()
        self._busy_timeout = float(busy_timeout)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    @property
    def url(self) -> str:
        """``sqlite:PATH`` (a path carries no credentials)."""
        return f"sqlite:{self._path}"

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- operations ------------------------------------------------------------------------

    def get(self, key: str) -> StoredToken | None:
        """See `TokenStore.get`."""
        with self._db() as db:
            return self._token(db, key, self._clock())

    def put(self, key: str, token: StoredToken, ttl: float) -> None:
        """See `TokenStore.put`."""
        ttl = checked_ttl(ttl)
        with self._db() as db:
            now = self._clock()
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?)",
                (key, token.value, token.token_type, token.expires_at, now + ttl),
            )
            db.execute("DELETE FROM failures WHERE key = ?", (key,))
            db.execute("DELETE FROM tokens WHERE until <= ?", (now,))
            db.execute("COMMIT")

    def try_lease(self, key: str, ttl: float) -> str | None:
        """See `TokenStore.try_lease`: one UPSERT that overwrites an expired lease only."""
        ttl = checked_ttl(ttl)
        lease = secrets.token_urlsafe(16)
        with self._db() as db:
            now = self._clock()
            cursor = db.execute(
                "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "lease = excluded.lease, until = excluded.until WHERE leases.until <= ?",
                (key, lease, now + ttl, now),
            )
            return lease if cursor.rowcount == 1 else None

    def release(self, key: str, lease: str) -> None:
        """See `TokenStore.release` (never raises: an unreleased lease expires)."""
        try:
            with self._db() as db:
                db.execute("DELETE FROM leases WHERE key = ? AND lease = ?", (key, lease))
        except StoreUnavailable:
            pass

    def record_failure(self, key: str, failure: StoredFailure) -> None:
        """See `TokenStore.record_failure`."""
        stored = StoredFailure.from_json(failure.to_json())  # scrubbed and cut as in Redis
        if stored is None:
            raise ValueError(f"not a storable failure: {failure!r}")
        with self._db() as db:
            now = self._clock()
            db.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    stored.kind,
                    stored.message,
                    stored.retry_at,
                    stored.count,
                    stored.error,
                    stored.error_description,
                    stored.status,
                    stored.lease,
                    now + failure_ttl(stored, now),
                ),
            )

    def snapshot(self, key: str) -> Snapshot:
        """See `TokenStore.snapshot` (one read transaction)."""
        with self._db() as db:
            now = self._clock()
            db.execute("BEGIN")
            try:
                token = self._token(db, key, now)
                row = db.execute(
                    "SELECT kind, message, retry_at, count, error, error_description, status, "
                    "lease FROM failures WHERE key = ? AND until > ?",
                    (key, now),
                ).fetchone()
                held = db.execute(
                    "SELECT lease FROM leases WHERE key = ? AND until > ?", (key, now)
                ).fetchone()
            finally:
                db.execute("COMMIT")
        failure = None if row is None else checked_failure(*row)
        lease = held[0] if held is not None and isinstance(held[0], str) else None
        return Snapshot(token, failure, lease)

    def get_nonce(self, origin: str) -> str | None:
        """See `TokenStore.get_nonce`."""
        with self._db() as db:
            row = db.execute(
                "SELECT nonce FROM nonces WHERE origin = ? AND until > ?",
                (origin, self._clock()),
            ).fetchone()
        return None if row is None else checked_nonce(row[0])

    def put_nonce(self, origin: str, nonce: str, ttl: float) -> None:
        """See `TokenStore.put_nonce` (a value that is not a nonce is ignored)."""
        ttl = checked_ttl(ttl)
        if checked_nonce(nonce) is None:
            return
        with self._db() as db:
            now = self._clock()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO nonces VALUES (?, ?, ?)", (origin, nonce, now + ttl))
            db.execute("DELETE FROM nonces WHERE until <= ?", (now,))
            db.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection (the next call would open a new one)."""
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"

    # -- connection ------------------------------------------------------------------------

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                db = self._connection()
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:
                        db.rollback()
                    raise
            except (sqlite3.Error, OSError) as exc:
                self._drop()
                raise StoreUnavailable(
                    f"token store {self.url}: {type(exc).__name__}: {scrub(str(exc))}; check "
                    "that the file and its directory exist and are writable by this user"
                ) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # After a fork the parent's connection is abandoned, not closed: closing it here
        # could touch locks the parent still holds.
        self._conn = None
        _prepare_file(self._path)
        db = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # autocommit: transactions are explicit BEGIN ... COMMIT
            check_same_thread=False,  # shared by this process's threads behind self._lock
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            self._initialize(db)
        except BaseException:
            db.close()
            raise
        self._conn, self._pid = db, os.getpid()
        return db

    def _initialize(self, db: sqlite3.Connection) -> None:
        # Processes that open a new file at the same moment (workers starting together) race
        # for the switch to WAL and the schema, and SQLite answers "database is locked" at
        # once there instead of waiting: try again, within the busy timeout.
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.01
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                # A token cache loses nothing worth an fsync per write when the power fails.
                db.execute("PRAGMA synchronous = NORMAL")
                for statement in _SCHEMA:
                    db.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with suppress(sqlite3.Error):
                conn.close()

    @staticmethod
    def _token(db: sqlite3.Connection, key: str, now: float) -> StoredToken | None:
        row = db.execute(
            "SELECT value, token_type, expires_at FROM tokens WHERE key = ? AND until > ?",
            (key, now),
        ).fetchone()
        return None if row is None else checked_token(*row)


def _prepare_file(path: Path) -> None:
    """Create the directory (0700) and the file (0600) if missing; make the file private."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink planted at the path must not make us chmod (or write) its target.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            # Planted by another user (a shared /tmp): it could read every token written.
            raise PermissionError(f"{path} belongs to another user (uid {info.st_uid})")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
