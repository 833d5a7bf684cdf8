"""The independent oracle must accept the RFC 9449 examples and reject their tampered forms.

If the oracle were wrong, every test that leans on it would prove nothing; these vectors come
from the RFC, not from our code.
"""

from __future__ import annotations

import pytest

from tests.oracle import OracleError, ath_of, check_proof, thumbprint

RFC_JWK = {
    "kty": "EC",
    "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
    "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
    "crv": "P-256",
}
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
# RFC 9449 §4.2 / §5 (token request) and §7.1 (protected resource request).
TOKEN_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklD"
    "UkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2"
    "R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBz"
    "Oi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiML"
    "vqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RESOURCE_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklD"
    "UkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2"
    "R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6"
    "Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8y"
    "cjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAg"
    "R6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA"
)


def test_rfc_vectors_for_thumbprint_and_ath() -> None:
    assert thumbprint(RFC_JWK) == RFC_JKT
    assert ath_of(RFC_TOKEN) == RFC_ATH


def test_accepts_rfc_token_request_proof() -> None:
    checked = check_proof(
        TOKEN_PROOF, htm="POST", url="https://server.example.com/token", now=1562262616
    )
    assert checked.jkt == RFC_JKT
    assert len(checked.checks) == 12


def test_accepts_rfc_resource_proof_ignoring_query() -> None:
    check_proof(
        RESOURCE_PROOF,
        htm="GET",
        url="https://RESOURCE.example.org:443/protectedresource?a=1#f",
        access_token=RFC_TOKEN,
        now=1562262618,
        expected_jkt=RFC_JKT,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"htm": "GET"}, "htm"),
        ({"url": "https://server.example.com/token2"}, "htu"),
        ({"url": "http://server.example.com/token"}, "htu"),
        ({"now": 1562262616 + 3600}, "iat"),
        ({"access_token": RFC_TOKEN}, "ath"),
        ({"nonce": "abc"}, "nonce"),
        ({"expected_jkt": "x" * 43}, "cnf.jkt"),
    ],
)
def test_rejects_each_mismatch(change: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {
        "htm": "POST",
        "url": "https://server.example.com/token",
        "now": 1562262616,
        **change,
    }
    with pytest.raises(OracleError, match=message):
        check_proof(TOKEN_PROOF, **kwargs)  # type: ignore[arg-type]


def test_rejects_tampered_signature_and_claims() -> None:
    head, claims, sig = TOKEN_PROOF.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(OracleError, match="signature"):
        check_proof(
            f"{head}.{claims}.{flipped}",
            htm="POST",
            url="https://server.example.com/token",
            now=1562262616,
        )
    with pytest.raises(OracleError, match="three parts"):
        check_proof(f"{head}.{claims}", htm="POST", url="https://server.example.com/token")
