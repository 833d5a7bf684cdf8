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
            _fail("interrupted", EXIT_INTERRUPTED)  # click turns ^C into Abort
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


_KEY_KINDS = {
    "ES256": "EC P-256",
    "ES384": "EC P-384",
    "ES512": "EC P-521",
    "EdDSA": "Ed25519",
    "PS256": "RSA-2048",
    "RS256": "RSA-2048",
}
"""What `dpop keygen --alg` makes, for its message."""


@contextlib.contextmanager
def _open_signer(
    ctx: click.Context, *, require: Sequence[str] = (), client: bool = False
) -> Iterator[tuple[Settings, Signer]]:
    settings = settings_from_context(ctx)
    if client and settings.issuer is not None:
        from dpop_signer.discovery import apply_discovery

        # The token endpoint from the issuer's metadata (unless --token-url), read once.
        settings, _ = apply_discovery(settings)
    # Everything missing is reported before a PIN is asked for or a token is touched.
    settings.require("key", *require)
    settings = prompt_for_secrets(settings, need_client_secret=client)
    from dpop_signer.config import build_signer
    from dpop_signer.signers.base import close_signer

    signer = build_signer(settings)
    try:
        if not client and settings.profile is not None:
            _check_key_profile(settings, signer)
        yield settings, signer
    finally:
        close_signer(signer)


def _check_key_profile(settings: Settings, signer: Signer) -> None:
    """The --profile rules a command that only signs can break (the key's algorithm)."""
    from dpop_signer.errors import ConfigError
    from dpop_signer.profiles import profile_violations

    violations = profile_violations(settings, signer=signer, client=False)
    if violations:
        raise ConfigError("; ".join(str(v) for v in violations))


@main.command()
@key_options
@click.option(
    "--alg",
    type=click.Choice(["ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256"]),
    default="ES256",
    show_default=True,
    help="JWS algorithm of the new key: ES256/ES384/ES512 make EC P-256/P-384/P-521, EdDSA "
    "Ed25519, PS256 and RS256 RSA-2048. The key implies its algorithm later, except RS256: "
    "open that key with alg=RS256 in its pkcs11: URI (a PEM RSA key signs PS256).",
)
@click.pass_context
def keygen(ctx: click.Context, /, alg: str = "ES256", **_: object) -> None:
    """Create a new key (P-256 for ES256, the default) and print its JWK thumbprint.

    REF is a PEM file path (written with mode 0600, never overwritten; --pin encrypts it) or a
    pkcs11: URI whose object= label (and id=) the new key pair gets in the token.

    \b
    Examples:
      dpop keygen --key dev-key.pem
      dpop keygen --key dev-ed25519.pem --alg EdDSA
      DPOP_PIN_FILE=pin.txt dpop keygen --key 'pkcs11:token=dpop-dev;object=dpop-es256'
      DPOP_PIN_FILE=pin.txt dpop keygen --alg PS256 --key 'pkcs11:token=dpop-dev;object=dpop-ps256'
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
    signer = generate_key(ref, pin=pin_for(settings, ref), alg=alg)
    try:
        where = getattr(signer, "uri", None) or ref  # a token's URI says alg=RS256 if needed
        click.echo(
            f"created an {_KEY_KINDS[alg]} key for {alg} at {mask_pin_values(where)}", err=True
        )
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


def _auth_and_log(
    settings: Settings, signer: Signer, verbose: bool
) -> tuple[DPoPAuth, SessionLog | None]:
    from urllib.parse import urlsplit

    from dpop_signer.config import build_auth
    from dpop_signer.console import SessionLog
    from dpop_signer.redaction import Redactor

    log = None
    if verbose:
        _verbose_library_log()
        # The log shows what the servers answered; an echo of the secret must not get through.
        secrets = [settings.secret("client_secret"), urlsplit(settings.token_url or "").password]
        redactor = Redactor(secrets, client_id=settings.client_id)
        log = SessionLog(sys.stderr, token_url=settings.token_url, redactor=redactor)
    return build_auth(settings, signer), log


def _client(settings: Settings, log: SessionLog | None) -> httpx.Client:
    """The httpx client of a command: system trust or --cacert, our User-Agent, no redirects."""
    import httpx

    from dpop_signer.tls import ssl_context
    from dpop_signer.tokens import USER_AGENT

    return httpx.Client(
        timeout=settings.timeout,
        verify=ssl_context(settings.ca_bundle),
        headers={"User-Agent": USER_AGENT},
        event_hooks=log.hooks() if log is not None else None,
        follow_redirects=False,  # `dpop request -L` follows them itself, origin by origin
    )


def _no_secret_note(settings: Settings) -> str | None:
    """Why the client authenticated as a public client, when nobody asked for that."""
    from dpop_signer.config_names import ways_to_set

    if settings.client_auth is not None or settings.client_secret is not None:
        return None
    return (
        f"no client secret is configured for client {settings.client_id!r}, so it "
        "authenticated as a public client (client_auth none); to give the secret, "
        f"{ways_to_set('client_secret')}; for a public client give --client-auth none"
    )


@contextlib.contextmanager
def _explain_missing_secret(settings: Settings) -> Iterator[None]:
    """Add what is missing to the server's refusal when no client secret was configured."""
    from dpop_signer.errors import TokenEndpointError

    try:
        yield
    except TokenEndpointError as exc:
        note = _no_secret_note(settings)
        if note is None or exc.error not in ("invalid_client", "unauthorized_client"):
            raise
        raise TokenEndpointError(
            f"{exc.message}; {note}",
            error=exc.error,
            error_description=exc.error_description,
            status=exc.status,
        ) from exc


