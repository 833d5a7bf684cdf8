"""Pkcs11Signer against a real SoftHSM2 token, plus RFC 7512 URI parsing.

Bad keys (RSA, P-384, duplicate labels, public-only, not sensitive) are made with python-pkcs11
directly, holding the module's lock (unserialized calls could crash SoftHSM2), so these tests
never rely on our own key generation to produce the cases it must refuse.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from dpop_signer import (
    ConfigError,
    DPoPSignerError,
    KeyNotFoundError,
    PinError,
    SignerUnavailableError,
    SigningFailedError,
    UnsupportedKeyError,
    generate_key,
    jwk_thumbprint,
    load_signer,
)
from dpop_signer.signers import AsyncSigner, Signer, sign_async
from dpop_signer.signers.pin import resolve_pin
from dpop_signer.signers.pkcs11 import (
    Pkcs11Signer,
    generate_pkcs11_key,
    open_pkcs11_signer,
)
from dpop_signer.signers.pkcs11_keys import decode_ec_point
from dpop_signer.signers.pkcs11_uri import (
    Pkcs11Uri,
    parse_pkcs11_uri,
    resolve_module,
)
from tests import oracle
from tests.conftest import ROOT, SoftHsmToken, require
from tests.sigcheck import check_jwk_shape, verify_all


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_one_line_without_pin(exc: BaseException, pin: str = "1234") -> None:
    text = str(exc)
    assert text
    assert "\n" not in text
    assert pin not in text
    assert pin not in repr(exc)


def b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signer(pkcs11_key_uri: str) -> Iterator[Pkcs11Signer]:
    """An open signer on the session key; it also holds the token login the admin needs."""
    with open_pkcs11_signer(pkcs11_key_uri) as opened:
        yield opened


@pytest.fixture(scope="module")
def admin(signer: Pkcs11Signer, softhsm: SoftHsmToken) -> Callable[[Callable[[Any], Any]], Any]:
    """Run ``fn(rw_session)`` with plain python-pkcs11 holding the module's lock."""

    def run(fn: Callable[[Any], Any]) -> Any:
        def body() -> Any:
            token = signer.module.lib.get_token(token_label=softhsm.label)
            session = token.open(rw=True)  # no PIN: the open signer holds the login
            try:
                return fn(session)
            finally:
                session.close()

        return signer.module.call(body)

    return run


@pytest.fixture(scope="module")
def bad_keys(admin: Callable[[Callable[[Any], Any]], Any]) -> dict[str, str]:
    """Labels of keys the signer must refuse, made directly with python-pkcs11."""
    names = ("rsa", "k256", "dup", "pubonly", "nopub", "plain", "mixed")
    labels = {name: unique(name) for name in names}

    def ec_pair(
        session: Any, curve: str, label: str, private: dict[Attribute, Any] | None = None
    ) -> tuple[Any, Any]:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
        )
        return params.generate_keypair(
            store=True,
            label=label,
            id=os.urandom(2),
            private_template={Attribute.SIGN: True, **(private or {})},
        )

    def make(session: Any) -> None:
        session.generate_keypair(KeyType.RSA, 1024, label=labels["rsa"], store=True)
        ec_pair(session, "secp256k1", labels["k256"])
        ec_pair(session, "secp256r1", labels["dup"])
        ec_pair(session, "secp256r1", labels["dup"])
        _, private = ec_pair(session, "secp256r1", labels["pubonly"])
        private.destroy()
        public, _ = ec_pair(session, "secp256r1", labels["nopub"])
        public.destroy()
        ec_pair(
            session,
            "secp256r1",
            labels["plain"],
            {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
        # A public key stored under the label of a different private key: a mismatched pair.
        public_a, _ = ec_pair(session, "secp256r1", unique("donor"))
        _, private_b = ec_pair(session, "secp256r1", labels["mixed"])
        the_id = bytes(private_b[Attribute.ID])
        for obj in session.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: the_id}
        ):
            obj.destroy()
        public_a.copy({Attribute.LABEL: labels["mixed"], Attribute.ID: the_id})

    admin(make)
    return labels


# --- RFC 7512 parsing (no token needed) ---------------------------------------------------


