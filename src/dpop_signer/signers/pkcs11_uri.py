r"""RFC 7512 ``pkcs11:`` URIs: parse them, and resolve the PIN and module they imply.

python-pkcs11 has no URI support, so the subset dpop-signer needs is parsed here, strictly: an
attribute we do not understand is refused rather than ignored, because ignoring it could select
a different key than the operator meant (RFC 7512 §2.3 lets a consumer refuse what it cannot
honour). Nothing here imports python-pkcs11; the backend in `dpop_signer.signers.pkcs11` does.

>>> uri = parse_pkcs11_uri("pkcs11:token=dpop-dev;object=dpop-es256;id=%01%02")
>>> uri.token, uri.object, uri.id
('dpop-dev', 'dpop-es256', b'\x01\x02')
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

from dpop_signer.algorithms import ALGORITHMS
from dpop_signer.errors import ConfigError, SignerUnavailableError
from dpop_signer.redaction import SECRET_MARK

__all__ = [
    "MODULE_ENV",
    "SOFTHSM2_MODULE_CANDIDATES",
    "Pkcs11Uri",
    "find_softhsm2_module",
    "parse_pkcs11_uri",
    "resolve_module",
]

"""Environment variable holding the token PIN when neither the caller nor the URI gives one."""

MODULE_ENV = "DPOP_PKCS11_MODULE"
"""Environment variable naming the PKCS#11 module when the URI has no ``module-path``."""

SOFTHSM2_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian, Ubuntu
    "/usr/lib/*-linux-gnu/softhsm/libsofthsm2.so",  # Debian multiarch
    "/usr/lib64/softhsm/libsofthsm2.so",  # Fedora, RHEL
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",  # Arch, Alpine
    "/usr/local/lib/softhsm/libsofthsm2.so",  # source builds, FreeBSD
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",  # macOS (Apple silicon)
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",  # macOS (Intel)
)
"""Where SoftHSM2's module is installed, in the order searched (globs allowed)."""

_PATH_ATTRS = frozenset({"token", "serial", "manufacturer", "model", "object", "id", "type"})
_QUERY_ATTRS = frozenset({"module-path", "pin-value", "pin-source", "sessions", "alg"})
MAX_SESSIONS = 64
"""Most signing sessions a ``sessions=`` query attribute may ask for."""
# Attributes RFC 7512 defines that we refuse on purpose, with the reason and the fix.
_REFUSED = {
    "slot-id": "slot numbers change (SoftHSM2 renumbers slots); select the token with token= "
    "or serial=",
    "slot-description": "select the token with token= or serial=",
    "slot-manufacturer": "select the token with token= or serial=",
    "library-manufacturer": "select the module with module-path=",
    "library-description": "select the module with module-path=",
    "library-version": "select the module with module-path=",
    "module-name": "p11-kit module names are not resolved; give module-path= instead",
}
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that select a key, a token, a module and a PIN.

    ``pin_value`` is kept out of ``repr`` and out of `redacted`, so that neither can leak it.
    """

    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None
    sessions: int | None = None
    alg: str | None = None
    """dpop-signer's own ``alg=``: the JWS algorithm, needed only to pick RS256 for an RSA key."""

    @property
    def key_description(self) -> str:
        """``'label' (id 0102)``-style text naming the key in messages."""
        parts = []
        if self.object is not None:
            parts.append(repr(self.object))
        if self.id is not None:
            parts.append(f"id {self.id.hex()}")
        return " ".join(parts) if parts else "(unnamed)"

    def redacted(self) -> str:
        """The URI without its PIN, for messages, ``repr`` and logs."""
        path = []
        for name in ("token", "serial", "manufacturer", "model", "object"):
            value = getattr(self, name)
            if value is not None:
                path.append(f"{name}={quote(value, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.type is not None:
            path.append(f"type={self.type}")
        query = []
        if self.module_path is not None:
            query.append(f"module-path={quote(self.module_path, safe='/')}")
        if self.pin_source is not None:
            query.append(f"pin-source={quote(self.pin_source, safe='/:')}")
        if self.pin_value is not None:
            query.append(f"pin-value={SECRET_MARK}")
        if self.sessions is not None:
            query.append(f"sessions={self.sessions}")
        if self.alg is not None:
            query.append(f"alg={self.alg}")
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")


def _decode(name: str, raw: str, *, text: bool) -> str | bytes:
    if _BAD_PERCENT.search(raw):
        raise ConfigError(
            f"PKCS#11 URI attribute {name}= has a '%' that is not followed by two hex digits; "
            "percent-encode it as %25"
        )
    data = unquote_to_bytes(raw)
    if not text:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"PKCS#11 URI attribute {name}= is not UTF-8 after decoding") from exc


