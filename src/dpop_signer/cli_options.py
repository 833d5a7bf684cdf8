"""The options every ``dpop`` command shares, and how they become `Settings`.

Kept apart from `dpop_signer.cli` so that the service commands (``dpop serve``, ``dpop proxy``
in `dpop_signer.service.commands`) use the same options without importing the CLI module that
registers them. A command composes what it needs::

    @click.command()
    @key_options
    @client_options
    @click.pass_context
    def serve(ctx: click.Context, **_: object) -> None:
        settings = settings_from_context(ctx)
        signer = build_signer(settings)

Options deliberately carry no click ``envvar=``: `dpop_signer.config.load_settings` reads the
environment itself so that an error can say which layer a bad value came from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dpop_signer.config_names import (
    ASSERTION_AUDIENCES,
    CLIENT_AUTH_METHODS,
    PROFILES,
    SECRET_FIELDS,
    env_name,
    option_name,
)

if TYPE_CHECKING:
    from dpop_signer.config import Settings

__all__ = [
    "client_options",
    "key_options",
    "prompt_for_secrets",
    "settings_from_context",
    "warn",
]

F = TypeVar("F", bound=Callable[..., Any])


def _env(field: str) -> str:
    return f"[env: {env_name(field)}]"


def _option(*decls: str, field: str | None = None, help: str, **kwargs: Any) -> Callable[[F], F]:
    text = f"{help} {_env(field)}" if field else help
    return click.option(*decls, help=text, **kwargs)


def _compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


key_options = _compose(
    _option(
        "--config",
        "config",
        field="config",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="TOML file with settings named after the long options.",
    ),
    _option(
        "--key",
        field="key",
        metavar="REF",
        help="PEM key file or pkcs11: URI (e.g. 'pkcs11:token=dev;object=dpop').",
    ),
    _option(
        "--pin",
        field="pin",
        metavar="PIN",
        help="Token PIN or PEM passphrase; visible in `ps`, so prefer the variable, "
        "--pin-file or the prompt.",
    ),
    _option(
        "--pin-file",
        field="pin_file",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="Read the PIN from FILE.",
    ),
    _option(
        "--sign-timeout",
        field="sign_timeout",
        metavar="SECONDS",
        type=float,
        help="Give up on a PKCS#11 module that has not answered within SECONDS (default 5).",
    ),
    _option(
        "--profile",
        field="profile",
        type=click.Choice(PROFILES),
        help="Hold the configuration to a client profile before any request: fapi2 (FAPI 2.0: "
        "DPoP, private_key_jwt with the issuer as aud, PS256/ES256/EdDSA keys, https "
        "endpoints, metadata that agrees).",
    ),
)
"""``--config``, ``--key``, ``--pin``, ``--pin-file``, ``--sign-timeout``, ``--profile``: what
every command that signs needs."""

client_options = _compose(
    _option(
        "--issuer",
        field="issuer",
        metavar="URL",
        help="Authorization server issuer: its RFC 8414 metadata names the token endpoint and "
        "what the server offers; it is the aud of private_key_jwt assertions.",
    ),
    _option(
        "--token-url",
        field="token_url",
        metavar="URL",
        help="Token endpoint URL (default: from the --issuer metadata).",
    ),
    _option("--client-id", field="client_id", metavar="ID", help="OAuth client_id."),
    _option(
        "--client-secret",
        field="client_secret",
        metavar="SECRET",
        help="Client secret; visible in `ps`, so prefer the variable or --client-secret-file.",
    ),
    _option(
        "--client-secret-file",
        field="client_secret_file",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="Read the client secret from FILE.",
    ),
    _option("--scope", field="scope", metavar="SCOPES", help="Scopes to request."),
    _option(
        "--client-auth",
        field="client_auth",
        type=click.Choice(CLIENT_AUTH_METHODS),
        help="How the client authenticates (default: client_secret_basic with a secret, "
        "else none).",
    ),
    _option(
        "--resource",
        field="resource",
        metavar="URI",
        multiple=True,
        help="RFC 8707 resource indicator; repeatable.",
    ),
    _option(
        "--assertion-audience",
        field="assertion_audience",
        type=click.Choice(ASSERTION_AUDIENCES),
        help="aud of private_key_jwt assertions: issuer (default; RFC 7523bis, FAPI 2.0) or "
        "token_endpoint (for servers that still demand the token URL).",
    ),
    _option("--audience", field="audience", metavar="AUD", help="Audience parameter."),
    _option(
        "--accept-bearer/--refuse-bearer",
        "accept_bearer",
        field="accept_bearer",
        default=None,
        help="Accept a Bearer token when the server does not bind it (default: refuse).",
    ),
    _option(
        "--proofs-ahead/--no-proofs-ahead",
        "proofs_ahead",
        field="proofs_ahead",
        default=None,
        help="Sign the next proof for a repeated method and URL ahead of time (default: on "
        "for a pkcs11: key, off for a PEM key).",
    ),
    _option(
        "--leeway",
        field="leeway",
        metavar="SECONDS",
        type=float,
        help="Renew a token this long before it expires (default 30).",
    ),
    _option(
        "--timeout",
        field="timeout",
        metavar="SECONDS",
        type=float,
        help="HTTP timeout (default 10).",
    ),
    _option(
        "--token-store",
        field="token_store",
        metavar="URL",
        help="Share tokens and nonces with other processes: memory (default), sqlite:PATH "
        "(one host) or redis://[user:password@]host:port/db, rediss://... (many hosts); "
        "prefer the variable or --config for a URL with a password.",
    ),
    _option(
        "--cacert",
        "ca_bundle",
        field="ca_bundle",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="Trust the CA certificates in this PEM file instead of the system's store.",
    ),
)
"""The authorization-server options: what every command that fetches a token needs."""


def warn(message: str) -> None:
    """Print one ``warning:`` line on stderr."""
    click.echo(f"warning: {message}", err=True)


def settings_from_context(ctx: click.Context) -> Settings:
    """Build `Settings` from the command's parameters, the environment and ``--config``.

    Parameters that are not settings (a command's own arguments) are ignored. A secret given
    as an option value works but warns, because other local users can read it in ``ps``.
    """
    # Here, not at the top: pydantic is most of ``dpop --help``'s start-up otherwise.
    from dpop_signer.config import Settings, load_settings

    params = ctx.params
    fields = set(Settings.model_fields) | {f"{name}_file" for name in SECRET_FIELDS}
    options = {name: value for name, value in params.items() if name in fields}
    for name in SECRET_FIELDS:
        if options.get(name) is not None:
            warn(
                f"{option_name(name)} on the command line can be read by other local users; "
                f"use {env_name(name)}, {option_name(name)}-file or the prompt instead"
            )
    for name in ("key", "assertion_key"):
        value = options.get(name)
        if isinstance(value, str) and "pin-value=" in value.lower():
            # The PIN inside the URI (RFC 7512 §2.4) is as visible in `ps` as --pin is.
            warn(
                f"{option_name(name)} with pin-value= on the command line can be read by other "
                f"local users; drop pin-value= and use {env_name('pin')}, "
                f"{option_name('pin')}-file or the prompt instead"
            )
    store = options.get("token_store")
    if isinstance(store, str) and "@" in store.partition("?")[0]:
        # A Redis password in the URL is as visible in `ps` as --client-secret is.
        warn(
            f"{option_name('token_store')} with a password on the command line can be read by "
            f"other local users; set {env_name('token_store')} or put token_store in --config"
        )
    return load_settings(options, config_file=params.get("config"), default_config=True)


def _stdin_is_interactive() -> bool:
    return sys.stdin.isatty() and os.environ.get("DPOP_NO_PROMPT", "") == ""


def _key_needs_pin(ref: str) -> tuple[bool, str]:
    """Whether opening ``ref`` needs a PIN we do not have yet, and how to name it."""
    from dpop_signer.signers import is_pkcs11_ref

    if is_pkcs11_ref(ref):
        try:
            from dpop_signer.signers.pin import ref_brings_pin
            from dpop_signer.signers.pkcs11_uri import parse_pkcs11_uri

            uri = parse_pkcs11_uri(ref)
        except Exception:  # a malformed URI: let load_signer report it properly
            return False, ""
        return not ref_brings_pin(ref), f"PIN for token {uri.token or uri.serial or '?'}"
    try:
        with open(ref, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False, ""
    return b"ENCRYPTED" in head, f"passphrase for {ref}"


def prompt_for_secrets(settings: Settings, *, need_client_secret: bool = False) -> Settings:
    """Ask for a missing PIN (and client secret) with hidden input, when stdin is a terminal.

    Non-interactive runs get no prompt: `load_signer` then raises a `PinError` that says how
    to give the PIN. ``DPOP_NO_PROMPT=1`` turns prompts off. A client with neither a secret
    nor a ``client_auth`` is asked for its secret too; an empty answer makes it a public client.
    """
    if not _stdin_is_interactive():
        return settings
    if settings.key is not None and settings.pin is None:
        needed, label = _key_needs_pin(settings.key)
        if needed:
            pin = click.prompt(label, hide_input=True, err=True)
            settings = settings.with_values("the prompt", pin=pin)
    if need_client_secret and settings.client_secret is None:
        if settings.client_auth in ("client_secret_basic", "client_secret_post"):
            secret = click.prompt(
                f"client secret for {settings.client_id}", hide_input=True, err=True
            )
            settings = settings.with_values("the prompt", client_secret=secret)
        elif settings.client_auth is None and settings.client_id is not None:
            # Nobody said the client is public: ask rather than send no secret and get a bare
            # invalid_client back. An empty answer means "a public client".
            secret = click.prompt(
                f"client secret for {settings.client_id} (Enter: none, a public client)",
                hide_input=True,
                err=True,
                default="",
                show_default=False,
            )
            if secret:
                settings = settings.with_values("the prompt", client_secret=secret)
            else:
                settings = settings.with_values("the prompt", client_auth="none")
    return settings
