"""Finding, checking, proving and generating the EC P-256 key inside a token.

Every function runs holding the module's lock. A key is found by the URI's ``object``/``id``
among EC private keys, checked (P-256, may sign, sensitive, ``CKM_ECDSA`` offered), and its public
point read from the public key object or the private key. One test signature proves the pair
belongs together, at open and whenever the key is found again (`prove_same_key`), so no proof is
ever signed by a key other than the one in its ``jwk`` header. Generation tries the strictest
template the module accepts and reads the safety attributes back.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from contextlib import suppress
from typing import Any, cast

import pkcs11
from asn1crypto.core import OctetString
from asn1crypto.keys import ECDomainParameters
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from dpop_signer.errors import (
    ConfigError,
    KeyChangedError,
    KeyNotFoundError,
    SignerError,
    SignerUnavailableError,
    UnsupportedKeyError,
)
from dpop_signer.jwk import EcPublicJwk, ec_public_jwk, raw_to_der_signature
from dpop_signer.signers.base import check_signature
from dpop_signer.signers.pkcs11_errors import ckr
from dpop_signer.signers.pkcs11_login import LoginSession, close_quietly
from dpop_signer.signers.pkcs11_uri import (
    Pkcs11Uri,
)

__all__ = [
    "attribute",
    "curve_of",
    "decode_ec_point",
    "find_private_key",
    "generate_key_pair",
    "prove_same_key",
    "public_point",
    "signs_for",
]

logger = logging.getLogger("dpop_signer.pkcs11")

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_SELF_TEST_MESSAGE = b"dpop-signer: does the private key match the public key?"


def find_private_key(session: pkcs11.Session, uri: Pkcs11Uri, what: str) -> SignMixin:
    """The one EC private key the URI's ``object``/``id`` select, or a clear error."""
    selector: dict[Attribute, Any] = {}
    if uri.object is not None:
        selector[Attribute.LABEL] = uri.object
    if uri.id is not None:
        selector[Attribute.ID] = uri.id
    private = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, **selector}
    # list(): a search left half-read keeps the session busy (OperationActive) or blocks it.
    ec_keys = list(session.get_objects({**private, Attribute.KEY_TYPE: KeyType.EC}))
    if len(ec_keys) == 1:
        return cast(SignMixin, ec_keys[0])
    if ec_keys:
        raise KeyNotFoundError(
            f"{len(ec_keys)} EC private keys match {what}; give each key a unique label, or "
            "add id= to the URI"
        )
    others = list(session.get_objects(private))
    if others:
        kinds = sorted({_key_type_name(o) for o in others})
        raise UnsupportedKeyError(
            f"{what} is {'/'.join(kinds)}, not EC; ES256 needs an EC P-256 key "
            "(make one with 'dpop keygen')"
        )
    named = list(session.get_objects(selector))
    if named:
        classes = sorted({_object_class_name(o) for o in named})
        raise UnsupportedKeyError(
            f"{what} is only a {'/'.join(classes)} object; signing needs its private key"
        )
    present = sorted(
        {
            str(o[Attribute.LABEL])
            for o in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        }
    )
    shown = ", ".join(repr(label) for label in present[:10]) or "none"
    raise KeyNotFoundError(
        f"{what} does not exist; private keys in the token: {shown}"
        + (" ..." if len(present) > 10 else "")
    )


def _key_type_name(obj: pkcs11.Object) -> str:
    try:
        return f"an {KeyType(obj[Attribute.KEY_TYPE]).name} key"
    except (p11x.PKCS11Error, ValueError):
        return "a non-EC key"


def _object_class_name(obj: pkcs11.Object) -> str:
    try:
        return ObjectClass(obj[Attribute.CLASS]).name.lower().replace("_", " ")
    except (p11x.PKCS11Error, ValueError):
        return "non-key"


def curve_of(ec_params: bytes) -> str:
    """``P-256``-style name of DER ECParameters (a namedCurve OID in practice)."""
    try:
        params = ECDomainParameters.load(ec_params)
        if params.name != "named":
            return "explicit-parameters"
        name = str(params.chosen.native)
    except (ValueError, TypeError):
        return "unknown"
    return _CURVE_NAMES.get(name, name)


def decode_ec_point(raw: bytes, what: str) -> bytes:
    """The uncompressed point from CKA_EC_POINT: DER OCTET STRING (the standard) or bare."""
    if len(raw) == 65 and raw[0] == 4:
        point = raw  # a bare point (some older modules); a wrapped one is 67 bytes
    else:
        try:
            point = bytes(OctetString.load(raw, strict=True).native)
        except (ValueError, TypeError) as exc:
            raise UnsupportedKeyError(
                f"the CKA_EC_POINT of {what} is neither a DER OCTET STRING nor a bare point"
            ) from exc
    if point[:1] in (b"\x02", b"\x03"):
        raise UnsupportedKeyError(
            f"{what} has a compressed public point; store the public key uncompressed"
        )
    return point


