"""Running ``dpop`` as a real subprocess in the CLI tests, and checking what it printed.

Also the small parts those tests need: `StubServer`, an HTTP(S) server on 127.0.0.1 with
programmed answers that records what it received (for redirects, slow and misbehaving servers),
and `make_tls_files`, a CA and a server certificate for 127.0.0.1 made with ``cryptography``
at test time.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The console script itself, as a user runs it (not `python -m`): what `pip install` made.
DPOP = Path(sys.executable).with_name("dpop")

# Variables a developer's shell may carry that would change what the CLI under test does.
_STRIPPED_PREFIXES = ("DPOP_",)
_KEPT = {"DPOP_PKCS11_MODULE"}


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def both(self) -> str:
        return self.out + self.err


def clean_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The test process's environment without DPOP_* settings, plus ``extra`` (None: unset)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED_PREFIXES) or k in _KEPT
    }
    env["DPOP_NO_PROMPT"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # No user or system config file: XDG_CONFIG_HOME points at a directory with none in it.
    env["XDG_CONFIG_HOME"] = "/nonexistent-dpop-test-config"
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def dpop(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    cwd: str | Path | None = None,
    stdin: str | None = None,
    timeout: float = 60.0,
) -> Result:
    """Run the ``dpop`` executable with ARGS, a clean environment plus ``env``."""
    assert DPOP.exists(), f"the dpop console script is not installed at {DPOP}"
    proc = subprocess.run(
        [str(DPOP), *args],
        env=clean_env(env),
        cwd=cwd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_ok(result: Result) -> Result:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.both
    return result


def assert_one_line_error(result: Result, *, code: int | None = None, says: str = "") -> str:
    """Non-zero exit, no traceback, and exactly one ``error:`` line on stderr (warnings aside)."""
    assert result.code != 0, f"expected failure, got 0\nstdout: {result.out}"
    if code is not None:
        assert result.code == code, f"exit {result.code}, want {code}; stderr: {result.err}"
    assert "Traceback" not in result.both, result.both
    lines = [line for line in result.err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, f"want one error line, got: {result.err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert says.lower() in lines[0].lower(), f"{says!r} not in {lines[0]!r}"
    return lines[0]


def assert_absent(text: str, secrets: Iterable[str | None]) -> None:
    """None of ``secrets`` (the real values) occurs in ``text``."""
    for secret in secrets:
        if secret:
            assert secret not in text, f"a secret value of {len(secret)} chars leaked"


# --- a stub HTTP(S) server -------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


Answer = tuple[int, dict[str, str], bytes]
Route = Callable[[Received], Answer]


def json_answer(status: int, value: object, **headers: str) -> Answer:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(value).encode()


def token_route(token: str = "stub-access-token-0123456789", token_type: str = "DPoP") -> Route:
    """A token endpoint that issues ``token`` to anyone (the stub checks nothing)."""

    def answer(_: Received) -> Answer:
        return json_answer(200, {"access_token": token, "token_type": token_type, "expires_in": 60})

    return answer


@dataclass
class StubServer:
    """An HTTP server on 127.0.0.1 (TLS with ``tls=(cert, key)``) answering from ``routes``.

    ``routes`` maps a path (without query) to a function of the `Received` request; other
    paths get 404. ``received`` lists every request in order. ``hold`` (a path) makes the
    server accept that request and never answer until the server stops (timeouts, ^C).
    """

    routes: dict[str, Route] = field(default_factory=dict)
    tls: tuple[Path, Path] | None = None
    received: list[Received] = field(default_factory=list)
    hold: str | None = None

    def __post_init__(self) -> None:
        stub = self
        self._release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                request = Received(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                stub.received.append(request)
                if path == stub.hold:
                    stub._release.wait(30)  # bounded: the test stops the server well before
                    return
                route = stub.routes.get(path)
                status, headers, content = (
                    route(request) if route else (404, {"Content-Type": "text/plain"}, b"no")
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the stub server did not stop within 10 s"

    def requests_to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path.split("?", 1)[0] == path]


@contextmanager
def stub_server(
    routes: dict[str, Route], *, tls: tuple[Path, Path] | None = None, hold: str | None = None
) -> Iterator[StubServer]:
    server = StubServer(routes, tls=tls, hold=hold).start()
    try:
        yield server
    finally:
        server.stop()


# --- a CA and a server certificate ------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate (PEM): what --cacert gets
    cert: Path  # the server's certificate for 127.0.0.1, signed by the CA
    key: Path  # the server's key


def make_tls_files(directory: Path) -> TlsFiles:
    """A private CA and a certificate for IP 127.0.0.1 signed by it, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpop-signer test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
