"""``dpop doctor``: walk a configuration step by step and say what is wrong and how to fix it.

Each step prints one line, ``✓ step: what was found`` or ``✗ step: what is wrong; fix: ...``;
a step that depends on a failed one is shown as skipped rather than failing for the same
reason twice. The key steps stop at the first failure, and a wrong PIN in particular is tried
exactly once: real tokens lock after a few wrong PINs.

The key itself is opened by the normal backend (`dpop_signer.signers.load_signer`), so doctor
checks what ``dpop request`` will really do; only the steps before login (module, token,
mechanisms) look at the PKCS#11 module directly, because the backend does them all at once.

URLs are printed without user info or query, and every line goes through
`dpop_signer.redaction.scrub`, so that a PIN in a key URI or a token never reaches the output.

``dpop doctor --json`` prints the same steps as one JSON document (`Doctor.report`) instead:
``{"ok": false, "steps": [{"step": "login", "status": "fail", "detail": "..."}, ...]}`` with
``status`` one of ``ok``, ``fail``, ``skip``.

`softhsm2_problem` names what is wrong with SoftHSM2's own configuration (``SOFTHSM2_CONF``
unset, pointing at a missing file, or at a token directory that is gone), which is the real
cause of most "no token" and "module failed to initialize" errors with SoftHSM2.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dpop_signer.errors import (
    DPoPSignerError,
    KeyNotFoundError,
    OAuthError,
    PinError,
    ServerUnreachableError,
    SignerUnavailableError,
    UnsupportedKeyError,
)
from dpop_signer.redaction import redact_url, sanitize_server_text, scrub
from dpop_signer.signers.base import close_signer

if TYPE_CHECKING:
    import httpx

    from dpop_signer.config import Settings
    from dpop_signer.discovery import ServerMetadata
    from dpop_signer.signers.base import Signer

__all__ = ["Doctor", "run_doctor", "softhsm2_problem"]

OK = "✓"
FAIL = "✗"
SKIP = "-"


@dataclass
class Doctor:
    """Collects step results and prints them as they come."""

    out: IO[str] | None
    failures: int = 0
    results: list[tuple[str, str, str]] = field(default_factory=list)

    def ok(self, step: str, detail: str) -> None:
        """Record a passed step."""
        self._emit(OK, step, detail)

    def fail(self, step: str, detail: str, fix: str | None = None) -> None:
        """Record a failed step, with the fix when the detail does not already say it."""
        self.failures += 1
        self._emit(FAIL, step, f"{detail}; fix: {fix}" if fix else detail)

    def skip(self, step: str, why: str) -> None:
        """Record a step that could not run."""
        self._emit(SKIP, step, f"skipped ({why})")

    def _emit(self, mark: str, step: str, detail: str) -> None:
        shown = " ".join(scrub(detail).split())
        self.results.append((mark, step, shown))
        if self.out is not None:
            print(f"{mark} {step}: {shown}", file=self.out, flush=True)

    def report(self) -> dict[str, Any]:
        """The steps as a JSON-ready document (``dpop doctor --json``)."""
        status = {OK: "ok", FAIL: "fail", SKIP: "skip"}
        return {
            "ok": self.failures == 0,
            "steps": [
                {"step": step, "status": status[mark], "detail": detail}
                for mark, step, detail in self.results
            ],
        }


def run_doctor(settings: Settings, *, out: IO[str], as_json: bool = False) -> bool:
    """Run every step for ``settings`` and return True when all passed.

    Prints one line per step to ``out`` as it runs, or with ``as_json`` one JSON document
    (`Doctor.report`) at the end.
    """
    doc = Doctor(None if as_json else out)
    signer = _key_steps(doc, settings)
    try:
        _server_steps(doc, settings, signer)
    finally:
        if signer is not None:
            close_signer(signer)
    if as_json:
        print(json.dumps(doc.report(), indent=2, ensure_ascii=False), file=out, flush=True)
    return doc.failures == 0


def softhsm2_problem(environ: dict[str, str] | None = None) -> str | None:
    """What is wrong with SoftHSM2's configuration, with the fix; None when nothing is seen.

    SoftHSM2 reads ``SOFTHSM2_CONF`` (default ``/etc/softhsm/softhsm2.conf``) and keeps its
    tokens in the ``directories.tokendir`` it names.
    """
    env = os.environ if environ is None else environ
    conf = env.get("SOFTHSM2_CONF", "")
    setup = "make softhsm writes .softhsm/softhsm2.conf and .softhsm/dev.env to load"
    if not conf:
        return (
            "SOFTHSM2_CONF is not set, so SoftHSM2 reads /etc/softhsm/softhsm2.conf and the "
            "tokens it names; set SOFTHSM2_CONF to the softhsm2.conf of your tokens "
            f"({setup})"
        )
    if not os.path.isfile(conf):
        return (
            f"SOFTHSM2_CONF={conf} does not exist, so SoftHSM2 cannot start; point "
            f"SOFTHSM2_CONF at an existing softhsm2.conf ({setup})"
        )
    tokendir = _softhsm2_tokendir(conf)
    if tokendir is not None and not os.path.isdir(tokendir):
        return (
            f"the token directory {tokendir} named in SOFTHSM2_CONF={conf} does not exist; "
            "create the tokens again (make softhsm) or point SOFTHSM2_CONF at the right file"
        )
    return None


def _softhsm2_tokendir(conf: str) -> str | None:
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return None
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip() == "directories.tokendir":
            return value.strip() or None
    return None


# --- the key -------------------------------------------------------------------------------


def _key_steps(doc: Doctor, settings: Settings) -> Signer | None:
    from dpop_signer.signers import is_pkcs11_ref

    if settings.key is None:
        doc.fail(
            "key configured",
            "no key",
            "give --key, set DPOP_KEY or put key in --config (a PEM path or a pkcs11: URI)",
        )
        return None
    if is_pkcs11_ref(settings.key):
        signer = _pkcs11_steps(doc, settings)
    else:
        signer = _pem_steps(doc, settings)
    if signer is not None:
        _sign_and_verify(doc, signer, settings)
    return signer


def _open(settings: Settings) -> Signer:
    from dpop_signer.config import build_signer

    return build_signer(settings)


def _pem_steps(doc: Doctor, settings: Settings) -> Signer | None:
    steps = ["key file readable", "passphrase", "EC P-256"]
    try:
        signer = _open(settings)
    except SignerUnavailableError as exc:
        return _fail_chain(doc, steps, 0, str(exc))
    except PinError as exc:
        doc.ok(steps[0], str(settings.key))
        return _fail_chain(doc, steps, 1, str(exc))
    except UnsupportedKeyError as exc:
        doc.ok(steps[0], str(settings.key))
        return _fail_chain(doc, steps, 2, str(exc))
    except DPoPSignerError as exc:
        return _fail_chain(doc, steps, 0, str(exc))
    doc.ok(steps[0], str(settings.key))
    doc.ok(steps[1], "given" if settings.pin is not None else "not needed (key not encrypted)")
    doc.ok(steps[2], "private key on secp256r1")
    return signer


def _fail_chain(doc: Doctor, steps: list[str], index: int, message: str) -> Signer | None:
    doc.fail(steps[index], message)
    for step in steps[index + 1 :]:
        doc.skip(step, f"needs '{steps[index]}'")
    return None


def _pkcs11_steps(doc: Doctor, settings: Settings) -> Signer | None:
    from dpop_signer.signers.pkcs11_uri import parse_pkcs11_uri, resolve_module

    steps = [
        "module loads",
        "token present",
        "login",
        "key found",
        "EC P-256",
        "CKM_ECDSA offered",
    ]
    assert settings.key is not None
    try:
        uri = parse_pkcs11_uri(settings.key)
        module_path = resolve_module(uri)
    except DPoPSignerError as exc:
        return _fail_chain(doc, steps, 0, str(exc))

    from dpop_signer.signers.pkcs11 import pkcs11_module

    try:
        module = pkcs11_module(module_path)
    except DPoPSignerError as exc:
        return _fail_chain(doc, steps, 0, str(exc))
    doc.ok(steps[0], module_path)

    try:
        # Through the backend's module object: every call into one module must hold its lock
        # (docs/architecture.md, "Concurrency"), and a second C_Initialize would fail.
        token = module.call(module.find_token, uri)
    except DPoPSignerError as exc:
        problem = softhsm2_problem() if "softhsm" in module_path.lower() else None
        fix = problem or "correct token= / serial= or initialise the token"
        return _fail_chain(doc, steps, 1, f"{exc}; fix: {fix}")

    def mechanisms_of() -> set[Any]:
        return set(token.slot.get_mechanisms())

    mechanisms: set[Any] | None
    try:
        mechanisms = module.call(mechanisms_of)
    except Exception:  # python-pkcs11 errors carry no message; the step says "not listed"
        mechanisms = None
    doc.ok(steps[1], f"{token.label!r} ({token.manufacturer_id} {token.model})")

    from pkcs11 import Mechanism

    if mechanisms is not None and Mechanism.ECDSA not in mechanisms:
        # Fail here, before login: without CKM_ECDSA the key cannot sign for ES256 anyway.
        for step in steps[2:5]:
            doc.skip(step, "the token cannot sign ES256")
        doc.fail(
            steps[5],
            "the token does not offer CKM_ECDSA",
            "use a token or HSM firmware that supports raw ECDSA on P-256",
        )
        return None

    try:
        signer = _open(settings)
    except PinError as exc:
        # Never retried: the message says which PIN source was used and how to fix it.
        doc.fail(steps[2], str(exc))
        for step in steps[3:5]:
            doc.skip(step, "needs 'login'")
        _mechanism_line(doc, steps[5], mechanisms)
        return None
    except KeyNotFoundError as exc:
        doc.ok(steps[2], _pin_detail(settings))
        doc.fail(steps[3], str(exc))
        doc.skip(steps[4], "needs 'key found'")
        _mechanism_line(doc, steps[5], mechanisms)
        return None
    except UnsupportedKeyError as exc:
        doc.ok(steps[2], _pin_detail(settings))
        doc.ok(steps[3], uri.key_description)
        doc.fail(steps[4], str(exc))
        _mechanism_line(doc, steps[5], mechanisms)
        return None
    except DPoPSignerError as exc:
        doc.fail(steps[2], str(exc))
        for step in steps[3:5]:
            doc.skip(step, "needs 'login'")
        _mechanism_line(doc, steps[5], mechanisms)
        return None
    doc.ok(steps[2], _pin_detail(settings))
    doc.ok(steps[3], uri.key_description)
    doc.ok(steps[4], "private key on secp256r1")
    _mechanism_line(doc, steps[5], mechanisms)
    return signer


def _mechanism_line(doc: Doctor, step: str, mechanisms: set[Any] | None) -> None:
    if mechanisms is None:
        doc.skip(step, "the module did not list its mechanisms")
    else:
        doc.ok(step, "the token signs with raw ECDSA (SHA-256 is computed on the host)")


def _pin_detail(settings: Settings) -> str:
    if settings.pin is None:
        return "PIN from the URI or not needed"
    return f"PIN accepted (from {settings.source_of('pin')})"


def _sign_and_verify(doc: Doctor, signer: Signer, settings: Settings) -> None:
    from dpop_signer.jwk import jwk_thumbprint
    from dpop_signer.proof import DPoPProofBuilder
    from dpop_signer.verify import verify_proof

    htu = settings.token_url or "https://doctor.invalid/token"
    try:
        builder = DPoPProofBuilder(signer)
        proof = builder.build("POST", htu)
        verify_proof(proof, htm="POST", htu=htu, jkt=jwk_thumbprint(signer.public_jwk))
    except DPoPSignerError as exc:
        doc.fail("sign and verify", str(exc))
        return
    doc.ok("sign and verify", f"a DPoP proof verifies with the key (jkt {builder.jkt})")


# --- the authorization server ----------------------------------------------------------------


def _server_steps(doc: Doctor, settings: Settings, signer: Signer | None) -> None:
    import httpx

    algorithm = signer.algorithm if signer is not None else "ES256"
    steps = ["token endpoint reachable", f"discovery advertises {algorithm}", "DPoP token issued"]
    from dpop_signer.tls import ssl_context
    from dpop_signer.tokens import USER_AGENT

    with httpx.Client(
        timeout=settings.timeout,
        follow_redirects=False,
        verify=ssl_context(settings.ca_bundle),
        headers={"User-Agent": USER_AGENT},
    ) as client:
        metadata = None
        if settings.issuer is not None:
            settings, metadata = _issuer_step(doc, client, settings)
        if settings.token_url is None:
            for step in steps:
                doc.skip(
                    step,
                    "no token endpoint: give --issuer or --token-url, or set DPOP_ISSUER or "
                    "DPOP_TOKEN_URL",
                )
            _profile_steps(doc, settings, signer, metadata)
            return
        if not _reachable(doc, client, settings.token_url):
            for step in steps[1:]:
                doc.skip(step, "needs 'token endpoint reachable'")
            _profile_steps(doc, settings, signer, metadata)
            return
        fits = True
        if metadata is not None:
            fits = _fit_steps(doc, settings, metadata, algorithm)
        else:
            _discovery(doc, client, settings.token_url, algorithm)
        _assertion_audience_step(doc, settings)
        fits = _profile_steps(doc, settings, signer, metadata) and fits
        if signer is None:
            doc.skip(steps[2], "needs a working key")
            return
        if settings.client_id is None:
            doc.skip(steps[2], "no client_id: give --client-id or set DPOP_CLIENT_ID")
            return
        if not fits:
            # build_auth would refuse the same settings before any request.
            doc.skip(steps[2], "needs the settings above to fit the server and the profile")
            return
        _token(doc, client, settings, signer)


def _issuer_step(
    doc: Doctor, client: httpx.Client, settings: Settings
) -> tuple[Settings, ServerMetadata | None]:
    """Read the issuer's metadata; the token endpoint from it unless --token-url is given."""
    from dpop_signer.discovery import fetch_metadata

    step = "issuer metadata"
    assert settings.issuer is not None
    try:
        metadata = fetch_metadata(settings.issuer, client)
    except DPoPSignerError as exc:
        doc.fail(step, str(exc))
        return settings, None
    endpoint = redact_url(metadata.token_endpoint)
    if settings.token_url is None:
        settings = settings.with_values(
            f"discovery ({metadata.url})", token_url=metadata.token_endpoint
        )
        used = f"token_endpoint {endpoint} is used"
    elif settings.token_url == metadata.token_endpoint:
        used = f"token_endpoint {endpoint} equals --token-url"
    else:
        used = (
            f"token_endpoint {endpoint}, but the token URL "
            f"{redact_url(settings.token_url)} (from {settings.source_of('token_url')}) wins"
        )
    doc.ok(step, f"{redact_url(metadata.url)} names issuer {metadata.issuer}; {used}")
    return settings, metadata