@main.command()
@key_options
@client_options
@click.option("--bare", is_flag=True, help="Print only the access token (for scripts).")
@click.option("-v", "--verbose", is_flag=True, help="Log the exchange (masked) on stderr.")
@click.pass_context
def token(ctx: click.Context, /, bare: bool, verbose: bool, **_: object) -> None:
    """Fetch a DPoP-bound client_credentials token and print the token response as JSON.

    The response is printed whole (it is what you asked for); --bare prints the access token
    alone. -v logs the exchange on stderr with the token, proof and secrets masked.

    \b
    Examples:
      dpop token --key dev-key.pem --token-url https://as.example/token \\
          --client-id svc --client-secret-file secret.txt --scope read
      TOKEN=$(dpop token --bare)
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    with _open_signer(ctx, require=("token_url", "client_id"), client=True) as (settings, signer):
        auth, log = _auth_and_log(settings, signer, verbose)
        with _client(settings, log) as client, _explain_missing_secret(settings):
            access_token = auth.get_token(client)
        click.echo(access_token.value if bare else json.dumps(access_token.raw, indent=2))


@main.command()
@key_options
@client_options
@click.option("--nonce", metavar="NONCE", help="DPoP nonce the API demanded (RFC 9449 §9).")
@click.argument("method")
@click.argument("url")
@click.pass_context
def headers(ctx: click.Context, /, method: str, url: str, nonce: str | None, **_: object) -> None:
    """Print ready 'Authorization:' and 'DPoP:' header lines for METHOD and URL.

    The token is fetched with client_credentials; the proof is bound to it (ath) and to
    METHOD and URL, so it is good for one request, within the server's iat window. The lines
    fit curl's -H @FILE. They carry the token and a proof: treat them as secrets.

    \b
    Examples:
      dpop headers GET https://api.example/v1/things > h.txt
      curl -H @h.txt https://api.example/v1/things
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.proof import DPoPProofBuilder

    with _open_signer(ctx, require=("token_url", "client_id"), client=True) as (settings, signer):
        auth, _log = _auth_and_log(settings, signer, False)
        with _client(settings, None) as client, _explain_missing_secret(settings):
            access_token = auth.get_token(client)
        lines = [f"Authorization: {access_token.scheme} {access_token.value}"]
        # A Bearer token (--accept-bearer) is sent without a proof (RFC 9449 §7.1).
        if access_token.is_dpop:
            builder = DPoPProofBuilder(signer)
            proof = builder.build(method.upper(), url, access_token=access_token.value, nonce=nonce)
            lines.append(f"DPoP: {proof}")
        click.echo("\n".join(lines))


