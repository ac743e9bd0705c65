"""Composite ML-DSA signatures, IETF draft-ietf-lamps-pq-composite-sigs-19.

hazardous: use the service API.  This module formats, encodes and verifies composite
signatures; it holds no keys and does no policy.  The service signs through :func:`sign`
with a closure that runs the classical half inside the token.

Two algorithms are supported (draft §6, "Algorithm Identifiers and Parameters")::

    name                          OID                     PH            classical component
    MLDSA87-ECDSA-P384-SHA512     1.3.6.1.5.5.7.6.49      SHA-512       ecdsa-with-SHA384, secp384r1
    MLDSA87-Ed448-SHAKE256        1.3.6.1.5.5.7.6.51      SHAKE256/64   Ed448 (pure, empty context)

Signing (draft §3.2), for a message M and an application context ctx of at most 255 bytes::

    M'       = Prefix || Label || len(ctx) || ctx || PH(M)     len(ctx): one unsigned byte
    mldsaSig = ML-DSA-87.Sign(sk, M', ctx=Label)                pure FIPS 204, Label as context
    tradSig  = Trad.Sign(sk, M')                                see below
    s        = mldsaSig || tradSig

``Prefix`` is the 32 ASCII bytes ``CompositeAlgorithmSignatures2025``; ``Label`` is the
ASCII string ``COMPSIG-`` followed by the algorithm name.  The classical component signs
M' with its own standard algorithm: ECDSA P-384 hashes M' with **SHA-384** (the draft pairs
SHA-512 as PH with ecdsa-with-SHA384 as the component), Ed448 signs M' itself as pure
Ed448 with an empty context.  A token's raw mechanisms therefore get
``SHA-384(M')`` (``CKM_ECDSA``) or ``M'`` (``CKM_EDDSA``); :func:`classical_digest` says
which.

Encodings (draft §4, §5)::

    public key   mldsaPK (2592) || tradPK   ECDSA: uncompressed SEC1 point 04||X||Y (97)
                                            Ed448: RFC 8032 encoding (57)
    signature    mldsaSig (4627) || tradSig ECDSA: DER Ecdsa-Sig-Value (RFC 3279)
                                            Ed448: RFC 8032 encoding (114)
    SPKI         SEQUENCE { SEQUENCE { OID }, BIT STRING (0 unused bits) { public key } }

The AlgorithmIdentifier has no parameters (not even NULL).  Private keys are never
exported, so the draft's private key encoding is not implemented.

Verification needs every component (draft §3.3); any failure raises one
:class:`SignatureInvalid` with one message.  A malformed *public key* or an over-long
context is the caller's mistake and raises :class:`CallerError` instead.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from appliance.algorithms import der_oid
from appliance.errors import CallerError, DeviceError, SignatureInvalid
from appliance.pqc import MAX_CONTEXT, MLDSA87_PUBLIC_LEN, MLDSA87_SIG_LEN, MlDsaSigner
from appliance.pqc import active_backend as _active_backend
from appliance.secret import BytesLike

__all__ = [
    "DRAFT",
    "PARAMS",
    "PREFIX",
    "ClassicalInput",
    "CompositeAlg",
    "CompositeParams",
    "classical_digest",
    "decode_public_key",
    "decode_signature",
    "encode_public_key",
    "encode_signature",
    "load_public_key_spki",
    "message_representative",
    "parse_composite_alg",
    "public_key_pem",
    "public_key_spki",
    "sign",
    "verify",
]

#: The draft version this module implements, byte for byte.
DRAFT: Final = "draft-ietf-lamps-pq-composite-sigs-19"

#: ``Prefix`` of M' (draft §2.2): the ASCII bytes of "CompositeAlgorithmSignatures2025".
PREFIX: Final = b"CompositeAlgorithmSignatures2025"

_PH_LEN: Final = 64  # both pre-hashes give 64 bytes: SHA-512 and SHAKE256 with 64-byte output
_P384_POINT_LEN: Final = 97  # 0x04 || X (48) || Y (48)
_ED448_PUBLIC_LEN: Final = 57
_ED448_SIG_LEN: Final = 114
_ECDSA_P384_DER_MIN: Final = 8  # SEQUENCE { INTEGER 1 byte, INTEGER 1 byte }
_ECDSA_P384_DER_MAX: Final = 104  # SEQUENCE { INTEGER 49 bytes, INTEGER 49 bytes }
_INVALID: Final = "composite signature invalid"
_ECDSA_HASH: Final[dict[str | None, hashes.HashAlgorithm]] = {"sha384": hashes.SHA384()}


class CompositeAlg(Enum):
    """The composite algorithms the appliance offers."""

    MLDSA87_ECDSA_P384_SHA512 = "mldsa87-ecdsa-p384-sha512"
    """ML-DSA-87 with ECDSA P-384 (component hash SHA-384); PH = SHA-512."""

    MLDSA87_ED448_SHAKE256 = "mldsa87-ed448-shake256"
    """ML-DSA-87 with pure Ed448; PH = SHAKE256 with 64-byte output."""


@dataclass(frozen=True, slots=True)
class CompositeParams:
    """The fixed parameters of one composite algorithm (draft §6).

    :ivar alg: our name for it.
    :ivar oid: the dotted OID of the algorithm (public key and signature).
    :ivar label: ``Label``, the ASCII bytes put into M' and passed as ML-DSA's context.
    :ivar classical: ``"ecdsa-p384"`` or ``"ed448"``.
    :ivar name: the draft's name without the ``id-`` prefix.
    :ivar prehash: ``PH``: ``"sha512"`` or ``"shake256-64"``.
    :ivar classical_hash: the hash the classical component applies to M'
        (``"sha384"`` for ECDSA P-384), or ``None`` when it signs M' itself (Ed448).
    :ivar classical_public_len: length of the classical public key encoding.
    """

    alg: CompositeAlg
    oid: str
    label: bytes
    classical: str
    name: str
    prehash: str
    classical_hash: str | None
    classical_public_len: int

    @property
    def public_len(self) -> int:
        """Length of the composite public key encoding (mldsaPK || tradPK)."""
        return MLDSA87_PUBLIC_LEN + self.classical_public_len


PARAMS: Final[dict[CompositeAlg, CompositeParams]] = {
    CompositeAlg.MLDSA87_ECDSA_P384_SHA512: CompositeParams(
        alg=CompositeAlg.MLDSA87_ECDSA_P384_SHA512,
        oid="1.3.6.1.5.5.7.6.49",
        label=b"COMPSIG-MLDSA87-ECDSA-P384-SHA512",
        classical="ecdsa-p384",
        name="MLDSA87-ECDSA-P384-SHA512",
        prehash="sha512",
        classical_hash="sha384",
        classical_public_len=_P384_POINT_LEN,
    ),
    CompositeAlg.MLDSA87_ED448_SHAKE256: CompositeParams(
        alg=CompositeAlg.MLDSA87_ED448_SHAKE256,
        oid="1.3.6.1.5.5.7.6.51",
        label=b"COMPSIG-MLDSA87-Ed448-SHAKE256",
        classical="ed448",
        name="MLDSA87-Ed448-SHAKE256",
        prehash="shake256-64",
        classical_hash=None,
        classical_public_len=_ED448_PUBLIC_LEN,
    ),
}


class ClassicalInput(NamedTuple):
    """What the classical component must sign, as a token's raw mechanism takes it.

    :ivar hash_name: ``"sha384"``: ``data`` is SHA-384(M'), to be signed with raw
        ``CKM_ECDSA`` (whose r‖s output the caller DER-encodes);
        ``None``: ``data`` is M' itself, to be signed with ``CKM_EDDSA`` as pure Ed448
        (``CK_EDDSA_PARAMS`` with ``phFlag`` false and an empty context).
    :ivar data: the bytes to hand to the mechanism.
    """

    hash_name: str | None
    data: bytes


# -- small helpers -------------------------------------------------------------------------


def _buf(what: str, value: object) -> bytes:
    """Bytes of a buffer; refuses str, int and lists, which ``bytes()`` would accept."""
    try:
        return memoryview(value).tobytes()  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}") from None


def _view(what: str, value: object) -> memoryview:
    """A flat byte view of a buffer, without copying it (for hashing long messages)."""
    try:
        return memoryview(value).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}") from None


def _check_params(p: object) -> CompositeParams:
    if not isinstance(p, CompositeParams):
        raise TypeError(f"params must be CompositeParams, not {type(p).__name__}")
    return p


def _known(p: object) -> CompositeParams:
    """``p``, if it is one of :data:`PARAMS` exactly (no home-made labels or OIDs)."""
    params = _check_params(p)
    if PARAMS.get(params.alg) != params:
        raise CallerError("composite parameters do not match any supported algorithm")
    return params


def _prehash(p: CompositeParams, message: memoryview) -> bytes:
    if p.prehash == "sha512":
        return hashlib.sha512(message).digest()
    if p.prehash == "shake256-64":
        return hashlib.shake_256(message).digest(_PH_LEN)
    raise CallerError(f"unknown pre-hash {p.prehash!r}")


def _check_context(context: object) -> bytes:
    ctx = _buf("context", context)
    if len(ctx) > MAX_CONTEXT:
        raise CallerError(f"composite context is {len(ctx)} bytes; at most {MAX_CONTEXT}")
    return ctx


# -- algorithm names -----------------------------------------------------------------------


def parse_composite_alg(name: str) -> CompositeParams:
    """Look up a composite algorithm by name.

    Accepts our names (``mldsa87-ecdsa-p384-sha512``), the draft's names with or without
    ``id-`` (``id-MLDSA87-ECDSA-P384-SHA512``) and the dotted OID; case does not matter.

    :raises CallerError: unknown name; the message lists the choices.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {type(name).__name__}")
    key = name.strip().lower()
    for p in PARAMS.values():
        if key in (p.alg.value, p.name.lower(), "id-" + p.name.lower(), p.oid):
            return p
    choices = ", ".join(a.value for a in CompositeAlg)
    raise CallerError(f"unknown composite algorithm {name!r}; choose one of: {choices}")


# -- the message representative ------------------------------------------------------------


def message_representative(
    p: CompositeParams, message: BytesLike, context: BytesLike = b""
) -> bytes:
    """M' = Prefix || Label || len(ctx) || ctx || PH(M) (draft §2.2 and §3.2 step 2).

    Uses ``p.label`` and ``p.prehash`` only.

    :raises CallerError: ``context`` is longer than 255 bytes.
    """
    params = _check_params(p)
    ctx = _check_context(context)
    ph = _prehash(params, _view("message", message))
    return b"".join((PREFIX, params.label, bytes((len(ctx),)), ctx, ph))


def classical_digest(p: CompositeParams, m_prime: BytesLike) -> ClassicalInput:
    """What the classical component's raw mechanism must sign, for a given M'.

    ECDSA P-384: ``ClassicalInput("sha384", SHA-384(M'))`` for ``CKM_ECDSA``; this is
    ecdsa-with-SHA384 over M', **not** SHA-512.  Ed448: ``ClassicalInput(None, M')`` for
    ``CKM_EDDSA`` (pure Ed448, empty context).

    :raises CallerError: ``m_prime`` is not an M' for ``p`` (wrong prefix or label, or
        a length that does not add up).
    """
    params = _known(p)
    mp = _buf("M'", m_prime)
    head = PREFIX + params.label
    if len(mp) < len(head) + 1 or not mp.startswith(head):
        raise CallerError("not a composite message representative for this algorithm")
    if len(mp) != len(head) + 1 + mp[len(head)] + _PH_LEN:
        raise CallerError("not a composite message representative for this algorithm")
    if params.classical_hash == "sha384":
        return ClassicalInput("sha384", hashlib.sha384(mp).digest())
    return ClassicalInput(None, mp)


# -- public keys -------------------------------------------------------------------------------


def _classical_public(
    p: CompositeParams, trad: bytes
) -> ec.EllipticCurvePublicKey | ed448.Ed448PublicKey:
    """Load a classical public key from its composite encoding, strictly."""
    if len(trad) != p.classical_public_len:
        raise CallerError(
            f"{p.classical} public key must be {p.classical_public_len} bytes, got {len(trad)}"
        )
    if p.classical == "ecdsa-p384":
        if trad[0] != 0x04:
            raise CallerError("ECDSA P-384 public key must be an uncompressed point")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), trad)
        except ValueError:
            raise CallerError("ECDSA P-384 public key is not a point on the curve") from None
    if p.classical == "ed448":
        # cryptography checks the length only; a bad encoding fails at verification.
        try:
            return ed448.Ed448PublicKey.from_public_bytes(trad)
        except ValueError:
            raise CallerError("Ed448 public key is malformed") from None
    raise CallerError(f"unknown classical algorithm {p.classical!r}")


