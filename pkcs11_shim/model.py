"""PKCS#11 slot, token, session and object model over a running :class:`Appliance`.

One slot (:data:`SLOT_ID`) holds one token.  For every key whose classical ECDSA part is
live (kind classical, state CLASSICAL, HYBRID or PQC_PREFERRED) the token shows a
``CKO_PRIVATE_KEY`` and a ``CKO_PUBLIC_KEY`` (``CKK_EC``) sharing the key's ``CKA_ID``.
Which objects exist follows the key's state at every call: once a key leaves the
classical states its handles are invalid.

Connections that negotiated the pqhsm extension (:attr:`Client.extended`, README) also see
EdDSA (``CKK_EC_EDWARDS``), ML-DSA-87 (``CKK_ML_DSA``), dual (``CKK_PQHSM_DUAL``) and
composite (``CKK_PQHSM_COMPOSITE``) objects and sign with ``CKM_EDDSA``,
``CKM_ECDSA_SHA256/384/512``, ``CKM_ML_DSA``, ``CKM_PQHSM_DUAL`` and
``CKM_PQHSM_COMPOSITE``, single-part or multi-part (``C_SignUpdate``/``C_SignFinal``).

Each client connection (one PKCS#11 application) gets a :class:`Client`: its own
sessions, login state, and object handles, stable for the life of the connection.

Security: client login uses the appliance's own client PINs (:mod:`appliance.clientpins`:
Argon2id hashes, a lockout counted durably before each check) whenever the home holds a
PIN store.  Only while no store exists does the interim fallback of slice 1 apply: the
client PIN is the token PIN the operator gave when the server started, compared in
constant time (a warning is logged once).  PINs are never logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from appliance import clientpins
from appliance.algorithms import der_oid, load_spki, parse_alg
from appliance.errors import CKR, NoSuchKey, SignatureInvalid
from appliance.keys import KeyInfo, KeyKind, KeyState
from appliance.secret import BytesLike, SecretBytes, ct_equal
from appliance.service import Appliance, composite_public_key
from appliance.signing import composite
from appliance.signing.dual import CLASSICAL_IDS, MAX_USER_CONTEXT
from appliance.signing.policy import Policy, PublicKeys
from appliance.signing.policy import verify as verify_policy
from pkcs11_shim.rpc import HANDSHAKE, Attribute, AttrValue, Mechanism

__all__ = ["SLOT_ID", "CkrError", "Client", "Pkcs11Model"]

log = logging.getLogger(__name__)

SLOT_ID: Final = 1
MAX_SESSIONS: Final = 64
MAX_RANDOM: Final = 64 * 1024
UNAVAILABLE: Final = 0xFFFFFFFFFFFFFFFF  # CK_UNAVAILABLE_INFORMATION

# Object classes, key types, attributes, mechanisms, flags (pkcs11t.h values).
CKO_PUBLIC_KEY: Final = 2
CKO_PRIVATE_KEY: Final = 3
CKK_EC: Final = 3
CKK_EC_EDWARDS: Final = 0x40
CKK_ML_DSA: Final = 0x4A
CKA_PARAMETER_SET: Final = 0x61D
CKP_ML_DSA_87: Final = 3
CKA_CLASS: Final = 0x000
CKA_TOKEN: Final = 0x001
CKA_PRIVATE: Final = 0x002
CKA_LABEL: Final = 0x003
CKA_VALUE: Final = 0x011
CKA_KEY_TYPE: Final = 0x100
CKA_SUBJECT: Final = 0x101
CKA_ID: Final = 0x102
CKA_SENSITIVE: Final = 0x103
CKA_ENCRYPT: Final = 0x104
CKA_DECRYPT: Final = 0x105
CKA_WRAP: Final = 0x106
CKA_UNWRAP: Final = 0x107
CKA_SIGN: Final = 0x108
CKA_SIGN_RECOVER: Final = 0x109
CKA_VERIFY: Final = 0x10A
CKA_VERIFY_RECOVER: Final = 0x10B
CKA_DERIVE: Final = 0x10C
CKA_EXTRACTABLE: Final = 0x162
CKA_LOCAL: Final = 0x163
CKA_NEVER_EXTRACTABLE: Final = 0x164
CKA_ALWAYS_SENSITIVE: Final = 0x165
CKA_KEY_GEN_MECHANISM: Final = 0x166
CKA_MODIFIABLE: Final = 0x170
CKA_COPYABLE: Final = 0x171
CKA_DESTROYABLE: Final = 0x172
CKA_EC_PARAMS: Final = 0x180
CKA_EC_POINT: Final = 0x181
CKA_ALWAYS_AUTHENTICATE: Final = 0x202
CKA_PUBLIC_KEY_INFO: Final = 0x129
CKA_ALLOWED_MECHANISMS: Final = 0x40000600
# Attributes that would reveal private key material: always CKR_ATTRIBUTE_SENSITIVE.
SENSITIVE_ATTRS: Final = frozenset({CKA_VALUE, 0x122, 0x123, 0x124, 0x125, 0x126, 0x127, 0x128})

CKM_SHA256: Final = 0x250
CKM_SHA384: Final = 0x260
CKM_SHA512: Final = 0x270
CKM_EC_KEY_PAIR_GEN: Final = 0x1040
CKM_ECDSA: Final = 0x1041
CKM_ECDSA_SHA256: Final = 0x1044
CKM_ECDSA_SHA384: Final = 0x1045
CKM_ECDSA_SHA512: Final = 0x1046
CKM_EC_EDWARDS_KEY_PAIR_GEN: Final = 0x1055
CKM_EDDSA: Final = 0x1057
CKM_ML_DSA_KEY_PAIR_GEN: Final = 0x1C
CKM_ML_DSA: Final = 0x1D
# pqhsm vendor-defined values (README "The pqhsm extension"; c/pkcs11.h).
CKK_PQHSM_DUAL: Final = 0x80000001
CKK_PQHSM_COMPOSITE: Final = 0x80000002
CKM_PQHSM_DUAL: Final = 0x80000001
CKM_PQHSM_COMPOSITE: Final = 0x80000002
CKP_PQHSM_MLDSA87_ECDSA_P384_SHA512: Final = 0x80000001
CKP_PQHSM_MLDSA87_ED448_SHAKE256: Final = 0x80000002
CKH_HEDGE_PREFERRED: Final = 0
CKH_HEDGE_REQUIRED: Final = 1
CKH_DETERMINISTIC_REQUIRED: Final = 2
CKF_HW: Final = 0x1
CKF_DIGEST: Final = 0x400
CKF_SIGN: Final = 0x800
CKF_VERIFY: Final = 0x2000
CKF_GENERATE_KEY_PAIR: Final = 0x10000
CKF_EC_F_P: Final = 0x100000
CKF_EC_NAMEDCURVE: Final = 0x800000
CKF_EC_UNCOMPRESS: Final = 0x1000000

CKF_TOKEN_PRESENT: Final = 0x1
CKF_RNG: Final = 0x1
CKF_LOGIN_REQUIRED: Final = 0x4
CKF_USER_PIN_INITIALIZED: Final = 0x8
CKF_TOKEN_INITIALIZED: Final = 0x400
CKF_RW_SESSION: Final = 0x2
CKF_SERIAL_SESSION: Final = 0x4
CKU_SO: Final = 0
CKU_USER: Final = 1
CKS_RO_PUBLIC_SESSION: Final = 0
CKS_RO_USER_FUNCTIONS: Final = 1
CKS_RW_PUBLIC_SESSION: Final = 2
CKS_RW_USER_FUNCTIONS: Final = 3
CKF_USER_PIN_COUNT_LOW: Final = 0x10000
CKF_USER_PIN_FINAL_TRY: Final = 0x20000
CKF_USER_PIN_LOCKED: Final = 0x40000
CKR_SESSION_PARALLEL_NOT_SUPPORTED: Final = 0x0B4
CKR_SESSION_READ_ONLY: Final = 0x0B5
CKR_CURVE_NOT_SUPPORTED: Final = 0x140

#: Digest mechanisms (all on the 0.24 client's no-parameter list): hashlib name, length.
DIGESTS: Final[dict[int, tuple[str, int]]] = {
    CKM_SHA256: ("sha256", 32),
    CKM_SHA384: ("sha384", 48),
    CKM_SHA512: ("sha512", 64),
}
#: CKA_EC_PARAMS (DER OID) -> appliance key type, for C_GenerateKeyPair.
EC_CURVES: Final[dict[bytes, str]] = {
    bytes.fromhex("06082a8648ce3d030107"): "ecdsa-p256",
    bytes.fromhex("06052b81040022"): "ecdsa-p384",
}
#: Coordinate length -> the hash whose size cryptography needs for a prehashed verify.
_PREHASH_BY_COORD: Final[dict[int, type[hashes.HashAlgorithm]]] = {
    32: hashes.SHA256,
    48: hashes.SHA384,
}
MAX_ECDSA_INPUT: Final = 64  # CKM_ECDSA data: the longest digest (SHA-512)
MAX_DIGEST_INPUT: Final = 64 << 20  # bytes hashed by one multi-part digest
#: Message bytes one connection may have collected for C_SignFinal, over all its sessions.
MAX_CLIENT_PARTS: Final = 64 << 20

#: Mechanisms advertised: only ones the p11-kit 0.24 client passes (DESIGN §8).
_EC_FLAGS: Final = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS
MECHANISMS: Final[dict[int, tuple[int, int, int]]] = {
    CKM_ECDSA: (256, 384, CKF_HW | CKF_SIGN | CKF_VERIFY | _EC_FLAGS),
    CKM_EC_KEY_PAIR_GEN: (256, 384, CKF_HW | CKF_GENERATE_KEY_PAIR | _EC_FLAGS),
    CKM_SHA256: (0, 0, CKF_DIGEST),
    CKM_SHA384: (0, 0, CKF_DIGEST),
    CKM_SHA512: (0, 0, CKF_DIGEST),
}
#: Extra mechanisms for connections that negotiated the pqhsm extension (README).
EXT_MECHANISMS: Final[dict[int, tuple[int, int, int]]] = {
    CKM_ECDSA_SHA256: (256, 384, CKF_HW | CKF_SIGN | _EC_FLAGS),
    CKM_ECDSA_SHA384: (256, 384, CKF_HW | CKF_SIGN | _EC_FLAGS),
    CKM_ECDSA_SHA512: (256, 384, CKF_HW | CKF_SIGN | _EC_FLAGS),
    CKM_EDDSA: (255, 448, CKF_HW | CKF_SIGN),
    CKM_ML_DSA: (CKP_ML_DSA_87, CKP_ML_DSA_87, CKF_HW | CKF_SIGN),
    CKM_PQHSM_DUAL: (0, 0, CKF_HW | CKF_SIGN),
    CKM_PQHSM_COMPOSITE: (0, 0, CKF_HW | CKF_SIGN),
}
#: What C_SignInit and C_VerifyInit take: p11-kit's client, and extended connections.
_SIGNING: Final = frozenset({CKM_ECDSA})
_EXT_SIGNING: Final = frozenset({CKM_ECDSA, *EXT_MECHANISMS})
#: CKM_ECDSA_SHA* -> the hash class for a prehashed verification.
_HASH_CLASS: Final[dict[int, type[hashes.HashAlgorithm]]] = {
    CKM_ECDSA_SHA256: hashes.SHA256,
    CKM_ECDSA_SHA384: hashes.SHA384,
    CKM_ECDSA_SHA512: hashes.SHA512,
}
#: CKM_ECDSA_SHA* -> the hash computed host-side before the token signs the digest.
_ECDSA_HASH: Final[dict[int, str]] = {
    CKM_ECDSA_SHA256: "sha256",
    CKM_ECDSA_SHA384: "sha384",
    CKM_ECDSA_SHA512: "sha512",
}
#: Object parts: the classical key ("classical"), the ML-DSA-87 part ("ml-dsa"), the dual
#: key (both halves, "dual") or a composite key ("composite").
CLASSICAL: Final = "classical"
ML_DSA: Final = "ml-dsa"
DUAL: Final = "dual"
COMPOSITE: Final = "composite"
MAX_CONTEXT: Final = 255
MLDSA87_SIG_LEN: Final = 4627
#: Mechanisms that sign the whole message (multi-part: parts are collected, then signed).
_WHOLE_MESSAGE: Final = frozenset({CKM_EDDSA, CKM_ML_DSA, CKM_PQHSM_DUAL, CKM_PQHSM_COMPOSITE})
#: Composite algorithm -> CKA_PARAMETER_SET value.
_COMPOSITE_SETS: Final[dict[composite.CompositeAlg, int]] = {
    composite.CompositeAlg.MLDSA87_ECDSA_P384_SHA512: CKP_PQHSM_MLDSA87_ECDSA_P384_SHA512,
    composite.CompositeAlg.MLDSA87_ED448_SHAKE256: CKP_PQHSM_MLDSA87_ED448_SHAKE256,
}
#: Longest classical signature per algorithm (DER ECDSA at its longest; raw EdDSA).
_MAX_CLASSICAL_SIG: Final[dict[str, int]] = {
    "ed25519": 64,
    "ed448": 114,
    "ecdsa-p256": 72,
    "ecdsa-secp256k1": 72,
    "ecdsa-p384": 104,
}
_DUAL_OVERHEAD: Final = 4 + 1 + 1 + 1 + 2 + 2  # PQDS envelope: magic, ids, two lengths
_LIVE_CLASSICAL: Final = (KeyState.CLASSICAL, KeyState.HYBRID, KeyState.PQC_PREFERRED)


class CkrError(Exception):
    """A PKCS#11 call failed with ``rv``; the dispatcher sends it as an error reply."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"CKR 0x{rv:x}")
        self.rv = rv


