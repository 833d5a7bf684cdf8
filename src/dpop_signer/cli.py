"""The ``dpop`` command: sign DPoP proofs with an HSM-held key, fetch tokens, call APIs.

The CLI is thin on purpose: each command turns its options into `Settings`
(`dpop_signer.config`), asks the library for a signer or a `DPoPAuth`, and prints. All the
protocol work lives in the library, so what the CLI does, a program can do too.

Errors never end in a traceback: every `DPoPSignerError`, HTTP transport error and usage error
is caught here, at the edge, and printed as one ``error: ...`` line on stderr. Exit status 2
means the command line or configuration is wrong, 1 that something failed at run time
(including an HTTP status of 400 or more from ``dpop request``).

Heavy modules (pydantic through `dpop_signer.config`, cryptography, httpx, python-pkcs11,
starlette) are imported inside the commands that need them, so ``dpop --help`` starts about as
fast as click itself (BENCHMARKS.md, start-up).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from dpop_signer import __version__
from dpop_signer.cli_options import (
    client_options,
    key_options,
    prompt_for_secrets,
    settings_from_context,
)
from dpop_signer.errors import ConfigError, DPoPSignerError

if TYPE_CHECKING:
    import httpx

    from dpop_signer.auth import DPoPAuth
    from dpop_signer.config import Settings
    from dpop_signer.console import SessionLog
    from dpop_signer.signers.base import Signer

__all__ = ["main"]

EXIT_RUNTIME = 1
EXIT_USAGE = 2

# Commands that live elsewhere and are imported only when used or listed: the service pulls in
# starlette and uvicorn, which `dpop thumbprint` should not pay for.
_LAZY_COMMANDS = {
    "serve": "dpop_signer.service.commands:serve",
    "proxy": "dpop_signer.service.commands:proxy",
}


def _fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _httpx_error_message(exc: Exception) -> str | None:
    """A one-line description of an httpx error, or None when ``exc`` is not one."""
    httpx = sys.modules.get("httpx")
    if httpx is None or not isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
        return None
    try:
        request = exc.request if isinstance(exc, httpx.RequestError) else None
    except RuntimeError:  # httpx raises when the error was created without a request
        request = None
    where = f" {request.method} {request.url.copy_with(query=None)}" if request else ""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out on{where}; raise --timeout or check the server"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect for{where}: {exc}; check the URL and that the server is running"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"bad URL: {exc}; give an absolute http:// or https:// URL"
    return f"HTTP error on{where}: {exc or type(exc).__name__}"


class DpopGroup(click.Group):
    """The ``dpop`` group: lazily registered service commands and one-line errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Built-in commands plus the service commands that are installed."""
        names = set(super().list_commands(ctx))
        names.update(name for name in _LAZY_COMMANDS if self._load_lazy(name) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A built-in command, or a service command imported on first use."""
        return super().get_command(ctx, cmd_name) or self._load_lazy(cmd_name)

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
        try:
            result = super().main(args, prog_name or "dpop", standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(exc.format_message() + hint, EXIT_USAGE)
        except click.Abort:
            _fail("aborted", 130)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except ConfigError as exc:
            _fail(str(exc), EXIT_USAGE)
        except DPoPSignerError as exc:
            _fail(str(exc), EXIT_RUNTIME)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:
            # The reader went away (`dpop request ... | head`): not worth an error line, and
            # Python must not complain again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_RUNTIME)
        except Exception as exc:
            message = _httpx_error_message(exc)
            if message is None:
                raise
            _fail(message, EXIT_RUNTIME)
        sys.exit(result if isinstance(result, int) else 0)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=DpopGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="dpop")
def main() -> None:
    """Sign OAuth 2.0 DPoP proofs (RFC 9449) with an ES256 key that stays in its token.

    The key is a PEM file (development) or a PKCS#11 URI naming a key in an HSM, a YubiHSM 2
    or SoftHSM2. Settings come from options, then DPOP_* environment variables, then
    --config FILE (TOML), then defaults.

    \b
    Examples:
      dpop demo
      dpop keygen --key dev-key.pem
      export DPOP_KEY='pkcs11:token=prod;object=dpop-es256' DPOP_PIN_FILE=/run/secrets/pin
      dpop request --token-url https://as.example/token --client-id svc \\
          https://api.example/v1/things
      dpop doctor --config dpop.toml
    """  # noqa: D301 - click's \b keeps the examples unwrapped


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
    from dpop_signer.console import mask_uri
    from dpop_signer.jwk import jwk_thumbprint
    from dpop_signer.signers import close_signer, generate_key, is_pkcs11_ref

    settings = settings_from_context(ctx)
    settings.require("key")
    ref = str(settings.key)
    if is_pkcs11_ref(ref):
        settings = prompt_for_secrets(settings)
    signer = generate_key(ref, pin=pin_for(settings, ref))
    try:
        click.echo(f"created a P-256 key at {mask_uri(ref)}", err=True)
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
    from dpop_signer.config import build_auth
    from dpop_signer.console import SessionLog

    log = SessionLog(sys.stderr, token_url=settings.token_url) if verbose else None
    return build_auth(settings, signer), log


