"""One validated `Settings` object from options, environment, a TOML file and defaults.

The CLI and the local service both describe a deployment the same way: which key signs
(``key``, ``pin``), which authorization server issues tokens (``token_url``, ``client_id``,
``client_secret``, ``scope``, ...), and how the service listens. `load_settings` merges four
layers, highest first::

    option (--token-url)  >  environment (DPOP_TOKEN_URL)  >  --config FILE (token_url)  >  default

and validates the result with pydantic. The config file is ``--config FILE``, else ``DPOP_CONFIG``;
with ``default_config=True`` (what the CLI passes) and neither given, the first that exists of
``$XDG_CONFIG_HOME/dpop/config.toml`` (``~/.config/dpop/config.toml``) and
``/etc/dpop/config.toml`` (`default_config_file`). Every value remembers where it came from,
so an error says ``token_url from DPOP_TOKEN_URL: ...`` instead of leaving the user to guess
which layer holds the bad value.

The config file is TOML with top-level keys named after the long options (``token-url`` and
``token_url`` are the same key); an unknown key is an error that names it::

    key = "pkcs11:token=prod;object=dpop-es256"
    token_url = "https://as.example/oauth2/token"
    client_id = "billing-batch"
    client_secret_file = "/run/secrets/dpop-client-secret"
    scope = "invoices:read"

Secrets (``pin``, ``client_secret``) have a second, file form (``pin_file``,
``client_secret_file``, or ``DPOP_PIN_FILE``/``DPOP_CLIENT_SECRET_FILE``) so that they need
never appear in a process list or a shell history. Within one layer the value and its file form
are mutually exclusive. `Settings` holds them as `pydantic.SecretStr`, so a repr or a log line of
the settings never shows them; a key reference is shown with its ``pin-value=`` masked (in
``repr``, `Settings.model_dump` and `Settings.model_dump_json`), and URLs in error messages
without user info or query (`dpop_signer.redaction`).

`build_signer` and `build_auth` turn settings into the library's objects; the CLI and the
service call them rather than wiring `load_signer` and `DPoPAuth` by hand.

>>> settings = load_settings({"key": "dev-key.pem", "token_url": "http://127.0.0.1:8080/token",
...                           "client_id": "demo-client"}, env={})
>>> settings.source_of("token_url")
'--token-url'
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
)

from dpop_signer.config_names import (
    CLIENT_AUTH_METHODS,
    ENV_PREFIX,
    SECRET_FIELDS,
    AssertionAudience,
    ClientAuth,
    Profile,
    env_name,
    option_name,
    ways_to_set,
)
from dpop_signer.errors import ConfigError
from dpop_signer.redaction import mask_pin_values, redact_url

if TYPE_CHECKING:
    from dpop_signer.auth import DPoPAuth
    from dpop_signer.discovery import ServerMetadata
    from dpop_signer.signers.base import Signer

__all__ = [
    "CLIENT_AUTH_METHODS",
    "ENV_PREFIX",
    "SECRET_FIELDS",
    "Settings",
    "build_auth",
    "build_signer",
    "default_config_file",
    "env_name",
    "load_settings",
    "option_name",
    "pin_for",
    "read_secret_file",
]

# Fields whose values are lists; in the environment they are separated by white space.
_LIST_FIELDS = frozenset({"resource", "allow_origin"})
# Key references: a pkcs11: URI may carry the PIN (RFC 7512 §2.4 pin-value=).
_KEY_FIELDS = frozenset({"key", "assertion_key"})
_URL_FIELDS = frozenset({"token_url", "upstream", "issuer", "token_store"})


def _show(name: str, value: str) -> str:
    """Field ``name``'s ``value`` as it may be shown (repr, model_dump)."""
    if name in _KEY_FIELDS:
        return mask_pin_values(value)
    if name in _URL_FIELDS:
        return redact_url(value)
    return value


