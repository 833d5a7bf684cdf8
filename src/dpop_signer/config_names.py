"""How a setting is named on the command line and in the environment; no pydantic here.

`dpop_signer.config` validates settings with pydantic, which takes longer to import than the
rest of ``dpop --help`` together; the CLI builds its options from these names alone and imports
`dpop_signer.config` only when a command runs.
"""

from __future__ import annotations

__all__ = ["CLIENT_AUTH_METHODS", "ENV_PREFIX", "SECRET_FIELDS", "env_name", "option_name"]

ENV_PREFIX = "DPOP_"
"""Environment variables are ``DPOP_`` + the field name in upper case (``DPOP_TOKEN_URL``)."""

CLIENT_AUTH_METHODS: tuple[str, ...] = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "none",
)
"""Token endpoint client authentication methods (RFC 6749 §2.3.1, RFC 7523 §2.2)."""

SECRET_FIELDS: tuple[str, ...] = ("pin", "client_secret")
"""Fields that are secrets: each also has a ``<name>_file`` form and is never echoed."""


def option_name(field: str) -> str:
    """The long option for ``field``: ``token_url`` -> ``--token-url``."""
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    """The environment variable for ``field``: ``token_url`` -> ``DPOP_TOKEN_URL``."""
    return ENV_PREFIX + field.upper()