def _parse_headers(values: Sequence[str]) -> list[tuple[str, str]]:
    headers = []
    for value in values:
        name, sep, content = value.partition(":")
        name = name.strip()
        if not sep or not name or any(c in name for c in " \t\r\n"):
            raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="-H")
        if name.lower() in ("authorization", "dpop"):
            raise click.BadParameter(
                f"{name} is set by dpop from the token and a fresh proof; drop this header",
                param_hint="-H",
            )
        headers.append((name, content.strip()))
    return headers


def _has_header(headers: Sequence[tuple[str, str]], name: str) -> bool:
    return any(k.lower() == name for k, _ in headers)


def _body(
    data: Sequence[str], json_data: Sequence[str], headers: list[tuple[str, str]]
) -> bytes | None:
    """The request body of -d / --json, as curl builds it; adds their Content-Type."""
    if data and json_data:
        raise click.UsageError("-d and --json both give the body; use one of them")
    if data:
        if not _has_header(headers, "content-type"):
            # curl's default for -d, so that scripts written for curl behave the same.
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        # curl joins repeated -d with '&' (form fields), and so do we.
        return b"&".join(_read_data(value, "-d") for value in data)
    if json_data:
        if not _has_header(headers, "content-type"):
            headers.append(("Content-Type", "application/json"))
        if not _has_header(headers, "accept"):
            headers.append(("Accept", "application/json"))
        # curl concatenates repeated --json as they are.
        return b"".join(_read_data(value, "--json") for value in json_data)
    return None


_MAX_REDIRECTS = 20


