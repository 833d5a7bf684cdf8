"""Finding, checking, proving and generating the signing key inside a token.

Every function runs holding the module's lock. A key is found by the URI's ``object``/``id``
among EC, EC Edwards and RSA private keys; its algorithm follows from it (`key_algorithm`: EC
P-256/P-384/P-521 sign ES256/ES384/ES512, Ed25519 EdDSA, RSA of 2048 bits or more PS256, or
RS256 when the URI says ``alg=RS256``), and `SignScheme` says how the token makes that
algorithm's JWS signature:

* ES256/ES384/ES512: SHA-256/384/512 on the host, ``CKM_ECDSA`` in the token, which returns r||s
  already (PKCS#11 3.0 §2.3.1, RFC 7518 §3.4);
* EdDSA: ``CKM_EDDSA`` over the message itself (Ed25519 hashes inside; RFC 8037 §3.1);
* PS256: SHA-256 on the host, ``CKM_RSA_PKCS_PSS`` with ``CKM_SHA256``, MGF1-SHA-256 and a 32-byte
  salt (RFC 7518 §3.5);
* RS256: ``CKM_SHA256_RSA_PKCS`` over the message (the token hashes and adds the DigestInfo).

The public key is read from the public key object or the private key. One test signature
proves the pair belongs together, at open and whenever the key is found again
(`prove_same_key`), so no proof is ever signed by a key other than the one in its ``jwk``
header. Generation tries the strictest template the module accepts and reads the safety
attributes back.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import pkcs11
from asn1crypto import core as asn1
from asn1crypto.core import OctetString
from asn1crypto.keys import ECDomainParameters
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from dpop_signer.algorithms import (
    ALGORITHMS,
    MIN_RSA_BITS,
    RSA_KEYGEN_BITS,
    JwsAlgorithm,
    algorithm_for_key,
    verify_signature,
)
from dpop_signer.errors import (
    ConfigError,
    KeyChangedError,
    KeyNotFoundError,
    SignerError,
    SignerUnavailableError,
    UnsupportedKeyError,
)
from dpop_signer.jwk import (
    CRV_OF_CURVE,
    PublicJwk,
    ec_public_jwk,
    jwk_signature_size,
    okp_public_jwk,
    public_key_of_jwk,
    rsa_public_jwk,
)
from dpop_signer.signers.base import check_signature
from dpop_signer.signers.pkcs11_errors import ckr
from dpop_signer.signers.pkcs11_login import LoginSession, close_quietly
from dpop_signer.signers.pkcs11_uri import (
    Pkcs11Uri,
)

__all__ = [
    "SignScheme",
    "attribute",
    "curve_of",
    "decode_ec_point",
    "find_private_key",
    "generate_key_pair",
    "key_algorithm",
    "prove_same_key",
    "public_jwk_of",
    "public_point",
    "scheme_for",
    "signs_for",
]

logger = logging.getLogger("dpop_signer.pkcs11")

_SELF_TEST_MESSAGE = b"dpop-signer: does the private key match the public key?"
_KEY_TYPES = {KeyType.EC: "EC", KeyType.EC_EDWARDS: "EC Edwards", KeyType.RSA: "RSA"}
"""Private key types a signer can use, with their names in messages."""
_ED25519_OID = "1.3.101.112"  # RFC 8410 §3 id-Ed25519


@dataclass(frozen=True)
class SignScheme:
    """How a token makes one algorithm's JWS signature (see the module docstring)."""

    algorithm: JwsAlgorithm
    mechanism: Mechanism
    param: Any
    """python-pkcs11's ``mechanism_param`` (the PSS parameters), or None."""
    hasher: Callable[[bytes], Any] | None
    """Host-side hash (``hashlib.sha256``...); None: the token is given the message itself."""
    digest_size: int
    """Bytes of what the token is given after host hashing; 0 when it gets the message."""
    needs: frozenset[Mechanism]
    """Mechanisms the token must offer to sign (and, with the key-pair one, to generate)."""
    keygen: Mechanism

    def data(self, message: bytes) -> bytes:
        """What the token signs for ``message``: its digest, or the message itself."""
        return message if self.hasher is None else self.hasher(message).digest()


def scheme_for(alg: JwsAlgorithm) -> SignScheme:
    """The `SignScheme` of ``alg``."""
    return _SCHEMES[alg.name]


