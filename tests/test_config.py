"""Settings: the four layers, their precedence, where each value came from, and secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpop_signer.config import Settings, build_signer, load_settings, pin_for
from dpop_signer.errors import ConfigError

AS = "https://as.example/token"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_each_layer_alone_and_its_source(tmp_path):
    cfg = write(tmp_path / "c.toml", f'token_url = "{AS}"\n')
    assert load_settings(config_file=cfg, env={}).token_url == AS
    assert load_settings(config_file=cfg, env={}).source_of("token_url") == f"{cfg} (token_url)"
    s = load_settings(env={"DPOP_TOKEN_URL": AS})
    assert (s.token_url, s.source_of("token_url")) == (AS, "DPOP_TOKEN_URL")
    s = load_settings({"token_url": AS}, env={})
    assert (s.token_url, s.source_of("token_url")) == (AS, "--token-url")
    s = load_settings(env={})
    assert (s.token_url, s.source_of("token_url")) == (None, "default")
    assert (s.leeway, s.timeout, s.accept_bearer, s.resource) == (30.0, 10.0, False, [])


def test_precedence_option_env_file_default(tmp_path):
    cfg = write(
        tmp_path / "c.toml",
        'client_id = "from-file"\nscope = "file-scope"\naudience = "file-aud"\n',
    )
    env = {"DPOP_CLIENT_ID": "from-env", "DPOP_SCOPE": "env-scope"}
    s = load_settings({"client_id": "from-option"}, config_file=cfg, env=env)
    assert s.client_id == "from-option"
    assert s.scope == "env-scope"
    assert s.audience == "file-aud"
    assert s.timeout == 10.0
    assert s.source_of("scope") == "DPOP_SCOPE"
    assert s.source_of("audience").endswith("(audience)")


def test_dpop_config_names_the_file(tmp_path):
    cfg = write(tmp_path / "c.toml", 'client_id = "x"\n')
    assert load_settings(env={"DPOP_CONFIG": str(cfg)}).client_id == "x"


@pytest.mark.parametrize("spelling", ["token-url", "token_url"])
def test_dash_and_underscore_keys(tmp_path, spelling):
    cfg = write(tmp_path / "c.toml", f'{spelling} = "{AS}"\naccept-bearer = true\n')
    s = load_settings(config_file=cfg, env={})
    assert s.token_url == AS
    assert s.accept_bearer is True


def test_unknown_keys_are_named(tmp_path):
    cfg = write(tmp_path / "c.toml", 'tokenurl = "x"\nclient_id = "a"\ncolour = 1\n')
    with pytest.raises(ConfigError, match=r"unknown keys 'tokenurl', 'colour'"):
        load_settings(config_file=cfg, env={})


def test_both_spellings_of_one_key_are_refused(tmp_path):
    cfg = write(tmp_path / "c.toml", 'client-id = "a"\nclient_id = "b"\n')
    with pytest.raises(ConfigError, match="client_id twice"):
        load_settings(config_file=cfg, env={})


@pytest.mark.parametrize(
    ("content", "message"),
    [("token_url = ", "not valid TOML"), (b"\xff\xfe", "not UTF-8")],
)
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "c.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(config_file=path, env={})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("layer", "where"),
    [("option", "--token-url"), ("env", "DPOP_TOKEN_URL"), ("file", "c.toml (token-url)")],
)
def test_errors_name_field_and_source(tmp_path, layer, where):
    bad = "ftp://as.example/token"
    cfg = write(tmp_path / "c.toml", f'token-url = "{bad}"\n')
    kwargs: dict = {"env": {}}
    if layer == "option":
        kwargs["options"] = {"token_url": bad}
    elif layer == "env":
        kwargs["env"] = {"DPOP_TOKEN_URL": bad}
    else:
        kwargs["config_file"] = cfg
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    message = str(info.value)
    assert message.startswith("token_url from ")
    assert where in message
    assert "not an absolute http:// or https:// URL" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("env", "field", "fragment"),
    [
        ({"DPOP_LEEWAY": "-1"}, "leeway from DPOP_LEEWAY", "greater than or equal to 0"),
        ({"DPOP_TIMEOUT": "0"}, "timeout from DPOP_TIMEOUT", "greater than 0"),
        ({"DPOP_TIMEOUT": "soon"}, "timeout from DPOP_TIMEOUT", "valid number"),
        ({"DPOP_CLIENT_AUTH": "magic"}, "client_auth from DPOP_CLIENT_AUTH", "client_secret_post"),
        ({"DPOP_ACCEPT_BEARER": "perhaps"}, "accept_bearer from DPOP_ACCEPT_BEARER", "boolean"),
        ({"DPOP_CLIENT_ID": "  "}, "client_id from DPOP_CLIENT_ID", "is empty"),
    ],
)
def test_value_errors(env, field, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert field in str(info.value)
    assert fragment in str(info.value)


def test_several_errors_in_one_message():
    with pytest.raises(ConfigError) as info:
        load_settings(env={"DPOP_LEEWAY": "-1", "DPOP_TOKEN_URL": "nope"})
    assert "leeway from DPOP_LEEWAY" in str(info.value)
    assert "token_url from DPOP_TOKEN_URL" in str(info.value)


def test_environment_types():
    s = load_settings(
        env={
            "DPOP_RESOURCE": "https://a.example/ https://b.example/",
            "DPOP_ACCEPT_BEARER": "true",
            "DPOP_LEEWAY": "5.5",
            "DPOP_CLIENT_AUTH": "client_secret_post",
        }
    )
    assert s.resource == ["https://a.example/", "https://b.example/"]
    assert s.accept_bearer is True
    assert s.leeway == 5.5
    assert s.client_auth == "client_secret_post"


def test_empty_environment_variable_is_unset():
    s = load_settings(env={"DPOP_PIN": "", "DPOP_CLIENT_ID": ""})
    assert s.pin is None
    assert s.client_id is None


def test_toml_list_and_repeated_option(tmp_path):
    cfg = write(tmp_path / "c.toml", 'resource = ["https://a.example/", "https://b.example/"]\n')
    assert load_settings(config_file=cfg, env={}).resource == [
        "https://a.example/",
        "https://b.example/",
    ]
    s = load_settings({"resource": ("https://c.example/",)}, config_file=cfg, env={})
    assert s.resource == ["https://c.example/"]


# --- secrets -------------------------------------------------------------------------------


def test_secrets_are_hidden_in_repr_and_dump():
    s = load_settings({"pin": "4321-pin", "client_secret": "s3cr3t-value"}, env={})
    assert "4321-pin" not in repr(s)
    assert "s3cr3t-value" not in repr(s)
    assert "s3cr3t-value" not in str(s.model_dump())
    assert s.secret("pin") == "4321-pin"
    assert s.secret("client_secret") == "s3cr3t-value"


@pytest.mark.parametrize("layer", ["option", "env", "file"])
def test_secret_file_forms(tmp_path, layer):
    secret_file = write(tmp_path / "secret.txt", "file-secret-1\n")
    pin_file = write(tmp_path / "pin.txt", "9876")
    if layer == "option":
        s = load_settings(
            {"client_secret_file": str(secret_file), "pin_file": str(pin_file)}, env={}
        )
        where = "--client-secret-file"
    elif layer == "env":
        s = load_settings(
            env={"DPOP_CLIENT_SECRET_FILE": str(secret_file), "DPOP_PIN_FILE": str(pin_file)}
        )
        where = "DPOP_CLIENT_SECRET_FILE"
    else:
        # Relative paths in a config file are relative to the file, not to the cwd.
        cfg = write(
            tmp_path / "c.toml", 'client-secret-file = "secret.txt"\npin_file = "pin.txt"\n'
        )
        s = load_settings(config_file=cfg, env={})
        where = "client-secret-file"
    assert s.secret("client_secret") == "file-secret-1"  # one trailing newline dropped
    assert s.secret("pin") == "9876"
    assert where in s.source_of("client_secret")


def test_value_and_file_in_one_layer_conflict(tmp_path):
    secret_file = write(tmp_path / "secret.txt", "x")
    with pytest.raises(ConfigError, match="client_secret is given twice"):
        load_settings(env={"DPOP_CLIENT_SECRET": "a", "DPOP_CLIENT_SECRET_FILE": str(secret_file)})


def test_file_form_in_a_higher_layer_wins(tmp_path):
    secret_file = write(tmp_path / "secret.txt", "from-file")
    s = load_settings({"client_secret_file": str(secret_file)}, env={"DPOP_CLIENT_SECRET": "env"})
    assert s.secret("client_secret") == "from-file"


@pytest.mark.parametrize(("content", "message"), [(None, "does not exist"), ("", "is empty")])
def test_bad_secret_files_never_show_content(tmp_path, content, message):
    path = tmp_path / "pin.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(env={"DPOP_PIN_FILE": str(path)})
    assert message in str(info.value)
    assert "pin_file from DPOP_PIN_FILE" in str(info.value)


def test_non_string_secret_in_file_is_refused_without_echo(tmp_path):
    cfg = write(tmp_path / "c.toml", "client_secret = 73737373\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=cfg, env={})
    assert "client_secret" in str(info.value)
    assert "73737373" not in str(info.value)


# --- helpers -------------------------------------------------------------------------------


def test_require_lists_every_missing_field_and_how_to_give_it():
    s = load_settings({"client_id": "x"}, env={})
    with pytest.raises(ConfigError) as info:
        s.require("key", "token_url", "client_id")
    message = str(info.value)
    assert "--key" in message
    assert "DPOP_KEY" in message
    assert "--token-url" in message
    assert "DPOP_TOKEN_URL" in message
    assert "client_id:" not in message


def test_effective_client_auth():
    assert load_settings(env={}).effective_client_auth == "none"
    assert (
        load_settings(env={"DPOP_CLIENT_SECRET": "x"}).effective_client_auth
        == "client_secret_basic"
    )
    explicit = load_settings(
        env={"DPOP_CLIENT_SECRET": "x", "DPOP_CLIENT_AUTH": "client_secret_post"}
    )
    assert explicit.effective_client_auth == "client_secret_post"


def test_with_values_validates_and_records_source():
    s = load_settings(env={}).with_values("the prompt", pin="1111")
    assert s.source_of("pin") == "the prompt"
    with pytest.raises(ConfigError, match="token_url from the demo"):
        s.with_values("the demo", token_url="not a url")


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValueError, match="frozen"):
        s.client_id = "x"  # type: ignore[misc]


def test_pin_precedence_for_pkcs11_uris():
    uri = "pkcs11:token=t;object=k?pin-value=1111"
    from_env = load_settings(env={"DPOP_PIN": "2222"})
    from_option = load_settings({"pin": "3333"}, env={})
    # The URI's own PIN beats DPOP_PIN; --pin beats the URI (signers/pin.py, load_signer).
    assert pin_for(from_env, uri) == "1111"
    assert pin_for(from_env, "pkcs11:token=t;object=k") == "2222"
    assert pin_for(from_option, uri) == "3333"
    assert pin_for(from_env, "key.pem") == "2222"


def test_build_signer_opens_the_configured_pem_key(pem_key_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests import oracle

    signer = build_signer(load_settings(env={"DPOP_KEY": pem_key_path}))
    key = serialization.load_pem_private_key(Path(pem_key_path).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    numbers = key.public_key().public_numbers()
    x = oracle._b64e(numbers.x.to_bytes(32, "big"))
    assert dict(signer.public_jwk)["x"] == x


def test_build_signer_needs_a_key():
    with pytest.raises(ConfigError, match="DPOP_KEY"):
        build_signer(load_settings(env={}))


def test_build_auth_wires_dpop_auth(pem_key_path):
    from dpop_signer.auth import DPoPAuth
    from dpop_signer.config import build_auth

    s = load_settings(
        env={
            "DPOP_KEY": pem_key_path,
            "DPOP_TOKEN_URL": AS,
            "DPOP_CLIENT_ID": "svc",
            "DPOP_CLIENT_SECRET": "sec",
        }
    )
    auth = build_auth(s, build_signer(s))
    assert isinstance(auth, DPoPAuth)
    with pytest.raises(ConfigError, match="needs a client secret"):
        build_auth(
            s.with_values("test", client_secret=None, client_auth="client_secret_post"),
            build_signer(s),
        )
    with pytest.raises(ConfigError, match="token_url"):
        build_auth(load_settings(env={"DPOP_KEY": pem_key_path}), build_signer(s))