def test_parse_full_uri() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=dpop%20dev;serial=abc;object=my%2Fkey;id=%01%ff;type=private"
        "?module-path=/usr/lib/x.so&pin-source=file:/run/pin"
    )
    assert uri == Pkcs11Uri(
        token="dpop dev",
        serial="abc",
        object="my/key",
        id=b"\x01\xff",
        type="private",
        module_path="/usr/lib/x.so",
        pin_source="file:/run/pin",
    )


def test_parse_accepts_40_character_label_and_utf8() -> None:
    label = "k" * 40
    assert parse_pkcs11_uri(f"pkcs11:object={label}").object == label
    assert parse_pkcs11_uri("pkcs11:object=cl%C3%A9").object == "clé"


@pytest.mark.parametrize(
    ("uri", "attribute"),
    [
        ("pkcs11:token=a;bogus=1;object=k", "bogus"),
        ("pkcs11:object=k?bogus=1", "bogus"),
        ("pkcs11:slot-id=3;object=k", "slot-id"),
        ("pkcs11:object=k?module-name=softhsm2", "module-name"),
        ("pkcs11:object=k;object=j", "object"),
        ("pkcs11:object=%zz", "object"),
        ("pkcs11:object=", "object"),
        ("pkcs11:object=k;type=cert", "type"),
        ("pkcs11:object=k?pin-value=1&pin-source=file:/x", "pin-source"),
        ("pkcs11:object=cl%FF", "object"),
        ("pkcs11:token", "token"),
    ],
)
def test_parse_refuses_with_the_attribute_named(uri: str, attribute: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pkcs11_uri(uri)
    assert attribute in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_refuses_other_schemes() -> None:
    with pytest.raises(ConfigError, match="pkcs11:"):
        parse_pkcs11_uri("file:/tmp/key.pem")


def test_pin_value_never_in_repr_or_redacted_form() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t;object=k?pin-value=s3cr3t-pin")
    assert uri.pin_value == "s3cr3t-pin"
    assert "s3cr3t-pin" not in repr(uri)
    assert "s3cr3t-pin" not in uri.redacted()
    assert parse_pkcs11_uri(uri.redacted().replace("pin-value=***", "pin-value=x")).token == "t"


def test_pin_precedence_argument_uri_environment(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("from-file\n")
    with_value = parse_pkcs11_uri("pkcs11:object=k?pin-value=from-uri")
    with_source = parse_pkcs11_uri(f"pkcs11:object=k?pin-source=file:{pin_file}")
    bare = parse_pkcs11_uri("pkcs11:object=k")
    env = {"DPOP_PIN": "from-env"}
    assert resolve_pin(with_value, "from-arg", environ=env) == "from-arg"
    assert resolve_pin(with_value, None, environ=env) == "from-uri"
    assert resolve_pin(with_source, None, environ=env) == "from-file"
    assert resolve_pin(bare, None, environ=env) == "from-env"
    assert resolve_pin(bare, None, environ={}) is None


def test_pin_source_forms(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin.txt"
    pin_file.write_text("0001password\r\n")
    for source in (f"file:{pin_file}", f"file://{pin_file}", str(pin_file)):
        uri = parse_pkcs11_uri(f"pkcs11:object=k?pin-source={source}")
        assert resolve_pin(uri, None, environ={}) == "0001password"
    with pytest.raises(PinError, match="does not exist"):
        resolve_pin(
            parse_pkcs11_uri(f"pkcs11:object=k?pin-source=file:{tmp_path}/missing"),
            None,
            environ={},
        )
    with pytest.raises(ConfigError, match="pin-source"):
        resolve_pin(parse_pkcs11_uri("pkcs11:object=k?pin-source=env:X"), None, environ={})


def test_module_precedence_uri_environment_softhsm() -> None:
    with_path = parse_pkcs11_uri("pkcs11:object=k?module-path=/from/uri.so")
    bare = parse_pkcs11_uri("pkcs11:object=k")
    env = {"DPOP_PKCS11_MODULE": "/from/env.so"}
    assert resolve_module(with_path, environ=env) == "/from/uri.so"
    assert resolve_module(bare, environ=env) == "/from/env.so"
    fallback = resolve_module(bare, environ={})  # the installed SoftHSM2, or a clear error
    assert fallback.endswith("libsofthsm2.so")


def test_ec_point_accepts_wrapped_and_bare_and_refuses_compressed() -> None:
    point = b"\x04" + bytes(range(64))
    assert decode_ec_point(b"\x04\x41" + point, "k") == point  # DER OCTET STRING (PKCS#11)
    assert decode_ec_point(point, "k") == point  # bare, as some older modules store it
    with pytest.raises(UnsupportedKeyError, match="compressed"):
        decode_ec_point(b"\x04\x21\x02" + bytes(32), "k")
    with pytest.raises(UnsupportedKeyError, match="OCTET STRING"):
        decode_ec_point(b"\x30\x00", "k")


# --- the signer on a real token -----------------------------------------------------------


def test_jwk_shape_and_thumbprint(signer: Pkcs11Signer) -> None:
    jwk = dict(signer.public_jwk)
    check_jwk_shape(jwk)
    assert jwk_thumbprint(signer.public_jwk) == oracle.thumbprint(jwk)
    assert signer.algorithm == "ES256"
    assert isinstance(signer, Signer)
    assert isinstance(signer, AsyncSigner)


def test_jwk_matches_the_public_key_read_directly(
    signer: Pkcs11Signer, admin: Callable[[Callable[[Any], Any]], Any]
) -> None:
    label = parse_pkcs11_uri(signer.uri).object

    def read(session: Any) -> bytes:
        public = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, label=label)
        return bytes(encode_ec_public_key(public))

    public = load_der_public_key(admin(read))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    jwk = dict(signer.public_jwk)
    assert jwk["x"] == b64(numbers.x.to_bytes(32, "big"))
    assert jwk["y"] == b64(numbers.y.to_bytes(32, "big"))


def test_signatures_verify(signer: Pkcs11Signer) -> None:
    pairs = [(b"msg-%d" % i, signer.sign(b"msg-%d" % i)) for i in range(300)]
    verify_all(dict(signer.public_jwk), pairs)


@pytest.mark.slow
def test_20000_signatures_verify_including_leading_zero_ones(signer: Pkcs11Signer) -> None:
    pairs = []
    for i in range(20_000):
        message = b"dpop-signing-input-" + i.to_bytes(4, "big")
        pairs.append((message, signer.sign(message)))
    leading_zero = verify_all(dict(signer.public_jwk), pairs)
    assert 40 <= leading_zero <= 400, leading_zero  # ~2/256 of 20,000 = ~156 expected


def test_four_threads_on_one_signer(signer: Pkcs11Signer) -> None:
    results: dict[int, list[tuple[bytes, bytes]]] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            results[n] = [(m, signer.sign(m)) for m in (b"t%d-%d" % (n, i) for i in range(2_000))]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert sorted(results) == [0, 1, 2, 3]
    verify_all(dict(signer.public_jwk), [p for n in range(4) for p in results[n]])


def test_async_from_many_concurrent_tasks(signer: Pkcs11Signer) -> None:
    async def main() -> tuple[list[bytes], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        signatures = await asyncio.gather(
            *(sign_async(signer, b"a%d" % i) for i in range(300)),
            *(signer.sign_async(b"b%d" % i) for i in range(300)),
        )
        done.set()
        await tick_task
        return list(signatures), ticks

    signatures, ticks = asyncio.run(main())
    messages = [b"a%d" % i for i in range(300)] + [b"b%d" % i for i in range(300)]
    verify_all(dict(signer.public_jwk), list(zip(messages, signatures, strict=True)))
    assert ticks > 1  # the loop kept running while the executor signed


def test_sign_digest_enforces_32_bytes(signer: Pkcs11Signer) -> None:
    import hashlib

    digest = hashlib.sha256(b"abc").digest()
    verify_all(dict(signer.public_jwk), [(b"abc", signer.sign_digest(digest))])
    for size in (0, 20, 31, 33, 48, 64):
        with pytest.raises(SigningFailedError, match="32-byte"):
            signer.sign_digest(bytes(size))


def test_load_signer_dispatches_uris(pkcs11_key_uri: str, signer: Pkcs11Signer) -> None:
    with load_signer(pkcs11_key_uri) as other:  # type: ignore[attr-defined]
        assert isinstance(other, Pkcs11Signer)
        assert other.public_jwk == signer.public_jwk


def test_signers_on_one_token_coexist_and_close_independently(
    softhsm: SoftHsmToken, signer: Pkcs11Signer
) -> None:
    first = generate_pkcs11_key(softhsm.uri(unique("coexist-a")), pin=softhsm.pin)
    second = generate_pkcs11_key(softhsm.uri(unique("coexist-b")), pin=softhsm.pin)
    same = open_pkcs11_signer(first.uri, pin=softhsm.pin)
    first.close()
    first.close()  # idempotent
    # Closing one signer must not log the others out (PKCS#11 login is per application).
    verify_all(dict(second.public_jwk), [(b"x", second.sign(b"x"))])
    verify_all(dict(same.public_jwk), [(b"y", same.sign(b"y"))])
    second.close()
    same.close()
    verify_all(dict(signer.public_jwk), [(b"z", signer.sign(b"z"))])
    with pytest.raises(SignerUnavailableError, match="closed"):
        same.sign(b"after close")


def test_last_close_logs_out_and_a_new_open_logs_in_again(softhsm: SoftHsmToken) -> None:
    # Runs in a fresh process so no other signer holds the token's login.
    script = textwrap.dedent(
        f"""
        from dpop_signer.signers.pkcs11 import open_pkcs11_signer, generate_pkcs11_key
        uri = {softhsm.uri("fresh-" + uuid.uuid4().hex[:8])!r}
        s = generate_pkcs11_key(uri, pin="1234")
        module = s.module
        s.close()
        assert module.call(lambda: len(module.anchors)) == 0
        s = open_pkcs11_signer(s.uri, pin="1234")
        assert len(s.sign(b"again")) == 64
        s.close()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_generated_key_reads_back_sensitive_and_never_extractable(
    softhsm: SoftHsmToken, admin: Callable[[Callable[[Any], Any]], Any]
) -> None:
    label = unique("gen")
    with generate_pkcs11_key(softhsm.uri(label), pin=softhsm.pin) as generated:
        key_id = parse_pkcs11_uri(generated.uri).id
        assert key_id is not None
        assert len(key_id) == 2

    def read(session: Any) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
        private = session.get_key(ObjectClass.PRIVATE_KEY, label=label)
        public = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
        names = (
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.SIGN,
            Attribute.DERIVE,
            Attribute.DECRYPT,
            Attribute.UNWRAP,
            Attribute.LOCAL,
            Attribute.KEY_TYPE,
            Attribute.ID,
        )
        return (
            {a: private[a] for a in names},
            {a: public[a] for a in (Attribute.TOKEN, Attribute.VERIFY, Attribute.ID)},
        )

    private, public = admin(read)
    assert private[Attribute.KEY_TYPE] == KeyType.EC
    assert private[Attribute.TOKEN] is True
    assert private[Attribute.PRIVATE] is True
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.ALWAYS_SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.NEVER_EXTRACTABLE] is True
    assert private[Attribute.SIGN] is True
    assert private[Attribute.DERIVE] is False
    assert private[Attribute.DECRYPT] is False
    assert private[Attribute.UNWRAP] is False
    assert private[Attribute.LOCAL] is True
    assert public[Attribute.TOKEN] is True
    assert public[Attribute.VERIFY] is True
    assert private[Attribute.ID] == public[Attribute.ID] == key_id


def test_generate_refuses_an_existing_label(pkcs11_key_uri: str) -> None:
    with pytest.raises(ConfigError, match="already has an object labelled") as info:
        generate_key(pkcs11_key_uri)
    assert_one_line_without_pin(info.value)


def test_generate_needs_a_label(softhsm: SoftHsmToken) -> None:
    with pytest.raises(ConfigError, match="object="):
        generate_pkcs11_key(f"pkcs11:token={softhsm.label};id=%01", pin=softhsm.pin)


def test_forty_character_label_and_two_byte_id(softhsm: SoftHsmToken) -> None:
    label = ("yubihsm-sized-label-" + uuid.uuid4().hex)[:40]
    assert len(label) == 40
    id_hex = uuid.uuid4().hex[:4]
    id_pct = "%" + id_hex[:2] + "%" + id_hex[2:]
    base = f"pkcs11:token={softhsm.label}"
    with generate_pkcs11_key(f"{base};object={label};id={id_pct}", pin=softhsm.pin) as made:
        expected = made.public_jwk
    for selector in (f"object={label}", f"id={id_pct}", f"object={label};id={id_pct}"):
        with open_pkcs11_signer(f"{base};{selector}", pin=softhsm.pin) as opened:
            assert opened.public_jwk == expected
            assert parse_pkcs11_uri(opened.uri).id == bytes.fromhex(id_hex)
            verify_all(dict(expected), [(b"m", opened.sign(b"m"))])


def test_serial_selects_the_token(signer: Pkcs11Signer, softhsm: SoftHsmToken) -> None:
    serial = signer.module.call(
        lambda: signer.module.lib.get_token(token_label=softhsm.label).serial.decode()
    )
    label = parse_pkcs11_uri(signer.uri).object
    with open_pkcs11_signer(f"pkcs11:serial={serial};object={label}", pin="1234") as opened:
        assert opened.public_jwk == signer.public_jwk


def test_repr_and_uri_never_show_the_pin(softhsm: SoftHsmToken, signer: Pkcs11Signer) -> None:
    label = parse_pkcs11_uri(signer.uri).object
    uri = f"pkcs11:token={softhsm.label};object={label};id=%AB%CD?pin-value={softhsm.pin}"
    assert "1234" not in repr(signer)
    assert "1234" not in signer.uri
    with pytest.raises(KeyNotFoundError) as info:  # that id is not the key's
        open_pkcs11_signer(uri)
    assert_one_line_without_pin(info.value)


# --- one clear error per bad input --------------------------------------------------------


def test_wrong_pin_is_refused_and_not_retried(softhsm: SoftHsmToken) -> None:
    # A fresh process, so C_Login really runs (no other signer holds the login), and so we
    # can check that the failed login left no session behind: an SO session needs none open.
    script = textwrap.dedent(
        f"""
        import sys
        from dpop_signer import PinError
        from dpop_signer.signers.pkcs11 import open_pkcs11_signer, pkcs11_module
        uri = "pkcs11:token={softhsm.label};object=whatever?module-path={softhsm.module}"
        for _ in range(2):
            try:
                open_pkcs11_signer(uri, pin="99999999")
            except PinError as exc:
                print(type(exc).__name__, exc)
        module = pkcs11_module({softhsm.module!r})
        def so_session():
            token = module.lib.get_token(token_label={softhsm.label!r})
            token.open(rw=True, so_pin={softhsm.so_pin!r}).close()
        module.call(so_session)
        print("no leaked session")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "no leaked session"
    assert len(lines) == 3
    for line in lines[:2]:
        assert line.startswith("PinError wrong PIN for token 'dpop-test'")
        assert "99999999" not in line


def test_wrong_pin_while_logged_in_is_refused(signer: Pkcs11Signer) -> None:
    with pytest.raises(PinError) as info:
        open_pkcs11_signer(signer.uri, pin="4321")
    assert_one_line_without_pin(info.value, "4321")


def test_missing_pin(signer: Pkcs11Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPOP_PIN", raising=False)
    with pytest.raises(PinError, match="needs a PIN: pass pin=, or add pin-source=") as info:
        open_pkcs11_signer(signer.uri)
    assert_one_line_without_pin(info.value)


def test_pin_from_environment_and_pin_source_file(
    signer: Pkcs11Signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPOP_PIN", "1234")
    with open_pkcs11_signer(signer.uri) as opened:
        assert opened.public_jwk == signer.public_jwk
    monkeypatch.setenv("DPOP_PIN", "0000")  # the URI's pin-source wins over the environment
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n")
    with open_pkcs11_signer(f"{signer.uri}&pin-source=file:{pin_file}") as opened:
        assert opened.public_jwk == signer.public_jwk
    # ... and the argument wins over the URI.
    with open_pkcs11_signer(f"{signer.uri}&pin-value=0000", pin="1234") as opened:
        assert opened.public_jwk == signer.public_jwk


def test_module_from_environment_when_the_uri_has_none(
    signer: Pkcs11Signer, softhsm: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = parse_pkcs11_uri(signer.uri).object
    bare = f"pkcs11:token={softhsm.label};object={label}"
    monkeypatch.setenv("DPOP_PKCS11_MODULE", "/nonexistent/from-env.so")
    with pytest.raises(SignerUnavailableError, match=r"from-env\.so"):
        open_pkcs11_signer(bare, pin="1234")
    with pytest.raises(SignerUnavailableError, match=r"from-uri\.so"):
        open_pkcs11_signer(bare + "?module-path=/nonexistent/from-uri.so", pin="1234")
    monkeypatch.setenv("DPOP_PKCS11_MODULE", softhsm.module)
    with open_pkcs11_signer(bare, pin="1234") as opened:
        assert opened.public_jwk == signer.public_jwk


def test_missing_module_file(softhsm: SoftHsmToken) -> None:
    with pytest.raises(SignerUnavailableError) as info:
        open_pkcs11_signer(
            "pkcs11:token=t;object=k?module-path=/nonexistent/libvendor.so", pin="1234"
        )
    text = str(info.value)
    assert "/nonexistent/libvendor.so" in text
    assert "DPOP_PKCS11_MODULE" in text
    assert "softhsm2" in text
    assert_one_line_without_pin(info.value)


def test_yubihsm_module_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("YUBIHSM_PKCS11_CONF", raising=False)
    with pytest.raises(SignerUnavailableError, match="YUBIHSM_PKCS11_CONF"):
        open_pkcs11_signer("pkcs11:object=k?module-path=/nonexistent/yubihsm_pkcs11.so", pin="x")


def test_file_that_is_not_a_module(tmp_path: Path) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(SignerUnavailableError, match=r"libfake\.so") as info:
        open_pkcs11_signer(f"pkcs11:object=k?module-path={fake}", pin="1234")
    assert_one_line_without_pin(info.value)


def test_unknown_token_lists_the_tokens_present(softhsm: SoftHsmToken) -> None:
    with pytest.raises(SignerUnavailableError) as info:
        open_pkcs11_signer(softhsm.uri("k").replace("token=dpop-test", "token=no-such"), pin="1234")
    assert "no-such" in str(info.value)
    assert "'dpop-test'" in str(info.value)
    assert_one_line_without_pin(info.value)


def test_unknown_key_label(softhsm: SoftHsmToken, signer: Pkcs11Signer) -> None:
    with pytest.raises(KeyNotFoundError, match="no-such-key") as info:
        open_pkcs11_signer(softhsm.uri("no-such-key"), pin="1234")
    assert_one_line_without_pin(info.value)


def test_uri_without_key_name() -> None:
    with pytest.raises(ConfigError, match="object="):
        open_pkcs11_signer("pkcs11:token=dpop-test", pin="1234")


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("dup", KeyNotFoundError, "2 EC private keys"),
        ("rsa", UnsupportedKeyError, "RSA"),
        ("k256", UnsupportedKeyError, "secp256k1"),
        ("pubonly", UnsupportedKeyError, "public key"),
        ("nopub", KeyNotFoundError, "no EC public key objects"),
        ("plain", UnsupportedKeyError, "not sensitive"),
        ("mixed", UnsupportedKeyError, "does not match"),
    ],
)
def test_bad_keys_are_refused(
    softhsm: SoftHsmToken,
    bad_keys: dict[str, str],
    case: str,
    error: type[DPoPSignerError],
    words: str,
) -> None:
    with pytest.raises(error) as info:
        open_pkcs11_signer(softhsm.uri(bad_keys[case]), pin="1234")
    assert type(info.value) is error
    assert words in str(info.value)
    assert bad_keys[case] in str(info.value)
    assert "dpop-test" in str(info.value)
    assert_one_line_without_pin(info.value)


# --- recovery -----------------------------------------------------------------------------


def sabotage(signer: Pkcs11Signer, what: str) -> None:
    """Break the signer's session behind its back, holding the module's lock."""
    module = signer.module
    anchor = signer._anchor

    def run() -> None:
        assert anchor.session is not None
        cryptoki = module.cryptoki
        assert cryptoki is not None  # SoftHSM2 shares its state with our ctypes calls
        if what == "close-session":
            anchor.session.close()
        elif what == "close-all-sessions":
            cryptoki.close_all_sessions(anchor.token.slot.slot_id)
        elif what == "logout":
            cryptoki.logout(int(anchor.session.handle))  # type: ignore[attr-defined]
        elif what == "finalize":
            module.lib.finalize()

    module.call(run)


@pytest.mark.parametrize("what", ["close-session", "close-all-sessions", "logout", "finalize"])
def test_lost_session_is_recovered_on_next_sign(
    signer: Pkcs11Signer, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    verify_all(dict(signer.public_jwk), [(b"before", signer.sign(b"before"))])
    sabotage(signer, what)
    with caplog.at_level("INFO", logger="dpop_signer.pkcs11"):
        verify_all(dict(signer.public_jwk), [(b"after", signer.sign(b"after"))])
    # The sabotage really broke the session: the signer saw an error and reopened once.
    assert [r.getMessage() for r in caplog.records if "reopening" in r.getMessage()], what
    assert "1234" not in caplog.text
    verify_all(dict(signer.public_jwk), [(b"again", signer.sign(b"again"))])


def test_lost_session_recovered_for_every_signer_on_the_token(
    softhsm: SoftHsmToken, signer: Pkcs11Signer
) -> None:
    with generate_pkcs11_key(softhsm.uri(unique("recover")), pin=softhsm.pin) as other:
        sabotage(signer, "close-all-sessions")
        verify_all(dict(signer.public_jwk), [(b"1", signer.sign(b"1"))])
        verify_all(dict(other.public_jwk), [(b"2", other.sign(b"2"))])  # re-finds its key


def test_lost_session_with_a_pin_that_no_longer_works_is_not_retried(
    signer: Pkcs11Signer,
) -> None:
    anchor = signer._anchor
    good = anchor._pin
    attempts = []
    cryptoki = signer.module.cryptoki
    assert cryptoki is not None
    real_login = cryptoki.login

    def counting_login(handle: int, pin: str) -> None:
        attempts.append(1)
        real_login(handle, pin)

    try:
        anchor._pin = "0000"  # as if the PIN had been changed while we ran
        cryptoki.login = counting_login  # type: ignore[method-assign,assignment]
        sabotage(signer, "close-all-sessions")
        with pytest.raises(PinError) as info:
            signer.sign(b"x")
        assert_one_line_without_pin(info.value, "0000")
        assert len(attempts) == 1
    finally:
        anchor._pin = good
        del cryptoki.login
    verify_all(dict(signer.public_jwk), [(b"ok", signer.sign(b"ok"))])


def test_open_after_a_lost_session_recovers(signer: Pkcs11Signer, softhsm: SoftHsmToken) -> None:
    sabotage(signer, "close-all-sessions")
    with open_pkcs11_signer(signer.uri, pin=softhsm.pin) as opened:
        assert opened.public_jwk == signer.public_jwk
    verify_all(dict(signer.public_jwk), [(b"s", signer.sign(b"s"))])


def test_exported_from_the_package() -> None:
    import dpop_signer

    assert dpop_signer.Pkcs11Signer is Pkcs11Signer


P11KIT_PROXY = next(
    (
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
            "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
            "/usr/lib64/p11-kit-proxy.so",
            "/usr/lib/p11-kit-proxy.so",
        )
        if os.path.exists(p)
    ),
    None,
)


def test_through_p11_kit_proxy_login_falls_back_to_python_pkcs11(
    softhsm: SoftHsmToken, pkcs11_key_uri: str
) -> None:
    # p11-kit-proxy hands out a new module instance per C_GetFunctionList, so the ctypes login
    # cannot reach python-pkcs11's instance; the backend must notice and log in another way.
    # A fresh process: the proxy initializes SoftHSM2 itself.
    require(
        P11KIT_PROXY is not None, "p11-kit-proxy.so is missing (Debian: apt-get install p11-kit)"
    )
    label = parse_pkcs11_uri(pkcs11_key_uri).object
    uri = f"pkcs11:token={softhsm.label};object={label}?module-path={P11KIT_PROXY}"
    script = textwrap.dedent(
        f"""
        from dpop_signer import PinError
        from dpop_signer.signers.pkcs11 import open_pkcs11_signer, pkcs11_module
        from tests.sigcheck import verify_all
        uri = {uri!r}
        try:
            open_pkcs11_signer(uri, pin="99999999")
        except PinError as exc:
            print("PinError", "99999999" in str(exc))
        print("ctypes login", pkcs11_module({P11KIT_PROXY!r}).cryptoki is not None)
        a = open_pkcs11_signer(uri, pin="1234")
        b = open_pkcs11_signer(uri, pin="1234")
        a.close()
        verify_all(dict(b.public_jwk), [(b"m", b.sign(b"m"))])
        print("jwk", b.public_jwk["x"])
        b.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    with open_pkcs11_signer(pkcs11_key_uri) as direct:
        assert done.stdout.split() == [
            "PinError",
            "False",
            "ctypes",
            "login",
            "False",
            "jwk",
            dict(direct.public_jwk)["x"],
        ]


def test_several_sessions_sign_at_once_through_p11_kit_proxy(
    softhsm: SoftHsmToken, pkcs11_key_uri: str
) -> None:
    # sessions=2: two signatures in the module at the same time (p11-kit-proxy initializes
    # SoftHSM2 with locking). 4 threads x 2,500 signatures, every one verified independently.
    require(
        P11KIT_PROXY is not None, "p11-kit-proxy.so is missing (Debian: apt-get install p11-kit)"
    )
    label = parse_pkcs11_uri(pkcs11_key_uri).object
    uri = f"pkcs11:token={softhsm.label};object={label}?module-path={P11KIT_PROXY}&sessions=2"
    script = textwrap.dedent(
        f"""
        import asyncio, json, threading
        from dpop_signer.signers.pkcs11 import open_pkcs11_signer
        signer = open_pkcs11_signer({uri!r}, pin="1234")
        pairs, lock = [], threading.Lock()
        def work(n):
            mine = [(b"t%d-%d" % (n, i), signer.sign(b"t%d-%d" % (n, i))) for i in range(2500)]
            with lock:
                pairs.extend(mine)
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads: t.start()
        for t in threads: t.join(120)
        async def tasks():
            return await asyncio.gather(*(signer.sign_async(b"a%d" % i) for i in range(200)))
        pairs += [(b"a%d" % i, s) for i, s in enumerate(asyncio.run(tasks()))]
        print(json.dumps({{"sessions": signer.sessions, "jwk": signer.public_jwk,
                          "pairs": [(m.hex(), s.hex()) for m, s in pairs]}}))
        signer.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["sessions"] == 2
    pairs = [(bytes.fromhex(m), bytes.fromhex(s)) for m, s in result["pairs"]]
    assert len(pairs) == 4 * 2500 + 200
    verify_all(result["jwk"], pairs)


def test_several_sessions_are_refused_for_a_module_without_locking(pkcs11_key_uri: str) -> None:
    with pytest.raises(ConfigError, match=r"sessions=2 needs a module that is safe") as info:
        open_pkcs11_signer(pkcs11_key_uri + "&sessions=2")
    assert "p11-kit-proxy.so" in str(info.value)
    with pytest.raises(ConfigError, match="sessions=0 is not a whole number"):
        open_pkcs11_signer(pkcs11_key_uri + "&sessions=0")


def test_several_sessions_are_refused_when_the_module_is_also_loaded_directly(
    softhsm: SoftHsmToken, signer: Pkcs11Signer
) -> None:
    # This process loads SoftHSM2 directly (the fixture's signer), without locking; through
    # p11-kit-proxy the same library would then be called from two sessions at once.
    require(
        P11KIT_PROXY is not None, "p11-kit-proxy.so is missing (Debian: apt-get install p11-kit)"
    )
    uri = f"pkcs11:token={softhsm.label};object=x?module-path={P11KIT_PROXY}&sessions=2"
    with pytest.raises(ConfigError, match="not safe in this process") as info:
        open_pkcs11_signer(uri, pin=softhsm.pin)
    assert "libsofthsm2.so" in str(info.value)
