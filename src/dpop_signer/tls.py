"""The TLS trust every HTTPS client of dpop-signer uses, and how a certificate failure is told.

By default certificates are checked against the operating system's trust store through
`truststore` (as pip does): the Windows and macOS certificate stores, and on Linux OpenSSL's
system bundle, which honours ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``. A company CA installed in
the system store is therefore trusted without extra settings. ``ca_bundle`` (``--cacert FILE``,
``DPOP_CA_BUNDLE``, ``ca_bundle`` in a config file) replaces that trust by the certificates in
one PEM file, as ``curl --cacert`` does: for a private CA, or to pin a test server.

`ssl_context` builds the context; the CLI and the service pass it as ``verify=`` to every httpx
client they make (token endpoint, APIs, upstreams). `certificate_problem` recognises a failed
certificate check anywhere in an exception's chain, so that the message can say it is a
certificate problem and how to fix it rather than "check that the server is running".
"""

from __future__ import annotations

import os
import ssl

from dpop_signer.errors import ConfigError

__all__ = ["certificate_problem", "ssl_context"]


def ssl_context(ca_bundle: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client `ssl.SSLContext` that verifies certificates and host names.

    Args:
        ca_bundle: A PEM file of CA certificates to trust instead of the system's; ``None``
            trusts the operating system's store (`truststore`).

    Raises:
        ConfigError: ``ca_bundle`` is missing, unreadable or holds no PEM certificate.
    """
    if ca_bundle is None:
        import truststore

        return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    path = os.fspath(ca_bundle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ConfigError(f"CA bundle {path!r} does not exist; give a PEM file") from None
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"CA bundle {path!r} cannot be used ({reason}); give a PEM file of CA certificates"
        ) from None
    return context


def certificate_problem(exc: BaseException) -> str | None:
    """What is wrong with the server's certificate, if a failed check caused ``exc``.

    Walks ``__cause__`` / ``__context__`` (httpx and dpop-signer wrap the `ssl` error) and
    returns OpenSSL's verify message (``unable to get local issuer certificate``,
    ``Hostname mismatch, certificate is not valid for '127.0.0.1'``), or None.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    # Bounded by the chain's length; `seen` stops a cycle.
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or current.reason or "certificate verify failed"
        text = str(current)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            # httpx re-raises the ssl error as its own ConnectError with the text only.
            detail = text.split("certificate verify failed:", 1)[-1]
            return detail.split("(_ssl.c", 1)[0].strip(" :") or "certificate verify failed"
        current = current.__cause__ or current.__context__
    return None