def _ecdsa_key(key: KeyInfo) -> bool:
    return (
        key.kind is KeyKind.CLASSICAL
        and key.state in _LIVE_CLASSICAL
        and (key.classical_alg or "").startswith("ecdsa-")
        and key.cka_id is not None
        and key.classical_spki is not None
    )


def _eddsa_key(key: KeyInfo) -> bool:
    return (
        key.kind is KeyKind.CLASSICAL
        and key.state in _LIVE_CLASSICAL
        and key.classical_alg in ("ed25519", "ed448")
        and key.cka_id is not None
        and key.classical_spki is not None
    )


def _mldsa_key(key: KeyInfo) -> bool:
    return key.kind in (KeyKind.CLASSICAL, KeyKind.MLDSA) and key.pqc_public is not None


def _dual_key(key: KeyInfo) -> bool:
    """Both halves live: a classical key in HYBRID or PQC_PREFERRED (dual signing)."""
    return (
        key.kind is KeyKind.CLASSICAL
        and key.state in (KeyState.HYBRID, KeyState.PQC_PREFERRED)
        and key.classical_alg in CLASSICAL_IDS
        and key.classical_spki is not None
        and key.pqc_public is not None
    )


def _composite_key(key: KeyInfo) -> bool:
    return (
        key.kind is KeyKind.COMPOSITE
        and key.composite_alg is not None
        and key.classical_spki is not None
        and key.pqc_public is not None
    )


def cka_id_of(key: KeyInfo) -> bytes:
    """The key's CKA_ID (born ML-DSA-87 keys: the id their key_id was made from)."""
    if key.cka_id is not None:
        return key.cka_id
    try:
        return bytes.fromhex(key.key_id)
    except ValueError:
        return key.key_id.encode("utf-8")


