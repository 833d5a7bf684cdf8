"""What makes a URL usable as a DPoP ``htu`` beyond what httpx parses: a real host and port.

httpx accepts URLs that no request can be sent to, and `dpop_signer.proof.normalize_htu`
(which takes what httpx parsed) would sign them: ``https://a:0/``, ``https://a:65536/``,
``https://a..b/``, ``https://xn--/``, hosts with spaces or braces. `check_http_url` refuses
those: the scheme is http or https, the port is 1-65535 (RFC 9110 §4.2.1 with RFC 6335's
range; an empty port means the scheme's default, RFC 3986 §3.2.3), and the host is an IPv4 or
bracketed IPv6 literal (httpx checks those) or a DNS name whose labels are 1-63 letters, digits,
hyphens or underscores, not starting or ending with a hyphen, at most 253 characters in all
(RFC 1123 §2.1, RFC 1035 §2.3.4), and whose ``xn--`` labels are valid Punycode (RFC 3492).
Underscores are allowed because real internal hosts (containers, SRV-style names) use them.
"""

from __future__ import annotations

import ipaddress
import re

import httpx

__all__ = ["check_http_url", "shown_url"]

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_MAX_NAME = 253


def check_http_url(value: str | httpx.URL, what: str = "htu") -> httpx.URL:
    """Parse ``value`` as an absolute http(s) URL with a valid host and port.

    ``what`` names the value in the error (``htu``, ``--upstream``). Returns the parsed URL.

    Raises:
        ValueError: ``value`` is not such a URL; the message says which part is wrong.
    """
    shown = shown_url(value)
    try:
        url = value if isinstance(value, httpx.URL) else httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"{what} {shown} is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(
            f"{what} {shown} is not an absolute http(s) URL, e.g. https://api.example/v1/things"
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"{what} {shown} has port {url.port}; a port is 1-65535")
    host = url.raw_host.decode("ascii", "replace")
    if not host:
        raise ValueError(f"{what} {shown} has no host")
    if not _valid_host(host):
        raise ValueError(
            f"{what} {shown} has an invalid host; give a DNS name (labels of letters, digits "
            "and hyphens separated by single dots) or an IP address"
        )
    return url


def _valid_host(host: str) -> bool:
    if ":" in host:  # an IPv6 literal (httpx strips the brackets and validated it)
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return False
        return True
    # One trailing dot is the DNS root (a fully qualified name); an empty label anywhere else
    # is not a name.
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > _MAX_NAME:
        return False
    for label in name.split("."):
        if _LABEL.fullmatch(label) is None:
            return False
        if label[:4].lower() == "xn--" and not _punycode(label[4:]):
            return False
    return True


def _punycode(encoded: str) -> bool:
    if not encoded:
        return False
    try:
        decoded = encoded.encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        return False
    return bool(decoded)


def shown_url(value: str | httpx.URL) -> str:
    """``value`` quoted for an error message, without query or fragment (credentials).

    At most 200 characters are shown.
    """
    head = str(value).split("?", 1)[0].split("#", 1)[0]
    return repr(head if len(head) <= 200 else head[:200] + "...")