def _fit_steps(doc: Doctor, settings: Settings, metadata: ServerMetadata, algorithm: str) -> bool:
    """What the metadata offers against the key and the client authentication; True if it fits."""
    from dpop_signer.discovery import metadata_problems

    problems = dict(
        metadata_problems(
            metadata, dpop_algorithm=algorithm, client_auth=settings.effective_client_auth
        )
    )
    step = f"discovery advertises {algorithm}"
    fits = True
    if "key" in problems:
        doc.fail(step, problems["key"])
        fits = False
    elif metadata.dpop_signing_alg_values_supported is None:
        doc.fail(
            step,
            f"{redact_url(metadata.url)} has no dpop_signing_alg_values_supported (RFC 9449 §5.1)",
            "enable DPoP on the authorization server",
        )
    else:
        doc.ok(step, f"dpop_signing_alg_values_supported lists {algorithm}")
    step = "client authentication offered"
    method = settings.effective_client_auth
    if "client_auth" in problems:
        doc.fail(step, problems["client_auth"])
        fits = False
    elif metadata.token_endpoint_auth_methods_supported is None:
        doc.skip(step, "the metadata lists no token_endpoint_auth_methods_supported")
    else:
        doc.ok(step, f"token_endpoint_auth_methods_supported lists {method}")
    return fits