def attribute(obj: pkcs11.Object, attr: Attribute) -> Any:
    """An attribute's value, or None when the token will not say."""
    try:
        return obj[attr]
    except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, p11x.FunctionFailed):
        return None


def public_point(session: pkcs11.Session, key: SignMixin, what: str) -> bytes:
    """The public point of ``key``: from its public key object, else from the key itself."""
    key_id = attribute(key, Attribute.ID)
    label = attribute(key, Attribute.LABEL)
    search: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: KeyType.EC,
    }
    if key_id:
        search[Attribute.ID] = key_id
    elif label:
        search[Attribute.LABEL] = label
    publics = list(session.get_objects(search)) if len(search) > 2 else []
    if len(publics) > 1 and key_id and label:
        publics = [p for p in publics if attribute(p, Attribute.LABEL) == label]
    if len(publics) == 1:
        return decode_ec_point(bytes(publics[0][Attribute.EC_POINT]), what)
    # Some tokens keep no public key object, but expose CKA_EC_POINT on the private key.
    raw = attribute(key, Attribute.EC_POINT)
    if raw:
        return decode_ec_point(bytes(raw), what)
    found = "several" if publics else "no"
    raise KeyNotFoundError(
        f"{found} EC public key objects share the id/label of {what}, and the private key does "
        "not expose CKA_EC_POINT; store its public key in the token with the same CKA_ID"
    )


