"""``WWW-Authenticate`` challenges (RFC 9110 §11.6.1) and the DPoP error in them (RFC 9449 §7.1).

A resource server answers ``401`` with ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` (§9)
or ``error="invalid_token"``; `dpop_error` finds that code among all the challenges of all the
header lines, whatever other schemes (``Bearer``, ``Basic``) come first.

>>> dpop_error(['Bearer realm="x", DPoP algs="ES256", error="use_dpop_nonce"'])
'use_dpop_nonce'
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["dpop_error", "parse_challenges"]


def dpop_error(values: Iterable[str]) -> str | None:
    """The ``error`` of the first ``DPoP`` challenge in these header values, or None."""
    for value in values:
        for scheme, params in parse_challenges(value):
            if scheme == "dpop":
                return params.get("error")
    return None


def parse_challenges(value: str) -> list[tuple[str, dict[str, str]]]:
    """Parse RFC 9110 §11.6.1 challenges: ``scheme [token68 | #auth-param]`` separated by ``,``.

    Tolerant by design: anything unparseable ends the current challenge, never raises.
    Scheme names come back lower-cased (they are case-insensitive, RFC 9110 §11.1).
    """
    result: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(value)
    params: dict[str, str] = {}
    while i < n:
        while i < n and value[i] in " \t,":
            i += 1
        start = i
        while i < n and value[i] not in " \t,=":
            i += 1
        word = value[start:i]
        j = i
        while j < n and value[j] in " \t":
            j += 1
        if not word:
            i = j + 1
            continue
        if j < n and value[j] == "=" and result:
            # name=value inside the current challenge
            j += 1
            while j < n and value[j] in " \t":
                j += 1
            if j < n and value[j] == '"':
                j += 1
                chars: list[str] = []
                while j < n and value[j] != '"':
                    if value[j] == "\\" and j + 1 < n:
                        j += 1
                    chars.append(value[j])
                    j += 1
                params[word.lower()] = "".join(chars)
                i = j + 1
            else:
                start = j
                while j < n and value[j] not in " \t,":
                    j += 1
                params[word.lower()] = value[start:j]
                i = j
            continue
        # a new challenge (or a token68 after a scheme, which carries no error param)
        if i < n and value[i] == "=":
            while i < n and value[i] == "=":
                i += 1
            continue
        params = {}
        result.append((word.lower(), params))
        i = j
    return result