def _assertion_audience_step(doc: Doctor, settings: Settings) -> None:
    if settings.effective_client_auth != "private_key_jwt":
        return
    step = "assertion audience"
    if settings.assertion_audience == "token_endpoint":
        doc.ok(
            step,
            f"aud is the token endpoint {redact_url(settings.token_url)} "
            "(assertion_audience token_endpoint; servers that follow RFC 7523bis refuse it)",
        )
    elif settings.issuer is not None:
        doc.ok(step, f"aud is the issuer {settings.issuer} (RFC 7523bis)")
    else:
        doc.ok(
            step,
            f"aud is the token endpoint {redact_url(settings.token_url)} because no issuer is "
            "configured; servers that follow RFC 7523bis refuse it: give --issuer or set "
            "DPOP_ISSUER",
        )


def _profile_steps(
    doc: Doctor, settings: Settings, signer: Signer | None, metadata: ServerMetadata | None
) -> bool:
    """One step per rule of ``--profile``; True when none fails."""
    from dpop_signer.profiles import check_profile

    ok = True
    for result in check_profile(settings, signer=signer, metadata=metadata):
        step = f"{result.profile} {result.rule}"
        if result.status == "ok":
            doc.ok(step, result.detail)
        elif result.status == "skip":
            doc.skip(step, result.detail)
        else:
            doc.fail(step, result.detail, result.fix)
            ok = False
    return ok