def signs_for(key: SignMixin, point: bytes, what: str) -> bool:
    """Whether ``key`` makes signatures that ``point`` verifies: one test signature.

    It proves the public key we publish belongs to this private key (a label can pair
    mismatched objects) and that the token signs as we expect.
    """
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise UnsupportedKeyError(f"the public point of {what} is not on P-256") from exc
    probe = key.sign(hashlib.sha256(_SELF_TEST_MESSAGE).digest(), mechanism=Mechanism.ECDSA)
    check_signature(probe, source=f"PKCS#11 {what}")
    try:
        public.verify(raw_to_der_signature(probe), _SELF_TEST_MESSAGE, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def prove_same_key(session: pkcs11.Session, key: SignMixin, jwk: EcPublicJwk, what: str) -> None:
    """Refuse a key found again unless it is the key whose ``jwk`` the signer publishes.

    Re-initializing a token, or deleting a key and generating another under the same label,
    leaves a different key behind the same name; proofs signed with it would carry a ``jwk``
    that does not verify them, and the tokens already fetched are bound to the old thumbprint
    (RFC 9449 §6).
    """
    point = public_point(session, key, what)
    if ec_public_jwk(point) != jwk or not signs_for(key, point, what):
        raise KeyChangedError(
            f"{what} is no longer the key this signer was opened with (the token now holds a "
            "different key under that name); nothing was signed with it. Open the signer again "
            "(or reload the service) to use the new key: tokens bound to the old key stay unused"
        )


def generate_key_pair(anchor: LoginSession, uri: Pkcs11Uri) -> bytes:
    """Make an EC P-256 key pair labelled ``uri.object`` in the token; return its CKA_ID."""
    assert uri.object is not None
    where = anchor.where
    missing = {Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA} - anchor.mechanisms
    if missing:
        names = ", ".join(sorted(f"CKM_{m.name}" for m in missing))
        raise UnsupportedKeyError(f"{where} does not offer {names}; it cannot make an ES256 key")
    try:
        # The anchor holds the login; a read-write session opened without a PIN shares it.
        session = anchor.token.open(rw=True)
    except p11x.PKCS11Error as exc:
        raise SignerUnavailableError(
            f"cannot open a read-write session on {where}: {ckr(exc)}"
        ) from exc
    try:
        if list(session.get_objects({Attribute.LABEL: uri.object})):
            raise ConfigError(
                f"{where} already has an object labelled {uri.object!r}; keys are never "
                "overwritten: choose another object= label"
            )
        key_id = uri.id if uri.id is not None else _free_id(session)
        if list(session.get_objects({Attribute.ID: key_id})):
            raise ConfigError(
                f"{where} already has an object with id {key_id.hex()}; choose another id="
            )
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        public, private, refused = _generate_with_fallback(
            session, params, uri.object, key_id, where
        )
        # A module fills in what a template leaves out, and may ignore what it asks: read back
        # what keeps the key inside the token, and never hand out a key that lacks it.
        wanted = {
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
        }
        actual = {attr: attribute(private, attr) for attr in wanted}
        wrong = [
            f"CKA_{attr.name} {actual[attr]} (asked {value})"
            for attr, value in wanted.items()
            if actual[attr] is not value
        ]
        if wrong:
            for obj in (private, public):
                with suppress(p11x.PKCS11Error):
                    obj.destroy()
            raise UnsupportedKeyError(
                f"{where} made key {uri.object!r} with {', '.join(wrong)}, so it was deleted; "
                "this token cannot keep an ES256 key private, sensitive and non-extractable: "
                "use another token"
            )
        extra = [
            f"CKA_{attr.name}"
            for attr in (Attribute.DERIVE, Attribute.DECRYPT, Attribute.UNWRAP)
            if attribute(private, attr)
        ]
    except p11x.PKCS11Error as exc:
        raise SignerError(f"generating key {uri.object!r} in {where} failed: {ckr(exc)}") from exc
    finally:
        close_quietly(session)  # opened without a PIN: closing it does not log out
    if refused:
        logger.warning("%s refused the full key template: %s", where, refused)
    if extra:
        logger.warning(
            "%s set %s true on key %r by default; dpop-signer only signs with it",
            where,
            "/".join(extra),
            uri.object,
        )
    logger.info("generated EC P-256 key %r (id %s) in %s", uri.object, key_id.hex(), where)
    return key_id


def _generate_with_fallback(
    session: pkcs11.Session,
    params: pkcs11.DomainParameters,
    label: str,
    key_id: bytes,
    where: str,
) -> tuple[pkcs11.PublicKey, pkcs11.PrivateKey, str]:
    """Generate the pair with the strictest template the module accepts.

    Returns the keys and, when the full template was refused, what the module answered and
    what the accepted template left out (empty when nothing was refused). Modules differ in
    which attributes a caller may set: tpm2-pkcs11 derives the public key's CKA_VERIFY and
    CKA_ENCRYPT from the TPM key and answers CKR_GENERAL_ERROR to a template that sets them.
    Every template asks what keeps the key safe (private, sensitive, never extractable, allowed
    to sign); the caller reads it back.
    """
    # python-pkcs11 adds usage attributes of its own (CKA_ENCRYPT, CKA_VERIFY, CKA_DERIVE...);
    # DEFAULT leaves an attribute out of the template the module sees.
    omit = pkcs11.constants.DEFAULT
    safe_private: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
    }
    full_public: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
    }
    full_private = {
        **safe_private,
        Attribute.DERIVE: False,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
    }
    attempts: tuple[tuple[str, dict[Attribute, Any], dict[Attribute, Any]], ...] = (
        ("", full_public, full_private),
        (
            "the public key's CKA_VERIFY and CKA_ENCRYPT",
            {**full_public, Attribute.VERIFY: omit, Attribute.ENCRYPT: omit},
            full_private,
        ),
        (
            "all but CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE and CKA_SIGN",
            {
                Attribute.TOKEN: True,
                Attribute.VERIFY: omit,
                Attribute.ENCRYPT: omit,
                Attribute.WRAP: omit,
            },
            {
                **safe_private,
                Attribute.DERIVE: omit,
                Attribute.DECRYPT: omit,
                Attribute.UNWRAP: omit,
            },
        ),
    )
    refusals: list[str] = []
    for left_out, public_template, private_template in attempts:
        try:
            public, private = params.generate_keypair(
                store=True,
                label=label,
                id=key_id,
                public_template=public_template,
                private_template=private_template,
            )
        except (
            p11x.AttributeTypeInvalid,
            p11x.AttributeValueInvalid,
            p11x.AttributeReadOnly,
            p11x.TemplateIncomplete,
            p11x.TemplateInconsistent,
            p11x.GeneralError,
        ) as exc:
            refusals.append(ckr(exc))
            # The id was free before: whatever carries it now is a half-made pair of ours.
            for obj in list(session.get_objects({Attribute.ID: key_id})):
                obj.destroy()
            continue
        if not refusals:
            return public, private, ""
        return public, private, f"{', '.join(refusals)}; made key {label!r} without {left_out}"
    raise SignerError(
        f"{where} refused every key template for {label!r} ({', '.join(refusals)}), down to one "
        "asking only CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE and CKA_SIGN true and "
        "CKA_EXTRACTABLE false on the private key; make the key with the token's own tool "
        f"with those attributes, then use it with object={label}"
    )


def _free_id(session: pkcs11.Session) -> bytes:
    for _ in range(64):
        candidate = secrets.token_bytes(2)
        if candidate != b"\x00\x00" and not list(session.get_objects({Attribute.ID: candidate})):
            return candidate
    raise ConfigError("could not find a free 2-byte CKA_ID in 64 tries; give one with id=")
