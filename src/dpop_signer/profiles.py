"""Client profiles: rule sets a configuration is held to before any request (``--profile``).

One profile exists, ``fapi2``: the client side of the FAPI 2.0 Security Profile (OpenID
Foundation, final 2025) as it applies to a client_credentials client with DPoP:

``sender-constrained tokens``
    Access tokens are sender-constrained; with DPoP (RFC 9449) that means a Bearer token is
    never accepted (``accept_bearer`` off).
``client authentication``
    ``private_key_jwt`` (RFC 7523); client secrets are not allowed.
``assertion audience``
    The assertion's ``aud`` is the issuer identifier, one string (FAPI 2.0, as
    draft-ietf-oauth-rfc7523bis): ``assertion_audience = "issuer"`` with ``issuer`` set.
``algorithms``
    The DPoP key and the assertion key sign with PS256, ES256 or EdDSA only (FAPI 2.0,
    cryptography and secrets); RS256 and the other ECDSA curves are refused.
``https endpoints``
    The issuer and the token endpoint are ``https`` URLs (FAPI 2.0, network layer: TLS
    everywhere). Decision: no exception for loopback ``http``; a FAPI test needs a TLS server
    (``--cacert`` trusts its private CA), so that what passes the profile in a test passes it
    in production too.
``metadata agrees``
    The issuer's metadata (RFC 8414, `dpop_signer.discovery`) was read and fits: it lists the
    DPoP key's algorithm in ``dpop_signing_alg_values_supported`` (it must publish that list),
    offers ``private_key_jwt`` and the assertion key's algorithm, and, when ``token_url`` is
    also given, names that same ``token_endpoint``.

`check_profile` evaluates every rule (`RuleResult`: ok, fail or skip, for ``dpop doctor``);
`profile_violations` returns the failures, whose text names the setting that would fix them
(option, variable and config key, as `dpop_signer.config_names.ways_to_set` says it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dpop_signer.config_names import PROFILES, ways_to_set

if TYPE_CHECKING:
    from dpop_signer.config import Settings
    from dpop_signer.discovery import ServerMetadata
    from dpop_signer.signers.base import Signer

__all__ = [
    "FAPI2_ALGORITHMS",
    "PROFILES",
    "RuleResult",
    "check_profile",
    "profile_violations",
]

FAPI2_ALGORITHMS: tuple[str, ...] = ("PS256", "ES256", "EdDSA")
"""The JWS algorithms FAPI 2.0 allows for signing (its cryptography requirements)."""

Status = Literal["ok", "fail", "skip"]


@dataclass(frozen=True)
class RuleResult:
    """One rule of a profile, evaluated: ``detail`` says what was found, ``fix`` how to fix it."""

    profile: str
    rule: str
    status: Status
    detail: str
    fix: str | None = None

    def __str__(self) -> str:
        text = f"profile {self.profile} ({self.rule}): {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def check_profile(
    settings: Settings,
    *,
    signer: Signer | None,
    assertion_signer: Signer | None = None,
    metadata: ServerMetadata | None = None,
    client: bool = True,
) -> list[RuleResult]:
    """Every rule of ``settings.profile`` for these settings, keys and metadata.

    Args:
        settings: The settings (``token_url`` already filled in by discovery, if it was).
        signer: The DPoP key (None: not opened; its rule is skipped).
        assertion_signer: The ``private_key_jwt`` key when it is another one.
        metadata: The issuer's metadata, when read.
        client: False for commands that only sign (``dpop jwk``, ``dpop proof``): only the
            key's rules apply.

    Returns an empty list without a profile.
    """
    if settings.profile is None:
        return []
    if settings.profile not in PROFILES:  # pragma: no cover - Settings validates it
        raise ValueError(f"unknown profile {settings.profile!r}")
    rules: list[Callable[[_Context], RuleResult]] = [_algorithms]
    if client:
        rules = [
            _sender_constrained,
            _client_authentication,
            _assertion_audience,
            _algorithms,
            _https,
            _metadata_agrees,
        ]
    context = _Context(settings, signer, assertion_signer, metadata)
    return [rule(context) for rule in rules]


def profile_violations(
    settings: Settings,
    *,
    signer: Signer | None,
    assertion_signer: Signer | None = None,
    metadata: ServerMetadata | None = None,
    client: bool = True,
) -> list[RuleResult]:
    """The rules of ``settings.profile`` that fail (see `check_profile`)."""
    results = check_profile(
        settings,
        signer=signer,
        assertion_signer=assertion_signer,
        metadata=metadata,
        client=client,
    )
    return [result for result in results if result.status == "fail"]


@dataclass(frozen=True)
class _Context:
    settings: Settings
    signer: Signer | None
    assertion_signer: Signer | None
    metadata: ServerMetadata | None

    def result(self, rule: str, status: Status, detail: str, fix: str | None = None) -> RuleResult:
        profile = self.settings.profile or ""
        return RuleResult(profile, rule, status, detail, fix)


def _sender_constrained(ctx: _Context) -> RuleResult:
    rule = "sender-constrained tokens"
    if ctx.settings.accept_bearer:
        return ctx.result(
            rule,
            "fail",
            f"accept_bearer is on (from {ctx.settings.source_of('accept_bearer')}), so an "
            "unbound Bearer token would be used",
            f"turn accept_bearer off: {ways_to_set('accept_bearer')} with false (--refuse-bearer)",
        )
    return ctx.result(rule, "ok", "only DPoP-bound tokens are accepted")


def _client_authentication(ctx: _Context) -> RuleResult:
    rule = "client authentication"
    method = ctx.settings.effective_client_auth
    if method != "private_key_jwt":
        return ctx.result(
            rule,
            "fail",
            f"client_auth is {method} (from {ctx.settings.source_of('client_auth')}), not "
            "private_key_jwt",
            f"use private_key_jwt: {ways_to_set('client_auth')}, and drop the client secret",
        )
    return ctx.result(rule, "ok", "private_key_jwt")


def _assertion_audience(ctx: _Context) -> RuleResult:
    rule = "assertion audience"
    settings = ctx.settings
    if settings.assertion_audience != "issuer":
        return ctx.result(
            rule,
            "fail",
            f"assertion_audience is {settings.assertion_audience} (from "
            f"{settings.source_of('assertion_audience')}); the aud must be the issuer",
            f"set it to issuer: {ways_to_set('assertion_audience')}",
        )
    if settings.issuer is None:
        return ctx.result(
            rule,
            "fail",
            "no issuer is configured, so assertions could only name the token endpoint",
            f"give the issuer: {ways_to_set('issuer')}",
        )
    return ctx.result(rule, "ok", f"aud is the issuer {settings.issuer}")


def _algorithms(ctx: _Context) -> RuleResult:
    rule = "algorithms"
    allowed = ", ".join(FAPI2_ALGORITHMS)
    if ctx.signer is None:
        return ctx.result(rule, "skip", "the key is not open")
    keys = [("the DPoP key", "key", ctx.signer)]
    if ctx.assertion_signer is not None and ctx.assertion_signer is not ctx.signer:
        keys.append(("the assertion key", "assertion_key", ctx.assertion_signer))
    for what, field, signer in keys:
        if signer.algorithm not in FAPI2_ALGORITHMS:
            return ctx.result(
                rule,
                "fail",
                f"{what} signs {signer.algorithm}, which FAPI 2.0 does not allow ({allowed})",
                f"use a {allowed} key: {ways_to_set(field)}",
            )
    shown = ", ".join(sorted({signer.algorithm for _, _, signer in keys}))
    return ctx.result(rule, "ok", f"{shown} (allowed: {allowed})")


def _https(ctx: _Context) -> RuleResult:
    from dpop_signer.redaction import redact_url

    rule = "https endpoints"
    settings = ctx.settings
    for field in ("issuer", "token_url"):
        value = getattr(settings, field)
        if value is not None and not value.lower().startswith("https://"):
            return ctx.result(
                rule,
                "fail",
                f"{field} {redact_url(value)} (from {settings.source_of(field)}) is not https; "
                "FAPI 2.0 requires TLS on every endpoint, loopback included",
                f"give an https URL: {ways_to_set(field)}",
            )
    if settings.token_url is None:
        return ctx.result(rule, "skip", "no token endpoint is known yet")
    return ctx.result(rule, "ok", "the issuer and the token endpoint use https")


def _metadata_agrees(ctx: _Context) -> RuleResult:
    from dpop_signer.discovery import metadata_problems
    from dpop_signer.redaction import redact_url

    rule = "metadata agrees"
    settings, metadata = ctx.settings, ctx.metadata
    if metadata is None:
        if settings.issuer is None:
            return ctx.result(
                rule,
                "fail",
                "no issuer is configured, so the server's metadata was not checked",
                f"give the issuer: {ways_to_set('issuer')}",
            )
        return ctx.result(rule, "skip", "the issuer's metadata could not be read")
    if metadata.dpop_signing_alg_values_supported is None:
        return ctx.result(
            rule,
            "fail",
            f"the metadata at {metadata.url} has no dpop_signing_alg_values_supported, so the "
            "server does not say it supports DPoP (RFC 9449 §5.1)",
            "enable DPoP at the authorization server, or correct the issuer: "
            + ways_to_set("issuer"),
        )
    if settings.token_url is not None and settings.token_url != metadata.token_endpoint:
        return ctx.result(
            rule,
            "fail",
            f"token_url {redact_url(settings.token_url)} (from "
            f"{settings.source_of('token_url')}) is not the issuer's token_endpoint "
            f"{redact_url(metadata.token_endpoint)}",
            "drop token_url so the discovered one is used, or correct it",
        )
    signer = ctx.signer
    assertion = ctx.assertion_signer or signer
    problems = metadata_problems(
        metadata,
        dpop_algorithm=signer.algorithm if signer is not None else None,
        client_auth=settings.effective_client_auth,
        assertion_algorithm=assertion.algorithm if assertion is not None else None,
    )
    if problems:
        return ctx.result(rule, "fail", "; ".join(text for _, text in problems))
    return ctx.result(rule, "ok", f"the metadata at {metadata.url} fits this client")
