"""The OAuth 2.0 client_credentials grant (RFC 6749 §4.4) with a DPoP proof on every request.

`ClientCredentialsTokenSource` knows how to ask for a token and how to read the answer; it does
no I/O itself. `TokenCache` holds the current `AccessToken` (a `CachedToken`, bound to the key
whose proofs it goes with), when to renew it, and the outcome of the last fetch with its
backoff. `dpop_signer.flow` decides when to fetch; the drivers (`dpop_signer.DPoPAuth`,
`dpop_signer.requests`, `dpop_signer.aiohttp`) send what it builds through the application's
own HTTP client.

Client authentication (RFC 6749 §2.3, RFC 7523, OpenID Connect Core §9):

- ``client_secret_basic``: HTTP Basic with the client id and secret each form-urlencoded first
  (RFC 6749 §2.3.1; a secret with ``:`` or ``%`` in it breaks servers otherwise).
- ``client_secret_post``: ``client_id`` and ``client_secret`` in the form body.
- ``private_key_jwt``: an RFC 7523 assertion signed with ES256 by a `Signer` (the DPoP key or
  another one; both may live in the HSM). A fresh assertion, with a fresh ``jti``, goes with
  every attempt, the nonce retry included, since servers reject a replayed ``jti``. Its ``aud``
  is the authorization server's issuer identifier, as one string
  (draft-ietf-oauth-rfc7523bis, which closes the audience-confusion attack on RFC 7523 §3's
  token endpoint audience; FAPI 2.0 demands it too). ``assertion_audience="token_endpoint"``
  keeps the token endpoint URL for servers that still demand it, and so does a client that
  knows no issuer (logged once).
- ``none``: a public client; only ``client_id`` is sent.

Responses are read as RFC 6749 §5.1 (success) or §5.2 (error). A token whose ``token_type``
is not ``DPoP`` (compared case-insensitively) is refused unless ``accept_bearer=True``: a
server that silently downgrades to Bearer would otherwise turn a sender-constrained deployment
into a bearer one without anybody noticing. Error messages carry status codes, content types
and the server's ``error`` code and ``error_description``, never the rest of the response body.
What the server wrote goes through a `dpop_signer.redaction.Redactor` first, so a server that
echoes the request cannot make us print the client secret (in any encoding) or a proof.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, get_args
from urllib.parse import quote_plus, urlencode

import httpx

from dpop_signer import __version__
from dpop_signer.config_names import AssertionAudience, ClientAuth
from dpop_signer.discovery import check_issuer
from dpop_signer.errors import (
    ConfigError,
    InvalidTokenResponseError,
    OAuthError,
    ProofError,
    ServerFailedError,
    ServerUnreachableError,
    TokenEndpointError,
)
from dpop_signer.jose import b64url_json, is_token68
from dpop_signer.proof import DPoPProofBuilder, compact_jws, default_jti
from dpop_signer.redaction import Redactor, redact_url
from dpop_signer.signers.base import Signer
from dpop_signer.urls import is_loopback, normalize_htu

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "USER_AGENT",
    "AccessToken",
    "AssertionAudience",
    "CachedToken",
    "ClientAuth",
    "ClientCredentialsTokenSource",
    "FetchFailure",
    "TokenCache",
    "retry_after_seconds",
]

logger = logging.getLogger("dpop_signer")


CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
"""RFC 7523 §2.2 ``client_assertion_type``."""

USER_AGENT = f"dpop-signer/{__version__}"
"""The ``User-Agent`` of token requests and of the CLI's HTTP clients: servers' logs can tell
dpop-signer apart from other clients (RFC 9110 §10.1.5)."""

# What to do about the common RFC 6749 §5.2 error codes, for one-line messages that help.
_HINTS = {
    "invalid_client": "check the client id, the client secret or key, and the client "
    "authentication method (client_auth) registered at the server",
    "unauthorized_client": "the client is not allowed to use the client_credentials grant; "
    "enable it for this client at the authorization server",
    "invalid_scope": "ask for a scope the client is allowed (--scope)",
    "invalid_target": "ask for a resource or audience the client is allowed (RFC 8707)",
    "unsupported_grant_type": "enable the client_credentials grant at the authorization server",
    "invalid_dpop_proof": "the server rejected the DPoP proof; check the clocks and that the "
    "server accepts ES256",
    "use_dpop_nonce": "the server demands a DPoP nonce (RFC 9449 §8)",
}


@dataclass(frozen=True)
class AccessToken:
    """An access token from a token endpoint (RFC 6749 §5.1).

    ``value`` and ``raw`` stay out of ``repr`` (and so out of logs and tracebacks).
    """

    value: str = field(repr=False)
    """The access token itself; send it only with its DPoP proof."""
    token_type: str
    """As the server spelled it (``DPoP``, ``dpop``, ``Bearer`` if accepted)."""
    expires_at: float | None
    """Seconds since the epoch (client clock) when it expires; None if the server said not."""
    scope: str | None = None
    """The granted scope if the server named it (RFC 6749 §5.1)."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)
    """The whole JSON response (it holds the token too: never log it)."""

    @property
    def is_dpop(self) -> bool:
        """True when the token is DPoP-bound (``token_type`` ``DPoP``, any case; RFC 9449 §5)."""
        return self.token_type.lower() == "dpop"

    @property
    def scheme(self) -> str:
        """The ``Authorization`` scheme to send it with: ``DPoP`` or ``Bearer`` (RFC 9449 §7.1)."""
        return "DPoP" if self.is_dpop else "Bearer"

    def expires_in(self, now: float) -> float | None:
        """Seconds left at ``now`` (negative once expired), or None when unknown."""
        return None if self.expires_at is None else self.expires_at - now