def _key_filter(template: list[Attribute]) -> Callable[[KeyInfo], bool] | None:
    """A cheap pre-filter for C_FindObjectsInit: a template naming CKA_ID or CKA_LABEL
    (as python-pkcs11's get_key and pkcs11: URIs do) can only match that key's objects,
    so only those get their attributes built.  Never excludes a real match: every object
    carries its key's CKA_ID and CKA_LABEL (``_common``); the full template check follows.
    """
    ids = {a.value for a in template if a.type == CKA_ID}
    labels = {a.value for a in template if a.type == CKA_LABEL}
    if not ids and not labels:
        return None
    return lambda k: (
        (not ids or cka_id_of(k) in ids) and (not labels or k.label.encode("utf-8") in labels)
    )


def ext_parts(key: KeyInfo) -> list[str]:
    """The object parts an extended connection sees for ``key`` in its state."""
    parts = [CLASSICAL] if _ecdsa_key(key) or _eddsa_key(key) else []
    if _mldsa_key(key):
        parts.append(ML_DSA)
    if _dual_key(key):
        parts.append(DUAL)
    if _composite_key(key):
        parts.append(COMPOSITE)
    return parts


def parse_mldsa_param(param: bytes | tuple[int, ...] | None) -> bytes:
    """The context of a ``CKM_ML_DSA`` parameter (README: u64 hedge, u32 len, context).

    :raises CkrError: ``CKR_MECHANISM_PARAM_INVALID``: malformed, deterministic
        signing required (the backend signs hedged only) or a context over 255 bytes.
    """
    if not param:
        return b""
    if isinstance(param, tuple) or len(param) < 12:
        raise CkrError(CKR.MECHANISM_PARAM_INVALID)
    hedge = int.from_bytes(param[:8], "big")
    n = int.from_bytes(param[8:12], "big")
    ctx = param[12:]
    if hedge not in (CKH_HEDGE_PREFERRED, CKH_HEDGE_REQUIRED) or n != len(ctx):
        raise CkrError(CKR.MECHANISM_PARAM_INVALID)
    if n > MAX_CONTEXT:
        raise CkrError(CKR.MECHANISM_PARAM_INVALID)
    return ctx


def check_eddsa_param(param: bytes | tuple[int, ...] | None, alg: str) -> None:
    """Check an optional ``CK_EDDSA_PARAMS`` (README: u8 phFlag, u32 len, context).

    :raises CkrError: ``CKR_MECHANISM_PARAM_INVALID``: prehash requested, a context
        for Ed25519, a non-empty context for Ed448, or malformed.
    """
    if param is None or param == b"":
        return
    if isinstance(param, tuple) or len(param) < 5:
        raise CkrError(CKR.MECHANISM_PARAM_INVALID)
    ph, n, ctx = param[0], int.from_bytes(param[1:5], "big"), param[5:]
    if alg != "ed448" or ph != 0 or n != len(ctx) or ctx:
        raise CkrError(CKR.MECHANISM_PARAM_INVALID)


def _ecdsa_verify(
    key: KeyInfo, digest: bytes, algo: hashes.HashAlgorithm, signature: bytes
) -> None:
    """Check a raw r||s signature over ``digest`` (sized for ``algo``) with the key's SPKI."""
    pub = load_spki(key.classical_spki or b"")
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise CkrError(CKR.DEVICE_ERROR)
    half = len(signature) // 2
    der = encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )
    try:
        pub.verify(der, digest, ec.ECDSA(Prehashed(algo)))
    except InvalidSignature:
        raise CkrError(CKR.SIGNATURE_INVALID) from None


def _mechanism_context(mech: Mechanism, key: KeyInfo, part: str) -> bytes:
    """Check ``mech`` and its parameter against the object's key and part; the context.

    :raises CkrError: ``CKR_MECHANISM_PARAM_INVALID`` (see the parsers) or
        ``CKR_KEY_TYPE_INCONSISTENT`` (the mechanism does not fit the object).
    """
    context = b""
    if mech.type in (CKM_ML_DSA, CKM_PQHSM_DUAL, CKM_PQHSM_COMPOSITE):
        context = parse_mldsa_param(mech.param)
        wanted = {CKM_ML_DSA: ML_DSA, CKM_PQHSM_DUAL: DUAL, CKM_PQHSM_COMPOSITE: COMPOSITE}
        ok = part == wanted[mech.type]
        if mech.type == CKM_PQHSM_DUAL and len(context) > MAX_USER_CONTEXT:
            raise CkrError(CKR.MECHANISM_PARAM_INVALID)
    elif mech.type == CKM_EDDSA:
        ok = part == CLASSICAL and _eddsa_key(key)
        if ok:
            check_eddsa_param(mech.param, key.classical_alg or "")
    else:
        if mech.param:
            raise CkrError(CKR.MECHANISM_PARAM_INVALID)
        ok = part == CLASSICAL and _ecdsa_key(key)
    if not ok:
        raise CkrError(CKR.KEY_TYPE_INCONSISTENT)
    return context


def _signature_length(mech: int, key: KeyInfo) -> int:
    """What a size query answers for ``mech`` with ``key``: the signature's length, or for
    dual and composite signatures (DER ECDSA parts vary) their longest."""
    if mech == CKM_ML_DSA:
        return MLDSA87_SIG_LEN
    if mech == CKM_EDDSA:
        return 64 if key.classical_alg == "ed25519" else 114
    if mech in (CKM_PQHSM_DUAL, CKM_PQHSM_COMPOSITE):
        classical = _MAX_CLASSICAL_SIG.get(key.classical_alg or "", 0)
        if mech == CKM_PQHSM_DUAL:
            return _DUAL_OVERHEAD + classical + MLDSA87_SIG_LEN
        return MLDSA87_SIG_LEN + classical
    return 2 * parse_alg(key.classical_alg or "").coord_len


def _der_octet_string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        return b"\x04" + bytes((n,)) + data
    if n < 0x100:
        return b"\x04\x81" + bytes((n,)) + data
    return b"\x04\x82" + n.to_bytes(2, "big") + data


def _common(key: KeyInfo, cls: int, key_type: int, gen: int) -> dict[int, AttrValue]:
    attrs: dict[int, AttrValue] = {
        CKA_CLASS: cls,
        CKA_TOKEN: True,
        CKA_PRIVATE: cls == CKO_PRIVATE_KEY,
        CKA_LABEL: key.label.encode("utf-8"),
        CKA_ID: cka_id_of(key),
        CKA_KEY_TYPE: key_type,
        CKA_SUBJECT: b"",
        CKA_LOCAL: key.origin == "generated",
        CKA_KEY_GEN_MECHANISM: gen if key.origin == "generated" else UNAVAILABLE,
        CKA_MODIFIABLE: False,
        CKA_COPYABLE: False,
        CKA_DESTROYABLE: False,
        CKA_DERIVE: False,
    }
    if cls == CKO_PRIVATE_KEY:
        attrs.update(
            {
                CKA_SENSITIVE: True,
                CKA_ALWAYS_SENSITIVE: True,
                CKA_EXTRACTABLE: False,
                CKA_NEVER_EXTRACTABLE: True,
                CKA_SIGN: True,
                CKA_SIGN_RECOVER: False,
                CKA_DECRYPT: False,
                CKA_UNWRAP: False,
                CKA_ALWAYS_AUTHENTICATE: False,
            }
        )
    else:
        attrs.update(
            {CKA_VERIFY: True, CKA_VERIFY_RECOVER: False, CKA_ENCRYPT: False, CKA_WRAP: False}
        )
    return attrs


