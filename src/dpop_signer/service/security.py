"""Who may talk to the service, and where it listens.

- `ApiKeys`: keys read from a file (never from an option value, which ``ps`` shows), one per
  line so a key can be rotated without downtime, compared in constant time.
- `Listen` / `bind_listener`: ``127.0.0.1:PORT``, ``[::1]:PORT``, ``localhost:PORT`` or
  ``unix:PATH``. TCP is loopback only unless remote access is asked for explicitly; a unix
  socket is created with mode 0600 (umask set before ``bind``, so it is never wider, not even
  for a moment).
- `parse_origins`: ``--allow-origin`` values as `dpop_signer.proof.origin_of` keys them
  (``scheme://host:port``, port always present), so ``https://api.example`` and
  ``https://API.example:443`` are the same origin.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import httpx

from dpop_signer.errors import ConfigError, ProofError
from dpop_signer.proof import origin_of

__all__ = [
    "ApiKeys",
    "Listen",
    "bind_listener",
    "parse_listen",
    "parse_origins",
    "remove_unix_socket",
]

_MIN_KEY_LENGTH = 16


class ApiKeys:
    """The API keys a caller may present; one per line in the key file."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("the API key file holds no key; write one random key per line")
        self._keys = keys

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """Read the keys; refuse a file that other users can read or keys that are too short.

        Raises:
            ConfigError: the file is missing, unreadable, world-accessible, empty, or a key is
                shorter than 16 characters.
        """
        where = f"API key file {os.fspath(path)!r}"
        try:
            info = os.stat(path)
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where} cannot be read: {exc.strerror}") from exc
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ConfigError(f"{where} is readable or writable by other users; chmod 600 it")
        keys = [line.strip() for line in data.splitlines() if line.strip()]
        for number, key in enumerate(keys, 1):
            if len(key) < _MIN_KEY_LENGTH:
                raise ConfigError(
                    f"{where}: the key on line {number} is shorter than {_MIN_KEY_LENGTH} "
                    "characters; generate one with 'openssl rand -hex 32'"
                )
        return cls(keys)

    def match(self, header_value: str | None, *, scheme: str = "bearer") -> int | None:
        """The 1-based number of the key that ``header_value`` presents, or None.

        ``header_value`` is an ``Authorization`` (or ``Proxy-Authorization``) value; the scheme
        is compared case-insensitively (RFC 9110 §11.1), the key in constant time against every
        key, so timing says nothing about which key or how much of it matched.
        """
        if not header_value:
            return None
        given_scheme, _, credentials = header_value.strip().partition(" ")
        if given_scheme.lower() != scheme:
            return None
        given = credentials.strip().encode("utf-8", "surrogateescape")
        found = None
        for number, key in enumerate(self._keys, 1):
            if hmac.compare_digest(given, key) and found is None:
                found = number
        return found


@dataclass(frozen=True)
class Listen:
    """Where to listen: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        """True for a unix socket."""
        return self.path is not None

    def describe(self, port: int | None = None) -> str:
        """``unix:PATH`` or ``HOST:PORT`` (IPv6 in brackets), with the bound port if given."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port if port is None else port}"

    @property
    def is_loopback(self) -> bool:
        """True for a unix socket or a loopback address."""
        if self.path is not None:
            return True
        assert self.host is not None
        return ipaddress.ip_address(self.host).is_loopback


def parse_listen(value: str) -> Listen:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``localhost:PORT`` or ``unix:PATH``.

    Host names other than ``localhost`` are refused: a name that resolves elsewhere tomorrow
    must not silently move the service off loopback.

    Raises:
        ConfigError: the value has none of these forms.
    """
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ConfigError("--listen unix: needs a socket path, e.g. unix:/run/dpop/dpop.sock")
        return Listen(path=os.path.abspath(path))
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--listen {value!r} is not HOST:PORT or unix:PATH (e.g. 127.0.0.1:8787)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(
            f"--listen {value!r}: give an IP address (127.0.0.1, ::1) or localhost, not a name"
        ) from exc
    return Listen(host=str(address), port=int(port_text))


def bind_listener(listen: Listen) -> socket.socket:
    """Create, bind and listen on the socket; a unix socket gets mode 0600.

    An existing unix socket file is replaced only when nothing answers on it (a stale socket
    left by a crash); a live one or a non-socket file is an error.

    Raises:
        ConfigError: the address is in use, not permitted, or the path is taken.
    """
    if listen.path is not None:
        return _bind_unix(listen.path)
    assert listen.host is not None
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it Nagle plus delayed ACKs add 40 ms to every answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {listen.describe()}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def _bind_unix(path: str) -> socket.socket:
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"--listen unix:{path}: the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise ConfigError(f"--listen unix:{path}: another process is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(1024)
    return sock


def remove_unix_socket(listen: Listen) -> None:
    """Remove the socket file at shutdown, so the next start finds a clean path."""
    if listen.path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.path)


def parse_origins(values: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Normalize ``--allow-origin`` values; each must be a bare origin (no path or query).

    Raises:
        ConfigError: a value is not an http(s) origin.
    """
    origins = set()
    for value in values:
        try:
            parsed = httpx.URL(value)
            origin = origin_of(parsed)
        except (ProofError, httpx.InvalidURL) as exc:
            raise ConfigError(
                f"--allow-origin {value!r} is not an origin like https://api.example"
            ) from exc
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ConfigError(
                f"--allow-origin {value!r} has a path or query; give only scheme://host[:port]"
            )
        origins.add(origin)
    return frozenset(origins)
