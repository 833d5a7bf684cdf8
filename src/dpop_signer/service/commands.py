"""The click commands ``dpop serve`` and ``dpop proxy`` (registered lazily by `dpop_signer.cli`).

They stay thin: settings come from `dpop_signer.cli_options` (options, ``DPOP_*`` variables,
``--config``), objects from `dpop_signer.config` (`build_signer`, `build_auth`); this module
only adds the service's own safety rules and hands everything to the ASGI applications.

The safety rules, checked before anything listens:

- TCP listens on loopback only, unless ``--allow-remote``;
- TCP needs ``--api-key-file``: any local process, and any web page through DNS rebinding, can
  reach a loopback port. ``--allow-unauthenticated`` waives that on loopback TCP only (never
  with ``--allow-remote``). A unix socket (mode 0600) is protected by file permissions and
  needs no key, though it checks one if given.

On ``SIGHUP`` both re-read their settings the same way (`_reload`) and swap in the new key,
PIN, client secret and API keys (`dpop_signer.service.reload`); the address, origins and
upstream stay as they were at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dpop_signer.cli_options import (
    client_options,
    key_options,
    prompt_for_secrets,
    settings_from_context,
)
from dpop_signer.errors import ConfigError

if TYPE_CHECKING:
    from dpop_signer.config import Settings
    from dpop_signer.service.metrics import Metrics
    from dpop_signer.service.reload import KeyBundle
    from dpop_signer.service.runner import ConnectionLimits
    from dpop_signer.service.security import ApiKeys, Listen

__all__ = ["proxy", "serve"]

DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_PROXY_LISTEN = "127.0.0.1:8788"

_listen_option = click.option(
    "--listen",
    metavar="ADDR",
    help="127.0.0.1:PORT, [::1]:PORT or unix:PATH (port 0 picks a free port). [env: DPOP_LISTEN]",
)
_api_key_option = click.option(
    "--api-key-file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="File with the API key(s) callers must present, one per line. [env: DPOP_API_KEY_FILE]",
)
_remote_option = click.option(
    "--allow-remote",
    is_flag=True,
    default=None,
    help="Allow a non-loopback TCP address (requires --api-key-file). [env: DPOP_ALLOW_REMOTE]",
)
_unauthenticated_option = click.option(
    "--allow-unauthenticated",
    is_flag=True,
    default=False,
    help="Serve loopback TCP without an API key: every local process may then use the key.",
)
_workers_option = click.option(
    "--workers",
    metavar="N",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Serve with N processes on one socket, each with its own HSM session.",
)
_probe_interval_option = click.option(
    "--probe-interval",
    metavar="SECONDS",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Sign a health probe when the key has not signed for SECONDS, so /healthz notices a "
    "lost key without traffic; 0 turns probes off.",
)
_read_timeout_option = click.option(
    "--read-timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0.1, max=3600),
    default=10.0,
    show_default=True,
    help="A caller must send its request headers within this time, and may pause its body no "
    "longer; slower connections are closed.",
)
_max_connections_option = click.option(
    "--max-connections",
    metavar="N",
    type=click.IntRange(min=1),
    default=None,
    help="Most open connections; a new one evicts the longest-idle. [default: what the "
    "open-files limit (ulimit -n) leaves room for]",
)
_log_level_option = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Log level (JSON lines on stderr).",
)


def _prepare(
    ctx: click.Context, default_listen: str, allow_unauthenticated: bool, log_level: str
) -> tuple[Settings, Listen, ApiKeys | None]:
    from dpop_signer.service.logs import configure_logging
    from dpop_signer.service.security import ApiKeys, parse_listen

    settings = prompt_for_secrets(settings_from_context(ctx), need_client_secret=True)
    listen = parse_listen(settings.listen or default_listen)
    if not listen.is_loopback and not settings.allow_remote:
        raise ConfigError(
            f"--listen {listen.describe()} is not a loopback address; give --allow-remote (with "
            "--api-key-file, and TLS in front) if other machines really must reach the key"
        )
    api_keys = ApiKeys.from_file(settings.api_key_file) if settings.api_key_file else None
    if api_keys is None and not listen.is_unix:
        if settings.allow_remote or not listen.is_loopback:
            raise ConfigError("--allow-remote needs --api-key-file")
        if not allow_unauthenticated:
            raise ConfigError(
                f"listening on TCP {listen.describe()} needs --api-key-file (every local "
                "process can reach a loopback port); use --listen unix:PATH, or give "
                "--allow-unauthenticated to accept that risk"
            )
    configure_logging(log_level)
    return settings, listen, api_keys


def _open_key(settings: Settings, metrics: Metrics) -> KeyBundle:
    """The key named by ``settings``, and the `DPoPAuth` on it when a token endpoint is set."""
    from dpop_signer.config import build_auth, build_signer
    from dpop_signer.service.reload import KeyBundle
    from dpop_signer.service.signer import ServiceSigner

    signer = ServiceSigner(lambda: build_signer(settings), metrics=metrics)
    try:
        wants_tokens = settings.token_url is not None or settings.issuer is not None
        auth = build_auth(settings, signer) if wants_tokens else None
    except BaseException:
        signer.close()
        raise
    return KeyBundle(signer, auth)


def _reload(
    ctx: click.Context, started: Settings, api_keys: ApiKeys | None, metrics: Metrics
) -> tuple[KeyBundle, ApiKeys | None]:
    """Read the settings again as at start (no prompts: a reload has no terminal)."""
    from dpop_signer.service.security import ApiKeys

    settings = settings_from_context(ctx)
    if settings.token_store is None and started.source_of("token_store") == _WORKERS_STORE:
        # The workers' default store stays: a reload must not split them onto memory.
        settings = settings.with_values(_WORKERS_STORE, token_store=started.token_store)
    if settings.pin is None and settings.key == started.key and started.pin is not None:
        # A PIN typed at the prompt cannot be read again; it stays while the key does.
        settings = settings.with_values(started.source_of("pin"), pin=started.pin)
    fresh = ApiKeys.from_file(settings.api_key_file) if settings.api_key_file else None
    if (fresh is None) != (api_keys is None):
        raise ConfigError(
            "adding or removing --api-key-file needs a restart; the running service keeps its "
            "API keys"
        )
    if started.token_url is not None and started.issuer is None:
        settings.require("token_url", "client_id")
    return _open_key(settings, metrics), fresh


def _token_counter(settings: Settings, metrics: Metrics) -> Callable[[Any], Any]:
    import httpx

    token_url = httpx.URL(settings.token_url) if settings.token_url else None

    async def count(response: httpx.Response) -> None:
        url = response.request.url
        if token_url is not None and (url.scheme, url.host, url.port, url.path) == (
            token_url.scheme,
            token_url.host,
            token_url.port,
            token_url.path,
        ):
            metrics.token_requests[str(response.status_code)] += 1

    return count


@click.command()
@_listen_option
@_api_key_option
@click.option(
    "--allow-origin",
    metavar="ORIGIN",
    multiple=True,
    help="Make proofs only for this origin (https://api.example); repeatable. "
    "[env: DPOP_ALLOW_ORIGIN]",
)
@_remote_option
@_unauthenticated_option
@_workers_option
@_probe_interval_option
@_read_timeout_option
@_max_connections_option
@_log_level_option
@key_options
@client_options
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    allow_unauthenticated: bool,
    workers: int,
    probe_interval: float,
    read_timeout: float,
    max_connections: int | None,
    log_level: str,
    **_: object,
) -> None:
    """Serve DPoP proofs and headers over HTTP to local programs.

    The key and the PIN stay in this process; callers get proofs (POST /v1/proof), the public
    key (GET /v1/jwk) and, with --token-url and --client-id, ready-made Authorization and DPoP
    headers (POST /v1/headers). No endpoint signs arbitrary bytes. TCP needs an API key file;
    a unix socket is created mode 0600. Stops cleanly on SIGTERM.

    \b
    Examples:
      dpop serve --listen unix:/run/dpop/dpop.sock --key 'pkcs11:token=prod;object=dpop'
      dpop serve --listen 127.0.0.1:8787 --api-key-file /etc/dpop/api-key \\
          --token-url https://as.example/token --client-id svc \\
          --allow-origin https://api.example
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.service.metrics import Metrics
    from dpop_signer.service.runner import ConnectionLimits
    from dpop_signer.service.security import parse_origins

    settings, listen, api_keys = _prepare(ctx, DEFAULT_LISTEN, allow_unauthenticated, log_level)
    origins = parse_origins(settings.allow_origin)
    if settings.token_url is not None or settings.client_id is not None:
        # With --issuer, discovery finds the token endpoint.
        settings.require(*(("client_id",) if settings.issuer else ("token_url", "client_id")))
    settings, metrics_dir, sock = _prepare_workers(settings, workers, listen)

    def run(index: int | None) -> bool:
        from dpop_signer.service.app import ServiceState, create_signer_app
        from dpop_signer.service.workers import SharedMetrics

        metrics = Metrics()
        bundle = _open_key(settings, metrics)
        try:
            state = ServiceState(
                key=bundle,
                api_keys=api_keys,
                allowed_origins=origins,
                metrics=metrics,
                make_client=_client_factory(settings, metrics),
                loopback_only=not listen.is_unix and not settings.allow_remote,
                probe_interval=probe_interval,
                shared_metrics=None
                if index is None
                else SharedMetrics(metrics_dir, index, metrics),
            )
        except BaseException:
            bundle.close()
            raise
        return _serve_worker(
            ctx, settings, api_keys, metrics, state, create_signer_app(state), listen, sock,
            index, ConnectionLimits(read_timeout, max_connections),
            mode="serve",
            jkt=bundle.jkt,
            api_key=api_keys is not None,
            allowed_origins=sorted(origins),
            token_endpoint=settings.token_url is not None or settings.issuer is not None,
        )  # fmt: skip

    if not _run(workers, run, listen, sock, metrics_dir):
        raise click.ClickException("the service failed to start; see the log lines above")