class Settings(BaseModel):
    """Everything needed to sign proofs, fetch tokens and run the service.

    All fields are optional here; a command asks for the ones it needs with `require`, so that
    ``dpop jwk`` does not insist on a token URL.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # The key.
    key: str | None = Field(
        default=None,
        description="PEM private key path or RFC 7512 pkcs11: URI of the ES256 key",
    )
    pin: SecretStr | None = Field(
        default=None, description="token PIN (PKCS#11) or passphrase (encrypted PEM)"
    )
    sign_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds a caller waits for a PKCS#11 module before giving up",
    )
    assertion_key: str | None = Field(
        default=None,
        description="key for private_key_jwt client assertions (default: the DPoP key)",
    )

    # The authorization server and the client registration.
    token_url: str | None = Field(default=None, description="token endpoint URL")
    issuer: str | None = Field(
        default=None,
        description="authorization server issuer; its RFC 8414 metadata names the token endpoint",
    )
    assertion_audience: AssertionAudience = Field(
        default="issuer",
        description="aud of private_key_jwt assertions: issuer (default) or token_endpoint",
    )
    client_id: str | None = Field(default=None, description="OAuth client_id")
    client_secret: SecretStr | None = Field(default=None, description="OAuth client secret")
    scope: str | None = Field(default=None, description="space-separated scopes to request")
    client_auth: ClientAuth | None = Field(
        default=None,
        description="client authentication (default: client_secret_basic with a secret, else none)",
    )
    resource: list[str] = Field(
        default_factory=list, description="RFC 8707 resource indicators (repeatable)"
    )
    audience: str | None = Field(
        default=None, description="audience parameter, if the AS wants one"
    )
    accept_bearer: bool = Field(
        default=False,
        description="accept a Bearer token when the AS does not bind it (unsafe; default off)",
    )
    proofs_ahead: bool | None = Field(
        default=None,
        description="sign the next proof for a repeated method and URL ahead of time "
        "(default: on for a pkcs11: key, off for a PEM key)",
    )
    leeway: float = Field(
        default=30.0, ge=0, description="renew tokens this many seconds before expiry"
    )
    timeout: float = Field(default=10.0, gt=0, description="HTTP timeout in seconds")
    token_store: str | None = Field(
        default=None,
        description="where tokens and nonces are shared: memory (default), sqlite:PATH, "
        "redis://[user:password@]host:port/db or rediss://...?ca=PATH",
    )
    ca_bundle: Path | None = Field(
        default=None,
        description="PEM file of CA certificates to trust instead of the system's store",
    )
    profile: Profile | None = Field(
        default=None, description="hold the configuration to a client profile: fapi2"
    )

    # The local service (dpop serve / dpop proxy).
    listen: str | None = Field(
        default=None, description="service address: 127.0.0.1:PORT or unix:PATH"
    )
    api_key_file: Path | None = Field(default=None, description="file holding the service API key")
    allow_origin: list[str] = Field(
        default_factory=list, description="origins the service signs for (repeatable)"
    )
    allow_remote: bool = Field(default=False, description="let the service listen beyond loopback")
    upstream: str | None = Field(default=None, description="URL the proxy forwards to")

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _config_file: tuple[str, str] | None = PrivateAttr(default=None)

    @field_validator("token_url", "upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        # The URL is shown redacted: its user info and query may hold credentials.
        shown = repr(redact_url(value))
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{shown} is not an absolute http:// or https:// URL")
        if parts.fragment:
            raise ValueError(f"{shown} has a fragment; remove the '#...' part")
        return value

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str | None) -> str | None:
        from dpop_signer.discovery import check_issuer

        if value is not None:
            try:
                check_issuer(value)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_serializer("key", "assertion_key", "token_url", "upstream", "issuer", "token_store")
    def _shown(self, value: str | None, info: FieldSerializationInfo) -> str | None:
        # model_dump and model_dump_json are for showing settings (with_values reads the
        # fields); a PIN in a key URI, and user info or a query in a URL, stay out of them.
        return None if value is None else _show(info.field_name, value)

    @field_validator("token_store")
    @classmethod
    def _token_store(cls, value: str | None) -> str | None:
        # The form only: the store is opened (and Redis's client imported) by build_auth.
        if value is None:
            return None
        text = value.strip()
        if text == "memory" or text.lower().startswith(("redis://", "rediss://")):
            return text
        if text.startswith("sqlite:") and text[len("sqlite:") :].strip("/"):
            return text
        raise ValueError(
            f"{redact_url(text)!r} is not memory, sqlite:PATH, "
            "redis://[user:password@]host:port/db or rediss://...?ca=PATH"
        )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name is not None and isinstance(value, str):
                value = _show(name, value)
            yield name, value

    @field_validator("key", "client_id", "scope", "audience", "assertion_key")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("resource", "allow_origin", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        if isinstance(value, str):
            return value.split()
        return value

    def source_of(self, name: str) -> str:
        """Where the value of field ``name`` came from: an option, a variable, a file or default."""
        return self._sources.get(name, "default")

    def require(self, *names: str) -> None:
        """Raise `ConfigError` naming every field in ``names`` that has no value.

        The message lists all three ways to give each missing value, so one run tells the user
        everything that is missing.
        """
        missing = [name for name in names if getattr(self, name) in (None, [])]
        if not missing:
            return
        hints = "; ".join(f"{name}: {ways_to_set(name)}" for name in missing)
        raise ConfigError(f"missing setting{'s' if len(missing) > 1 else ''}: {hints}")

    @property
    def config_file(self) -> tuple[str, str] | None:
        """The config file read and what named it (``--config``, ``DPOP_CONFIG``, ``default``)."""
        return self._config_file

    def secret(self, name: str) -> str | None:
        """The plain value of secret field ``name`` (``pin`` or ``client_secret``)."""
        value = getattr(self, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else None

    @property
    def effective_client_auth(self) -> str:
        """The client authentication method, defaulted from whether a secret is configured."""
        if self.client_auth is not None:
            return self.client_auth
        return "client_secret_basic" if self.client_secret is not None else "none"

    def with_values(self, source: str, **values: object) -> Settings:
        """A copy with ``values`` set (validated) and recorded as coming from ``source``.

        Used for values that arrive late, such as a PIN typed at a prompt.
        """
        # The fields themselves, not model_dump(): that masks a pin-value= in the key.
        data: dict[str, object] = {name: getattr(self, name) for name in type(self).model_fields}
        data.update(values)
        sources = dict(self._sources)
        sources.update(dict.fromkeys(values, source))
        settings = _validate(data, sources)
        settings._config_file = self._config_file
        return settings


def _field_names() -> tuple[str, ...]:
    return tuple(Settings.model_fields)


def _file_fields() -> dict[str, str]:
    return {f"{name}_file": name for name in SECRET_FIELDS}


def load_settings(
    options: Mapping[str, object] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    option_label: Callable[[str], str] = option_name,
    default_config: bool = False,
) -> Settings:
    """Merge options, environment, a TOML file and defaults into validated `Settings`.

    Args:
        options: values given on the command line, by field name; ``None`` values are
            "not given". Secret file forms are accepted as ``pin_file`` / ``client_secret_file``.
        config_file: a TOML file; when ``None``, ``DPOP_CONFIG`` in ``env`` names one.
        default_config: with neither, read `default_config_file` if there is one.
        env: the environment to read (default `os.environ`).
        option_label: how an option is named in error messages (``--token-url``).

    Raises:
        ConfigError: a value is invalid, a file is unreadable, a key is unknown; the message
            names the field and the layer it came from.
    """
    environ = os.environ if env is None else env
    # Lowest layer first; each later layer overrides the earlier ones per field.
    layers: list[tuple[dict[str, object], dict[str, str]]] = []
    named_by = "--config"
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file, named_by = environ[ENV_PREFIX + "CONFIG"], ENV_PREFIX + "CONFIG"
    if config_file is None and default_config:
        config_file, named_by = default_config_file(environ), "default location"
    if config_file is not None:
        layers.append(_file_layer(Path(config_file)))
    layers.append(_env_layer(environ))
    layers.append(_options_layer(options or {}, option_label))

    merged: dict[str, object] = {}
    sources: dict[str, str] = {}
    for values, where in layers:
        for name, value in values.items():
            merged[name] = value
            sources[name] = where[name]
    settings = _validate(merged, sources)
    if config_file is not None:
        settings._config_file = (os.fspath(config_file), named_by)
    return settings


def default_config_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The config file read when none is named: the first of these that exists, or None.

    ``$XDG_CONFIG_HOME/dpop/config.toml`` (``~/.config/dpop/config.toml`` when the variable
    is unset, as the XDG Base Directory specification says), then ``/etc/dpop/config.toml``.
    """
    environ = os.environ if env is None else env
    xdg = environ.get("XDG_CONFIG_HOME") or ""
    if not os.path.isabs(xdg):  # the specification says to ignore a relative value
        home = environ.get("HOME") or os.path.expanduser("~")
        xdg = os.path.join(home, ".config")
    for candidate in (Path(xdg, "dpop", "config.toml"), Path("/etc/dpop/config.toml")):
        if candidate.is_file():
            return candidate
    return None