class ClientCredentialsTokenSource:
    """Builds client_credentials token requests and parses their responses; no I/O.

    Args:
        token_url: The token endpoint (absolute http or https URL).
        client_id: The OAuth client id.
        client_secret: Required for ``client_secret_basic`` and ``client_secret_post``; refused
            for the other methods.
        client_auth: How the client authenticates (see the module docstring).
        assertion_signer: Signs the ``private_key_jwt`` assertion (required for it).
        scope: Space-separated scopes to ask for.
        resource: One or more RFC 8707 resource indicators (each an absolute URI).
        audience: An ``audience`` parameter, for servers that use it instead of ``resource``.
        accept_bearer: Accept ``token_type: Bearer``. Off by default: a DPoP client that gets
            a bearer token has been downgraded.
        assertion_lifetime: Seconds a ``private_key_jwt`` assertion is valid (``exp - iat``).
        issuer: The authorization server's issuer identifier (RFC 8414 §2), from its metadata
            (`dpop_signer.discovery`) or configured; the ``aud`` of client assertions.
        assertion_audience: ``"issuer"`` (default) or ``"token_endpoint"``: what a
            ``private_key_jwt`` assertion's ``aud`` is (see the module docstring).

    Raises:
        ConfigError: a missing or contradictory setting.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        client_auth: ClientAuth = "client_secret_basic",
        assertion_signer: Signer | None = None,
        scope: str | None = None,
        resource: str | Sequence[str] | None = None,
        audience: str | None = None,
        accept_bearer: bool = False,
        assertion_lifetime: float = 60.0,
        issuer: str | None = None,
        assertion_audience: AssertionAudience = "issuer",
    ) -> None:
        if client_auth not in get_args(ClientAuth):
            raise ConfigError(
                f"client_auth {client_auth!r} is not one of " + ", ".join(get_args(ClientAuth))
            )
        try:
            self._htu = normalize_htu(token_url)
        except ProofError as exc:
            raise ConfigError(f"token URL is unusable: {exc}") from exc
        if not isinstance(client_id, str) or not client_id:
            raise ConfigError("client_id is missing; give the OAuth client id (--client-id)")
        needs_secret = client_auth in ("client_secret_basic", "client_secret_post")
        if needs_secret and not client_secret:
            raise ConfigError(
                f"client_auth {client_auth} needs a client secret and none was given; "
                "pass client_secret="
            )
        if not needs_secret and client_secret is not None:
            raise ConfigError(
                f"a client secret was given but client_auth is {client_auth}, which does not "
                "use one; drop the secret or choose client_secret_basic/client_secret_post"
            )
        if client_auth == "private_key_jwt" and assertion_signer is None:
            raise ConfigError("client_auth private_key_jwt needs an assertion_signer")
        if client_auth != "private_key_jwt" and assertion_signer is not None:
            raise ConfigError(
                f"an assertion_signer was given but client_auth is {client_auth}; "
                "use client_auth='private_key_jwt'"
            )
        resources = [resource] if isinstance(resource, str) else list(resource or ())
        for item in resources:
            if not isinstance(item, str) or "://" not in item or "#" in item:
                raise ConfigError(
                    f"resource {item!r} is not an absolute URI without a fragment (RFC 8707 §2)"
                )
        if not (assertion_lifetime > 0 and math.isfinite(assertion_lifetime)):
            raise ConfigError("assertion_lifetime must be a positive number of seconds")
        self._issuer = None if issuer is None else check_issuer(issuer)
        self._assertion_aud = _assertion_aud(assertion_audience, self._issuer, token_url)
        # Issuer wanted but unknown: the token endpoint it is, said once when first used.
        self._aud_fallback = assertion_audience == "issuer" and self._issuer is None
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._client_auth: ClientAuth = client_auth
        self._assertion_signer = assertion_signer
        self._scope = scope or None
        self._resources = tuple(resources)
        self._audience = audience or None
        self._accept_bearer = accept_bearer
        self._assertion_lifetime = assertion_lifetime
        # A password in the token URL's user info is a credential the server may echo too.
        self._redact = Redactor([client_secret, httpx.URL(token_url).password], client_id=client_id)
        if httpx.URL(token_url).scheme == "http" and not is_loopback(token_url):
            logger.warning(
                "token URL %s uses plain http: client credentials travel unencrypted", self._htu
            )

    @property
    def token_url(self) -> str:
        """The token endpoint as configured."""
        return self._token_url

    @property
    def htu(self) -> str:
        """The token endpoint as the ``htu`` of its proofs."""
        return self._htu

    @property
    def client_id(self) -> str:
        """The OAuth client id."""
        return self._client_id

    @property
    def client_auth(self) -> ClientAuth:
        """The client authentication method."""
        return self._client_auth

    @property
    def accept_bearer(self) -> bool:
        """Whether a Bearer token is accepted instead of a DPoP one."""
        return self._accept_bearer

    @property
    def assertion_signer(self) -> Signer | None:
        """The signer of ``private_key_jwt`` assertions (None for other methods)."""
        return self._assertion_signer

    @property
    def issuer(self) -> str | None:
        """The authorization server's issuer identifier, when known."""
        return self._issuer

    @property
    def assertion_aud(self) -> str:
        """The ``aud`` of this client's assertions: the issuer, or the token endpoint URL."""
        return self._assertion_aud

    def assertion_signing_input(self, now: float) -> str:
        """The unsigned RFC 7523 §3 client assertion for a request made at ``now``.

        ``iss`` and ``sub`` are the client id, ``aud`` `assertion_aud` (one string), ``jti``
        128 random bits, ``exp`` ``assertion_lifetime`` seconds after ``iat``. Sign
        ``result.encode("ascii")`` with `assertion_signer` and join with `finish_assertion`.

        Raises:
            ConfigError: client_auth is not ``private_key_jwt``.
        """
        signer = self._assertion_signer
        if signer is None:
            raise ConfigError("client assertions are only made for client_auth private_key_jwt")
        if self._aud_fallback:
            _tell_no_issuer(self._token_url)
        iat = int(now)
        header = {"alg": signer.algorithm, "typ": "JWT"}
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self._assertion_aud,
            "jti": default_jti(),
            "iat": iat,
            "exp": iat + int(self._assertion_lifetime),
        }
        return f"{b64url_json(header)}.{b64url_json(claims)}"

    @staticmethod
    def finish_assertion(signing_input: str, signature: bytes) -> str:
        """Join an assertion's signing input and its ES256 signature."""
        return compact_jws(signing_input, signature, source="assertion signer")

    def client_assertion(self, now: float) -> str:
        """A signed ``private_key_jwt`` assertion (signing synchronously)."""
        signing_input = self.assertion_signing_input(now)
        assert self._assertion_signer is not None  # checked by assertion_signing_input
        return self.finish_assertion(
            signing_input, self._assertion_signer.sign(signing_input.encode("ascii"))
        )

    def build_request(self, *, proof: str, client_assertion: str | None = None) -> httpx.Request:
        """The token request (RFC 6749 §4.4.2) carrying ``proof`` in its ``DPoP`` header.

        Raises:
            ConfigError: ``client_assertion`` is missing for ``private_key_jwt`` (or given for
                another method).
        """
        form: list[tuple[str, str]] = [("grant_type", "client_credentials")]
        if self._scope is not None:
            form.append(("scope", self._scope))
        form.extend(("resource", item) for item in self._resources)
        if self._audience is not None:
            form.append(("audience", self._audience))
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            "DPoP": proof,
        }
        auth = self._client_auth
        if (auth == "private_key_jwt") != (client_assertion is not None):
            raise ConfigError("a client assertion goes with client_auth private_key_jwt only")
        if auth == "client_secret_basic":
            assert self._client_secret is not None  # checked in __init__
            headers["Authorization"] = _basic(self._client_id, self._client_secret)
        else:
            form.append(("client_id", self._client_id))
        if auth == "client_secret_post":
            assert self._client_secret is not None
            form.append(("client_secret", self._client_secret))
        elif client_assertion is not None:
            form.append(("client_assertion_type", CLIENT_ASSERTION_TYPE))
            form.append(("client_assertion", client_assertion))
        return httpx.Request(
            "POST", self._token_url, headers=headers, content=urlencode(form).encode("ascii")
        )

    def parse(self, response: httpx.Response, *, now: float) -> AccessToken:
        """Read a token endpoint response whose body has been read.

        Args:
            response: The response, body read.
            now: The client's clock when it arrived; ``expires_at = now + expires_in``.

        Raises:
            TokenEndpointError: an RFC 6749 §5.2 error (``.error``, ``.error_description``,
                ``.status``); ``use_dpop_nonce`` is one too.
            InvalidTokenResponseError: not a usable §5.1 response (not JSON, HTML, missing or
                malformed fields, a ``token_type`` that is not DPoP).
            ServerFailedError: a 5xx without an OAuth error body: the server failed.
        """
        status = response.status_code
        where = f"token endpoint {self._htu}"
        ctype = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        shown_type = ctype or "no content type"
        body = _json_object(response)
        if body is not None and status >= 400 and isinstance(body.get("error"), str):
            raise self._error(body, status, where)
        if status >= 500:
            raise ServerFailedError(
                f"{where} failed with HTTP {status} ({shown_type}); the authorization server "
                "is broken or overloaded, try again later or check its logs"
            )
        if status != 200:
            location = response.headers.get("location")
            redirect = (
                f" redirecting to {self._redact(redact_url(location), limit=200)}"
                if location and status < 400
                else ""
            )
            raise InvalidTokenResponseError(
                f"{where} answered HTTP {status} ({shown_type}){redirect}, not a token "
                "response (RFC 6749 §5.1); check that the token URL points at the token endpoint"
            )
        if body is None:
            raise InvalidTokenResponseError(
                f"{where} answered HTTP 200 with {shown_type} that is not a JSON object, not a "
                "token response (RFC 6749 §5.1); check that the token URL points at the token "
                "endpoint"
            )
        return self._token(body, where, now)

    def _error(self, body: Mapping[str, Any], status: int, where: str) -> TokenEndpointError:
        # Server text: it may echo the request (Basic credentials, the form, the proof).
        error = self._redact(str(body["error"]), limit=64)
        raw_description = body.get("error_description")
        description = None
        if isinstance(raw_description, str):
            description = self._redact(raw_description) or None
        detail = f": {description}" if description else ""
        hint = _HINTS.get(error)
        return TokenEndpointError(
            f"{where} refused the token request with HTTP {status} {error}{detail}"
            + (f" ({hint})" if hint else ""),
            error=error,
            error_description=description,
            status=status,
        )

    def _token(self, body: dict[str, Any], where: str, now: float) -> AccessToken:
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise InvalidTokenResponseError(f"{where} sent no access_token (RFC 6749 §5.1)")
        if not is_token68(value):
            raise InvalidTokenResponseError(
                f"{where} sent an access_token that is not token68 (RFC 9110 §11.2), so it "
                "cannot go into an Authorization header"
            )
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or not token_type:
            raise InvalidTokenResponseError(f"{where} sent no token_type (RFC 6749 §5.1)")
        kind = token_type.lower()
        if kind == "bearer" and not self._accept_bearer:
            raise InvalidTokenResponseError(
                f"{where} issued a Bearer token although a DPoP proof was sent (RFC 9449 §5): "
                "the server does not bind tokens to the key. Enable DPoP for this client at "
                "the server, or pass accept_bearer=True to accept unbound tokens"
            )
        if kind not in ("dpop", "bearer"):
            raise InvalidTokenResponseError(
                f"{where} issued a token of type {self._redact(token_type, limit=40)!r}; only "
                "DPoP (or Bearer with accept_bearer=True) can be used"
            )
        expires_in = body.get("expires_in")
        if isinstance(expires_in, str) and expires_in.strip().isdigit():
            expires_in = int(expires_in)  # seen in the wild, although RFC 6749 says a number
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not math.isfinite(expires_in)
            or expires_in < 0
        ):
            raise InvalidTokenResponseError(
                f"{where} sent expires_in that is not a non-negative number (RFC 6749 §5.1)"
            )
        scope = body.get("scope")
        return AccessToken(
            value=value,
            token_type=token_type,
            expires_at=None if expires_in is None else now + float(expires_in),
            scope=scope if isinstance(scope, str) else None,
            raw=body,
        )

    def __repr__(self) -> str:
        return (
            f"ClientCredentialsTokenSource({self._htu!r}, client_id={self._client_id!r}, "
            f"client_auth={self._client_auth!r})"
        )