def _prepare_workers(
    settings: Settings, workers: int, listen: Listen
) -> tuple[Settings, Path, Any]:
    """Settings with the workers' default store, their scratch directory, the bound socket.

    With ``--workers`` the key is opened once here and closed, so a wrong key or PIN is tried
    once, not once per worker.
    """
    from dpop_signer.service.metrics import Metrics
    from dpop_signer.service.security import bind_listener

    scratch = _metrics_dir()
    settings = _workers_store(settings, workers, scratch)
    if workers > 1:
        _open_key(settings, Metrics()).close()
    return settings, scratch, bind_listener(listen)


def _client_factory(settings: Settings, metrics: Metrics, **extra: Any) -> Callable[[], Any]:
    """What builds the service's HTTP client at start-up: system trust, User-Agent, counters."""

    def make() -> Any:
        import httpx

        from dpop_signer.tls import ssl_context
        from dpop_signer.tokens import USER_AGENT

        return httpx.AsyncClient(
            timeout=settings.timeout,
            verify=ssl_context(settings.ca_bundle),
            headers={"User-Agent": USER_AGENT},
            event_hooks={"response": [_token_counter(settings, metrics)]},
            **extra,
        )

    return make


def _serve_worker(
    ctx: click.Context,
    settings: Settings,
    api_keys: ApiKeys | None,
    metrics: Metrics,
    state: Any,
    app: Any,
    listen: Listen,
    sock: Any,
    index: int | None,
    limits: ConnectionLimits,
    **fields: object,
) -> bool:
    """Serve ``app`` on ``sock`` with SIGHUP reloading ``state``'s key and API keys.

    ``index`` is the worker's number with ``--workers``, None for a single process.
    """
    from dataclasses import replace

    from dpop_signer.service.reload import Reloader
    from dpop_signer.service.runner import serve_app

    def install(new: KeyBundle, keys: ApiKeys | None) -> KeyBundle:
        old: KeyBundle = state.key
        state.key, state.api_keys = new, keys
        return old

    reloader = Reloader(lambda: _reload(ctx, settings, api_keys, metrics), install)
    extra: dict[str, Any] = {"worker": index, **fields}
    return serve_app(
        app,
        listen,
        sock,
        # One connection per wake-up with --workers: the first worker awake would take all.
        limits=replace(limits, accept_batch=None if index is None else 1),
        on_reload=reloader.request,
        owner=index is None,
        **extra,
    )