def ext_object_attributes(key: KeyInfo, cls: int, part: str) -> dict[int, AttrValue]:
    """Attributes of an object an extended connection sees (EC, EdDSA, ML-DSA-87, dual or
    composite)."""
    if part == DUAL:
        attrs = _common(key, cls, CKK_PQHSM_DUAL, UNAVAILABLE)
        attrs[CKA_ALLOWED_MECHANISMS] = (CKM_PQHSM_DUAL,)
        if cls == CKO_PUBLIC_KEY:
            attrs[CKA_VALUE] = key.pqc_public or b""
            attrs[CKA_PUBLIC_KEY_INFO] = key.classical_spki or b""
        return attrs
    if part == COMPOSITE:
        params = composite.parse_composite_alg(key.composite_alg or "")
        attrs = _common(key, cls, CKK_PQHSM_COMPOSITE, UNAVAILABLE)
        attrs[CKA_PARAMETER_SET] = _COMPOSITE_SETS[params.alg].to_bytes(8, "little")
        attrs[CKA_ALLOWED_MECHANISMS] = (CKM_PQHSM_COMPOSITE,)
        if cls == CKO_PUBLIC_KEY:
            public = composite_public_key(key)
            attrs[CKA_VALUE] = public
            attrs[CKA_PUBLIC_KEY_INFO] = composite.public_key_spki(params, public)
        return attrs
    if part == ML_DSA:
        attrs = _common(key, cls, CKK_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN)
        attrs[CKA_PARAMETER_SET] = CKP_ML_DSA_87.to_bytes(8, "little")
        attrs[CKA_ALLOWED_MECHANISMS] = (CKM_ML_DSA,)
        if cls == CKO_PUBLIC_KEY:
            attrs[CKA_VALUE] = key.pqc_public or b""
        return attrs
    if _eddsa_key(key):
        alg = parse_alg(key.classical_alg or "")
        attrs = _common(key, cls, CKK_EC_EDWARDS, CKM_EC_EDWARDS_KEY_PAIR_GEN)
        attrs[CKA_EC_PARAMS] = der_oid(alg.curve_oid)
        attrs[CKA_ALLOWED_MECHANISMS] = (CKM_EDDSA,)
        if cls == CKO_PUBLIC_KEY:
            pub = load_spki(key.classical_spki or b"")
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            attrs[CKA_EC_POINT] = _der_octet_string(raw)
        return attrs
    attrs = object_attributes(key, cls)
    attrs[CKA_ALLOWED_MECHANISMS] = (CKM_ECDSA, *_ECDSA_HASH)
    return attrs


def object_attributes(key: KeyInfo, cls: int) -> dict[int, AttrValue]:
    """The attributes of the public (``CKO_PUBLIC_KEY``) or private object of ``key``."""
    if key.classical_alg is None or key.classical_spki is None:
        raise CkrError(CKR.DEVICE_ERROR)
    alg = parse_alg(key.classical_alg)
    pub = load_spki(key.classical_spki)
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise CkrError(CKR.DEVICE_ERROR)
    attrs = _common(key, cls, CKK_EC, CKM_EC_KEY_PAIR_GEN)
    attrs[CKA_EC_PARAMS] = der_oid(alg.curve_oid)
    attrs[CKA_ALLOWED_MECHANISMS] = (CKM_ECDSA,)
    if cls == CKO_PUBLIC_KEY:
        point = pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        attrs[CKA_EC_POINT] = _der_octet_string(point)
    return attrs


class Pkcs11Model:
    """What every client connection shares: the appliance, the token label, the PINs.

    Client logins check the appliance's client PIN store in ``pin_home`` (default: the
    appliance home) whenever it exists.  ``client_pin`` is the interim slice-1 fallback
    (the token PIN) used only while no store exists; this object owns it and
    :meth:`close` wipes it.
    """

    def __init__(
        self,
        app: Appliance,
        *,
        client_pin: SecretBytes | None = None,
        pin_home: Path | None = None,
        max_failures: int = clientpins.MAX_FAILURES,
    ) -> None:
        self.app = app
        self._pin = client_pin
        self.pin_home = Path(pin_home) if pin_home is not None else app.cfg.home
        self.max_failures = max_failures
        self._warned = False
        self._warn_lock = threading.Lock()
        info = app.token.info()
        self.label = info.label or "pqhsm"
        self.serial = info.serial or app.appliance_id[:16]

    def check_pin(self, pin: SecretBytes | BytesLike) -> None:
        """Check a client PIN against the store, or (no store) the interim token PIN.

        :raises PinIncorrect: wrong PIN (counted toward the lockout).
        :raises PinLocked: too many consecutive failures, whatever the PIN.
        :raises CkrError: ``CKR_USER_PIN_NOT_INITIALIZED``: no store and no fallback.
        """
        if clientpins.exists(self.pin_home):
            view = pin.view() if isinstance(pin, SecretBytes) else pin
            clientpins.verify(self.pin_home, view, max_failures=self.max_failures)
            return
        if self._pin is None:
            raise CkrError(CKR.USER_PIN_NOT_INITIALIZED)
        with self._warn_lock:
            if not self._warned:
                self._warned = True
                log.warning(
                    "no client PIN store in %s: clients log in with the token PIN "
                    "(interim); run 'python -m pkcs11_shim set-pin'",
                    self.pin_home,
                )
        if not ct_equal(self._pin, pin):  # no immutable copy of the stored PIN
            raise CkrError(CKR.PIN_INCORRECT)

    def pin_flags(self) -> int:
        """CKF_USER_PIN_* token flags for the current failure count."""
        if not clientpins.exists(self.pin_home):
            return 0
        n = clientpins.failures(self.pin_home)
        if n >= self.max_failures:
            return CKF_USER_PIN_LOCKED
        flags = CKF_USER_PIN_COUNT_LOW if n else 0
        if n == self.max_failures - 1:
            flags |= CKF_USER_PIN_FINAL_TRY
        return flags

    def ecdsa_keys(self) -> list[KeyInfo]:
        """Keys that currently expose PKCS#11 objects."""
        return [k for k in self.app.keys() if _ecdsa_key(k)]

    def close(self) -> None:
        """Wipe the interim client PIN."""
        if self._pin is not None:
            self._pin.wipe()


@dataclass
class Operation:
    """One session's sign or verify operation (PKCS#11 allows one of each at a time)."""

    key: str | None = None  # key_id while the operation is active
    mech: int = CKM_ECDSA  # its mechanism (extension connections: others too)
    context: bytes = b""  # CKM_ML_DSA / dual / composite context
    multi: bool = False  # an Update call came: only the Final call may end it
    fed: int = 0  # message bytes fed by Update calls (bounded by MAX_DIGEST_INPUT)
    hash: hashlib._Hash | None = None  # CKM_ECDSA_SHA*: the incremental hash
    parts: bytearray | None = None  # whole-message mechanisms: the collected parts
    length: int | None = None  # what size queries answer, once first asked (fixed)

    def start(self, key_id: str, mech: int, context: bytes) -> None:
        self.key, self.mech, self.context = key_id, mech, context
        self.multi, self.fed, self.hash, self.parts = False, 0, None, None
        self.length = None

    def end(self) -> str | None:
        """End the operation; its key id (None: none was active)."""
        key_id, self.key = self.key, None
        self.hash, self.parts = None, None
        return key_id

    def feed(self, data: bytes, held: int) -> None:
        """One Update part, after PKCS#11's checks (``held``: bytes the connection holds).

        :raises CkrError: the operation was ended (as every error ends it).
        """
        try:
            if self.mech == CKM_ECDSA:  # single-part only (PKCS#11 mechanism table)
                raise CkrError(CKR.FUNCTION_NOT_SUPPORTED)
            if self.fed + len(data) > MAX_DIGEST_INPUT:
                raise CkrError(CKR.DATA_LEN_RANGE)
            if self.mech in _WHOLE_MESSAGE and held + len(data) > MAX_CLIENT_PARTS:
                raise CkrError(CKR.DEVICE_MEMORY)
        except CkrError:
            self.end()
            raise
        self.multi = True
        self.fed += len(data)
        if self.mech in _ECDSA_HASH:
            if self.hash is None:
                self.hash = hashlib.new(_ECDSA_HASH[self.mech])
            self.hash.update(data)
        else:
            if self.parts is None:
                self.parts = bytearray()
            self.parts += data


@dataclass
class Session:
    """One PKCS#11 session of a client."""

    flags: int
    found: list[int] | None = None
    sign: Operation = field(default_factory=Operation)  # C_Sign*
    verify: Operation = field(default_factory=Operation)  # C_Verify*
    digest: hashlib._Hash | None = None  # while C_Digest* is active
    digest_fed: int = 0  # bytes hashed so far (bounded by MAX_DIGEST_INPUT)


