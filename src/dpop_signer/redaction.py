"""What may be printed of a secret, a key reference, a URL, and of text that a server sent.

Every message, log line, ``-v`` line and service response body is built from pieces that pass
through here, so the rules live in one place:

- A secret value that has to be mentioned (a token, a proof, a nonce, a client secret, a PIN)
  is shown as `mask` makes it: ``…(N chars)``, its length only. Never a prefix: for an opaque
  token or a secret a prefix is part of the secret, and for a short id in Basic credentials it
  would be most of it. Basic credentials are shown as ``client_id:…(N chars)`` (`mask_basic`).
- A key reference shows no ``pin-value=`` (RFC 7512 §2.4 lets a URI carry the PIN):
  `mask_pin_values`.
- A URL shows no user info (``user:password@``), query or fragment contents, which carry
  credentials and codes: `redact_url`.
- Text that a server sends (``error``, ``error_description``, a ``WWW-Authenticate`` challenge,
  a ``Location``) is untrusted and may echo what we sent it. A `Redactor` built with the client
  secret (and id) removes that secret in every form it travelled in (raw, form-urlencoded,
  percent-encoded, base64 inside Basic credentials or alone, at any alignment), anything shaped
  like a compact JWS (RFC 7515 §7.1: proofs, access tokens, client assertions), user info in
  URLs, control and bidi characters (log injection), and caps the length. It is applied where
  the error object is built from server text, so every later consumer (CLI ``error:`` lines,
  ``dpop serve`` and ``dpop proxy`` bodies and logs) gets clean text without repeating it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = [
    "JWS_MARK",
    "SECRET_MARK",
    "Redactor",
    "mask",
    "mask_basic",
    "mask_pin_values",
    "redact_url",
    "sanitize_server_text",
    "scrub",
]

SECRET_MARK = "***"
"""What a known secret (client secret, PIN in a URI) is replaced by."""

JWS_MARK = "[JWS removed]"
"""What a compact-JWS-shaped string (a proof, a token, an assertion) is replaced by."""

DEFAULT_LIMIT = 300
"""Characters of server text kept in a message (the rest is cut, marked with ``…``)."""

# Server text is scanned only this far: the result is cut far shorter anyway, and the scan
# must cost nothing however large a hostile error body is. Cutting after the scan means a
# secret split at this boundary lies beyond what is kept.
_SCAN_LIMIT = 16 * 1024
# A secret shorter than this is not searched for: replacing every "ab" would mangle the text
# while protecting nothing.
_MIN_SECRET = 4

# Base64 and base64url characters (RFC 4648 §4, §5) without the "=" padding, which only ends
# a run: widening a match over "=" to the left would swallow a "name=" in front of it.
_B64_RUN_CHAR = re.compile(r"[A-Za-z0-9+/_-]")
# Compact JWS (RFC 7515 §7.1): three base64url segments joined by dots; JWE has five. A JOSE
# header is a JSON object, so its base64url starts with "ey" or "ew" ("{" then '"', " " or a
# newline) and is at least 16 characters long (``{"alg":"ES256"}`` alone is 20); three long
# segments are taken for a JWS whatever they start with.
_JWS = re.compile(
    r"(?<![A-Za-z0-9_-])"
    r"(?:e[wy][A-Za-z0-9_-]{14,}(?:\.[A-Za-z0-9_-]*){2,4}"
    r"|[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}(?:\.[A-Za-z0-9_-]*){0,2})"
)
# RFC 7512 §2.4 pin-value= in a pkcs11: URI, in whatever text it appears.
_PIN_VALUE = re.compile(r"(pin-value=)[^&;\s'\"]*", re.I)
# RFC 3986 §3.2.1 user info of a URL in free text: scheme://userinfo@host.
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/?#@\s]*@")
# C0 and C1 controls, and the Unicode line separators and bidi controls that rewrite how a log
# line reads (RFC 9110 §5.5 allows none of them in a field value anyway).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]+")


def mask(value: str) -> str:
    """Show a secret as ``…(812 chars)``: its length, never any of its characters."""
    return f"…({len(value)} chars)"


def mask_basic(credentials: str) -> str:
    """Basic credentials (RFC 7617) as ``client_id:…(N chars)``; undecodable ones as `mask`.

    The id is shown as sent (form-urlencoded, RFC 6749 §2.3.1); the secret only by length.
    """
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return mask(credentials)
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return mask(credentials)
    return f"{client_id}:{mask(secret)}"


def mask_pin_values(text: str) -> str:
    """``text`` with every ``pin-value=`` of a PKCS#11 URI (RFC 7512 §2.4) masked."""
    return _PIN_VALUE.sub(lambda m: m.group(1) + SECRET_MARK, text)


def redact_url(url: object) -> str:
    """A URL fit to print: user info masked, query and fragment shown by length only.

    >>> redact_url("https://u:p@as.example/token?client_secret=x#f")
    'https://…@as.example/token?…(15 chars)#…(1 chars)'
    """
    text = str(url)
    base, hash_sign, fragment = text.partition("#")
    base, question, query = base.partition("?")
    scheme, sep, rest = base.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        _userinfo, at, host = authority.rpartition("@")
        base = f"{scheme}://{'…@' if at else ''}{host}{slash}{path}"
    shown = _CONTROL.sub(" ", base)
    if question:
        shown += f"?{mask(query)}"
    if hash_sign:
        shown += f"#{mask(fragment)}"
    return shown