_told_no_issuer: set[str] = set()


def _assertion_aud(mode: AssertionAudience, issuer: str | None, token_url: str) -> str:
    """The ``aud`` of client assertions for ``mode`` (draft-ietf-oauth-rfc7523bis)."""
    if mode not in get_args(AssertionAudience):
        raise ConfigError(
            f"assertion_audience {mode!r} is not one of " + ", ".join(get_args(AssertionAudience))
        )
    if mode == "token_endpoint" or issuer is None:
        # As configured: the URL the request goes to, which servers compare with their own.
        return token_url
    # One string, never an array (draft-ietf-oauth-rfc7523bis).
    return issuer


def _tell_no_issuer(token_url: str) -> None:
    """Log, once per token endpoint, that assertions fall back to its URL as ``aud``."""
    if token_url in _told_no_issuer:
        return
    _told_no_issuer.add(token_url)
    logger.info(
        "private_key_jwt assertions name the token endpoint %s as aud because no issuer is "
        "known; servers that follow draft-ietf-oauth-rfc7523bis refuse that: give the issuer "
        "(issuer=, --issuer)",
        normalize_htu(token_url),
    )


def _basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: form-urlencode both before joining them with ":" (plain Basic would
    # break a secret containing ":" and disagree with servers on non-ASCII).
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("ascii")).decode("ascii")


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


