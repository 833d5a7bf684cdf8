"""The ``dpop`` command: sign DPoP proofs with an HSM-held key, fetch tokens, call APIs.

The CLI is thin on purpose: each command turns its options into `Settings`
(`dpop_signer.config`), asks the library for a signer or a `DPoPAuth`, and prints. All the
protocol work lives in the library, so what the CLI does, a program can do too.

Errors never end in a traceback: every `DPoPSignerError`, HTTP transport error and usage error
is caught here, at the edge, and printed as one ``error: ...`` line on stderr, in the words of
the command line (`dpop_signer.cli_errors.cli_message`). The exit status says what failed and is
the same for every command (`dpop_signer.cli_errors`): 1 an HTTP error status from the API or a
failed doctor check, 2 usage or configuration, 3 the key or its token, 4 the authorization
server refused, 5 network or TLS, 130 interrupted.

Heavy modules (pydantic through `dpop_signer.config`, cryptography, httpx, python-pkcs11,
starlette) are imported inside the commands that need them, so ``dpop --help`` starts about as
fast as click itself (BENCHMARKS.md, start-up).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from dpop_signer import __version__
from dpop_signer.cli_errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    cli_message,
    exit_code_for,
)
from dpop_signer.cli_options import (
    client_options,
    key_options,
    prompt_for_secrets,
    settings_from_context,
    warn,
)
from dpop_signer.errors import DPoPSignerError

if TYPE_CHECKING:
    import httpx

    from dpop_signer.auth import DPoPAuth
    from dpop_signer.config import Settings
    from dpop_signer.console import SessionLog
    from dpop_signer.signers.base import Signer

__all__ = ["main"]

# Commands that live elsewhere and are imported only when used or listed: the service pulls in
# starlette and uvicorn, which `dpop thumbprint` should not pay for.
_LAZY_COMMANDS = {
    "serve": "dpop_signer.service.commands:serve",
    "proxy": "dpop_signer.service.commands:proxy",
}


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    from dpop_signer.redaction import scrub

    # Messages are built clean; scrub is the last net (a PIN in a key URI, a JWS, user info).
    click.echo(f"error: {' '.join(scrub(message).split())}", err=True)
    sys.exit(code)


class _LibraryLogLines(logging.Handler):
    """Library log records as ``warning:`` lines (or ``*`` notes with -v) on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.verbose = False

    def emit(self, record: logging.LogRecord) -> None:
        from dpop_signer.cli_errors import cli_words
        from dpop_signer.redaction import scrub

        # The backoff note is for long-running processes; a one-shot command reports the
        # failure itself in its error line.
        if not self.verbose and str(record.msg).startswith("token request to %s failed ("):
            return
        text = " ".join(cli_words(scrub(record.getMessage())).split())
        prefix = "warning: " if record.levelno >= logging.WARNING else "* "
        click.echo(prefix + text, err=True)


_LOG_LINES = _LibraryLogLines()


def _verbose_library_log() -> None:
    """Show the library's INFO records (token fetches, nonce retries) as ``*`` lines."""
    _LOG_LINES.verbose = True
    _LOG_LINES.setLevel(logging.INFO)
    logging.getLogger("dpop_signer").setLevel(logging.INFO)


def _command_options(command: click.Command | None) -> frozenset[str]:
    if command is None:
        return frozenset()
    return frozenset(
        opt
        for param in command.params
        for opt in (*param.opts, *param.secondary_opts)
        if opt.startswith("--")
    )