def encode_public_key(
    p: CompositeParams, mldsa_public: BytesLike, classical_public: BytesLike
) -> bytes:
    """SerializePublicKey: ``mldsaPK || tradPK`` (draft §4.1).

    :param classical_public: ECDSA: the uncompressed SEC1 point (97 bytes);
        Ed448: the raw 57-byte key.
    :raises CallerError: a component has the wrong length, or the ECDSA point is not
        uncompressed or not on the curve.
    """
    params = _known(p)
    mldsa_pk = _buf("ML-DSA public key", mldsa_public)
    trad = _buf("classical public key", classical_public)
    if len(mldsa_pk) != MLDSA87_PUBLIC_LEN:
        raise CallerError(
            f"ML-DSA-87 public key must be {MLDSA87_PUBLIC_LEN} bytes, got {len(mldsa_pk)}"
        )
    _classical_public(params, trad)
    return mldsa_pk + trad


def decode_public_key(p: CompositeParams, data: BytesLike) -> tuple[bytes, bytes]:
    """DeserializePublicKey: split into ``(mldsaPK, tradPK)`` (draft §4.1), strictly.

    Unlike the draft's sketch, the total length must be exact and the classical key must
    load (ECDSA: uncompressed and on the curve).

    :raises CallerError: wrong length or a bad ECDSA point.
    """
    params = _known(p)
    raw = _buf("composite public key", data)
    if len(raw) != params.public_len:
        raise CallerError(
            f"{params.name} public key must be {params.public_len} bytes, got {len(raw)}"
        )
    mldsa_pk, trad = raw[:MLDSA87_PUBLIC_LEN], raw[MLDSA87_PUBLIC_LEN:]
    _classical_public(params, trad)
    return mldsa_pk, trad