def _client(settings: Settings, auth: Any, log: SessionLog | None) -> httpx.Client:
    import httpx

    return httpx.Client(
        auth=auth,
        timeout=settings.timeout,
        event_hooks=log.hooks() if log is not None else None,
        follow_redirects=False,
    )


@main.command()
@key_options
@client_options
@click.option("-v", "--verbose", is_flag=True, help="Log the exchange (masked) on stderr.")
@click.pass_context
def token(ctx: click.Context, /, verbose: bool, **_: object) -> None:
    """Fetch a DPoP-bound client_credentials token and print the token response as JSON.

    The response is printed whole (it is what you asked for); -v logs the exchange on stderr
    with the token, proof and secrets masked.

    \b
    Example:
      dpop token --key dev-key.pem --token-url https://as.example/token \\
          --client-id svc --client-secret-file secret.txt --scope read
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    with _open_signer(ctx, require=("token_url", "client_id"), client=True) as (settings, signer):
        auth, log = _auth_and_log(settings, signer, verbose)
        with _client(settings, auth, log) as client:
            access_token = auth.get_token(client)
        click.echo(json.dumps(access_token.raw, indent=2))


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


@main.command()
@click.option("-X", "--request", "method", metavar="METHOD", help="HTTP method (default GET).")
@click.option(
    "-H", "--header", "headers", metavar="'NAME: VALUE'", multiple=True, help="Extra header."
)
@click.option(
    "-d",
    "--data",
    metavar="DATA|@FILE",
    help="Request body; @FILE reads a file, @- stdin. Implies POST.",
)
@click.option("-i", "--include", is_flag=True, help="Print the status line and headers.")
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
    data: str | None,
    include: bool,
    verbose: bool,
    **_: object,
) -> None:
    """Call a DPoP-protected API, like curl: fetch a token, sign, print the response body.

    The token is fetched with client_credentials and reused; every request gets a fresh
    proof; nonce demands (RFC 9449 §8, §9) are answered once. -v logs both exchanges on stderr
    with every token, proof, secret, PIN and nonce masked. The exit status is 1 when the API
    answers with 400 or more.

    \b
    Examples:
      dpop request https://api.example/v1/things
      dpop request -X POST -H 'Content-Type: application/json' -d @body.json -i \\
          https://api.example/v1/things
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    import httpx

    extra_headers = _parse_headers(headers)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise click.BadParameter(f"{url!r}: {exc}", param_hint="URL") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise click.BadParameter(
            f"{url!r} is not an absolute http:// or https:// URL", param_hint="URL"
        )
    body = _read_data(data, "-d") if data is not None else None
    verb = (method or ("POST" if body is not None else "GET")).upper()
    if body is not None and not any(k.lower() == "content-type" for k, _ in extra_headers):
        # curl's default for -d, so that scripts written for curl behave the same.
        extra_headers.append(("Content-Type", "application/x-www-form-urlencoded"))

    with _open_signer(ctx, require=("token_url", "client_id"), client=True) as (settings, signer):
        auth, log = _auth_and_log(settings, signer, verbose)
        with _client(settings, auth, log) as client:
            response = client.request(verb, target, headers=extra_headers, content=body)
            _print_response(response, include=include)
    if response.status_code >= 400:
        _fail(
            f"{verb} {target.copy_with(query=None)} answered {response.status_code} "
            f"{response.reason_phrase}"
        )


def _print_response(response: httpx.Response, *, include: bool) -> None:
    from dpop_signer.console import mask

    out = sys.stdout
    if include:
        out.write(f"{response.http_version} {response.status_code} {response.reason_phrase}\n")
        for name, value in response.headers.multi_items():
            shown = mask(value) if name.lower() in ("dpop-nonce", "set-cookie") else value
            out.write(f"{name}: {shown}\n")
        out.write("\n")
    out.flush()
    content = response.read()
    sys.stdout.buffer.write(content)
    if content and not content.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()


@main.command()
@key_options
@client_options
@click.pass_context
def doctor(ctx: click.Context, /, **_: object) -> None:
    """Check the key, the token and the authorization server, one step at a time.

    Prints a ✓ or ✗ line per step (module loads, token present, login, key found, EC P-256,
    CKM_ECDSA offered, sign and verify, token endpoint reachable, discovery advertises ES256,
    a DPoP token bound to this key comes back) with the fix for each failure. A wrong PIN is
    never retried. The exit status is 1 when any step fails.

    \b
    Example:
      dpop doctor --config dpop.toml
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.doctor import run_doctor

    settings = prompt_for_secrets(settings_from_context(ctx), need_client_secret=True)
    ok = run_doctor(settings, out=sys.stdout)
    if not ok:
        sys.exit(EXIT_RUNTIME)


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
    DPoP-bound token with the development SoftHSM2 key (DPOP_KEY, as `make demo` sets it) or a
    temporary PEM key, calls the API and prints the session log and the API's response.

    \b
    Examples:
      make demo
      dpop demo --key dev-key.pem
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.demo import run_demo

    run_demo(key=key, require_nonce=nonce, out=sys.stdout)


if __name__ == "__main__":  # pragma: no cover - `python -m dpop_signer.cli`
    main()