class DpopGroup(click.Group):
    """The ``dpop`` group: lazily registered service commands and one-line errors."""

    _invoked: click.Command | None = None

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Built-in commands plus the service commands that are installed."""
        names = set(super().list_commands(ctx))
        names.update(name for name in _LAZY_COMMANDS if self._load_lazy(name) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A built-in command, or a service command imported on first use."""
        return super().get_command(ctx, cmd_name) or self._load_lazy(cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """Resolve as click does, remembering the command: its errors name its options."""
        name, command, rest = super().resolve_command(ctx, args)
        self._invoked = command
        return name, command, rest

    def _load_lazy(self, name: str) -> click.Command | None:
        target = _LAZY_COMMANDS.get(name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "the service is not there" means "no such command"; a missing dependency
            # inside it is a real error and must be seen.
            if exc.name and module_name.startswith(exc.name):
                return None
            raise
        command = getattr(module, attr, None)
        return command if isinstance(command, click.Command) else None

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        """Run the CLI, turning every expected failure into one ``error:`` line."""
        extra.pop("standalone_mode", None)
        library_log = logging.getLogger("dpop_signer")
        if _LOG_LINES not in library_log.handlers:
            library_log.addHandler(_LOG_LINES)
            library_log.propagate = False  # no second copy through Python's last resort
        try:
            result = super().main(args, prog_name or "dpop", standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            # `dpop` alone: the help as `dpop --help` prints it, but as a usage error.
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(exc.format_message() + hint, EXIT_USAGE)
        except click.Abort:
            _fail("aborted", EXIT_INTERRUPTED)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`dpop request ... | head`): not worth an error line, and
            # Python must not complain again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_FAILED)
        except Exception as exc:
            if not _is_expected(exc):
                raise
            _fail(cli_message(exc, _command_options(self._invoked)), exit_code_for(exc))
        sys.exit(result if isinstance(result, int) else 0)


def _is_expected(exc: Exception) -> bool:
    """Errors the CLI reports in one line: ours, and httpx's (network, URLs)."""
    if isinstance(exc, DPoPSignerError):
        return True
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.HTTPError | httpx.InvalidURL)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_MAIN_HELP = f"""Sign OAuth 2.0 DPoP proofs (RFC 9449) with an ES256 key that stays in its token.

The key is a PEM file (development) or a PKCS#11 URI naming a key in an HSM, a YubiHSM 2 or
SoftHSM2. Settings come from options, then DPOP_* environment variables, then a TOML file
(--config FILE, DPOP_CONFIG, else $XDG_CONFIG_HOME/dpop/config.toml or /etc/dpop/config.toml),
then defaults; `dpop config` shows each one and where it came from.

\b
Examples:
  dpop demo
  dpop keygen --key dev-key.pem
  export DPOP_KEY='pkcs11:token=prod;object=dpop-es256' DPOP_PIN_FILE=/run/secrets/pin
  dpop request --token-url https://as.example/token --client-id svc \\
      https://api.example/v1/things
  dpop doctor --config dpop.toml

{EXIT_STATUS_HELP}

\b
Shell completion (bash; zsh_source or fish_source for those shells):
  eval "$(_DPOP_COMPLETE=bash_source dpop)"
"""


@click.group(
    cls=DpopGroup, context_settings=CONTEXT_SETTINGS, help=_MAIN_HELP, no_args_is_help=True
)
@click.version_option(__version__, "-V", "--version", prog_name="dpop")
def main() -> None:
    """Sign OAuth 2.0 DPoP proofs (RFC 9449) with an ES256 key that stays in its token."""


@contextlib.contextmanager
def _open_signer(
    ctx: click.Context, *, require: Sequence[str] = (), client: bool = False
) -> Iterator[tuple[Settings, Signer]]:
    settings = settings_from_context(ctx)
    # Everything missing is reported before a PIN is asked for or a token is touched.
    settings.require("key", *require)
    settings = prompt_for_secrets(settings, need_client_secret=client)
    from dpop_signer.config import build_signer
    from dpop_signer.signers.base import close_signer

    signer = build_signer(settings)
    try:
        yield settings, signer
    finally:
        close_signer(signer)


@main.command()
@key_options
@click.pass_context
def keygen(ctx: click.Context, /, **_: object) -> None:
    """Create a new P-256 key and print its JWK thumbprint.

    REF is a PEM file path (written with mode 0600, never overwritten; --pin encrypts it) or a
    pkcs11: URI whose object= label (and id=) the new key pair gets in the token.

    \b
    Examples:
      dpop keygen --key dev-key.pem
      DPOP_PIN_FILE=pin.txt dpop keygen --key 'pkcs11:token=dpop-dev;object=dpop-es256'
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.config import pin_for
    from dpop_signer.jwk import jwk_thumbprint
    from dpop_signer.redaction import mask_pin_values
    from dpop_signer.signers import close_signer, generate_key, is_pkcs11_ref

    settings = settings_from_context(ctx)
    settings.require("key")
    ref = str(settings.key)
    if is_pkcs11_ref(ref):
        settings = prompt_for_secrets(settings)
    signer = generate_key(ref, pin=pin_for(settings, ref))
    try:
        click.echo(f"created a P-256 key at {mask_pin_values(ref)}", err=True)
        click.echo(jwk_thumbprint(signer.public_jwk))
    finally:
        close_signer(signer)


@main.command()
@key_options
@click.pass_context
def jwk(ctx: click.Context, /, **_: object) -> None:
    """Print the key's public JWK (kty, crv, x, y) as JSON.

    \b
    Example:
      dpop jwk --key 'pkcs11:token=dpop-dev;object=dpop-es256'
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    with _open_signer(ctx) as (_settings, signer):
        click.echo(json.dumps(signer.public_jwk, indent=2))


@main.command()
@key_options
@click.pass_context
def thumbprint(ctx: click.Context, /, **_: object) -> None:
    """Print the key's RFC 7638 JWK thumbprint (the jkt an AS binds tokens to).

    \b
    Example:
      dpop thumbprint --key dev-key.pem
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.jwk import jwk_thumbprint

    with _open_signer(ctx) as (_settings, signer):
        click.echo(jwk_thumbprint(signer.public_jwk))


def _read_value(value: str | None, what: str) -> str | None:
    """``@FILE`` reads FILE, ``@-`` reads stdin; anything else is the value itself."""
    if value is None or not value.startswith("@"):
        return value
    data = _read_data(value, what)
    return data.decode("utf-8").strip()


def _read_data(value: str, what: str) -> bytes:
    if not value.startswith("@"):
        return value.encode("utf-8")
    path = value[1:]
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise click.UsageError(f"{what} file {path!r} cannot be read: {exc.strerror}") from None


@main.command()
@key_options
@click.option(
    "--access-token",
    metavar="TOKEN|@FILE",
    envvar="DPOP_ACCESS_TOKEN",
    help="Bind the proof to this token (adds ath); @FILE reads it, @- reads stdin. "
    "[env: DPOP_ACCESS_TOKEN]",
)
@click.option("--nonce", metavar="NONCE", help="Server-provided DPoP nonce to include.")
@click.argument("method")
@click.argument("url")
@click.pass_context
def proof(
    ctx: click.Context,
    /,
    method: str,
    url: str,
    access_token: str | None,
    nonce: str | None,
    **_: object,
) -> None:
    """Print one DPoP proof for METHOD and URL.

    The proof carries a fresh jti and iat, htm=METHOD and htu=URL without query and fragment
    (RFC 9449 §4.2); with --access-token it also carries ath, with --nonce the nonce.

    \b
    Examples:
      dpop proof --key dev-key.pem GET https://api.example/v1/things
      curl -H "DPoP: $(dpop proof POST https://as.example/token)" ...
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.proof import DPoPProofBuilder

    token = _read_value(access_token, "--access-token")
    with _open_signer(ctx) as (_settings, signer):
        builder = DPoPProofBuilder(signer)
        click.echo(builder.build(method.upper(), url, access_token=token, nonce=nonce))