@dataclass
class Client:
    """State of one client connection (one PKCS#11 application).

    Every method implements one PKCS#11 call and raises :class:`CkrError` on failure.
    """

    model: Pkcs11Model
    extended: bool = False  # negotiated the pqhsm extension (version byte 0x50 to 0x53)
    sized_sign_init: bool = False  # extension v2 and up: C_SignInit replies the length
    sign_once: bool = False  # extension v4 (0x53): C_SignInit + C_Sign in one request
    initialized: bool = False
    logged_in: bool = False
    sessions: dict[int, Session] = field(default_factory=dict)
    _next_session: int = 1
    _handles: dict[tuple[str, int, str], int] = field(default_factory=dict)
    _objects: dict[int, tuple[str, int, str]] = field(default_factory=dict)

    # -- general -------------------------------------------------------------------------

    def initialize(self, handshake: bytes | None) -> None:
        if handshake != HANDSHAKE:
            raise CkrError(CKR.ARGUMENTS_BAD)
        if self.initialized:
            raise CkrError(CKR.CRYPTOKI_ALREADY_INITIALIZED)
        self.initialized = True

    def finalize(self) -> None:
        self._ready()
        self.sessions.clear()
        self.logged_in = False
        self.initialized = False

    def check_ready(self) -> None:
        """:raises CkrError: ``CKR_CRYPTOKI_NOT_INITIALIZED`` before C_Initialize."""
        self._ready()

    def _ready(self) -> None:
        if not self.initialized:
            raise CkrError(CKR.CRYPTOKI_NOT_INITIALIZED)

    def _slot(self, slot_id: int) -> None:
        self._ready()
        if slot_id != SLOT_ID:
            raise CkrError(CKR.SLOT_ID_INVALID)

    def _session(self, handle: int) -> Session:
        self._ready()
        try:
            return self.sessions[handle]
        except KeyError:
            raise CkrError(CKR.SESSION_HANDLE_INVALID) from None

    # -- slots, tokens, mechanisms -------------------------------------------------------

    def slot_list(self) -> list[int]:
        self._ready()
        return [SLOT_ID]

    def check_slot(self, slot_id: int) -> None:
        self._slot(slot_id)

    def mechanism_info(self, slot_id: int, mech: int) -> tuple[int, int, int]:
        self._slot(slot_id)
        try:
            return self.mechanisms()[mech]
        except KeyError:
            raise CkrError(CKR.MECHANISM_INVALID) from None

    def mechanisms(self) -> dict[int, tuple[int, int, int]]:
        """The mechanisms this connection sees (more once the extension is negotiated)."""
        return {**MECHANISMS, **EXT_MECHANISMS} if self.extended else MECHANISMS

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, slot_id: int, flags: int) -> int:
        self._slot(slot_id)
        if not flags & CKF_SERIAL_SESSION:
            raise CkrError(CKR_SESSION_PARALLEL_NOT_SUPPORTED)
        if len(self.sessions) >= MAX_SESSIONS:
            raise CkrError(CKR.HOST_MEMORY)
        handle = self._next_session
        self._next_session += 1
        self.sessions[handle] = Session(flags=flags & (CKF_RW_SESSION | CKF_SERIAL_SESSION))
        return handle

    def close_session(self, handle: int) -> None:
        self._session(handle)
        del self.sessions[handle]
        if not self.sessions:
            self.logged_in = False

    def close_all_sessions(self, slot_id: int) -> None:
        self._slot(slot_id)
        self.sessions.clear()
        self.logged_in = False

    def session_info(self, handle: int) -> tuple[int, int, int, int]:
        s = self._session(handle)
        rw = bool(s.flags & CKF_RW_SESSION)
        if self.logged_in:
            state = CKS_RW_USER_FUNCTIONS if rw else CKS_RO_USER_FUNCTIONS
        else:
            state = CKS_RW_PUBLIC_SESSION if rw else CKS_RO_PUBLIC_SESSION
        return SLOT_ID, state, s.flags, 0

    def login(self, handle: int, user_type: int, pin: SecretBytes | BytesLike | None) -> None:
        self._session(handle)
        if user_type != CKU_USER:
            raise CkrError(CKR.USER_TYPE_INVALID)
        if self.logged_in:
            raise CkrError(CKR.USER_ALREADY_LOGGED_IN)
        if pin is None:
            raise CkrError(CKR.ARGUMENTS_BAD)
        self.model.check_pin(pin)
        self.logged_in = True
        log.info("client logged in")

    def logout(self, handle: int) -> None:
        self._session(handle)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        self.logged_in = False
        for s in self.sessions.values():
            s.sign.end()
            s.verify.end()

    # -- objects -------------------------------------------------------------------------

    def _visible_parts(
        self, wanted: Callable[[KeyInfo], bool] | None = None
    ) -> dict[int, tuple[KeyInfo, int, str]]:
        """Handle -> (key, class, part) for every object the client may see now (of the
        keys ``wanted`` accepts, when given)."""
        out: dict[int, tuple[KeyInfo, int, str]] = {}
        classes = [CKO_PUBLIC_KEY, CKO_PRIVATE_KEY] if self.logged_in else [CKO_PUBLIC_KEY]
        candidates = self.model.app.keys() if self.extended else self.model.ecdsa_keys()
        if wanted is not None:
            candidates = [k for k in candidates if wanted(k)]
        if self.extended:
            keys = [(k, p) for k in candidates for p in ext_parts(k)]
        else:
            keys = [(k, CLASSICAL) for k in candidates]
        for key, part in keys:
            for cls in classes:
                ref = (key.key_id, cls, part)
                handle = self._handles.get(ref)
                if handle is None:
                    handle = len(self._handles) + 1
                    self._handles[ref] = handle
                    self._objects[handle] = ref
                out[handle] = (key, cls, part)
        return out

    def _visible(self) -> dict[int, tuple[KeyInfo, int]]:
        """Handle -> (key, class) for every object the client may see now."""
        return {h: (k, c) for h, (k, c, _) in self._visible_parts().items()}

    def _attributes(self, key: KeyInfo, cls: int, part: str) -> dict[int, AttrValue]:
        if self.extended:
            return ext_object_attributes(key, cls, part)
        return object_attributes(key, cls)

    def _object_part(
        self, handle: int, *, invalid: int = CKR.OBJECT_HANDLE_INVALID
    ) -> tuple[KeyInfo, int, str]:
        """The object behind ``handle`` if the client may see it now (as in
        :meth:`_visible_parts`), found without walking every key: a handle exists only
        for an object once seen, and stays valid while its key still has that part."""
        ref = self._objects.get(handle)
        if ref is None:
            raise CkrError(invalid)
        key_id, cls, part = ref
        if cls == CKO_PRIVATE_KEY and not self.logged_in:
            raise CkrError(invalid)
        try:
            key = self.model.app.key(key_id)
        except NoSuchKey:
            raise CkrError(invalid) from None
        parts = ext_parts(key) if self.extended else ([CLASSICAL] if _ecdsa_key(key) else [])
        if part not in parts:
            raise CkrError(invalid)
        return key, cls, part

    def _object(
        self, handle: int, *, invalid: int = CKR.OBJECT_HANDLE_INVALID
    ) -> tuple[KeyInfo, int]:
        key, cls, _ = self._object_part(handle, invalid=invalid)
        return key, cls

    def find_init(self, handle: int, template: list[Attribute]) -> None:
        s = self._session(handle)
        if s.found is not None:
            raise CkrError(CKR.OPERATION_ACTIVE)
        found: list[int] = []
        for h, (key, cls, part) in sorted(self._visible_parts(_key_filter(template)).items()):
            attrs = self._attributes(key, cls, part)
            if all(a.type in attrs and attrs[a.type] == a.value for a in template):
                found.append(h)
        s.found = found

    def find(self, handle: int, max_count: int) -> list[int]:
        s = self._session(handle)
        if s.found is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        out, s.found = s.found[:max_count], s.found[max_count:]
        return out

    def find_final(self, handle: int) -> None:
        s = self._session(handle)
        if s.found is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        s.found = None

    def get_attributes(
        self, handle: int, obj: int, template: list[tuple[int, int]]
    ) -> tuple[list[Attribute], int]:
        """Values for ``template`` and the call's real return code (``aAu``)."""
        self._session(handle)
        key, cls, part = self._object_part(obj)
        attrs = self._attributes(key, cls, part)
        rv: int = CKR.OK
        out: list[Attribute] = []
        for atype, length in template:
            if cls == CKO_PRIVATE_KEY and atype in SENSITIVE_ATTRS:
                out.append(Attribute(atype, None))
                rv = CKR.ATTRIBUTE_SENSITIVE
                continue
            if atype not in attrs:
                out.append(Attribute(atype, None))
                if rv == CKR.OK or rv == CKR.BUFFER_TOO_SMALL:
                    rv = CKR.ATTRIBUTE_TYPE_INVALID
                continue
            value = attrs[atype]
            if length and length < _c_size(value):
                out.append(Attribute(atype, None))
                if rv == CKR.OK:
                    rv = CKR.BUFFER_TOO_SMALL
                continue
            out.append(Attribute(atype, value))
        return out, rv

    # -- signing -------------------------------------------------------------------------

    def sign_init(self, handle: int, mech: Mechanism, key_handle: int) -> KeyInfo:
        """Start a signing operation; the key it signs with."""
        s = self._session(handle)
        if s.sign.key is not None:
            raise CkrError(CKR.OPERATION_ACTIVE)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        if mech.type not in (_EXT_SIGNING if self.extended else _SIGNING):
            raise CkrError(CKR.MECHANISM_INVALID)
        key, cls, part = self._object_part(key_handle, invalid=CKR.KEY_HANDLE_INVALID)
        if cls != CKO_PRIVATE_KEY:
            raise CkrError(CKR.KEY_FUNCTION_NOT_PERMITTED)
        context = _mechanism_context(mech, key, part)
        s.sign.start(key.key_id, mech.type, context)
        return key

    def sign_init_sized(self, handle: int, mech: Mechanism, key_handle: int) -> int:
        """``sign_init``, then the length every size query on the operation will get (the
        extension's C_SignInit reply carries it, so the module answers them itself)."""
        key = self.sign_init(handle, mech, key_handle)
        op = self._session(handle).sign
        try:
            op.length = _signature_length(mech.type, key)
        except BaseException:
            op.end()  # no operation the client was not told of
            raise
        return op.length

    def sign_abort(self, handle: int) -> None:
        """End the session's signing operation, if any (a combined request failed after
        its C_SignInit part: the client is told of no operation)."""
        s = self.sessions.get(handle)
        if s is not None:
            s.sign.end()

    def sign_length(self, handle: int) -> int:
        """The signature length of the active operation (for size queries).

        Dual and composite signatures with an ECDSA part vary in length (DER): this is
        their longest, which PKCS#11 allows a size query to answer.
        """
        op = self._session(handle).sign
        if op.key is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if op.length is None:  # computed once per operation: C_Sign asks again
            op.length = _signature_length(op.mech, self.model.app.key(op.key))
        return op.length

    def sign(self, handle: int, data: bytes | None) -> bytes:
        """Single-part ``C_Sign``; ends the operation.

        ``CKM_ECDSA`` signs a client-computed digest; the extension mechanisms sign the
        whole message.  After ``C_SignUpdate`` only ``C_SignFinal`` may end the operation:
        ``C_Sign`` then fails with ``CKR_OPERATION_ACTIVE`` (and ends it, as every error).
        """
        s = self._session(handle)
        multi = s.sign.multi
        key_id = s.sign.end()
        if key_id is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if multi:
            raise CkrError(CKR.OPERATION_ACTIVE)
        if data is None or (not data and s.sign.mech == CKM_ECDSA):
            raise CkrError(CKR.ARGUMENTS_BAD)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        key = self.model.app.key(key_id)
        if s.sign.mech != CKM_ECDSA:
            if len(data) > MAX_DIGEST_INPUT:
                raise CkrError(CKR.DATA_LEN_RANGE)
            if s.sign.mech in _ECDSA_HASH:
                return self._sign_ext(
                    s, key, hashlib.new(_ECDSA_HASH[s.sign.mech], data), len(data)
                )
            return self._sign_ext(s, key, data, len(data))
        if not _ecdsa_key(key):
            raise CkrError(CKR.KEY_HANDLE_INVALID)
        if len(data) > MAX_ECDSA_INPUT:
            raise CkrError(CKR.DATA_LEN_RANGE)
        sig = self.model.app.sign(key, data, kind="classical", raw=True, prehashed=True)
        log.info("signed %d-byte digest with key %s", len(data), key.label)
        return sig

    def sign_update(self, handle: int, data: bytes | None) -> None:
        """``C_SignUpdate``: feed one part.  Any error ends the operation.

        ``CKM_ECDSA_SHA*`` hash incrementally; the whole-message mechanisms collect the
        parts (at most 64 MiB in all, then ``CKR_DATA_LEN_RANGE``; and at most 64 MiB held
        for one connection over all its sessions, then ``CKR_DEVICE_MEMORY``).
        ``CKM_ECDSA`` is single-part only (PKCS#11 mechanism table):
        ``CKR_FUNCTION_NOT_SUPPORTED``.
        """
        s = self._session(handle)
        if s.sign.key is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if data is None or not self.logged_in:
            s.sign.end()  # every error ends the operation
            raise CkrError(CKR.ARGUMENTS_BAD if data is None else CKR.USER_NOT_LOGGED_IN)
        s.sign.feed(data, self._held())

    def _held(self) -> int:
        """Message bytes this connection's sessions hold for C_SignFinal/C_VerifyFinal."""
        held = 0
        for x in self.sessions.values():
            held += len(x.sign.parts or b"") + len(x.verify.parts or b"")
        return held

    def sign_final(self, handle: int) -> bytes:
        """``C_SignFinal``: sign what ``C_SignUpdate`` fed (possibly nothing); ends it."""
        s = self._session(handle)
        parts, digest, fed = s.sign.parts, s.sign.hash, s.sign.fed
        key_id = s.sign.end()
        if key_id is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if s.sign.mech == CKM_ECDSA:
            raise CkrError(CKR.FUNCTION_NOT_SUPPORTED)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        key = self.model.app.key(key_id)
        if s.sign.mech in _ECDSA_HASH:
            h = digest if digest is not None else hashlib.new(_ECDSA_HASH[s.sign.mech])
            return self._sign_ext(s, key, h, fed)
        return self._sign_ext(s, key, bytes(parts) if parts is not None else b"", fed)

    def _sign_ext(self, s: Session, key: KeyInfo, data: bytes | hashlib._Hash, size: int) -> bytes:
        """Sign with an extension mechanism (the key's state is checked again here).

        ``data`` is the whole message, or for ``CKM_ECDSA_SHA*`` the hash over it.
        """
        mech = s.sign.mech
        app = self.model.app
        if isinstance(data, bytes):
            if mech == CKM_ML_DSA:
                if not _mldsa_key(key):
                    raise CkrError(CKR.KEY_HANDLE_INVALID)
                sig = app.sign(key, data, kind="ml-dsa", context=s.sign.context)
            elif mech == CKM_PQHSM_DUAL:
                if not _dual_key(key):
                    raise CkrError(CKR.KEY_HANDLE_INVALID)
                sig = app.sign(key, data, kind="dual", context=s.sign.context)
            elif mech == CKM_PQHSM_COMPOSITE:
                if not _composite_key(key):
                    raise CkrError(CKR.KEY_HANDLE_INVALID)
                sig = app.sign(key, data, kind="composite", context=s.sign.context)
            else:
                if not _eddsa_key(key):
                    raise CkrError(CKR.KEY_HANDLE_INVALID)
                sig = app.sign(key, data, kind="classical")
        else:
            if not _ecdsa_key(key):
                raise CkrError(CKR.KEY_HANDLE_INVALID)
            sig = app.sign(key, data.digest(), kind="classical", raw=True, prehashed=True)
        log.info("signed a %d-byte message with key %s (mechanism 0x%x)", size, key.label, mech)
        return sig

    # -- digests ---------------------------------------------------------------------------

    def digest_init(self, handle: int, mech: Mechanism) -> None:
        """Start a digest (``CKM_SHA256/384/512``, no parameter); no login needed."""
        s = self._session(handle)
        if s.digest is not None:
            raise CkrError(CKR.OPERATION_ACTIVE)
        if mech.type not in DIGESTS:
            raise CkrError(CKR.MECHANISM_INVALID)
        if mech.param:
            raise CkrError(CKR.MECHANISM_PARAM_INVALID)
        s.digest = hashlib.new(DIGESTS[mech.type][0])
        s.digest_fed = 0

    def _active_digest(self, handle: int) -> tuple[Session, hashlib._Hash]:
        s = self._session(handle)
        if s.digest is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        return s, s.digest

    def digest_length(self, handle: int) -> int:
        """The output length of the active digest (for size queries)."""
        return self._active_digest(handle)[1].digest_size

    def digest_update(self, handle: int, data: bytes | None) -> None:
        """Feed ``data``; any error ends the operation."""
        s, h = self._active_digest(handle)
        if data is None or s.digest_fed + len(data) > MAX_DIGEST_INPUT:
            s.digest = None
            raise CkrError(CKR.ARGUMENTS_BAD if data is None else CKR.DATA_LEN_RANGE)
        s.digest_fed += len(data)
        h.update(data)

    def digest(self, handle: int, data: bytes | None) -> bytes:
        """Single-part digest: hash ``data`` and end the operation."""
        s, h = self._active_digest(handle)
        s.digest = None
        if s.digest_fed:
            raise CkrError(CKR.OPERATION_ACTIVE)  # C_Digest after C_DigestUpdate
        if data is None:
            raise CkrError(CKR.ARGUMENTS_BAD)
        h.update(data)
        return h.digest()

    def digest_final(self, handle: int) -> bytes:
        """End a multi-part digest and return the hash."""
        s, h = self._active_digest(handle)
        s.digest = None
        return h.digest()

    # -- verification --------------------------------------------------------------------

    def verify_init(self, handle: int, mech: Mechanism, key_handle: int) -> None:
        """Start verification with a public key object: ``CKM_ECDSA``, and on extended
        connections every extension mechanism (same parameters as for signing)."""
        s = self._session(handle)
        if s.verify.key is not None:
            raise CkrError(CKR.OPERATION_ACTIVE)
        if mech.type not in (_EXT_SIGNING if self.extended else _SIGNING):
            raise CkrError(CKR.MECHANISM_INVALID)
        if not self.extended and mech.param:
            raise CkrError(CKR.MECHANISM_PARAM_INVALID)
        key, cls, part = self._object_part(key_handle, invalid=CKR.KEY_HANDLE_INVALID)
        if cls != CKO_PUBLIC_KEY:
            raise CkrError(CKR.KEY_FUNCTION_NOT_PERMITTED)
        context = _mechanism_context(mech, key, part) if self.extended else b""
        s.verify.start(key.key_id, mech.type, context)

    def verify(self, handle: int, data: bytes | None, signature: bytes | None) -> None:
        """Single-part ``C_Verify``; ends the operation.

        ``CKM_ECDSA`` verifies a raw r||s signature over a client-computed digest, used as
        ECDSA does (ANSI X9.62): its leftmost bits up to the order's length, so a digest of
        any length up to 64 bytes verifies exactly as it was signed.  The extension
        mechanisms verify the whole message (see :meth:`_verify_ext`).  After
        ``C_VerifyUpdate`` only ``C_VerifyFinal`` may end the operation.

        :raises CkrError: ``CKR_SIGNATURE_INVALID``, ``CKR_SIGNATURE_LEN_RANGE`` (not
            twice the coordinate length) or ``CKR_DATA_LEN_RANGE`` (empty or over 64).
        """
        s = self._session(handle)
        multi = s.verify.multi
        key_id = s.verify.end()
        if key_id is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if multi:
            raise CkrError(CKR.OPERATION_ACTIVE)
        if data is None or signature is None:
            raise CkrError(CKR.ARGUMENTS_BAD)
        key = self.model.app.key(key_id)
        if s.verify.mech != CKM_ECDSA:
            if len(data) > MAX_DIGEST_INPUT:
                raise CkrError(CKR.DATA_LEN_RANGE)
            if s.verify.mech in _ECDSA_HASH:
                h = hashlib.new(_ECDSA_HASH[s.verify.mech], data)
                self._verify_ext(s, key, h, signature)
            else:
                self._verify_ext(s, key, data, signature)
            return
        if not _ecdsa_key(key):
            raise CkrError(CKR.KEY_HANDLE_INVALID)
        if not 0 < len(data) <= MAX_ECDSA_INPUT:
            raise CkrError(CKR.DATA_LEN_RANGE)
        half = parse_alg(key.classical_alg or "").coord_len
        if len(signature) != 2 * half:
            raise CkrError(CKR.SIGNATURE_LEN_RANGE)
        algo = _PREHASH_BY_COORD.get(half)
        if algo is None:
            raise CkrError(CKR.DEVICE_ERROR)
        # Same integer e as X9.62: truncate to the order's bytes (the supported orders are
        # whole bytes), or left-pad with zeros, which does not change the value.
        digest = data[:half] if len(data) >= half else bytes(half - len(data)) + data
        _ecdsa_verify(key, digest, algo(), signature)

    def verify_update(self, handle: int, data: bytes | None) -> None:
        """``C_VerifyUpdate``: feed one part; the rules and limits of :meth:`sign_update`."""
        s = self._session(handle)
        if s.verify.key is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if data is None:
            s.verify.end()  # every error ends the operation
            raise CkrError(CKR.ARGUMENTS_BAD)
        s.verify.feed(data, self._held())

    def verify_final(self, handle: int, signature: bytes | None) -> None:
        """``C_VerifyFinal``: check ``signature`` over what was fed; ends the operation."""
        s = self._session(handle)
        parts, digest = s.verify.parts, s.verify.hash
        key_id = s.verify.end()
        if key_id is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if s.verify.mech == CKM_ECDSA:
            raise CkrError(CKR.FUNCTION_NOT_SUPPORTED)
        if signature is None:
            raise CkrError(CKR.ARGUMENTS_BAD)
        key = self.model.app.key(key_id)
        if s.verify.mech in _ECDSA_HASH:
            h = digest if digest is not None else hashlib.new(_ECDSA_HASH[s.verify.mech])
            self._verify_ext(s, key, h, signature)
        else:
            self._verify_ext(s, key, bytes(parts) if parts is not None else b"", signature)

    def _verify_ext(
        self, s: Session, key: KeyInfo, data: bytes | hashlib._Hash, signature: bytes
    ) -> None:
        """Verify with an extension mechanism from the key's recorded public parts.

        ``CKM_ECDSA_SHA*``: raw r||s (``CKR_SIGNATURE_LEN_RANGE`` otherwise) over the hash;
        ``CKM_EDDSA``: the raw signature; ``CKM_ML_DSA``: FIPS 204 with the context;
        dual and composite: :func:`appliance.signing.policy.verify`, policy ``strict``.
        The key's state is checked again (its objects may have gone).

        :raises CkrError: ``CKR_SIGNATURE_INVALID``, ``CKR_SIGNATURE_LEN_RANGE`` or
            ``CKR_KEY_HANDLE_INVALID``.
        """
        mech = s.verify.mech
        if not isinstance(data, bytes):
            if not _ecdsa_key(key):
                raise CkrError(CKR.KEY_HANDLE_INVALID)
            if len(signature) != 2 * parse_alg(key.classical_alg or "").coord_len:
                raise CkrError(CKR.SIGNATURE_LEN_RANGE)
            _ecdsa_verify(key, data.digest(), _HASH_CLASS[mech](), signature)
            return
        if mech == CKM_EDDSA:
            if not _eddsa_key(key):
                raise CkrError(CKR.KEY_HANDLE_INVALID)
            if len(signature) != (64 if key.classical_alg == "ed25519" else 114):
                raise CkrError(CKR.SIGNATURE_LEN_RANGE)
            pub = load_spki(key.classical_spki or b"")
            if not isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
                raise CkrError(CKR.DEVICE_ERROR)
            try:
                pub.verify(signature, data)
            except InvalidSignature:
                raise CkrError(CKR.SIGNATURE_INVALID) from None
            return
        if mech == CKM_ML_DSA:
            if not _mldsa_key(key):
                raise CkrError(CKR.KEY_HANDLE_INVALID)
            if len(signature) != MLDSA87_SIG_LEN:
                raise CkrError(CKR.SIGNATURE_LEN_RANGE)
            keys = PublicKeys(mldsa=mldsa.MLDSA87PublicKey.from_public_bytes(key.pqc_public or b""))
        elif mech == CKM_PQHSM_DUAL:
            if not _dual_key(key):
                raise CkrError(CKR.KEY_HANDLE_INVALID)
            keys = PublicKeys(
                classical=load_spki(key.classical_spki or b""),
                mldsa=mldsa.MLDSA87PublicKey.from_public_bytes(key.pqc_public or b""),
            )
        else:
            if not _composite_key(key):
                raise CkrError(CKR.KEY_HANDLE_INVALID)
            params = composite.parse_composite_alg(key.composite_alg or "")
            keys = PublicKeys(composite=(params, composite_public_key(key)))
        try:
            verify_policy(keys, data, signature, policy=Policy.STRICT, context=s.verify.context)
        except SignatureInvalid:
            raise CkrError(CKR.SIGNATURE_INVALID) from None

    # -- objects: generation and destruction -----------------------------------------------

    def generate_key_pair(
        self, handle: int, mech: Mechanism, pub_tpl: list[Attribute], priv_tpl: list[Attribute]
    ) -> tuple[int, int]:
        """``CKM_EC_KEY_PAIR_GEN``: create an appliance ECDSA key; (public, private) handles.

        The key is an ordinary appliance key (``app.create_key``): P-256 or P-384 from
        ``CKA_EC_PARAMS``, label from ``CKA_LABEL``.  The appliance chooses ``CKA_ID``;
        a template that asks for anything the key cannot have is refused.
        """
        s = self._session(handle)
        if mech.type != CKM_EC_KEY_PAIR_GEN:
            raise CkrError(CKR.MECHANISM_INVALID)
        if mech.param:
            raise CkrError(CKR.MECHANISM_PARAM_INVALID)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        if not s.flags & CKF_RW_SESSION:
            raise CkrError(CKR_SESSION_READ_ONLY)
        pub = {a.type: a.value for a in pub_tpl}
        priv = {a.type: a.value for a in priv_tpl}
        params = pub.get(CKA_EC_PARAMS, priv.get(CKA_EC_PARAMS))
        if params is None:
            raise CkrError(CKR.TEMPLATE_INCOMPLETE)
        if not isinstance(params, bytes) or params not in EC_CURVES:
            raise CkrError(CKR_CURVE_NOT_SUPPORTED)
        labels = {v for v in (pub.get(CKA_LABEL), priv.get(CKA_LABEL)) if v is not None}
        if len(labels) > 1:
            raise CkrError(CKR.TEMPLATE_INCONSISTENT)
        raw_label = labels.pop() if labels else None
        if raw_label is not None and not isinstance(raw_label, bytes):
            raise CkrError(CKR.ATTRIBUTE_VALUE_INVALID)
        try:
            label = raw_label.decode("utf-8") if raw_label else f"p11-{os.urandom(6).hex()}"
        except UnicodeDecodeError:
            raise CkrError(CKR.ATTRIBUTE_VALUE_INVALID) from None
        _check_template(pub, CKO_PUBLIC_KEY)
        _check_template(priv, CKO_PRIVATE_KEY)
        key = self.model.app.create_key(EC_CURVES[params], label)
        log.info("generated key %s (%s) through PKCS#11", key.label, EC_CURVES[params])
        visible = self._visible()
        handles = {cls: h for h, (k, cls) in visible.items() if k.key_id == key.key_id}
        return handles[CKO_PUBLIC_KEY], handles[CKO_PRIVATE_KEY]

    def destroy_object(self, handle: int, obj: int) -> None:
        """Always refused: appliance keys leave only through migration (CKA_DESTROYABLE
        is false), so an existing object gives ``CKR_ACTION_PROHIBITED``."""
        self._session(handle)
        self._object(obj)
        raise CkrError(CKR.ACTION_PROHIBITED)

    def random(self, handle: int, n: int) -> bytes:
        self._session(handle)
        if n > MAX_RANDOM:
            raise CkrError(CKR.DATA_LEN_RANGE)
        return os.urandom(n)


