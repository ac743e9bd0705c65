"""ECDSA signatures verify in both encodings, including raw r||s that starts with 0x30.

A raw P-384 signature starts with the DER SEQUENCE tag one time in 256; the verifier used
to take such a signature for DER and reject it (a CI run hit it).  These tests build such
signatures on purpose, so the case runs every time rather than by chance.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from appliance.errors import SignatureInvalid
from appliance.signing.policy import Policy, PublicKeys, verify
from appliance.signing.verify import verify_signature

CURVES = [(ec.SECP256R1(), hashes.SHA256(), 32), (ec.SECP384R1(), hashes.SHA384(), 48)]


def _raw_starting_with(
    key: ec.EllipticCurvePrivateKey, algo: hashes.HashAlgorithm, size: int, first: int
) -> tuple[bytes, bytes, bytes]:
    """(message, DER, raw) for a signature whose raw form starts with ``first``."""
    for i in range(100_000):
        msg = b"m%d" % i
        der = key.sign(msg, ec.ECDSA(algo))
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if raw[0] == first:
            return msg, der, raw
    raise AssertionError("no signature with that first byte in 100,000 tries")


@pytest.mark.parametrize(("curve", "algo", "size"), CURVES, ids=["p256", "p384"])
@pytest.mark.parametrize("first", [0x30, 0x31])
def test_raw_and_der_verify_whatever_the_first_byte(
    curve: ec.EllipticCurve, algo: hashes.HashAlgorithm, size: int, first: int
) -> None:
    key = ec.generate_private_key(curve)
    msg, der, raw = _raw_starting_with(key, algo, size, first)
    pub = key.public_key()
    keys = PublicKeys(classical=pub)
    for sig in (raw, der):
        verify_signature(pub, msg, sig)
        verify(keys, msg, sig, policy=Policy.LEGACY)


@pytest.mark.parametrize(("curve", "algo", "size"), CURVES, ids=["p256", "p384"])
def test_ambiguous_length_still_rejects_a_wrong_message(
    curve: ec.EllipticCurve, algo: hashes.HashAlgorithm, size: int
) -> None:
    key = ec.generate_private_key(curve)
    msg, _, raw = _raw_starting_with(key, algo, size, 0x30)
    pub = key.public_key()
    with pytest.raises(SignatureInvalid):
        verify_signature(pub, msg + b"!", raw)
    with pytest.raises(SignatureInvalid):
        verify(PublicKeys(classical=pub), msg + b"!", raw, policy=Policy.LEGACY)
    flipped = bytes([raw[0]]) + bytes([raw[1] ^ 1]) + raw[2:]
    with pytest.raises(SignatureInvalid):
        verify_signature(pub, msg, flipped)