def _run(
    workers: int, run: Callable[[int | None], bool], listen: Listen, sock: Any, scratch: Path
) -> bool:
    """``run(None)`` in this process, or ``run(index)`` in each of ``workers`` processes."""
    if workers == 1:
        return run(None)
    import shutil

    from dpop_signer.service.security import remove_unix_socket
    from dpop_signer.service.workers import run_workers

    try:
        return run_workers(workers, run)
    finally:
        sock.close()
        remove_unix_socket(listen)
        shutil.rmtree(scratch, ignore_errors=True)


_WORKERS_STORE = "the default for --workers"


def _workers_store(settings: Settings, workers: int, scratch: Path) -> Settings:
    """``settings`` with a SQLite token store in ``scratch`` for several workers without one.

    Without a store each worker would fetch (and renew) its own token and learn every nonce on
    its own; the file lives in the workers' private scratch directory (0700, the file 0600)
    and goes away with it. An explicit ``--token-store`` (``memory`` included) is kept.
    """
    if workers == 1 or settings.token_store is not None or settings.token_url is None:
        return settings
    return settings.with_values(_WORKERS_STORE, token_store=f"sqlite:{scratch / 'tokens.db'}")


def _metrics_dir() -> Path:
    """A private directory (made by the workers, mode 0700) for their counters."""
    import tempfile

    base = Path(os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir())
    return base / f"dpop-workers-{os.getpid()}"


