"""The classical signature algorithms the appliance keeps in the token.

One table: curve OIDs (what goes into ``CKA_EC_PARAMS``), the host-side hash for ECDSA,
group orders for low-S normalization, and conversions between the token's
``CKA_EC_POINT`` and X.509 SubjectPublicKeyInfo.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from appliance.errors import CallerError

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClassicalAlg",
    "der_oid",
    "ec_point_to_spki",
    "load_spki",
    "parse_alg",
]


class ClassicalAlg(Enum):
    """Classical signature algorithms, by the names the CLI and the WAL use."""

    ED25519 = "ed25519"
    ED448 = "ed448"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    ECDSA_SECP256K1 = "ecdsa-secp256k1"


@dataclass(frozen=True, slots=True)
class Algorithm:
    """What the token and the host need to know about one classical algorithm."""

    alg: ClassicalAlg
    curve_oid: str
    edwards: bool
    hash_name: str | None  # host-side hash for ECDSA; None for EdDSA
    order: int | None  # group order n, for low-S normalization
    low_s: bool  # normalize s to the lower half (secp256k1 convention)
    coord_len: int  # bytes per coordinate / raw signature half

    @property
    def name(self) -> str:
        return self.alg.value

    def hash(self) -> hashes.HashAlgorithm:
        if self.hash_name == "sha256":
            return hashes.SHA256()
        if self.hash_name == "sha384":
            return hashes.SHA384()
        raise CallerError(f"{self.name} signs the message itself; it has no host-side hash")

    def curve(self) -> ec.EllipticCurve:
        curves: dict[ClassicalAlg, ec.EllipticCurve] = {
            ClassicalAlg.ECDSA_P256: ec.SECP256R1(),
            ClassicalAlg.ECDSA_P384: ec.SECP384R1(),
            ClassicalAlg.ECDSA_SECP256K1: ec.SECP256K1(),
        }
        try:
            return curves[self.alg]
        except KeyError:
            raise CallerError(f"{self.name} is not an ECDSA curve") from None


ALGORITHMS: Final[dict[ClassicalAlg, Algorithm]] = {
    a.alg: a
    for a in (
        Algorithm(ClassicalAlg.ED25519, "1.3.101.112", True, None, None, False, 32),
        Algorithm(ClassicalAlg.ED448, "1.3.101.113", True, None, None, False, 57),
        Algorithm(
            ClassicalAlg.ECDSA_P256,
            "1.2.840.10045.3.1.7",
            False,
            "sha256",
            0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
            False,
            32,
        ),
        Algorithm(
            ClassicalAlg.ECDSA_P384,
            "1.3.132.0.34",
            False,
            "sha384",
            int(
                "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                "581A0DB248B0A77AECEC196ACCC52973",
                16,
            ),
            False,
            48,
        ),
        Algorithm(
            ClassicalAlg.ECDSA_SECP256K1,
            "1.3.132.0.10",
            False,
            "sha256",
            0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
            True,
            32,
        ),
    )
}

_BY_OID: Final = {a.curve_oid: a for a in ALGORITHMS.values()}
#: By CLI name: looked up on every classical signature, so not through the enum's call.
_BY_NAME: Final = {a.alg.value: a for a in ALGORITHMS.values()}
# Some tokens (older SoftHSM2, OpenSC) encode Edwards curves as PrintableString names.
_EDWARDS_NAMES: Final = {"edwards25519": ClassicalAlg.ED25519, "edwards448": ClassicalAlg.ED448}


def parse_alg(name: str) -> Algorithm:
    """Look up a classical algorithm by its CLI name; a clear error lists the choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        choices = ", ".join(a.value for a in ClassicalAlg)
        raise CallerError(f"unknown key type {name!r} (choose one of: {choices})") from None


def der_oid(dotted: str) -> bytes:
    """DER-encode an OBJECT IDENTIFIER (used as ``CKA_EC_PARAMS``)."""
    arcs = [int(x) for x in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return bytes([0x06, len(body)]) + bytes(body)


def _decode_oid(der: bytes) -> str:
    if len(der) < 3 or der[0] != 0x06 or der[1] != len(der) - 2:
        raise CallerError("CKA_EC_PARAMS is not a DER OBJECT IDENTIFIER")
    body = der[2:]
    first = body[0]
    arcs = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for b in body[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(str(a) for a in arcs)


def alg_from_ec_params(params: bytes) -> Algorithm:
    """Identify the algorithm from a token's ``CKA_EC_PARAMS``."""
    if params[:1] == b"\x13":  # PrintableString curve name
        name = params[2:].decode("ascii", "replace")
        if name in _EDWARDS_NAMES:
            return ALGORITHMS[_EDWARDS_NAMES[name]]
        raise CallerError(f"unsupported curve {name!r}")
    oid = _decode_oid(params)
    try:
        return _BY_OID[oid]
    except KeyError:
        raise CallerError(f"unsupported curve OID {oid}") from None


def _unwrap_octet_string(point: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING; some tokens return the raw point instead."""
    if len(point) >= 2 and point[0] == 0x04:
        if point[1] < 0x80 and point[1] == len(point) - 2:
            return point[2:]
        if point[1] == 0x81 and len(point) >= 3 and point[2] == len(point) - 3:
            return point[3:]
    return point


def ec_point_to_spki(alg: Algorithm, ec_point: bytes) -> bytes:
    """Turn a token's ``CKA_EC_POINT`` into DER SubjectPublicKeyInfo."""
    raw = _unwrap_octet_string(ec_point)
    key: PublicKeyTypes
    try:
        if alg.alg is ClassicalAlg.ED25519:
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        elif alg.alg is ClassicalAlg.ED448:
            key = ed448.Ed448PublicKey.from_public_bytes(raw)
        else:
            key = ec.EllipticCurvePublicKey.from_encoded_point(alg.curve(), raw)
    except ValueError:
        raise CallerError(f"token returned a malformed {alg.name} public point") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_spki(spki: bytes) -> PublicKeyTypes:
    """Parse DER SubjectPublicKeyInfo; a clear error for anything malformed."""
    try:
        return serialization.load_der_public_key(spki)
    except (ValueError, TypeError):
        raise CallerError("malformed public key (SubjectPublicKeyInfo)") from None