def _reachable(doc: Doctor, client: httpx.Client, token_url: str) -> bool:
    import httpx

    step = "token endpoint reachable"
    shown = redact_url(token_url)
    try:
        response = client.get(token_url)
    except httpx.TimeoutException:
        doc.fail(step, f"{shown} timed out", "check the URL, proxies and firewalls")
        return False
    except httpx.HTTPError as exc:
        from dpop_signer.tls import certificate_problem

        problem = certificate_problem(exc)
        if problem is not None:
            doc.fail(
                step,
                f"{shown}: TLS certificate check failed: {problem}",
                "for a private CA give --cacert FILE, set DPOP_CA_BUNDLE or put ca_bundle in "
                "--config; otherwise fix the server's certificate",
            )
            return False
        doc.fail(
            step,
            f"{shown}: {exc or type(exc).__name__}",
            "check the URL and that the server is running",
        )
        return False
    status = response.status_code
    if status in (404, 410):
        # Some token endpoints answer every GET with 404 (they route POST only); the server's
        # own discovery document (RFC 8414 §2 token_endpoint) tells them from a wrong path.
        listed = _discovered_token_endpoint(client, token_url)
        if listed is not None and listed.rstrip("/") == token_url.rstrip("/"):
            doc.ok(step, f"{shown} (HTTP {status} to GET; discovery names it as token_endpoint)")
            return True
        if listed is not None:
            doc.fail(
                step,
                f"{shown} answered GET with HTTP {status}; the discovery document names "
                f"{sanitize_server_text(redact_url(listed), limit=200)} as token_endpoint",
                "use that URL as the token URL",
            )
            return False
        doc.fail(
            step,
            f"{shown} answered GET with HTTP {status} and the discovery document does not name it",
            "check the token URL (the authorization server's discovery document names it as "
            "token_endpoint)",
        )
        return False
    if 300 <= status < 400:
        location = sanitize_server_text(redact_url(response.headers.get("location", "")), limit=200)
        doc.fail(
            step,
            f"{shown} answered GET with HTTP {status}, redirecting to {location or 'nowhere'}",
            "use the URL it redirects to as the token URL (token requests are not redirected)",
        )
        return False
    doc.ok(step, f"{shown} answered GET with HTTP {status}")
    return True


