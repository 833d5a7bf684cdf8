"""Authorization server metadata (RFC 8414): find the token endpoint and what the server offers.

With the setting ``issuer`` (``--issuer URL``, ``DPOP_ISSUER``, ``issuer`` in a config file)
dpop-signer reads the server's metadata instead of relying on a token URL typed by hand.
`metadata_urls` builds the places to look, in this order:

1. ``/.well-known/oauth-authorization-server`` inserted between the host and the issuer's path
   (RFC 8414 §3.1);
2. ``/.well-known/openid-configuration`` inserted the same way (RFC 8414 §5, compatibility);
3. for an issuer with a path, ``/.well-known/openid-configuration`` appended to it, which is
   where OpenID Connect Discovery 1.0 §4 puts it (and most OpenID providers serve it).

The first that answers ``200`` with a JSON object is used; its ``issuer`` must equal the
configured issuer exactly (RFC 8414 §3.3, simple string comparison): a document that names
another issuer is refused rather than tried further, since it may come from a server that
impersonates the configured one (RFC 8414 §6.2). Redirects are not followed (a metadata URL
that moved is an error naming where it points).

`ServerMetadata` keeps what the client uses: ``token_endpoint``,
``dpop_signing_alg_values_supported`` (RFC 9449 §5.1), ``token_endpoint_auth_methods_supported``
and ``token_endpoint_auth_signing_alg_values_supported`` (RFC 8414 §2). `discover` caches the
result per process (a successful fetch only; a failure is tried again next time), so that the
service and repeated `build_auth` calls fetch it once. `metadata_problems` says what in the
metadata does not fit a client's settings (the key's algorithm not offered for DPoP proofs, the
client authentication method not offered), in the words of the library; the CLI and ``dpop
doctor`` show the same sentences.

The explicit ``token_url`` still wins over the discovered ``token_endpoint`` (`apply_discovery`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from dpop_signer.errors import ConfigError, OAuthError, ServerUnreachableError
from dpop_signer.redaction import redact_url, sanitize_server_text
from dpop_signer.urls import check_http_url, is_loopback

if TYPE_CHECKING:
    import os

    from dpop_signer.config import Settings

__all__ = [
    "ServerMetadata",
    "apply_discovery",
    "check_issuer",
    "discover",
    "fetch_metadata",
    "forget_discovered",
    "metadata_problems",
    "metadata_urls",
]

_OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"
_OIDC_WELL_KNOWN = "/.well-known/openid-configuration"
_MAX_DOCUMENT = 256 * 1024
"""Bytes of a metadata document read at most (real ones are a few kB)."""


@dataclass(frozen=True)
class ServerMetadata:
    """The parts of an authorization server's metadata (RFC 8414 §2) the client uses.

    A list the server did not publish is ``None`` (nothing known), not empty.
    """

    issuer: str
    """The issuer identifier, equal to the configured one (RFC 8414 §3.3)."""
    token_endpoint: str
    url: str
    """Where the document was read."""
    dpop_signing_alg_values_supported: tuple[str, ...] | None = None
    token_endpoint_auth_methods_supported: tuple[str, ...] | None = None
    token_endpoint_auth_signing_alg_values_supported: tuple[str, ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)
    """The whole document."""


def check_issuer(issuer: str) -> str:
    """``issuer`` if it is a valid issuer identifier (RFC 8414 §2), else raise `ConfigError`.

    An ``https`` URL (``http`` only on a loopback host, for tests) with a host, no query and no
    fragment.
    """
    try:
        url = check_http_url(issuer, "issuer")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or issuer.endswith(("?", "#")):
        raise ConfigError(
            f"issuer {redact_url(issuer)!r} has a query or fragment, which an issuer identifier "
            "never has (RFC 8414 §2); give the issuer as the server's metadata names it"
        )
    if url.scheme != "https" and not is_loopback(url):
        raise ConfigError(
            f"issuer {redact_url(issuer)!r} is not https; an issuer identifier uses the https "
            "scheme (RFC 8414 §2)"
        )
    if url.userinfo:
        raise ConfigError(f"issuer {redact_url(issuer)!r} has user info; drop the 'user@' part")
    return issuer


def metadata_urls(issuer: str) -> list[str]:
    """Where the metadata of ``issuer`` may be, in the order they are tried (module docstring).

    >>> metadata_urls("https://as.example/tenant1/")
    ['https://as.example/.well-known/oauth-authorization-server/tenant1', \
'https://as.example/.well-known/openid-configuration/tenant1', \
'https://as.example/tenant1/.well-known/openid-configuration']
    """
    parts = urlsplit(issuer)
    origin = f"{parts.scheme}://{parts.netloc}"
    # RFC 8414 §3.1: a terminating "/" of the issuer's path is removed before inserting.
    path = parts.path.rstrip("/")
    urls = [f"{origin}{_OAUTH_WELL_KNOWN}{path}", f"{origin}{_OIDC_WELL_KNOWN}{path}"]
    if path:
        urls.append(f"{origin}{path}{_OIDC_WELL_KNOWN}")
    return urls


def fetch_metadata(issuer: str, client: httpx.Client) -> ServerMetadata:
    """Read and check the metadata of ``issuer`` through ``client`` (no cache; see `discover`).

    Raises:
        ConfigError: ``issuer`` is not a valid issuer identifier.
        ServerUnreachableError: no metadata URL could be reached, or none has a document.
        OAuthError: a document was found but is unusable: another ``issuer``, no
            ``token_endpoint``, malformed fields.
    """
    check_issuer(issuer)
    tried: list[str] = []
    for url in metadata_urls(issuer):
        try:
            response = client.get(url, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            # The host does not answer at all: the other URLs are on the same host.
            raise _unreachable(issuer, url, exc) from exc
        except httpx.HTTPError as exc:
            tried.append(f"{url}: {type(exc).__name__}")
            continue
        if 300 <= response.status_code < 400:
            location = sanitize_server_text(
                redact_url(response.headers.get("location", "")), limit=200
            )
            raise OAuthError(
                f"the metadata of issuer {issuer} at {url} redirects (HTTP "
                f"{response.status_code}) to {location or 'nowhere'}; metadata is not followed "
                "across redirects: check the issuer URL"
            )
        if response.status_code != 200:
            tried.append(f"{url}: HTTP {response.status_code}")
            continue
        document = _json_object(response.content)
        if document is None:
            tried.append(f"{url}: not a JSON object")
            continue
        return _metadata(issuer, url, document)
    raise ServerUnreachableError(
        f"issuer {issuer} publishes no authorization server metadata (RFC 8414): "
        + "; ".join(tried)
        + "; check the issuer URL, or give the token endpoint with --token-url"
    )


def _unreachable(issuer: str, url: str, exc: httpx.TransportError) -> ServerUnreachableError:
    from dpop_signer.tls import certificate_problem

    # The CLI tells a certificate problem apart by the chained cause (cli_errors).
    problem = certificate_problem(exc)
    detail = f"TLS certificate check failed: {problem}" if problem else str(exc) or "no detail"
    return ServerUnreachableError(
        f"cannot read the metadata of issuer {issuer} at {url}: {type(exc).__name__} "
        f"({detail}); check the issuer URL and that the server is up (ca_bundle for a "
        "private CA)"
    )


def _json_object(content: bytes) -> dict[str, Any] | None:
    if len(content) > _MAX_DOCUMENT:
        return None
    try:
        value = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _metadata(issuer: str, url: str, document: Mapping[str, Any]) -> ServerMetadata:
    where = f"the metadata at {url}"
    named = document.get("issuer")
    if named != issuer:
        shown = sanitize_server_text(json.dumps(named), limit=200)
        raise OAuthError(
            f"{where} names issuer {shown}, not {issuer!r}; the issuer must match exactly "
            "(RFC 8414 §3.3): correct the issuer setting to the server's own issuer identifier, "
            "or suspect a server impersonating it"
        )
    token_endpoint = document.get("token_endpoint")
    if not isinstance(token_endpoint, str):
        raise OAuthError(
            f"{where} has no token_endpoint (RFC 8414 §2); give the token endpoint with --token-url"
        )
    try:
        check_http_url(token_endpoint, "token_endpoint")
    except ValueError as exc:
        raise OAuthError(f"{where}: {sanitize_server_text(str(exc), limit=300)}") from None
    return ServerMetadata(
        issuer=issuer,
        token_endpoint=token_endpoint,
        url=url,
        dpop_signing_alg_values_supported=_strings(
            document, "dpop_signing_alg_values_supported", where
        ),
        token_endpoint_auth_methods_supported=_strings(
            document, "token_endpoint_auth_methods_supported", where
        ),
        token_endpoint_auth_signing_alg_values_supported=_strings(
            document, "token_endpoint_auth_signing_alg_values_supported", where
        ),
        raw=dict(document),
    )


def _strings(document: Mapping[str, Any], name: str, where: str) -> tuple[str, ...] | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise OAuthError(f"{where}: {name} is not a JSON array of strings (RFC 8414 §2)")
    return tuple(value)


# --- the per-process cache ---------------------------------------------------------------------

_CacheKey = tuple[str, str | None]
_cache: dict[_CacheKey, ServerMetadata] = {}
_cache_lock = threading.Lock()
_fetch_locks: dict[_CacheKey, threading.Lock] = {}


def discover(
    issuer: str,
    *,
    timeout: float = 10.0,
    ca_bundle: str | os.PathLike[str] | None = None,
    client_factory: Callable[[], httpx.Client] | None = None,
) -> ServerMetadata:
    """The metadata of ``issuer``, fetched once per process (`fetch_metadata` does the work).

    Args:
        issuer: The issuer identifier.
        timeout: HTTP timeout in seconds.
        ca_bundle: PEM CA certificates to trust instead of the system's (`dpop_signer.tls`).
        client_factory: Makes the httpx client to fetch with (default: our TLS trust, our
            ``User-Agent``, no redirects); cached per ``issuer`` and ``ca_bundle`` all the same.

    Raises:
        The errors of `fetch_metadata`; a failure is not cached.
    """
    import os

    key: _CacheKey = (issuer, None if ca_bundle is None else os.fspath(ca_bundle))
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            return found
        lock = _fetch_locks.setdefault(key, threading.Lock())
    # One fetch per issuer at a time: threads of the service starting together share it.
    with lock:
        with _cache_lock:
            found = _cache.get(key)
        if found is not None:
            return found
        with (client_factory or _default_client(timeout, ca_bundle))() as client:
            metadata = fetch_metadata(issuer, client)
        with _cache_lock:
            _cache[key] = metadata
        return metadata


def forget_discovered() -> None:
    """Empty the per-process cache (for tests, and for a reload that must read it again)."""
    with _cache_lock:
        _cache.clear()


def _default_client(
    timeout: float, ca_bundle: str | os.PathLike[str] | None
) -> Callable[[], httpx.Client]:
    def make() -> httpx.Client:
        from dpop_signer.tls import ssl_context
        from dpop_signer.tokens import USER_AGENT

        return httpx.Client(
            timeout=timeout,
            verify=ssl_context(ca_bundle),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    return make


# --- what fits and what does not ---------------------------------------------------------------


def metadata_problems(
    metadata: ServerMetadata,
    *,
    dpop_algorithm: str | None,
    client_auth: str,
    assertion_algorithm: str | None = None,
) -> list[tuple[str, str]]:
    """What in ``metadata`` does not fit the client: ``(setting, sentence)`` per problem.

    ``setting`` is the one that would fix it (``key``, ``client_auth``, ``assertion_key``); the
    sentence says what is wrong and how to fix it.

    ``dpop_algorithm`` is the DPoP key's ``Signer.algorithm``; ``assertion_algorithm`` that of
    the ``private_key_jwt`` assertion key (None: not known, not checked). A list the server
    did not publish is no problem (nothing is known against it); an empty one is.
    """
    problems: list[tuple[str, str]] = []
    offered = metadata.dpop_signing_alg_values_supported
    if offered is not None and dpop_algorithm is not None and dpop_algorithm not in offered:
        problems.append(
            (
                "key",
                f"the DPoP key signs {dpop_algorithm}, which issuer {metadata.issuer} does not "
                f"offer for DPoP proofs (dpop_signing_alg_values_supported: {_listed(offered)}; "
                "RFC 9449 §5.1); use a key of one of those algorithms (key) or allow "
                f"{dpop_algorithm} at the server",
            )
        )
    methods = metadata.token_endpoint_auth_methods_supported
    if methods is not None and client_auth not in methods:
        problems.append(
            (
                "client_auth",
                f"client_auth {client_auth} is not offered by issuer {metadata.issuer} "
                f"(token_endpoint_auth_methods_supported: {_listed(methods)}; RFC 8414 §2); "
                "choose one of those (client_auth) or enable it at the server",
            )
        )
    signing = metadata.token_endpoint_auth_signing_alg_values_supported
    if (
        client_auth == "private_key_jwt"
        and assertion_algorithm is not None
        and signing is not None
        and assertion_algorithm not in signing
    ):
        problems.append(
            (
                "assertion_key",
                f"the private_key_jwt assertion key signs {assertion_algorithm}, which issuer "
                f"{metadata.issuer} does not accept (token_endpoint_auth_signing_alg_values_"
                f"supported: {_listed(signing)}); use an assertion key of one of those "
                "algorithms (assertion_key)",
            )
        )
    return problems


def _listed(values: Sequence[str]) -> str:
    shown = ", ".join(values) if values else "none"
    return sanitize_server_text(shown, limit=200)


# --- settings ----------------------------------------------------------------------------------


def apply_discovery(settings: Settings) -> tuple[Settings, ServerMetadata | None]:
    """``settings`` with ``token_url`` taken from the issuer's metadata when not given, and it.

    Without ``issuer`` nothing is fetched: ``(settings, None)``. A ``token_url`` given by the
    user wins over the discovered ``token_endpoint``; one taken from the metadata is recorded
    as coming from ``discovery (URL)``.

    Raises:
        The errors of `discover`.
    """
    if settings.issuer is None:
        return settings, None
    metadata = discover(settings.issuer, timeout=settings.timeout, ca_bundle=settings.ca_bundle)
    if settings.token_url is None:
        settings = settings.with_values(
            f"discovery ({metadata.url})", token_url=metadata.token_endpoint
        )
    return settings, metadata