# --- the token cache ---------------------------------------------------------------------

_BACKOFF_FIRST = 1.0
"""Seconds before the token endpoint is asked again after one failed fetch (before jitter)."""
_BACKOFF_CAP = 60.0
"""The backoff doubles with each failed fetch in a row up to this many seconds."""
_RETRY_AFTER_CAP = 300.0
"""A server's ``Retry-After`` is honoured up to this many seconds (a longer one is a typo or
hostile; five minutes without a token is already an outage)."""
_EXPIRY_MARGIN = 1.0
"""A token is not sent in its last second (at most a quarter of its lifetime): it would expire
on the way or in the server's queue."""

_random = random.SystemRandom()


@dataclass(frozen=True)
class CachedToken:
    """A token with the key it is bound to and its schedule (client clock throughout)."""

    token: AccessToken
    proofs: DPoPProofBuilder
    """The builder of the key the token was fetched with: its proofs, and only its, go with it
    (the server bound the token to that key's thumbprint, ``cnf.jkt``, RFC 9449 §6.1)."""
    renew_at: float | None  # None: no expiry known, renewed only on 401
    expire_at: float | None  # from then on the token is not sent any more
    authorization: str  # the Authorization header value, built once per token


@dataclass(frozen=True)
class FetchFailure:
    """The outcome of the last token fetch when it failed: shared by everyone who waited."""

    error: OAuthError
    count: int  # failed fetches in a row
    retry_at: float  # client clock: no token request before this