def _split(section: str, sep: str, allowed: frozenset[str], kind: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    if not section:
        return attrs
    for item in section.split(sep):
        if not item:
            continue  # RFC 7512 tolerates an empty attribute (a trailing ';')
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"PKCS#11 URI {kind} attribute {name!r} has no '=value'")
        if name in _REFUSED:
            raise ConfigError(f"PKCS#11 URI attribute {name}= is not supported: {_REFUSED[name]}")
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(
                f"unknown PKCS#11 URI {kind} attribute {name!r}; known {kind} attributes: {known}"
            )
        if name in attrs:
            raise ConfigError(f"PKCS#11 URI attribute {name}= appears twice")
        attrs[name] = value
    return attrs


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI into a `Pkcs11Uri`.

    Path attributes: ``token``, ``serial``, ``manufacturer``, ``model`` (select the token),
    ``object`` (CKA_LABEL), ``id`` (CKA_ID, percent-encoded bytes), ``type`` (``private``).
    Query attributes: ``module-path``, ``pin-value``, ``pin-source`` (``file:`` URI or path),
    and dpop-signer's own ``sessions`` (how many sessions sign at once; see `Pkcs11Signer`) and
    ``alg`` (the JWS algorithm; it must fit the key, and picks RS256 rather than PS256 for an
    RSA key).

    Raises:
        ConfigError: not a ``pkcs11:`` URI, or an attribute is unknown, repeated, empty or
            malformed; the message names the attribute.
    """
    if uri[:7].lower() != "pkcs11:":
        raise ConfigError("a PKCS#11 key reference must start with 'pkcs11:' (RFC 7512)")
    if "#" in uri:
        raise ConfigError("a PKCS#11 URI has no fragment; percent-encode '#' as %23")
    path, _, query = uri[7:].partition("?")
    path_attrs = _split(path, ";", _PATH_ATTRS, "path")
    query_attrs = _split(query, "&", _QUERY_ATTRS, "query")

    values: dict[str, str | bytes] = {}
    for name, raw in {**path_attrs, **query_attrs}.items():
        value = _decode(name, raw, text=name != "id")
        if not value:
            raise ConfigError(f"PKCS#11 URI attribute {name}= is empty")
        values[name] = value

    kind = values.get("type")
    if kind is not None and kind != "private":
        raise ConfigError(
            f"PKCS#11 URI type={kind!s} cannot sign; use type=private or leave type= out"
        )
    if "pin-value" in values and "pin-source" in values:
        raise ConfigError("PKCS#11 URI has both pin-value= and pin-source=; keep one")

    def text(name: str) -> str | None:
        value = values.get(name)
        assert value is None or isinstance(value, str)
        return value

    sessions = text("sessions")
    if sessions is not None and not (sessions.isdigit() and 1 <= int(sessions) <= MAX_SESSIONS):
        raise ConfigError(
            f"PKCS#11 URI sessions={sessions} is not a whole number from 1 to {MAX_SESSIONS}"
        )
    alg = text("alg")
    if alg is not None and alg not in ALGORITHMS:
        raise ConfigError(
            f"PKCS#11 URI alg={alg} is not a supported algorithm; use one of "
            f"{', '.join(ALGORITHMS)} (or leave alg= out: it follows the key)"
        )
    ident = values.get("id")
    assert ident is None or isinstance(ident, bytes)
    return Pkcs11Uri(
        token=text("token"),
        serial=text("serial"),
        manufacturer=text("manufacturer"),
        model=text("model"),
        object=text("object"),
        id=ident,
        type=text("type"),
        module_path=text("module-path"),
        pin_value=text("pin-value"),
        pin_source=text("pin-source"),
        sessions=int(sessions) if sessions is not None else None,
        alg=alg,
    )


def find_softhsm2_module() -> str | None:
    """The first SoftHSM2 module found in the usual install locations, or None."""
    for pattern in SOFTHSM2_MODULE_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def resolve_module(uri: Pkcs11Uri, *, environ: dict[str, str] | None = None) -> str:
    """The module path: ``module-path``, then ``DPOP_PKCS11_MODULE``, then SoftHSM2.

    The file is not checked here; loading it reports a missing file with the fix.

    Raises:
        SignerUnavailableError: none is given and SoftHSM2 is not installed.
    """
    if uri.module_path is not None:
        return uri.module_path
    env = os.environ if environ is None else environ
    configured = env.get(MODULE_ENV)
    if configured:
        return configured
    found = find_softhsm2_module()
    if found is None:
        raise SignerUnavailableError(
            "no PKCS#11 module given and SoftHSM2 not found; add module-path=/path/to/module.so "
            f"to the URI or set {MODULE_ENV}, or install SoftHSM2 (apt-get install softhsm2)"
        )
    return found
