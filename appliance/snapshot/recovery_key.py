"""Offline recovery-officer key: restore post-quantum keys onto a brand-new token.

hazardous: used by ``pqhsm recovery-key create``, ``backup --recovery-key`` and
``restore --recovery-seed``.

The keystore's ML-KEM-1024 seed normally exists only sealed by the token.  A backup may
also carry it sealed to an offline ML-KEM-1024 *recovery* key::

    recovery/kem-seed.sealed = magic "PQHSMR1\\0" || kem_ct (1568) || nonce (12)
                               || AES-256-GCM(seed) || tag
        key = HKDF-SHA3-256(ikm = ss, salt = SHA3-256(kem_ct),
                            info = "pqhsm/recovery/v1" || keystore_id)
        AAD = magic || keystore_id

With the officer's seed file, a restore onto a new token unseals the KEM seed and seals it
again with the new token's wrap key.  Blobs are untouched: they depend on the KEM key and
the passphrase, both unchanged.  Classical keys lived only in the old token and cannot be
recovered, by design; the restore names them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import BlobInvalid, CallerError
from appliance.fsio import FILE_MODE, check_private_file, read_file
from appliance.pqc import MLKEM1024_CT_LEN, MLKEM1024_EK_LEN, MLKEM1024_SEED_LEN, PqcBackend
from appliance.secret import SecretBytes

__all__ = ["SEALED_MAGIC", "create_recovery_key", "load_recovery_public", "open_seed", "seal_seed"]

SEALED_MAGIC: Final = b"PQHSMR1\x00"
PUB_MAGIC: Final = b"PQHSM-RECOVERY-EK-1\n"
_INFO: Final = b"pqhsm/recovery/v1"
_NONCE: Final = 12


def _key(ss: SecretBytes, kem_ct: bytes, keystore_id: bytes) -> SecretBytes:
    out = SecretBytes(32)
    HKDF(hashes.SHA3_256(), 32, hashlib.sha3_256(kem_ct).digest(), _INFO + keystore_id).derive_into(
        ss.view(), out.view()
    )
    return out


def create_recovery_key(backend: PqcBackend, out_dir: Path) -> tuple[Path, Path]:
    """Write ``recovery-key.seed`` (0600, keep it offline) and ``recovery-key.pub``."""
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    seed_path, pub_path = out_dir / "recovery-key.seed", out_dir / "recovery-key.pub"
    for p in (seed_path, pub_path):
        if p.exists():
            raise CallerError(f"{p} already exists; refusing to overwrite a recovery key")
    with SecretBytes.random(MLKEM1024_SEED_LEN) as seed:
        ek = backend.mlkem1024_from_seed(seed.view()).encapsulation_key()
        fd = os.open(seed_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, seed.view())
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, PUB_MAGIC + ek.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return seed_path, pub_path


def load_recovery_public(path: Path) -> bytes:
    data = read_file(path, limit=8192)
    if not data.startswith(PUB_MAGIC):
        raise CallerError(f"{path}: not a pqhsm recovery public key")
    try:
        ek = bytes.fromhex(data[len(PUB_MAGIC) :].decode().strip())
    except ValueError:
        raise CallerError(f"{path}: malformed recovery public key") from None
    if len(ek) != MLKEM1024_EK_LEN:
        raise CallerError(f"{path}: recovery public key has the wrong length")
    return ek


def load_recovery_seed(path: Path) -> SecretBytes:
    check_private_file(path)
    data = read_file(path, limit=1024)
    if len(data) != MLKEM1024_SEED_LEN:
        raise CallerError(f"{path}: not a {MLKEM1024_SEED_LEN}-byte recovery seed")
    # read_file returns bytes; copied into wipeable memory at once.
    return SecretBytes(data)


def seal_seed(
    backend: PqcBackend, recovery_ek: bytes, kem_seed: SecretBytes, keystore_id: bytes
) -> bytes:
    ss, kem_ct = backend.mlkem1024_encapsulate(recovery_ek)
    try:
        key = _key(ss, kem_ct, keystore_id)
    finally:
        ss.wipe()
    nonce = os.urandom(_NONCE)
    try:
        out = bytearray(len(kem_seed) + 16)
        AESGCM(key.view()).encrypt_into(nonce, kem_seed.view(), SEALED_MAGIC + keystore_id, out)
    finally:
        key.wipe()
    return SEALED_MAGIC + kem_ct + nonce + bytes(out)


def open_seed(
    backend: PqcBackend, recovery_seed: SecretBytes, sealed: bytes, keystore_id: bytes
) -> SecretBytes:
    """:raises BlobInvalid: wrong recovery key, wrong keystore, or tampering."""
    head = len(SEALED_MAGIC)
    if (
        not sealed.startswith(SEALED_MAGIC)
        or len(sealed) != head + MLKEM1024_CT_LEN + _NONCE + MLKEM1024_SEED_LEN + 16
    ):
        raise BlobInvalid("not a sealed recovery seed")
    kem_ct = sealed[head : head + MLKEM1024_CT_LEN]
    nonce = sealed[head + MLKEM1024_CT_LEN : head + MLKEM1024_CT_LEN + _NONCE]
    ss = backend.mlkem1024_from_seed(recovery_seed.view()).decapsulate(kem_ct)
    try:
        key = _key(ss, kem_ct, keystore_id)
    finally:
        ss.wipe()
    out = SecretBytes(MLKEM1024_SEED_LEN)
    try:
        AESGCM(key.view()).decrypt_into(
            nonce,
            memoryview(sealed)[head + MLKEM1024_CT_LEN + _NONCE :],
            SEALED_MAGIC + keystore_id,
            out.view(),
        )
    except InvalidTag:
        out.wipe()
        raise BlobInvalid("the recovery key does not open this backup's sealed seed") from None
    finally:
        key.wipe()
    return out