class TokenCache:
    """The current token, when it is due, and the backoff after failed fetches.

    Written only by the one flow that holds the fetch lock (`dpop_signer.flow`); read by every
    request without a lock: each attribute is replaced whole, never mutated.

    Args:
        clock: Seconds since the epoch.
        leeway: Renew this many seconds before expiry (at most half the token's lifetime).
    """

    def __init__(self, clock: Callable[[], float], leeway: float) -> None:
        self._clock = clock
        self._leeway = leeway
        self.entry: CachedToken | None = None
        self.failure: FetchFailure | None = None
        self.fetches = 0  # finished fetches, failed or not: tells a waiter its fetch is done

    def store(self, token: AccessToken, proofs: DPoPProofBuilder, now: float) -> CachedToken:
        """Cache ``token``, fetched with ``proofs``'s key at ``now``; clears the failure."""
        renew_at = expire_at = None
        if token.expires_at is not None:
            lifetime = token.expires_at - now
            expire_at = token.expires_at - min(_EXPIRY_MARGIN, lifetime / 4)
            renew_at = min(expire_at, token.expires_at - min(self._leeway, lifetime / 2))
        entry = CachedToken(token, proofs, renew_at, expire_at, f"{token.scheme} {token.value}")
        self.entry = entry
        self.failure = None
        self.fetches += 1
        return entry

    def fresh(self, proofs: DPoPProofBuilder, rejected: CachedToken | None) -> CachedToken | None:
        """The token of ``proofs``'s key if it is not due for renewal (and not ``rejected``)."""
        entry = self.entry
        if entry is None or entry is rejected or entry.proofs is not proofs:
            return None
        if entry.renew_at is not None and self._clock() >= entry.renew_at:
            return None
        return entry

    def usable(self, proofs: DPoPProofBuilder, rejected: CachedToken | None) -> CachedToken | None:
        """The token of ``proofs``'s key if it can still be sent, due for renewal or not."""
        entry = self.entry
        if entry is None or entry is rejected or entry.proofs is not proofs:
            return None
        if entry.expire_at is not None and self._clock() >= entry.expire_at:
            return None
        return entry

    def backing_off(self) -> bool:
        """True while no token request may be sent after a failure."""
        failure = self.failure
        return failure is not None and self._clock() < failure.retry_at

    def raise_while_backing_off(self) -> None:
        """Raise the last failure again (a new instance, `shared`) while backing off."""
        failure = self.failure
        if failure is not None and self._clock() < failure.retry_at:
            raise self.shared(failure)

    def shared(self, failure: FetchFailure) -> OAuthError:
        """A new error like ``failure.error`` for one more caller (one instance per raise)."""
        wait = max(0.0, failure.retry_at - self._clock())
        original = failure.error
        message = (
            f"{original.message} (the token request this waited for failed)"
            if wait <= 0
            else f"{original.message} (the last token request failed; {failure.count} in a "
            f"row; the next is sent in {wait:.1f} s at the earliest)"
        )
        error: OAuthError
        if isinstance(original, TokenEndpointError):
            error = TokenEndpointError(
                message,
                error=original.error,
                error_description=original.error_description,
                status=original.status,
            )
        else:
            error = type(original)(message)
        error.retry_after = wait if original.retry_after is not None else None
        error.__cause__ = original
        return error

    def failed(self, error: OAuthError, where: str, *, count: int | None = None) -> FetchFailure:
        """Record a failed fetch: shared with the waiters, backed off if the server is down.

        ``count`` is the number of failed fetches in a row, this one included (the backoff
        exponent); by default one more than the last recorded here. A shared token store
        passes its own count, so that every process backs off as one would.
        """
        previous = self.failure
        if count is None:
            count = 1 if previous is None else previous.count + 1
        hint = error.retry_after  # the server's Retry-After (see retry_after_seconds)
        delay = 0.0
        if hint is not None or _unavailable(error):
            # Exponential backoff with "equal jitter": half the ceiling plus up to half at
            # random, so that clients that failed together do not come back together.
            ceiling = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2.0 ** min(count - 1, 16))
            delay = ceiling / 2 + _random.uniform(0.0, ceiling / 2)
            if hint is not None:
                delay = max(delay, min(hint, _RETRY_AFTER_CAP))
            error.retry_after = delay
        # A refusal (bad credentials, a nonce or clock problem) is shared with the requests
        # that waited for this fetch but not backed off: the next attempt carries what this
        # one taught (nonce, clock offset), and asking again is how such errors clear.
        failure = self.failure = FetchFailure(error, count, self._clock() + delay)
        self.fetches += 1
        logger.warning(
            "token request to %s failed (%d in a row); the next one in %.1f s at the earliest",
            where, count, delay,
        )  # fmt: skip
        return failure

    def adopt(self, token: AccessToken, proofs: DPoPProofBuilder, now: float) -> CachedToken | None:
        """Cache a token another process fetched (from a shared store), if it can be sent.

        None, and nothing cached, when it is within its last `_EXPIRY_MARGIN` second.
        Its schedule is computed from the lifetime left, as if it had been fetched now.
        """
        if token.expires_at is not None and token.expires_at - now <= _EXPIRY_MARGIN:
            return None
        return self.store(token, proofs, now)

    def adopt_failure(self, error: OAuthError, count: int, retry_at: float) -> FetchFailure:
        """Record a failed fetch another process made (from a shared store), with its backoff.

        The requests of this process that waited for the fetch get it as if it were theirs.
        """
        failure = self.failure = FetchFailure(error, count, retry_at)
        self.fetches += 1
        return failure

    def clear(self) -> None:
        """Forget the token (the failure and its backoff stay: they are the server's)."""
        self.entry = None


def _unavailable(error: OAuthError) -> bool:
    """True if ``error`` says the token endpoint is down or overloaded: worth backing off."""
    if isinstance(error, ServerUnreachableError | ServerFailedError):  # down, or a bare 5xx
        return True
    return isinstance(error, TokenEndpointError) and (error.status == 429 or error.status >= 500)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (RFC 9110 §10.2.3), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():  # delay-seconds = 1*DIGIT
        return float(min(int(value[:9]), 10**8))
    try:
        seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, seconds)