# -- DER: just enough for SubjectPublicKeyInfo ----------------------------------------------

_SEQUENCE: Final = 0x30
_BIT_STRING: Final = 0x03


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _der(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _der_len(len(content)) + content


def _algorithm_identifier(p: CompositeParams) -> bytes:
    """``SEQUENCE { OID }``: parameters absent (draft §5.3, ``PARAMS ARE absent``)."""
    return _der(_SEQUENCE, der_oid(p.oid))


def _read_tlv(data: bytes, pos: int, tag: int) -> tuple[int, int]:
    """Read one DER TLV with ``tag`` at ``pos``; return (content start, content end).

    Strict: definite lengths only, in the shortest form, and within ``data``.
    """
    if pos + 2 > len(data) or data[pos] != tag:
        raise CallerError("not a composite SubjectPublicKeyInfo")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 3 or pos + n > len(data):  # indefinite, or absurdly long
            raise CallerError("not a composite SubjectPublicKeyInfo")
        length = int.from_bytes(data[pos : pos + n], "big")
        if data[pos] == 0 or length < 0x80:  # not the shortest form
            raise CallerError("not a composite SubjectPublicKeyInfo (non-DER length)")
        pos += n
    if pos + length > len(data):
        raise CallerError("not a composite SubjectPublicKeyInfo (truncated)")
    return pos, pos + length


_PEM_BEGIN: Final = "-----BEGIN PUBLIC KEY-----"
_PEM_END: Final = "-----END PUBLIC KEY-----"


def public_key_spki(p: CompositeParams, composite_public: BytesLike) -> bytes:
    """DER SubjectPublicKeyInfo for a composite public key (draft §5.1, §5.3).

    :raises CallerError: the public key is malformed (see :func:`decode_public_key`).
    """
    params = _known(p)
    raw = _buf("composite public key", composite_public)
    decode_public_key(params, raw)
    bits = _der(_BIT_STRING, b"\x00" + raw)
    return _der(_SEQUENCE, _algorithm_identifier(params) + bits)


def public_key_pem(p: CompositeParams, composite_public: BytesLike) -> bytes:
    """PEM (``PUBLIC KEY``) of :func:`public_key_spki`, 64 base64 characters a line."""
    b64 = binascii.b2a_base64(public_key_spki(p, composite_public), newline=False)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"\n".join([_PEM_BEGIN.encode(), *lines, _PEM_END.encode()]) + b"\n"


def _pem_to_der(text: bytes) -> bytes:
    try:
        lines = text.decode("ascii").strip().splitlines()
    except UnicodeDecodeError:
        raise CallerError("not a composite public key PEM") from None
    lines = [line.strip() for line in lines]
    if len(lines) < 3 or lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
        raise CallerError("not a composite public key PEM (expected one PUBLIC KEY block)")
    try:
        return binascii.a2b_base64("".join(lines[1:-1]), strict_mode=True)
    except binascii.Error:
        raise CallerError("not a composite public key PEM (bad base64)") from None


def load_public_key_spki(der_or_pem: BytesLike) -> tuple[CompositeParams, bytes]:
    """Parse a SubjectPublicKeyInfo made by :func:`public_key_spki` (DER or PEM).

    Strict DER: shortest-form definite lengths, no trailing bytes at any level, an
    AlgorithmIdentifier holding exactly one of our OIDs with parameters absent, a BIT
    STRING with no unused bits, and a public key of the exact length with a valid ECDSA
    point.

    :returns: the algorithm's parameters and the composite public key bytes.
    :raises CallerError: anything else.
    """
    data = _buf("SubjectPublicKeyInfo", der_or_pem)
    if data.lstrip().startswith(b"-----BEGIN"):
        data = _pem_to_der(data)
    start, end = _read_tlv(data, 0, _SEQUENCE)
    if end != len(data):
        raise CallerError("not a composite SubjectPublicKeyInfo (trailing bytes)")
    _, alg_end = _read_tlv(data, start, _SEQUENCE)
    alg_id = data[start:alg_end]
    params = next((p for p in PARAMS.values() if _algorithm_identifier(p) == alg_id), None)
    if params is None:
        raise CallerError(
            "not a composite SubjectPublicKeyInfo for a supported algorithm "
            "(unknown OID, or AlgorithmIdentifier parameters present)"
        )
    bits_start, bits_end = _read_tlv(data, alg_end, _BIT_STRING)
    if bits_end != end:
        raise CallerError("not a composite SubjectPublicKeyInfo (trailing bytes)")
    if bits_start == bits_end or data[bits_start] != 0:
        raise CallerError("not a composite SubjectPublicKeyInfo (BIT STRING unused bits)")
    public = data[bits_start + 1 : bits_end]
    decode_public_key(params, public)
    return params, public


# -- signatures --------------------------------------------------------------------------------


def encode_signature(mldsa_sig: BytesLike, classical_sig: BytesLike) -> bytes:
    """SerializeSignatureValue: ``mldsaSig || tradSig`` (draft §4.3).

    :raises CallerError: the ML-DSA part is not 4627 bytes or the classical part is empty.
    """
    mldsa = _buf("ML-DSA signature", mldsa_sig)
    trad = _buf("classical signature", classical_sig)
    if len(mldsa) != MLDSA87_SIG_LEN:
        raise CallerError(f"ML-DSA-87 signature must be {MLDSA87_SIG_LEN} bytes, got {len(mldsa)}")
    if not trad:
        raise CallerError("classical signature is empty")
    return mldsa + trad


def _classical_sig_ok(p: CompositeParams, trad: bytes) -> bool:
    """Whether ``trad`` is a well-formed classical signature encoding for ``p``."""
    if p.classical == "ed448":
        return len(trad) == _ED448_SIG_LEN
    if p.classical == "ecdsa-p384":
        if not _ECDSA_P384_DER_MIN <= len(trad) <= _ECDSA_P384_DER_MAX:
            return False
        try:
            r, s = decode_dss_signature(trad)
        except ValueError:
            return False
        # Re-encoding must give the same bytes: rejects BER, non-minimal integers and
        # trailing data.  Zero and negative values are never valid ECDSA signatures.
        return r > 0 and s > 0 and encode_dss_signature(r, s) == trad
    return False


def decode_signature(p: CompositeParams, sig: BytesLike) -> tuple[bytes, bytes]:
    """DeserializeSignatureValue: split into ``(mldsaSig, tradSig)`` (draft §4.3), strictly.

    The ECDSA part must be a DER ``Ecdsa-Sig-Value`` with nothing after it; the Ed448
    part must be exactly 114 bytes.

    :raises SignatureInvalid: malformed (wrong length, truncated, extended, bad DER).
    """
    params = _known(p)
    raw = _buf("signature", sig)
    if len(raw) <= MLDSA87_SIG_LEN:
        raise SignatureInvalid(_INVALID)
    mldsa, trad = raw[:MLDSA87_SIG_LEN], raw[MLDSA87_SIG_LEN:]
    if not _classical_sig_ok(params, trad):
        raise SignatureInvalid(_INVALID)
    return mldsa, trad


def sign(
    p: CompositeParams,
    mldsa_signer: MlDsaSigner,
    classical_sign: Callable[[bytes], bytes],
    message: BytesLike,
    context: BytesLike = b"",
    *,
    composite_public: BytesLike | None = None,
) -> bytes:
    """Composite-ML-DSA.Sign (draft §3.2): ``mldsaSig || tradSig`` over M'.

    :param mldsa_signer: the composite key's own ML-DSA-87 key (never shared with any
        other key: the draft forbids reuse).
    :param classical_sign: signs what :func:`classical_digest` gives for M' and returns
        the signature: DER ``Ecdsa-Sig-Value`` for ECDSA (DER-encode ``CKM_ECDSA``'s
        raw r‖s first), the raw 114 bytes for Ed448.
    :param composite_public: when given, the fresh signature is verified against it
        before it is returned (catches a token signing the wrong digest, a wrong key or
        a fault); the service should always pass it.

    Security: the classical closure receives only SHA-384(M') or M', which start with
    the composite Prefix and Label; it must not be reachable with caller-chosen input
    for the same key.

    :raises CallerError: context over 255 bytes, or ``composite_public`` malformed or
        not matching ``mldsa_signer``.
    :raises DeviceError: the classical signer returned a malformed signature, or the
        self-check against ``composite_public`` failed.
    """
    params = _known(p)
    if not callable(classical_sign):
        raise TypeError("classical_sign must be callable")
    expected_public = None
    if composite_public is not None:
        mldsa_pk, _ = decode_public_key(params, composite_public)
        if mldsa_signer.public_bytes() != mldsa_pk:
            raise CallerError("the ML-DSA signer does not belong to this composite key")
        expected_public = _buf("composite public key", composite_public)
    m_prime = message_representative(params, message, context)
    mldsa_sig = mldsa_signer.sign(m_prime, params.label)
    if len(mldsa_sig) != MLDSA87_SIG_LEN:
        raise DeviceError("ML-DSA signer returned a signature of the wrong length")
    returned: object = classical_sign(classical_digest(params, m_prime).data)
    try:
        trad = _buf("classical signature", returned)
    except TypeError:
        raise DeviceError("classical signer returned no signature bytes") from None
    if not _classical_sig_ok(params, trad):
        raise DeviceError(
            f"classical signer returned a malformed {params.classical} signature"
            + (" (expected DER Ecdsa-Sig-Value)" if params.classical == "ecdsa-p384" else "")
        )
    signature = encode_signature(mldsa_sig, trad)
    if expected_public is not None:
        try:
            verify(params, expected_public, message, signature, context)
        except SignatureInvalid:
            raise DeviceError("composite signature failed its self-check") from None
    return signature


def verify(
    p: CompositeParams,
    composite_public: BytesLike,
    message: BytesLike,
    signature: BytesLike,
    context: BytesLike = b"",
) -> None:
    """Composite-ML-DSA.Verify (draft §3.3): both components must verify over M'.

    ML-DSA-87 through :func:`appliance.pqc.active_backend` with ``ctx = Label``; the
    classical part through ``cryptography`` (ecdsa-with-SHA384 or pure Ed448).

    :raises SignatureInvalid: any failure, malformed signature included; one message.
    :raises CallerError: context over 255 bytes, or a malformed public key.
    """
    params = _known(p)
    ctx = _check_context(context)
    mldsa_pk, trad_pk = decode_public_key(params, composite_public)
    classical_key = _classical_public(params, trad_pk)
    mldsa_sig, trad_sig = decode_signature(params, signature)
    m_prime = message_representative(params, message, ctx)
    try:
        _active_backend().mldsa87_verify(mldsa_pk, m_prime, mldsa_sig, params.label)
    except SignatureInvalid:
        raise SignatureInvalid(_INVALID) from None
    try:
        if isinstance(classical_key, ec.EllipticCurvePublicKey):
            classical_key.verify(trad_sig, m_prime, ec.ECDSA(_ECDSA_HASH[params.classical_hash]))
        else:
            classical_key.verify(trad_sig, m_prime)
    except InvalidSignature:
        raise SignatureInvalid(_INVALID) from None