def _scheme(name: str, mechanism: Mechanism, param: Any, keygen: Mechanism) -> SignScheme:
    alg = ALGORITHMS[name]
    # RS256 goes to CKM_SHA256_RSA_PKCS whole, so that no DigestInfo is built on the host.
    hasher = alg.hasher if mechanism in (Mechanism.ECDSA, Mechanism.RSA_PKCS_PSS) else None
    size = hasher(b"").digest_size if hasher is not None else 0
    return SignScheme(alg, mechanism, param, hasher, size, frozenset({mechanism}), keygen)


_SCHEMES = {
    s.algorithm.name: s
    for s in (
        _scheme("ES256", Mechanism.ECDSA, None, Mechanism.EC_KEY_PAIR_GEN),
        _scheme("ES384", Mechanism.ECDSA, None, Mechanism.EC_KEY_PAIR_GEN),
        _scheme("ES512", Mechanism.ECDSA, None, Mechanism.EC_KEY_PAIR_GEN),
        _scheme("EdDSA", Mechanism.EDDSA, None, Mechanism.EC_EDWARDS_KEY_PAIR_GEN),
        _scheme(
            "PS256",
            Mechanism.RSA_PKCS_PSS,
            (Mechanism.SHA256, MGF.SHA256, 32),
            Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        ),
        _scheme("RS256", Mechanism.SHA256_RSA_PKCS, None, Mechanism.RSA_PKCS_KEY_PAIR_GEN),
    )
}