@main.command()
@click.option("-X", "--request", "method", metavar="METHOD", help="HTTP method (default GET).")
@click.option(
    "-H", "--header", "headers", metavar="'NAME: VALUE'", multiple=True, help="Extra header."
)
@click.option(
    "-d",
    "--data",
    metavar="DATA|@FILE",
    multiple=True,
    help="Request body; @FILE reads a file, @- stdin; repeated, joined with '&'. Implies POST "
    "and a form Content-Type.",
)
@click.option(
    "--json",
    "json_data",
    metavar="DATA|@FILE",
    multiple=True,
    help="JSON request body (sets Content-Type and Accept to application/json). Implies POST.",
)
@click.option("-i", "--include", is_flag=True, help="Print the status line and headers.")
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the body to FILE instead of stdout.",
)
@click.option("-f", "--fail", "fail", is_flag=True, help="On an HTTP error status, print no body.")
@click.option(
    "-L",
    "--location",
    is_flag=True,
    help=f"Follow redirects (up to {_MAX_REDIRECTS}); the token and proofs go to the first "
    "URL's origin only.",
)
@click.option(
    "-s", "--silent", is_flag=True, help="No warnings and no error line for an HTTP status."
)
@click.option("-v", "--verbose", is_flag=True, help="Log the exchanges (masked) on stderr.")
@key_options
@client_options
@click.argument("url")
@click.pass_context
def request(
    ctx: click.Context,
    /,
    url: str,
    method: str | None,
    headers: tuple[str, ...],
    data: tuple[str, ...],
    json_data: tuple[str, ...],
    include: bool,
    output: str | None,
    fail: bool,
    location: bool,
    silent: bool,
    verbose: bool,
    **_: object,
) -> None:
    """Call a DPoP-protected API, like curl: fetch a token, sign, print the response body.

    The token is fetched with client_credentials and reused; every request gets a fresh
    proof; a server's nonce demand (RFC 9449 §8, §9) is answered by retrying once with the
    server's nonce. -v logs the exchanges on stderr with every token, proof, secret, PIN and
    nonce masked. The exit status is 1 when the API answers with 400 or more (see dpop --help).

    With -L, redirects are followed with a fresh proof for each URL; the token and proofs go
    only to the origin of URL, never to another one (a redirect elsewhere is followed without
    them, as curl drops credentials on another host).

    \b
    Examples:
      dpop request https://api.example/v1/things
      dpop request --json '{"name": "x"}' -i https://api.example/v1/things
      dpop request -d a=1 -d b=2 -o reply.json -f https://api.example/v1/form
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    import httpx

    from dpop_signer.redaction import redact_url

    extra_headers = _parse_headers(headers)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise click.BadParameter(f"{redact_url(url)!r}: {exc}", param_hint="URL") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise click.BadParameter(
            f"{redact_url(url)!r} is not an absolute http:// or https:// URL", param_hint="URL"
        )
    body = _body(data, json_data, extra_headers)
    verb = (method or ("POST" if body is not None else "GET")).upper()
    if silent:
        logging.getLogger("dpop_signer").setLevel(logging.ERROR)

    with _open_signer(ctx, require=("token_url", "client_id"), client=True) as (settings, signer):
        auth, log = _auth_and_log(settings, signer, verbose)
        with _client(settings, log) as client, _explain_missing_secret(settings):
            response = _follow(
                client, auth, verb, target, extra_headers, body, location=location, include=include
            )
            ok = response.status_code < 400
            if ok or not fail:
                _write_body(response, output)
    if response.is_redirect and not location and not silent:
        where = redact_url(response.headers.get("location", ""))
        warn(
            f"{verb} {redact_url(target)} answered {response.status_code} redirecting to "
            f"{where or 'nowhere'}; add -L to follow it"
        )
    if not ok:
        if silent:
            sys.exit(EXIT_FAILED)
        _fail(
            f"{response.request.method} {redact_url(response.url)} answered "
            f"{response.status_code} {response.reason_phrase}"
        )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _follow(
    client: httpx.Client,
    auth: DPoPAuth,
    verb: str,
    target: httpx.URL,
    headers: list[tuple[str, str]],
    body: bytes | None,
    *,
    location: bool,
    include: bool,
) -> httpx.Response:
    """Send the request, and with ``location`` follow its redirects (RFC 9110 §15.4)."""
    origin = _origin(target)
    url = target
    for _hop in range(_MAX_REDIRECTS + 1):
        # The token and a proof only for the origin the user named: a redirect must not hand
        # them to another server (a proof for the new URL would still carry the token's ath).
        hop_auth = auth if _origin(url) == origin else None
        response = client.request(verb, url, headers=headers, content=body, auth=hop_auth)
        if not (location and response.is_redirect and response.next_request is not None):
            if include:
                _write_head(response)
            return response
        if include:
            _write_head(response)
            sys.stdout.write("\n")
        following = response.next_request
        if following.method != verb:  # 303, and 301/302 after POST: GET without the body
            verb, body = following.method, None
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
        url = following.url
    raise click.ClickException(
        f"more than {_MAX_REDIRECTS} redirects from {target.copy_with(query=None)}; the "
        "server redirects in a loop"
    )


def _write_head(response: httpx.Response) -> None:
    from dpop_signer.redaction import mask

    out = sys.stdout
    out.write(f"{response.http_version} {response.status_code} {response.reason_phrase}\n")
    for name, value in response.headers.multi_items():
        shown = mask(value) if name.lower() in ("dpop-nonce", "set-cookie") else value
        out.write(f"{name}: {shown}\n")
    out.write("\n")
    out.flush()


def _write_body(response: httpx.Response, output: str | None) -> None:
    content = response.read()
    if output is not None and output != "-":
        try:
            with open(output, "wb") as f:
                f.write(content)
        except OSError as exc:
            raise click.UsageError(f"-o {output!r} cannot be written: {exc.strerror}") from None
        return
    sys.stdout.buffer.write(content)
    if content and not content.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()


@main.command()
@key_options
@client_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report instead of lines.")
@click.pass_context
def doctor(ctx: click.Context, /, as_json: bool, **_: object) -> None:
    """Check the key, the token and the authorization server, one step at a time.

    Prints a ✓ or ✗ line per step (module loads, token present, login, key found, EC P-256,
    CKM_ECDSA offered, sign and verify, issuer metadata with --issuer, token endpoint reachable,
    discovery advertises the key's algorithm, client authentication offered, assertion
    audience, one line per --profile rule, a DPoP token bound to this key comes back) with the
    fix for each failure; --json prints
    {"ok": ..., "steps": [{"step", "status", "detail"}, ...]} instead. A wrong PIN is never
    retried. The exit status is 1 when any step fails.

    \b
    Examples:
      dpop doctor --config dpop.toml
      dpop doctor --issuer https://as.example --client-auth private_key_jwt --profile fapi2
      dpop doctor --json | jq '.steps[] | select(.status == "fail")'
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.doctor import run_doctor

    settings = prompt_for_secrets(settings_from_context(ctx), need_client_secret=True)
    ok = run_doctor(settings, out=sys.stdout, as_json=as_json)
    if not ok:
        sys.exit(EXIT_FAILED)


