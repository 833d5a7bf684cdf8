"""Where a key's PIN or passphrase comes from: one rule for the library, the CLI and the service.

The caller's PIN wins (the ``pin=`` argument; on the command line ``--pin``, ``--pin-file`` or
the prompt), then the key reference's own (``pin-value=`` or ``pin-source=`` in an RFC 7512
URI), then the ``DPOP_PIN`` environment variable. `dpop_signer.config` ranks a PIN that came
from the environment as ``DPOP_PIN``, below the URI's own, whatever setting carried it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dpop_signer.errors import ConfigError, PinError
from dpop_signer.signers.pkcs11_uri import Pkcs11Uri, parse_pkcs11_uri

__all__ = ["PIN_ENV", "read_pin_source", "ref_brings_pin", "resolve_pin"]

PIN_ENV = "DPOP_PIN"
"""The environment variable with the PIN (or PEM passphrase), used when nothing else gives one."""


def read_pin_source(source: str) -> str:
    """The PIN in the file a ``pin-source=`` names (RFC 7512 §2.4), without a final newline."""
    if source.startswith("file://"):
        # file:///run/pin and file://localhost/run/pin (RFC 8089); other hosts are not files.
        host, slash, rest = source[7:].partition("/")
        if host not in ("", "localhost") or not slash:
            raise ConfigError(f"pin-source={source} names a remote file; use file:/absolute/path")
        path = "/" + rest
    elif source.startswith("file:"):
        path = source[5:]
    elif source.startswith("/"):
        path = source
    else:
        raise ConfigError(
            f"pin-source={source} is not supported; use pin-source=file:/path/to/pin-file"
        )
    try:
        data = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PinError(f"PIN file {path} (pin-source) does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PinError(f"PIN file {path} (pin-source) cannot be read as UTF-8 text") from exc
    # A PIN file usually ends with the newline an editor or `echo` added; it is not the PIN.
    return data.removesuffix("\n").removesuffix("\r")


def resolve_pin(
    ref: str | Pkcs11Uri, pin: str | None, *, environ: Mapping[str, str] | None = None
) -> str | None:
    """The PIN or passphrase to open key ``ref`` with: the one precedence rule.

    ``pin`` (the caller's argument: ``--pin``, ``--pin-file``, a prompt), then the key
    reference's own (``pin-value=`` or ``pin-source=`` in a ``pkcs11:`` URI), then the
    ``DPOP_PIN`` environment variable. Returns None when none of them gives one; the backend
    decides whether the key needs it.

    Raises:
        ConfigError: the URI is malformed, or ``pin-source`` is not a local file.
        PinError: the ``pin-source`` file is missing or unreadable.
    """
    if pin is not None:
        return pin
    uri = ref if isinstance(ref, Pkcs11Uri) else _uri_of(ref)
    if uri is not None:
        if uri.pin_value is not None:
            return uri.pin_value
        if uri.pin_source is not None:
            return read_pin_source(uri.pin_source)
    env = os.environ if environ is None else environ
    return env.get(PIN_ENV)


def ref_brings_pin(ref: str) -> bool:
    """Whether key reference ``ref`` carries its own PIN (``pin-value=`` / ``pin-source=``)."""
    uri = _uri_of(ref)
    return uri is not None and (uri.pin_value is not None or uri.pin_source is not None)


def _uri_of(ref: str) -> Pkcs11Uri | None:
    return parse_pkcs11_uri(ref) if ref[:7].lower() == "pkcs11:" else None