def _discovered_token_endpoint(client: httpx.Client, token_url: str) -> str | None:
    """``token_endpoint`` of the server's discovery document, or None without one."""
    metadata = _discovery_document(client, token_url)
    value = metadata[1].get("token_endpoint") if metadata is not None else None
    return value if isinstance(value, str) else None


def _discovery_document(client: httpx.Client, token_url: str) -> tuple[str, dict[str, Any]] | None:
    """The first discovery document found (URL, metadata), or None."""
    import httpx

    for url in _well_known_urls(token_url):
        try:
            response = client.get(url)
        except httpx.HTTPError:
            continue
        if response.status_code != 200:
            continue
        try:
            metadata = response.json()
        except ValueError:
            continue
        if isinstance(metadata, dict):
            return url, metadata
    return None


def _well_known_urls(token_url: str) -> list[str]:
    parts = urlsplit(token_url)
    # The host without user info: discovery documents are public (RFC 8414 §3).
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    # RFC 8414 §3 (OAuth) first, then OpenID Connect Discovery 1.0 §4.
    return [
        f"{origin}/.well-known/oauth-authorization-server",
        f"{origin}/.well-known/openid-configuration",
    ]


def _discovery(doc: Doctor, client: httpx.Client, token_url: str, algorithm: str) -> None:
    """Without --issuer: the metadata found next to the token URL, if any, for information."""
    step = f"discovery advertises {algorithm}"
    found = _discovery_document(client, token_url)
    if found is not None:
        url, metadata = found
        algs = metadata.get("dpop_signing_alg_values_supported")
        if isinstance(algs, list) and algorithm in algs:
            doc.ok(step, f"dpop_signing_alg_values_supported lists {algorithm} ({redact_url(url)})")
        elif algs is None:
            doc.fail(
                step,
                f"{redact_url(url)} has no dpop_signing_alg_values_supported (RFC 9449 §5.1)",
                "enable DPoP on the authorization server",
            )
        else:
            doc.fail(
                step,
                f"{redact_url(url)} lists dpop_signing_alg_values_supported "
                f"{sanitize_server_text(json.dumps(algs), limit=200)}, without {algorithm}",
                f"allow {algorithm} for DPoP proofs on the authorization server, or use a key "
                "of a listed algorithm",
            )
        return
    doc.skip(step, "the server publishes no discovery document")