def scrub(text: str) -> str:
    """The rules that need no known secret: JWS shapes, ``pin-value=``, URL user info, controls.

    For text we wrote ourselves (a one-line error about to be printed) as a last safety net;
    server text goes through a `Redactor`, which does this and more.
    """
    text = _JWS.sub(JWS_MARK, text)
    text = mask_pin_values(text)
    text = _USERINFO.sub(lambda m: m.group(1) + "…@", text)
    return _CONTROL.sub(" ", text).strip()


def _cap(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return text[:limit] + "…"


def _plain_forms(secret: str) -> set[str]:
    # How a secret appears in text: as is, form-urlencoded (RFC 6749 §2.3.1, a form body),
    # percent-encoded for a URL component or a path, and escaped inside a JSON string.
    return {
        secret,
        quote_plus(secret, safe=""),
        quote(secret, safe=""),
        quote(secret),
        json.dumps(secret)[1:-1],
    }


def _base64_cores(data: bytes) -> set[str]:
    """Base64 text that appears wherever ``data`` is base64-encoded inside anything longer.

    Base64 encodes 3 bytes into 4 characters, so the characters of ``data`` depend on its
    offset modulo 3 in the encoded whole (``client_id:`` in front of the secret in Basic
    credentials, for one). For each offset, the 4-character groups made of ``data`` bytes only
    are the same whatever surrounds them; they are the core to search for.
    """
    cores = set()
    for offset in range(3):
        padded = b"\0" * offset + data
        encoded = base64.b64encode(padded).decode("ascii")
        first = 1 if offset else 0
        last = len(padded) // 3
        core = encoded[4 * first : 4 * last]
        if len(core) >= 4:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))  # base64url (RFC 4648 §5)
    return cores


class Redactor:
    """Removes known secrets, in every encoding, and JWS-shaped strings from untrusted text.

    Args:
        secrets: The values to remove (a client secret); ``None`` and empty ones are skipped.
        client_id: The client id, so that Basic credentials (``base64(id:secret)``) made of a
            short secret are found too.

    ``repr`` never shows the secrets.
    """

    def __init__(self, secrets: Iterable[str | None] = (), *, client_id: str | None = None) -> None:
        plain: set[str] = set()
        encoded: set[str] = set()
        self._count = 0
        for secret in secrets:
            if not secret or len(secret) < _MIN_SECRET:
                continue
            self._count += 1
            forms = _plain_forms(secret)
            plain.update(forms)
            for form in forms:
                encoded.update(_base64_cores(form.encode("utf-8")))
            if client_id is not None:
                for pair in (
                    f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}",
                    f"{client_id}:{secret}",
                ):
                    whole = base64.b64encode(pair.encode("utf-8")).decode("ascii").rstrip("=")
                    encoded.update({whole, whole.replace("+", "-").replace("/", "_")})
        # Longest first, so that a form containing another one is removed whole.
        self._plain = _alternation(plain, re.IGNORECASE)
        self._encoded = _alternation(encoded, 0)

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def __call__(self, text: str, *, limit: int | None = DEFAULT_LIMIT) -> str:
        """``text`` with secrets and JWS shapes replaced, controls flattened, cut to ``limit``.

        ``limit=None`` keeps the whole (scanned) text.
        """
        text = text[:_SCAN_LIMIT]
        if self._encoded is not None:
            text = _replace_runs(text, self._encoded)
        if self._plain is not None:
            text = self._plain.sub(SECRET_MARK, text)
        return _cap(scrub(text), limit)

    def clean_json(self, value: object, *, limit: int | None = DEFAULT_LIMIT) -> object:
        """A copy of a JSON value with every string (keys too) passed through the redactor."""
        if isinstance(value, str):
            return self(value, limit=limit)
        if isinstance(value, dict):
            return {
                self(str(k), limit=limit): self.clean_json(v, limit=limit) for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.clean_json(v, limit=limit) for v in value]
        return value


def sanitize_server_text(
    text: str, *, secrets: Iterable[str | None] = (), limit: int | None = DEFAULT_LIMIT
) -> str:
    """Untrusted ``text`` from a server, fit for a message: see `Redactor`.

    For a one-off call; code that sanitizes often builds one `Redactor` and keeps it.
    """
    return Redactor(secrets)(text, limit=limit)


def _alternation(forms: set[str], flags: int) -> re.Pattern[str] | None:
    if not forms:
        return None
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join(re.escape(form) for form in ordered), flags)


def _replace_runs(text: str, pattern: re.Pattern[str]) -> str:
    # A base64 match is widened to the whole run of base64 characters around it: the
    # characters next to a core still carry bits of the secret (and the rest of a Basic
    # credential is the client id and the separator, nothing worth keeping).
    pieces = []
    position = 0
    for match in pattern.finditer(text):
        start, end = match.start(), match.end()
        if start < position:
            continue  # inside a run already replaced
        while start > position and _B64_RUN_CHAR.match(text, start - 1):
            start -= 1
        while end < len(text) and _B64_RUN_CHAR.match(text, end):
            end += 1
        while end < len(text) and text[end] == "=":
            end += 1
        pieces.append(text[position:start])
        pieces.append(SECRET_MARK)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)
