"""How a setting is named on the command line and in the environment; no pydantic here.

`dpop_signer.config` validates settings with pydantic, which takes longer to import than the
rest of ``dpop --help`` together; the CLI builds its options from these names alone and imports
`dpop_signer.config` only when a command runs.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ASSERTION_AUDIENCES",
    "CLIENT_AUTH_METHODS",
    "ENV_PREFIX",
    "PROFILES",
    "SECRET_FIELDS",
    "AssertionAudience",
    "ClientAuth",
    "Profile",
    "env_name",
    "option_name",
    "ways_to_set",
]

ENV_PREFIX = "DPOP_"
"""Environment variables are ``DPOP_`` + the field name in upper case (``DPOP_TOKEN_URL``)."""

ClientAuth = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
"""Token endpoint client authentication methods, named as in the OAuth registry (RFC 7591 §2;
RFC 6749 §2.3.1, RFC 7523 §2.2)."""

CLIENT_AUTH_METHODS: tuple[str, ...] = get_args(ClientAuth)
"""`ClientAuth`'s names, in order, for option choices and messages."""

AssertionAudience = Literal["issuer", "token_endpoint"]
"""The ``aud`` of a ``private_key_jwt`` client assertion: the authorization server's issuer
identifier (draft-ietf-oauth-rfc7523bis, FAPI 2.0; the default) or, for servers that still
demand it, the token endpoint URL (RFC 7523 §3 as first published)."""

ASSERTION_AUDIENCES: tuple[str, ...] = get_args(AssertionAudience)
"""`AssertionAudience`'s names, for option choices and messages."""

Profile = Literal["fapi2"]
"""Client profiles whose rules a configuration can be held to (`dpop_signer.profiles`)."""

PROFILES: tuple[str, ...] = get_args(Profile)
"""`Profile`'s names, for option choices and messages."""

SECRET_FIELDS: tuple[str, ...] = ("pin", "client_secret")
"""Fields that are secrets: each also has a ``<name>_file`` form and is never echoed."""


# Options named as curl names them, where the field name would read differently.
_OPTION_ALIASES = {"ca_bundle": "--cacert"}


def option_name(field: str) -> str:
    """The long option for ``field``: ``token_url`` -> ``--token-url`` (curl's names aside)."""
    return _OPTION_ALIASES.get(field, "--" + field.replace("_", "-"))


def env_name(field: str) -> str:
    """The environment variable for ``field``: ``token_url`` -> ``DPOP_TOKEN_URL``."""
    return ENV_PREFIX + field.upper()


def ways_to_set(field: str, options: frozenset[str] | set[str] | None = None) -> str:
    """How a user gives ``field``, in the words of a command that has ``options``.

    ``options`` are the long options the command accepts (``None``: all of them). A secret is
    offered in its file forms first, because a value on the command line is visible in ``ps``::

        give --pin-file FILE or --pin, set DPOP_PIN_FILE or DPOP_PIN, or put pin_file in --config
    """
    names = [f"{field}_file", field] if field in SECRET_FIELDS else [field]

    def has(option: str) -> bool:
        return options is None or option in options

    given = [option_name(n) + (" FILE" if n.endswith("_file") else "") for n in names]
    given = [g for g, n in zip(given, names, strict=True) if has(option_name(n))]
    parts = []
    if given:
        parts.append("give " + " or ".join(given))
    parts.append("set " + " or ".join(env_name(n) for n in names))
    if has("--config"):
        parts.append(f"put {names[0]} in --config")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + (", or " if len(parts) > 2 else " or ") + parts[-1]
