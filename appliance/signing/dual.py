"""Dual (OR-mode) signatures: a classical and an ML-DSA-87 signature in one envelope.

hazardous: the service signs; :mod:`appliance.signing.policy` verifies.

Envelope, version 1 (all integers big-endian)::

    magic        4 bytes   b"PQDS"
    version      u8        1
    classical    u8        1 ed25519, 2 ed448, 3 ecdsa-p256, 4 ecdsa-p384, 5 ecdsa-secp256k1
    pqc          u8        1 ML-DSA-87
    clen         u16       length of the classical signature
    csig         clen      a standard signature over M: raw Ed25519/Ed448, or DER ECDSA
                           (SHA-256 for P-256 and secp256k1, SHA-384 for P-384; secp256k1
                           low-S) — exactly what a legacy verifier checks, unchanged
    plen         u16       4627
    psig         plen      ML-DSA-87 (FIPS 204, pure, hedged) over M with context
                           "pqhsm-dual-v1" || SHA3-256(classical SPKI) || SHA3-256(csig)
                           || caller context (at most 178 bytes)

Binding the ML-DSA part to the dual key's classical public key *and* to this envelope's
classical signature means an upgraded verifier (policy ``pqc``) rejects a classical part
swapped for another, an ML-DSA part moved into another envelope, and an ML-DSA part
presented as a plain ML-DSA signature (its context differs).  The dual kind reuses the
key's existing classical half on purpose, so legacy verifiers keep working during the
migration; composite keys (IETF draft) never share key material with anything.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from appliance.errors import CallerError, SignatureInvalid
from appliance.pqc import MAX_CONTEXT, MLDSA87_SIG_LEN, MlDsaSigner

__all__ = [
    "CLASSICAL_IDS",
    "DUAL_MAGIC",
    "DualSignature",
    "dual_context",
    "encode_dual",
    "parse_dual",
    "sign_dual",
]

DUAL_MAGIC: Final = b"PQDS"
DUAL_VERSION: Final = 1
MLDSA87_ID: Final = 1
CONTEXT_LABEL: Final = b"pqhsm-dual-v1"
_HEAD: Final = struct.Struct(">4sBBBH")
_U16: Final = struct.Struct(">H")
CLASSICAL_IDS: Final = {
    "ed25519": 1,
    "ed448": 2,
    "ecdsa-p256": 3,
    "ecdsa-p384": 4,
    "ecdsa-secp256k1": 5,
}
_NAMES: Final = {v: k for k, v in CLASSICAL_IDS.items()}
MAX_USER_CONTEXT: Final = MAX_CONTEXT - len(CONTEXT_LABEL) - 64


@dataclass(frozen=True, slots=True)
class DualSignature:
    classical_alg: str
    classical_sig: bytes
    mldsa_sig: bytes


def dual_context(
    classical_spki: bytes,
    classical_sig: bytes,
    user_context: bytes = b"",
    *,
    spki_hash: bytes | None = None,
) -> bytes:
    """The ML-DSA context that binds the part to the dual key and to its envelope.

    ``spki_hash`` (SHA3-256 of the SPKI) may be passed by a verifier that cached it.
    """
    if len(user_context) > MAX_USER_CONTEXT:
        raise CallerError(
            f"dual signature context is {len(user_context)} bytes; at most {MAX_USER_CONTEXT}"
        )
    key_hash = spki_hash if spki_hash is not None else hashlib.sha3_256(classical_spki).digest()
    return CONTEXT_LABEL + key_hash + hashlib.sha3_256(classical_sig).digest() + user_context


def encode_dual(sig: DualSignature) -> bytes:
    cid = CLASSICAL_IDS.get(sig.classical_alg)
    if cid is None:
        raise CallerError(f"no dual encoding for {sig.classical_alg!r}")
    return (
        _HEAD.pack(DUAL_MAGIC, DUAL_VERSION, cid, MLDSA87_ID, len(sig.classical_sig))
        + sig.classical_sig
        + _U16.pack(len(sig.mldsa_sig))
        + sig.mldsa_sig
    )


def parse_dual(data: bytes) -> DualSignature:
    """Parse an envelope; any malformation is a :class:`SignatureInvalid` naming it."""
    if len(data) < _HEAD.size:
        raise SignatureInvalid("dual signature truncated")
    magic, version, cid, pid, clen = _HEAD.unpack_from(data)
    if magic != DUAL_MAGIC:
        raise SignatureInvalid("not a dual signature (bad magic)")
    if version != DUAL_VERSION:
        raise SignatureInvalid(f"unsupported dual signature version {version}")
    if cid not in _NAMES or pid != MLDSA87_ID:
        raise SignatureInvalid("dual signature names an unknown algorithm")
    at = _HEAD.size
    csig = data[at : at + clen]
    at += clen
    if len(csig) != clen or len(data) < at + _U16.size:
        raise SignatureInvalid("dual signature truncated")
    (plen,) = _U16.unpack_from(data, at)
    at += _U16.size
    if plen != MLDSA87_SIG_LEN:
        raise SignatureInvalid("dual signature has a wrong ML-DSA-87 length")
    psig = data[at : at + plen]
    if len(psig) != plen:
        raise SignatureInvalid("dual signature truncated")
    if at + plen != len(data):
        raise SignatureInvalid("dual signature has trailing bytes")
    return DualSignature(_NAMES[cid], csig, psig)


def sign_dual(
    classical_alg: str,
    classical_spki: bytes,
    classical_sign: Callable[[bytes], bytes],
    mldsa: MlDsaSigner,
    message: bytes,
    user_context: bytes = b"",
) -> bytes:
    """Classical part first (a standard signature over M), then the bound ML-DSA part."""
    if len(user_context) > MAX_USER_CONTEXT:
        raise CallerError(
            f"dual signature context is {len(user_context)} bytes; at most {MAX_USER_CONTEXT}"
        )
    csig = classical_sign(message)
    psig = mldsa.sign(message, dual_context(classical_spki, csig, user_context))
    return encode_dual(DualSignature(classical_alg, csig, psig))