def _validate(data: dict[str, object], sources: dict[str, str]) -> Settings:
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None
    settings._sources.update(sources)
    return settings


def _describe(exc: ValidationError, sources: Mapping[str, str]) -> str:
    # Built from pydantic's message only, never its input_value: the value may be a secret.
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else "settings"
        where = sources.get(field, "default")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error" and field == "client_auth":
            message = f"must be one of {', '.join(CLIENT_AUTH_METHODS)}"
        elif error["type"] == "literal_error":
            message = f"must be {error.get('ctx', {}).get('expected', 'one of the names listed')}"
        problems.append(f"{field} from {where}: {message}")
    return "; ".join(problems)


def _options_layer(
    options: Mapping[str, object], label: Callable[[str], str]
) -> tuple[dict[str, object], dict[str, str]]:
    values: dict[str, object] = {}
    where: dict[str, str] = {}
    for name, value in options.items():
        if value is None or value == () or value == []:
            continue
        values[name] = list(value) if isinstance(value, tuple) else value
        where[name] = label(name)
    return _resolve_secret_files(values, where)


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, object], dict[str, str]]:
    values: dict[str, object] = {}
    where: dict[str, str] = {}
    for name in (*_field_names(), *_file_fields()):
        var = env_name(name)
        raw = environ.get(var)
        # An empty variable is "unset": `DPOP_PIN= dpop ...` must not mean "the empty PIN".
        if raw is None or raw == "":
            continue
        values[name] = raw
        where[name] = var
    return _resolve_secret_files(values, where)


