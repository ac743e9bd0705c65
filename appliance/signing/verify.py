"""Verification from public keys alone: what a verifier node runs, with no token.

``verify_signature`` returns ``None`` or raises :class:`SignatureInvalid`; it never returns
a bool.  Malformed keys are a :class:`CallerError` naming the problem; a malformed
signature is just an invalid one.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from appliance.errors import CallerError, SignatureInvalid
from appliance.pqc import MAX_CONTEXT, MLDSA87_SIG_LEN
from appliance.secret import BytesLike

__all__ = ["load_public_key", "verify_ecdsa", "verify_signature"]

_ECDSA_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp256k1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
}


def verify_ecdsa(
    key: ec.EllipticCurvePublicKey, sig: bytes, msg: bytes, algo: ec.ECDSA, size: int
) -> None:
    """Verify DER ``Ecdsa-Sig-Value`` or raw r||s (``size`` bytes each).

    A raw signature starts with 0x30 one time in 256 and may then also read as DER, so a
    2*size signature starting with 0x30 is tried as DER first and as raw r||s second.  Both
    are encodings of the same (r, s); accepting either never accepts a different pair.

    :raises InvalidSignature: neither reading verifies.
    """
    if len(sig) == 2 * size:
        if sig[0] == 0x30:
            try:
                key.verify(sig, msg, algo)
                return
            except (InvalidSignature, ValueError):
                pass
        sig = encode_dss_signature(
            int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
        )
    key.verify(sig, msg, algo)


def load_public_key(data: bytes) -> PublicKeyTypes:
    """Parse a PEM or DER SubjectPublicKeyInfo."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(data)
        return serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CallerError("not a PEM or DER public key (SubjectPublicKeyInfo)") from None


def verify_signature(
    key: PublicKeyTypes, message: BytesLike, signature: BytesLike, *, context: bytes = b""
) -> None:
    """Verify a plain classical or ML-DSA-87 signature.

    ECDSA accepts DER ``Ecdsa-Sig-Value`` or raw r||s; the hash follows the curve (SHA-256
    for P-256 and secp256k1, SHA-384 for P-384).  ``context`` applies to ML-DSA only.

    :raises SignatureInvalid: the signature does not verify (one message for every cause).
    """
    msg, sig = bytes(message), bytes(signature)
    if context and not isinstance(key, mldsa.MLDSA87PublicKey):
        raise CallerError("a context applies to ML-DSA signatures only")
    if len(context) > MAX_CONTEXT:
        raise CallerError(f"context longer than {MAX_CONTEXT} bytes")
    try:
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(sig, msg)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            hash_cls = _ECDSA_HASH.get(key.curve.name)
            if hash_cls is None:
                raise CallerError(f"unsupported curve {key.curve.name}")
            verify_ecdsa(key, sig, msg, ec.ECDSA(hash_cls()), (key.curve.key_size + 7) // 8)
        elif isinstance(key, mldsa.MLDSA87PublicKey):
            # the parsed key object verifies directly; re-parsing the 2592-byte key per
            # call through the raw-bytes backend interface cost about 10% of a verify
            if len(sig) != MLDSA87_SIG_LEN:
                raise SignatureInvalid("signature invalid")
            key.verify(sig, msg, context or None)
        else:
            raise CallerError(f"unsupported public key type {type(key).__name__}")
    except InvalidSignature:
        raise SignatureInvalid("signature invalid") from None
    except ValueError:
        raise SignatureInvalid("signature invalid") from None
