"""What a ``dpop`` command exits with, and its error line in the words of the command line.

Exit statuses are the same for every command and are computed from the exception type alone
(the tree is in `dpop_signer.errors`), so a script can tell what failed::

    0    success
    1    the API answered an HTTP error status (dpop request), or a doctor check failed
    2    usage or configuration: a bad option, a missing or invalid setting or file
    3    the key or its token: missing, PIN refused, unsupported, HSM unavailable
    4    the authorization server refused: an OAuth error, a Bearer token, a looping nonce demand
    5    network: unreachable, timed out, TLS (certificate) failure, a server error (5xx)
    130  interrupted

The library speaks Python in its messages (``pass pin=``, ``accept_bearer=True``, "the httpx
client's timeout="); `cli_message` rewrites those hints into the options, environment variables
and config keys that exist for the command that failed, so ``dpop demo`` (which has no
``--pin``) is never told to use ``--pin``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection

from dpop_signer.config_names import ways_to_set
from dpop_signer.errors import (
    ConfigError,
    DPoPSignerError,
    OAuthError,
    ProofError,
    ServerFailedError,
    ServerUnreachableError,
    SignerError,
    SignerUnavailableError,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_KEY",
    "EXIT_NETWORK",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_STATUS_HELP",
    "EXIT_USAGE",
    "cli_message",
    "cli_words",
    "exit_code_for",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_KEY = 3
EXIT_REFUSED = 4
EXIT_NETWORK = 5
EXIT_INTERRUPTED = 130

EXIT_STATUS_HELP = """\b
Exit status:
  0    success
  1    the API answered an HTTP error status, or a doctor check failed
  2    usage or configuration (bad option, missing or invalid setting)
  3    the key or its token (missing, PIN refused, unsupported, HSM unavailable)
  4    the authorization server refused (OAuth error, Bearer token, nonce loop)
  5    network (unreachable, timeout, TLS certificate, server error)
  130  interrupted"""
"""The table for ``--help`` texts (click keeps lines after ``\\b`` unwrapped)."""


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception that ends a command (see the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ConfigError | ProofError):
        return EXIT_USAGE
    if isinstance(exc, SignerError):
        return EXIT_KEY
    if isinstance(exc, ServerUnreachableError | ServerFailedError):
        return EXIT_NETWORK
    if isinstance(exc, OAuthError):
        return EXIT_REFUSED
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            return EXIT_USAGE
        if isinstance(exc, httpx.TransportError):
            return EXIT_NETWORK
    return EXIT_FAILED


Options = Collection[str]


def _ways(field: str, options: Options | None) -> str:
    return ways_to_set(field, None if options is None else frozenset(options))


# Library phrases and what the command line says instead. Each replacement gets the long
# options of the command that failed, so that it only names what that command accepts.
_CLI_WORDS: list[tuple[re.Pattern[str], Callable[[Options | None], str]]] = [
    (
        re.compile(r"pass pin= \(its passphrase\)"),
        lambda opts: "to give its passphrase, " + _ways("pin", opts),
    ),
    (
        re.compile(r"pass pin=(, use --pin or DPOP_PIN)?"),
        lambda opts: _ways("pin", opts),
    ),
    (
        re.compile(r"pass client_secret=|\(--client-secret or DPOP_CLIENT_SECRET\)"),
        lambda opts: _ways("client_secret", opts),
    ),
    (
        re.compile(r"or pass accept_bearer=True( to accept unbound tokens)?"),
        lambda opts: (
            "or, to accept unbound tokens, "
            + _ways("accept_bearer", opts).replace("DPOP_ACCEPT_BEARER", "DPOP_ACCEPT_BEARER=1")
        ),
    ),
    (re.compile(r"with accept_bearer=True"), lambda opts: "with --accept-bearer"),
    (
        re.compile(r"\(?timeouts are the [\w ]*client's timeout=? setting\)?"),
        lambda opts: "(to wait longer, " + _ways("timeout", opts) + ")",
    ),
]


def cli_message(exc: BaseException, options: Options) -> str:
    """The one-line message for ``exc``, in the words of a command that has ``options``."""
    from dpop_signer.tls import certificate_problem

    problem = certificate_problem(exc)
    if problem is not None:
        return _certificate_message(exc, problem, options)
    if isinstance(exc, DPoPSignerError):
        message = str(exc)
    else:
        message = _httpx_message(exc, options) or f"{type(exc).__name__}: {exc}"
    message = cli_words(message, options)
    if isinstance(exc, SignerUnavailableError) and "softhsm" in message.lower():
        from dpop_signer.doctor import softhsm2_problem

        cause = softhsm2_problem()
        if cause is not None:
            # SoftHSM2's own configuration is the real cause; changing the module is not the fix.
            kept = [part for part in message.split("; ") if "module-path=" not in part]
            message = "; ".join([*kept, cause])
    return message


def cli_words(message: str, options: Options | None = None) -> str:
    """``message`` with the library's Python hints put in command-line words.

    ``options``: the long options of the command (``None``: every option is offered).
    """
    for pattern, words in _CLI_WORDS:
        if pattern.search(message):
            # A function, not a string: the words may hold backslashes re.sub would expand.
            replacement = words(options)
            message = pattern.sub(lambda _m: replacement, message)  # noqa: B023 - used at once
    return message


def _where(exc: BaseException) -> str:
    from dpop_signer.redaction import redact_url

    httpx = sys.modules.get("httpx")
    request = None
    if httpx is not None and isinstance(exc, httpx.RequestError):
        try:
            request = exc.request
        except RuntimeError:  # httpx raises when the error was created without a request
            request = None
    return f" {request.method} {redact_url(request.url)}" if request is not None else ""


def _certificate_message(exc: BaseException, problem: str, options: Options) -> str:
    where = _where(exc)
    what = f"for{where}" if where else "of the server"
    return (
        f"TLS certificate check failed {what}: {problem}; if the server's certificate is "
        f"signed by a private CA, trust that CA's PEM file: {_ways('ca_bundle', options)}; "
        "otherwise fix the server's certificate (name, expiry, chain)"
    )


def _httpx_message(exc: BaseException, options: Options) -> str | None:
    """A one-line description of an httpx error, or None when ``exc`` is not one."""
    httpx = sys.modules.get("httpx")
    if httpx is None or not isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
        return None
    where = _where(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out on{where}; to wait longer, {_ways('timeout', options)}"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect for{where}: {exc}; check the URL and that the server is running"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"bad URL: {exc}; give an absolute http:// or https:// URL"
    return f"HTTP error on{where}: {exc or type(exc).__name__}"