def _file_layer(path: Path) -> tuple[dict[str, object], dict[str, str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    known = set(_field_names()) | set(_file_fields())
    values: dict[str, object] = {}
    where: dict[str, str] = {}
    unknown = []
    for raw_key, value in data.items():
        name = raw_key.replace("-", "_")
        if name not in known:
            unknown.append(raw_key)
            continue
        if name in values:
            raise ConfigError(
                f"config file {str(path)!r} sets {name} twice (as '-' and '_' spellings)"
            )
        if name in SECRET_FIELDS and not isinstance(value, str):
            raise ConfigError(f"{name} from {path}: must be a string")
        values[name] = value
        where[name] = f"{path} ({raw_key})"
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; known keys are "
            f"{', '.join(sorted(known))}"
        )
    # A relative secret file in a config file is relative to that file, not to the cwd.
    for file_field in (*_file_fields(), "ca_bundle"):
        if isinstance(values.get(file_field), str):
            target = Path(str(values[file_field])).expanduser()
            values[file_field] = str(target if target.is_absolute() else path.parent / target)
    return _resolve_secret_files(values, where)


def _resolve_secret_files(
    values: dict[str, object], where: dict[str, str]
) -> tuple[dict[str, object], dict[str, str]]:
    """Replace ``pin_file`` / ``client_secret_file`` by the secret they hold, within one layer."""
    for file_field, secret_field in _file_fields().items():
        if file_field not in values:
            continue
        file_where = where.pop(file_field)
        file_value = values.pop(file_field)
        if secret_field in values:
            raise ConfigError(
                f"{secret_field} is given twice, by {where[secret_field]} and by {file_where}; "
                "keep one"
            )
        if not isinstance(file_value, str | os.PathLike):
            raise ConfigError(f"{file_field} from {file_where}: must be a file path")
        values[secret_field] = read_secret_file(file_value, what=f"{file_field} from {file_where}")
        where[secret_field] = file_where
    return values, where


def read_secret_file(path: str | os.PathLike[str], *, what: str) -> str:
    """Read a secret from a file, dropping one trailing newline (as ``echo`` writes it).

    Raises:
        ConfigError: the file is missing, unreadable or empty; the message names ``what``
            and the path, never the content.
    """
    where = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what}: file {where!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what}: file {where!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: file {where!r} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(f"{what}: file {where!r} is empty")
    return secret


def build_signer(settings: Settings) -> Signer:
    """Open the signer that ``settings.key`` names, with ``settings.pin``.

    Raises:
        ConfigError: no key is configured.
        SignerError: the key cannot be opened (see `dpop_signer.signers.load_signer`).
    """
    from dpop_signer.signers import load_signer

    settings.require("key")
    assert settings.key is not None  # for mypy: require() checked it
    return load_signer(
        settings.key, pin=pin_for(settings, settings.key), sign_timeout=settings.sign_timeout
    )


def pin_for(settings: Settings, ref: str) -> str | None:
    """The PIN to pass to `load_signer` / `generate_key` for key ``ref``.

    The rule is `dpop_signer.signers.pin.resolve_pin`'s; a PIN that came from the environment
    (``DPOP_PIN``, ``DPOP_PIN_FILE``) ranks as ``DPOP_PIN`` does, below the URI's own.
    """
    from dpop_signer.signers.pin import PIN_ENV, resolve_pin

    pin = settings.secret("pin")
    if pin is not None and settings.source_of("pin").startswith(ENV_PREFIX):
        return resolve_pin(ref, None, environ={PIN_ENV: pin})
    return pin


def build_auth(settings: Settings, signer: Signer, **overrides: Any) -> DPoPAuth:
    """Build the `DPoPAuth` that ``settings`` describe, signing with ``signer``.

    ``overrides`` are passed to `DPoPAuth` as they are (``nonces=``, ``clock=``), for callers
    such as the service that share a nonce cache.

    With ``issuer`` the token endpoint comes from the issuer's metadata unless ``token_url``
    is given (`dpop_signer.discovery`), and what the metadata says must fit: the key's
    algorithm and the client authentication method offered. With ``profile`` its rules are
    checked (`dpop_signer.profiles`). All of it before any token request.

    Raises:
        ConfigError: ``token_url`` or ``client_id`` is missing, the client authentication
            method needs a secret that is not configured, the metadata does not fit, or a
            profile rule is broken.
        OAuthError: the issuer's metadata is unusable (`dpop_signer.discovery.discover`).
    """
    from dpop_signer.auth import DPoPAuth
    from dpop_signer.discovery import apply_discovery

    settings, metadata = apply_discovery(settings)
    settings.require("token_url", "client_id")
    method = settings.effective_client_auth
    if method in ("client_secret_basic", "client_secret_post") and settings.client_secret is None:
        raise ConfigError(
            f"client_auth {method} (from {settings.source_of('client_auth')}) needs a client "
            f"secret and none is configured: {ways_to_set('client_secret')}"
        )
    assertion_signer: Signer | None = None
    if method == "private_key_jwt":
        if settings.assertion_key is not None and settings.assertion_key != settings.key:
            from dpop_signer.signers import load_signer

            assertion_signer = load_signer(
                settings.assertion_key,
                pin=pin_for(settings, settings.assertion_key),
                sign_timeout=settings.sign_timeout,
            )
        else:
            assertion_signer = signer
    _check_fit(settings, signer, assertion_signer, metadata)
    kwargs: dict[str, Any] = {
        "token_url": settings.token_url,
        "client_id": settings.client_id,
        "client_secret": settings.secret("client_secret"),
        "scope": settings.scope,
        "client_auth": method,
        "assertion_signer": assertion_signer,
        "resource": list(settings.resource) or None,
        "audience": settings.audience,
        "leeway": settings.leeway,
        "accept_bearer": settings.accept_bearer,
        "token_store": settings.token_store or "memory",
        "proofs_ahead": _proofs_ahead(settings),
        "issuer": settings.issuer,
        "assertion_audience": settings.assertion_audience,
    }
    kwargs.update(overrides)
    return DPoPAuth(signer, **kwargs)


def _proofs_ahead(settings: Settings) -> bool | None:
    """``proofs_ahead`` as set, else from the key reference (the service wraps its signer)."""
    from dpop_signer.signers import is_pkcs11_ref

    if settings.proofs_ahead is not None or settings.key is None:
        return settings.proofs_ahead
    return is_pkcs11_ref(settings.key)


def _check_fit(
    settings: Settings,
    signer: Signer,
    assertion_signer: Signer | None,
    metadata: ServerMetadata | None,
) -> None:
    """Raise `ConfigError` when the metadata or the profile refuses these settings."""
    from dpop_signer.discovery import metadata_problems
    from dpop_signer.profiles import profile_violations

    problems: list[str] = []
    if metadata is not None:
        assertion_algorithm = None if assertion_signer is None else assertion_signer.algorithm
        found = metadata_problems(
            metadata,
            dpop_algorithm=signer.algorithm,
            client_auth=settings.effective_client_auth,
            assertion_algorithm=assertion_algorithm,
        )
        problems = [text for _, text in found]
    if settings.profile is not None:
        violations = profile_violations(
            settings, signer=signer, assertion_signer=assertion_signer, metadata=metadata
        )
        # "metadata agrees" repeats the metadata problems already listed.
        problems += [str(v) for v in violations if not (v.rule == "metadata agrees" and problems)]
    if problems:
        if assertion_signer is not None and assertion_signer is not signer:
            from dpop_signer.signers.base import close_signer

            close_signer(assertion_signer)
        raise ConfigError("; ".join(problems))