@click.command()
@click.option(
    "--upstream",
    metavar="URL",
    help="Base URL every request is forwarded to, e.g. https://api.example. [env: DPOP_UPSTREAM]",
)
@_listen_option
@_api_key_option
@_remote_option
@_unauthenticated_option
@click.option(
    "--replay-limit",
    metavar="BYTES",
    type=click.IntRange(min=0),
    default=8 * 1024 * 1024,
    show_default=True,
    help="Request bodies up to this size are kept so a nonce demand or token renewal can "
    "resend them; larger ones stream without a retry.",
)
@click.option(
    "--replay-total",
    metavar="BYTES",
    type=click.IntRange(min=0),
    default=32 * 1024 * 1024,
    show_default=True,
    help="Most bytes all kept request bodies together may hold; beyond it a body streams "
    "without a retry.",
)
@_workers_option
@_read_timeout_option
@_max_connections_option
@_log_level_option
@key_options
@client_options
@click.pass_context
def proxy(
    ctx: click.Context,
    /,
    allow_unauthenticated: bool,
    workers: int,
    replay_limit: int,
    replay_total: int,
    read_timeout: float,
    max_connections: int | None,
    log_level: str,
    **_: object,
) -> None:
    """Forward requests to --upstream with a DPoP-bound token and a fresh proof.

    curl http://127.0.0.1:PORT/path reaches UPSTREAM/path with Authorization: DPoP and DPoP
    headers added; nonce demands and token renewal are handled here. Bodies stream both ways.
    With --api-key-file, callers send Proxy-Authorization: Bearer <key>.

    \b
    Example:
      dpop proxy --upstream https://api.example --listen 127.0.0.1:8788 \\
          --api-key-file /etc/dpop/api-key --token-url https://as.example/token \\
          --client-id svc
    """  # noqa: D301 - click's \b keeps the examples unwrapped
    from dpop_signer.service.metrics import Metrics
    from dpop_signer.service.runner import ConnectionLimits
    from dpop_signer.urls import check_http_url

    settings, listen, api_keys = _prepare(
        ctx, DEFAULT_PROXY_LISTEN, allow_unauthenticated, log_level
    )
    settings.require("upstream", "token_url", "client_id")
    assert settings.upstream is not None  # for mypy: require() checked it
    try:
        upstream = check_http_url(settings.upstream, "--upstream")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    settings, scratch, sock = _prepare_workers(settings, workers, listen)

    def run(index: int | None) -> bool:
        from dpop_signer.service.proxy import ProxyState, ReplayBudget, create_proxy_app

        metrics = Metrics()
        bundle = _open_key(settings, metrics)
        try:
            state = ProxyState(
                upstream=upstream,
                key=bundle,
                make_client=_client_factory(settings, metrics, follow_redirects=False),
                api_keys=api_keys,
                replay_limit=replay_limit,
                replay_budget=ReplayBudget(replay_total),
                metrics=metrics,
            )
        except BaseException:
            bundle.close()
            raise
        loopback_only = not listen.is_unix and not settings.allow_remote
        return _serve_worker(
            ctx, settings, api_keys, metrics, state,
            create_proxy_app(state, loopback_only=loopback_only), listen, sock,
            index, ConnectionLimits(read_timeout, max_connections),
            mode="proxy",
            # Never the whole URL: user info or a query may carry credentials.
            upstream=f"{upstream.scheme}://{upstream.netloc.decode('ascii')}{upstream.path}",
            api_key=api_keys is not None,
        )  # fmt: skip

    if not _run(workers, run, listen, sock, scratch):
        raise click.ClickException("the proxy failed to start; see the log lines above")