@main.command("config")
@key_options
@client_options
@click.pass_context
def config_command(ctx: click.Context, /, **_: object) -> None:
    """Print the effective settings and where each came from, secrets masked.

    Each line is a TOML line (so it can start a config file) with its source: an option, a
    DPOP_* variable, the config file and key, or the default. Secrets show their length only.
    Unset settings are listed as comments.

    \b
    Examples:
      dpop config
      dpop config --config /etc/dpop/config.toml --scope read
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.config import Settings
    from dpop_signer.config_names import SECRET_FIELDS
    from dpop_signer.redaction import mask

    settings = settings_from_context(ctx)
    config = settings.config_file
    if config is None:
        click.echo("# no config file (none given, none at the default locations)")
    else:
        click.echo(f"# config file: {config[0]} (named by {config[1]})")
    shown = settings.model_dump(mode="json")
    for name in Settings.model_fields:
        value = shown[name]
        if name in SECRET_FIELDS and getattr(settings, name) is not None:
            value = mask(settings.secret(name) or "")
        if value is None or value == []:
            click.echo(f"# {name} is not set")
            continue
        click.echo(f"{name} = {json.dumps(value)}  # from {settings.source_of(name)}")


@main.command()
@click.option(
    "--key",
    metavar="REF",
    help="Key to use (default: DPOP_KEY, else a temporary PEM key). [env: DPOP_KEY]",
)
@click.option("--nonce/--no-nonce", default=True, help="Servers demand DPoP nonces (default on).")
@click.pass_context
def demo(ctx: click.Context, key: str | None, nonce: bool) -> None:
    """Run the whole DPoP flow against local servers and show every exchange (masked).

    Starts an authorization server and a resource server on free 127.0.0.1 ports, fetches a
    DPoP-bound token with the development SoftHSM2 key (DPOP_KEY, with DPOP_PIN or
    DPOP_PIN_FILE, as `make demo` sets them) or a temporary PEM key, calls the API and prints
    the session log and the API's response.

    \b
    Examples:
      make demo
      dpop demo --key dev-key.pem
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.demo import run_demo

    run_demo(key=key, require_nonce=nonce, out=sys.stdout)


if __name__ == "__main__":  # pragma: no cover - `python -m dpop_signer.cli`
    main()