def _token(doc: Doctor, client: httpx.Client, settings: Settings, signer: Signer) -> None:
    from dpop_signer.config import build_auth
    from dpop_signer.jwk import jwk_thumbprint

    step = "DPoP token issued"
    try:
        auth = build_auth(settings, signer)
        token = auth.get_token(client)
    except ServerUnreachableError as exc:
        doc.fail(step, str(exc))
        return
    except OAuthError as exc:
        doc.fail(step, str(exc), _token_fix(exc))
        return
    except DPoPSignerError as exc:
        doc.fail(step, str(exc))
        return
    if token.token_type.lower() != "dpop":
        doc.fail(
            step,
            f"token_type is {token.token_type!r}, not DPoP (accepted because of accept_bearer)",
            "enable DPoP-bound tokens for this client on the authorization server",
        )
        return
    lifetime = (
        f", expires in {token.expires_at - _now():.0f} s" if token.expires_at is not None else ""
    )
    doc.ok(step, f"token_type DPoP{lifetime}")
    claims = _jwt_claims(token.value)
    jkt_step = "token bound to this key"
    if claims is None:
        doc.skip(jkt_step, "the access token is opaque, so cnf.jkt cannot be read")
        return
    cnf = claims.get("cnf")
    bound = cnf.get("jkt") if isinstance(cnf, dict) else None
    ours = jwk_thumbprint(signer.public_jwk)
    if bound == ours:
        doc.ok(jkt_step, f"cnf.jkt equals our thumbprint {ours}")
    elif bound is None:
        doc.fail(
            jkt_step,
            "the JWT access token has no cnf.jkt (RFC 9449 §6.1)",
            "configure the authorization server to bind tokens to DPoP keys",
        )
    else:
        doc.fail(
            jkt_step,
            f"cnf.jkt is {sanitize_server_text(str(bound), limit=100)}, our key's thumbprint "
            f"is {ours}",
            "the server bound the token to another key; check the key the server saw",
        )


def _now() -> float:
    import time

    return time.time()


def _token_fix(exc: OAuthError) -> str | None:
    error = getattr(exc, "error", None)
    fixes: dict[str, str] = {
        "invalid_client": "check client_id and the client secret (DPOP_CLIENT_SECRET[_FILE]) "
        "and client_auth",
        "unauthorized_client": "allow the client_credentials grant for this client",
        "invalid_scope": "request a scope the client is allowed (--scope)",
        "invalid_dpop_proof": "check the clock (iat) and that the AS accepts ES256",
    }
    return fixes.get(error) if isinstance(error, str) else None


def _jwt_claims(value: str) -> dict[str, Any] | None:
    from dpop_signer.jose import peek_claims

    return peek_claims(value)
