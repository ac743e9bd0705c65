"""Verification policies, chosen by the verifier (DESIGN §7), from public keys alone.

* ``legacy`` — the classical part must verify (what an unmodified verifier checks);
* ``pqc``    — the ML-DSA-87 part must verify;
* ``strict`` — every part the key has must be present and verify.

A composite signature always needs all of its parts, whatever the policy.  There is no
"accept anything" policy.  :func:`verify` returns ``None`` or raises
:class:`SignatureInvalid`; it never returns a bool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from appliance.errors import CallerError, SignatureInvalid
from appliance.signing import composite as comp
from appliance.signing.dual import DUAL_MAGIC, dual_context, parse_dual
from appliance.signing.verify import load_public_key, verify_ecdsa, verify_signature

__all__ = ["Policy", "PublicKeys", "classical_alg_name", "load_public_keys", "verify"]


class Policy(Enum):
    LEGACY = "legacy"
    PQC = "pqc"
    STRICT = "strict"

    @classmethod
    def parse(cls, text: str) -> Policy:
        try:
            return cls(text)
        except ValueError:
            raise CallerError(f"unknown policy {text!r} (choose legacy, pqc or strict)") from None


def classical_alg_name(key: PublicKeyTypes) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    if isinstance(key, ec.EllipticCurvePublicKey):
        names = {
            "secp256r1": "ecdsa-p256",
            "secp384r1": "ecdsa-p384",
            "secp256k1": "ecdsa-secp256k1",
        }
        if key.curve.name in names:
            return names[key.curve.name]
    raise CallerError(f"unsupported classical public key {type(key).__name__}")


@dataclass(frozen=True)
class PublicKeys:
    """A verifier's view of one key: its classical half, ML-DSA half, or composite key."""

    classical: PublicKeyTypes | None = None
    mldsa: mldsa.MLDSA87PublicKey | None = None
    composite: tuple[Any, bytes] | None = None  # (CompositeParams, composite public key)

    def classical_verifier(self) -> Callable[[bytes, bytes], None]:
        """``(signature, message) -> None``, raising InvalidSignature/ValueError; built once.

        Dispatching on the key type once per PublicKeys rather than per signature keeps the
        policy layer within a few percent of the raw primitives.
        """
        cached = self.__dict__.get("_cverify")
        if cached is not None:
            return cast("Callable[[bytes, bytes], None]", cached)
        key = self.classical
        if key is None:
            raise CallerError("no classical public key")
        fn: Callable[[bytes, bytes], None]
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            fn = key.verify
        elif isinstance(key, ec.EllipticCurvePublicKey):
            algo = ec.ECDSA(hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256())
            size = (key.curve.key_size + 7) // 8
            ec_key = key

            def fn(sig: bytes, msg: bytes) -> None:
                verify_ecdsa(ec_key, sig, msg, algo, size)
        else:
            raise CallerError(f"unsupported classical public key {type(key).__name__}")
        object.__setattr__(self, "_cverify", fn)
        return fn

    def classical_name(self) -> str:
        cached = self.__dict__.get("_cname")
        if cached is None:
            if self.classical is None:
                raise CallerError("no classical public key")
            cached = classical_alg_name(self.classical)
            object.__setattr__(self, "_cname", cached)
        return str(cached)

    def spki_hash(self) -> bytes:
        cached = self.__dict__.get("_spki_hash")
        if cached is None:
            cached = hashlib.sha3_256(self.classical_spki()).digest()
            object.__setattr__(self, "_spki_hash", cached)
        return bytes(cached)

    def classical_spki(self) -> bytes:
        if self.classical is None:
            raise CallerError("no classical public key")
        return self.classical.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _pem_blocks(data: bytes) -> list[bytes]:
    blocks, rest = [], data
    while (start := rest.find(b"-----BEGIN")) != -1:
        end = rest.find(b"-----END", start)
        stop = rest.find(b"-----", end + 8) if end != -1 else -1
        if stop == -1:
            raise CallerError("truncated PEM block")
        blocks.append(rest[start : stop + 5])
        rest = rest[stop + 5 :]
    return blocks


def load_public_keys(*datas: bytes) -> PublicKeys:
    """Collect public keys from PEM (one or more blocks per input) or DER inputs."""
    classical: PublicKeyTypes | None = None
    pq: mldsa.MLDSA87PublicKey | None = None
    composite: tuple[Any, bytes] | None = None
    for data in datas:
        for block in _pem_blocks(data) or [data]:
            try:
                key = load_public_key(block)
            except CallerError:
                try:
                    composite = comp.load_public_key_spki(block)
                except CallerError:
                    raise CallerError(
                        "not a PEM or DER public key (classical, ML-DSA-87 or composite SPKI)"
                    ) from None
                continue
            if isinstance(key, mldsa.MLDSA87PublicKey):
                if pq is not None:
                    raise CallerError("two ML-DSA-87 public keys given")
                pq = key
            else:
                if classical is not None:
                    raise CallerError("two classical public keys given")
                classical_alg_name(key)  # refuses unsupported types
                classical = key
    if composite is not None and (classical is not None or pq is not None):
        raise CallerError("a composite public key stands alone")
    if composite is None and classical is None and pq is None:
        raise CallerError("no public key given")
    return PublicKeys(classical, pq, composite)


def verify(
    keys: PublicKeys, message: bytes, signature: bytes, *, policy: Policy, context: bytes = b""
) -> None:
    """Verify ``signature`` over ``message`` under ``policy``.

    :raises SignatureInvalid: the policy is not satisfied (a required part is missing, or
        a part does not verify).  The message says which policy failed, never more.
    """
    if keys.composite is not None:
        params, public = keys.composite
        comp.verify(params, public, message, signature, context)
        return
    if signature[:4] == DUAL_MAGIC and keys.classical is not None and keys.mldsa is not None:
        dual = parse_dual(signature)
        if dual.classical_alg != keys.classical_name():
            raise SignatureInvalid("dual signature is for another classical algorithm")
        check_classical = policy in (Policy.LEGACY, Policy.STRICT)
        check_pqc = policy in (Policy.PQC, Policy.STRICT)
        try:
            if check_classical:
                keys.classical_verifier()(dual.classical_sig, message)
            if check_pqc:
                ctx = dual_context(b"", dual.classical_sig, context, spki_hash=keys.spki_hash())
                keys.mldsa.verify(dual.mldsa_sig, message, ctx)
        except (InvalidSignature, ValueError):
            raise SignatureInvalid("signature invalid") from None
        return
    # a plain signature carries exactly one part
    is_mldsa = keys.mldsa is not None and (keys.classical is None or len(signature) == 4627)
    if is_mldsa:
        if policy is Policy.LEGACY:
            raise SignatureInvalid("policy legacy needs a classical part; this is ML-DSA-87 only")
        if policy is Policy.STRICT and keys.classical is not None:
            raise SignatureInvalid(
                "policy strict needs every part of a dual key; the classical part is missing"
            )
        assert keys.mldsa is not None  # noqa: S101 - is_mldsa implies it
        verify_signature(keys.mldsa, message, signature, context=context)
        return
    if keys.classical is None:
        raise SignatureInvalid("no classical public key for a classical signature")
    if policy is Policy.PQC:
        raise SignatureInvalid(
            "policy pqc needs an ML-DSA-87 part; this signature is classical only"
        )
    if policy is Policy.STRICT and keys.mldsa is not None:
        raise SignatureInvalid(
            "policy strict needs every part of a dual key; the ML-DSA-87 part is missing"
        )
    if context:
        raise CallerError("a context applies to ML-DSA signatures only")
    verify_signature(keys.classical, message, signature)