#: Attributes a generation template may set to anything (checked or used elsewhere).
_FREE_ATTRS: Final = frozenset({CKA_LABEL, CKA_EC_PARAMS, CKA_SUBJECT})


def _check_template(template: dict[int, AttrValue], cls: int) -> None:
    """Refuse template values the generated object will not have.

    ``CKA_ID`` cannot be chosen (the appliance assigns it): ``CKR_ATTRIBUTE_READ_ONLY``
    (an empty value, meaning no preference, is accepted).
    An attribute the object does not have: ``CKR_ATTRIBUTE_TYPE_INVALID``; a different
    value: ``CKR_TEMPLATE_INCONSISTENT``.
    """
    fixed = _FIXED_ATTRS[cls]
    for atype, value in template.items():
        if atype in _FREE_ATTRS:
            continue
        if atype == CKA_ID:
            if value == b"":  # python-pkcs11's default: no preference
                continue
            raise CkrError(CKR.ATTRIBUTE_READ_ONLY)
        if atype not in fixed:
            raise CkrError(CKR.ATTRIBUTE_TYPE_INVALID)
        if fixed[atype] != value:
            raise CkrError(CKR.TEMPLATE_INCONSISTENT)


def _fixed_attrs(cls: int) -> dict[int, AttrValue]:
    common: dict[int, AttrValue] = {
        CKA_CLASS: cls,
        CKA_TOKEN: True,
        CKA_PRIVATE: cls == CKO_PRIVATE_KEY,
        CKA_KEY_TYPE: CKK_EC,
        CKA_MODIFIABLE: False,
        CKA_COPYABLE: False,
        CKA_DESTROYABLE: False,
        CKA_DERIVE: False,
        CKA_ALLOWED_MECHANISMS: (CKM_ECDSA,),
    }
    if cls == CKO_PRIVATE_KEY:
        common.update(
            {
                CKA_SENSITIVE: True,
                CKA_EXTRACTABLE: False,
                CKA_SIGN: True,
                CKA_SIGN_RECOVER: False,
                CKA_DECRYPT: False,
                CKA_UNWRAP: False,
                CKA_ALWAYS_AUTHENTICATE: False,
            }
        )
    else:
        common.update(
            {CKA_VERIFY: True, CKA_VERIFY_RECOVER: False, CKA_ENCRYPT: False, CKA_WRAP: False}
        )
    return common


_FIXED_ATTRS: Final = {c: _fixed_attrs(c) for c in (CKO_PUBLIC_KEY, CKO_PRIVATE_KEY)}


def _c_size(value: AttrValue) -> int:
    """The C length of an attribute value (what ``ulValueLen`` reports)."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 8
    if isinstance(value, bytes):
        return len(value)
    if value is None:
        return 0
    return (8 if all(isinstance(v, int) for v in value) else 24) * len(value)