def find_private_key(session: pkcs11.Session, uri: Pkcs11Uri, what: str) -> SignMixin:
    """The one EC, EC Edwards or RSA private key the URI's ``object``/``id`` select."""
    selector: dict[Attribute, Any] = {}
    if uri.object is not None:
        selector[Attribute.LABEL] = uri.object
    if uri.id is not None:
        selector[Attribute.ID] = uri.id
    private = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, **selector}
    # list(): a search left half-read keeps the session busy (OperationActive) or blocks it.
    found = list(session.get_objects(private))
    usable = [o for o in found if attribute(o, Attribute.KEY_TYPE) in _KEY_TYPES]
    if len(usable) == 1:
        return cast(SignMixin, usable[0])
    if usable:
        kinds = "/".join(sorted({_KEY_TYPES[o[Attribute.KEY_TYPE]] for o in usable}))
        raise KeyNotFoundError(
            f"{len(usable)} {kinds} private keys match {what}; give each key a unique label, "
            "or add id= to the URI"
        )
    if found:
        kinds = "/".join(sorted({_key_type_name(o) for o in found}))
        raise UnsupportedKeyError(
            f"{what} is {kinds}; a signing key is EC, Ed25519 or RSA "
            "(make one with 'dpop keygen --alg')"
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
        return "an unknown key type"


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
    return CRV_OF_CURVE.get(name, name)


def edwards_curve_of(ec_params: bytes) -> str:
    """``Ed25519``, or another name, of an EC Edwards key's CKA_EC_PARAMS.

    PKCS#11 3.0 §2.3.10 allows the RFC 8410 OID or a PrintableString curve name; SoftHSM 2.6
    stores ``edwards25519`` whichever it was given.
    """
    try:
        value = asn1.load(ec_params)
    except (ValueError, TypeError):
        return "unknown"
    if isinstance(value, asn1.ObjectIdentifier) and value.dotted == _ED25519_OID:
        return "Ed25519"
    if isinstance(value, asn1.PrintableString) and value.native == "edwards25519":
        return "Ed25519"
    return str(value.native)[:40]


def key_algorithm(key: SignMixin, requested: str | None, what: str) -> JwsAlgorithm:
    """The JWS algorithm ``key`` signs with (``requested`` is the URI's ``alg=``, if any).

    Raises:
        UnsupportedKeyError: a curve or RSA size with no algorithm here, or a ``requested``
            algorithm that does not fit the key; the message says which.
    """
    key_type = key[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        kty, crv = "EC", curve_of(bytes(key[Attribute.EC_PARAMS]))
        if crv not in CRV_OF_CURVE.values():
            raise UnsupportedKeyError(
                f"{what} is an EC {crv} key; use P-256 (ES256), P-384 (ES384) or P-521 (ES512)"
            )
    elif key_type == KeyType.EC_EDWARDS:
        kty, crv = "OKP", edwards_curve_of(bytes(key[Attribute.EC_PARAMS]))
        if crv != "Ed25519":
            raise UnsupportedKeyError(f"{what} is an EC Edwards {crv} key; EdDSA needs Ed25519")
    else:
        kty, crv = "RSA", None
        bits = _modulus_bits(key)
        if bits < MIN_RSA_BITS:
            raise UnsupportedKeyError(
                f"{what} is an RSA key of {bits} bits; PS256 and RS256 need {MIN_RSA_BITS} or more"
            )
    try:
        return algorithm_for_key(kty, crv, requested)
    except UnsupportedKeyError as exc:
        raise UnsupportedKeyError(f"{what}: {exc.message}") from None


def _modulus_bits(key: SignMixin) -> int:
    bits = attribute(key, Attribute.MODULUS_BITS)
    if isinstance(bits, int) and bits > 0:
        return bits
    modulus = attribute(key, Attribute.MODULUS)
    return int.from_bytes(bytes(modulus), "big").bit_length() if modulus else 0


def decode_ec_point(raw: bytes, what: str) -> bytes:
    """The public point from CKA_EC_POINT: DER OCTET STRING (the standard) or bare.

    Bare: an uncompressed P-256/P-384/P-521 point (65, 97, 133 bytes; some older modules), or
    a 32-byte Ed25519 key. Wrapped ones are 2 or 3 bytes longer.
    """
    if (len(raw) in (65, 97, 133) and raw[0] == 4) or len(raw) == 32:
        point = raw
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


def _public_objects(session: pkcs11.Session, key: SignMixin) -> list[pkcs11.Object]:
    """The public key objects of ``key``'s type sharing its CKA_ID (else its label)."""
    key_id = attribute(key, Attribute.ID)
    label = attribute(key, Attribute.LABEL)
    search: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: key[Attribute.KEY_TYPE],
    }
    if key_id:
        search[Attribute.ID] = key_id
    elif label:
        search[Attribute.LABEL] = label
    publics = list(session.get_objects(search)) if len(search) > 2 else []
    if len(publics) > 1 and key_id and label:
        publics = [p for p in publics if attribute(p, Attribute.LABEL) == label]
    return publics


def public_point(session: pkcs11.Session, key: SignMixin, what: str) -> bytes:
    """The public point of an EC or EC Edwards key: its public object's, else its own."""
    publics = _public_objects(session, key)
    if len(publics) == 1:
        return decode_ec_point(bytes(publics[0][Attribute.EC_POINT]), what)
    # Some tokens keep no public key object, but expose CKA_EC_POINT on the private key.
    raw = attribute(key, Attribute.EC_POINT)
    if raw:
        return decode_ec_point(bytes(raw), what)
    found = "several" if publics else "no"
    kind = "EC Edwards" if key[Attribute.KEY_TYPE] == KeyType.EC_EDWARDS else "EC"
    raise KeyNotFoundError(
        f"{found} {kind} public key objects share the id/label of {what}, and the private key "
        "does not expose CKA_EC_POINT; store its public key in the token with the same CKA_ID"
    )


def public_jwk_of(session: pkcs11.Session, key: SignMixin, what: str) -> PublicJwk:
    """The public JWK of ``key`` (EC, Ed25519 or RSA), read from the token.

    Raises:
        KeyNotFoundError: the token holds no public half the key can be paired with.
        UnsupportedKeyError: the public half is malformed (compressed point, wrong length).
    """
    key_type = key[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        return ec_public_jwk(public_point(session, key, what))
    if key_type == KeyType.EC_EDWARDS:
        point = public_point(session, key, what)
        if len(point) != 32:
            raise UnsupportedKeyError(f"the CKA_EC_POINT of {what} is not a 32-byte Ed25519 key")
        return okp_public_jwk(point)
    publics = _public_objects(session, key)
    for holder in [*publics[:1], key]:
        modulus = attribute(holder, Attribute.MODULUS)
        exponent = attribute(holder, Attribute.PUBLIC_EXPONENT)
        if modulus and exponent:
            return rsa_public_jwk(
                int.from_bytes(bytes(modulus), "big"), int.from_bytes(bytes(exponent), "big")
            )
    raise KeyNotFoundError(
        f"no RSA public key object shares the id/label of {what}, and the private key does not "
        "expose CKA_MODULUS and CKA_PUBLIC_EXPONENT; store its public key with the same CKA_ID"
    )


def signs_for(key: SignMixin, jwk: PublicJwk, scheme: SignScheme, what: str) -> bool:
    """Whether ``key`` makes ``scheme`` signatures that ``jwk`` verifies: one test signature.

    It proves the public key we publish belongs to this private key (a label can pair
    mismatched objects) and that the token signs as we expect, in the algorithm's exact form.
    """
    try:
        public = public_key_of_jwk(jwk)
    except ValueError as exc:
        raise UnsupportedKeyError(f"the public key of {what} is unusable: {exc}") from exc
    probe = bytes(
        key.sign(
            scheme.data(_SELF_TEST_MESSAGE),
            mechanism=scheme.mechanism,
            mechanism_param=scheme.param,
        )
    )
    check_signature(
        probe,
        source=f"PKCS#11 {what}",
        size=jwk_signature_size(jwk),
        algorithm=scheme.algorithm.name,
    )
    return verify_signature(scheme.algorithm, public, _SELF_TEST_MESSAGE, probe)


def prove_same_key(
    session: pkcs11.Session, key: SignMixin, jwk: PublicJwk, scheme: SignScheme, what: str
) -> None:
    """Refuse a key found again unless it is the key whose ``jwk`` the signer publishes.

    Re-initializing a token, or deleting a key and generating another under the same label,
    leaves a different key behind the same name; proofs signed with it would carry a ``jwk``
    that does not verify them, and the tokens already fetched are bound to the old thumbprint
    (RFC 9449 §6).
    """
    if public_jwk_of(session, key, what) != jwk or not signs_for(key, jwk, scheme, what):
        raise KeyChangedError(
            f"{what} is no longer the key this signer was opened with (the token now holds a "
            "different key under that name); nothing was signed with it. Open the signer again "
            "(or reload the service) to use the new key: tokens bound to the old key stay unused"
        )


def generate_key_pair(anchor: LoginSession, uri: Pkcs11Uri, alg: JwsAlgorithm) -> bytes:
    """Make a key pair for ``alg`` labelled ``uri.object`` in the token; return its CKA_ID.

    ES256/ES384/ES512: EC P-256/P-384/P-521; EdDSA: Ed25519; PS256/RS256: RSA of
    `RSA_KEYGEN_BITS` bits with public exponent 65537.
    """
    assert uri.object is not None
    where = anchor.where
    scheme = scheme_for(alg)
    missing = ({scheme.keygen} | scheme.needs) - anchor.mechanisms
    if missing:
        names = ", ".join(sorted(f"CKM_{m.name}" for m in missing))
        raise UnsupportedKeyError(
            f"{where} does not offer {names}; it cannot make an {alg.name} key"
        )
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
        public, private, refused = _generate_with_fallback(
            session, _key_pair_maker(session, alg), uri.object, key_id, where
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
                f"this token cannot keep an {alg.name} key private, sensitive and "
                "non-extractable: "
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
    logger.info("generated %s key %r (id %s) in %s", _kind(alg), uri.object, key_id.hex(), where)
    return key_id


_EC_CURVE_OF = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_KeyPairMaker = Callable[..., tuple[pkcs11.PublicKey, pkcs11.PrivateKey]]


def _kind(alg: JwsAlgorithm) -> str:
    if alg.kty == "RSA":
        return f"RSA-{RSA_KEYGEN_BITS}"
    return f"EC {alg.crv}" if alg.kty == "EC" else str(alg.crv)


def _key_pair_maker(session: pkcs11.Session, alg: JwsAlgorithm) -> _KeyPairMaker:
    """``generate_keypair`` of the right key type, curve or size, taking only the templates."""
    if alg.kty == "RSA":

        def rsa(**kwargs: Any) -> tuple[pkcs11.PublicKey, pkcs11.PrivateKey]:
            return session.generate_keypair(KeyType.RSA, RSA_KEYGEN_BITS, **kwargs)

        return rsa
    if alg.kty == "OKP":
        # The RFC 8410 OID: PKCS#11 3.0 §2.3.10 allows it and SoftHSM and others accept it.
        params = session.create_domain_parameters(
            KeyType.EC_EDWARDS,
            {Attribute.EC_PARAMS: asn1.ObjectIdentifier(_ED25519_OID).dump()},
            local=True,
        )

        def edwards(**kwargs: Any) -> tuple[pkcs11.PublicKey, pkcs11.PrivateKey]:
            return params.generate_keypair(mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **kwargs)

        return edwards
    params = session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: encode_named_curve_parameters(_EC_CURVE_OF[alg.name])},
        local=True,
    )
    return cast(_KeyPairMaker, params.generate_keypair)


def _generate_with_fallback(
    session: pkcs11.Session,
    make: _KeyPairMaker,
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
            public, private = make(
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
