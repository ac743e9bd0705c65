"""Dual-compromise blobs (DESIGN §4).

hazardous: use the service API.

On disk::

    magic    8 bytes   b"PQHSMB1\\0"
    hlen     u32 BE    length of the header
    header   hlen      canonical CBOR {v, key_id, alg, kem_ct, nonce, created, kdf}
    sealed   rest      AES-256-GCM ciphertext || 16-byte tag;  AAD = magic || hlen || header

    (ss, kem_ct) = ML-KEM-1024.Encaps(ek)
    blob_key     = HKDF-SHA3-256(ikm = ss || pw_key, salt = SHA3-256(kem_ct),
                                 info = "pqhsm/blob/v1" || key_id || alg)

``kdf`` (an addition to DESIGN §4's header) is the passphrase generation the blob was
sealed under, so an interrupted passphrase change knows which blobs still need it.
Opening needs the token (to decapsulate ``kem_ct``) *and* the passphrase (for ``pw_key``).
Every failure — wrong passphrase, wrong token, any flipped byte — is one ``BlobInvalid``.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance import codec
from appliance.errors import BlobInvalid, CallerError
from appliance.pqc import MLKEM1024_CT_LEN, MlKemDecapsulator, PqcBackend
from appliance.secret import SecretBytes

__all__ = ["BLOB_MAGIC", "PREFIX", "BlobHeader", "open_blob", "seal_blob", "valid_key_id"]

BLOB_MAGIC: Final = b"PQHSMB1\x00"
PREFIX: Final = struct.Struct(">8sI")
BLOB_VERSION: Final = 1
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
MAX_HEADER: Final = 8192
MAX_BLOB: Final = 1 << 20
INFO_PREFIX: Final = b"pqhsm/blob/v1"
_KEY_ID_RE: Final = re.compile(r"[0-9a-z][0-9a-z._-]{0,127}")


def valid_key_id(key_id: str) -> str:
    """Key ids name files and go into HKDF info: lowercase letters, digits, ``._-``."""
    if not _KEY_ID_RE.fullmatch(key_id):
        raise CallerError(f"invalid key id {key_id!r}")
    return key_id


@dataclass(frozen=True, slots=True)
class BlobHeader:
    """The authenticated, unencrypted part of a blob."""

    key_id: str
    alg: str
    kem_ct: bytes
    nonce: bytes
    created: int
    kdf: int
    v: int = BLOB_VERSION

    def to_cbor(self) -> bytes:
        return codec.dumps(
            {
                "v": self.v,
                "key_id": self.key_id,
                "alg": self.alg,
                "kem_ct": self.kem_ct,
                "nonce": self.nonce,
                "created": self.created,
                "kdf": self.kdf,
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> BlobHeader:
        try:
            m = codec.loads_map(data, "blob header")
        except CallerError:
            raise BlobInvalid("blob header is not canonical CBOR") from None
        v, key_id, alg, ct = m.get("v"), m.get("key_id"), m.get("alg"), m.get("kem_ct")
        nonce, created, kdf = m.get("nonce"), m.get("created"), m.get("kdf")
        ok = (
            v == BLOB_VERSION
            and isinstance(key_id, str)
            and isinstance(alg, str)
            and isinstance(ct, bytes)
            and len(ct) == MLKEM1024_CT_LEN
            and isinstance(nonce, bytes)
            and len(nonce) == NONCE_LEN
            and isinstance(created, int)
            and isinstance(kdf, int)
            and set(m) == {"v", "key_id", "alg", "kem_ct", "nonce", "created", "kdf"}
        )
        if not ok:
            raise BlobInvalid("blob header has the wrong version or fields")
        return cls(m["key_id"], m["alg"], m["kem_ct"], m["nonce"], m["created"], m["kdf"])


def _blob_key(
    ss: SecretBytes, pw_key: SecretBytes, kem_ct: bytes, key_id: str, alg: str
) -> SecretBytes:
    ikm = SecretBytes(len(ss) + len(pw_key))
    out = SecretBytes(32)
    try:
        ikm.view()[: len(ss)] = ss.view()
        ikm.view()[len(ss) :] = pw_key.view()
        hkdf = HKDF(
            algorithm=hashes.SHA3_256(),
            length=32,
            salt=hashlib.sha3_256(kem_ct).digest(),
            info=INFO_PREFIX + key_id.encode() + alg.encode(),
        )
        hkdf.derive_into(ikm.view(), out.view())
        return out
    finally:
        ikm.wipe()


def seal_blob(
    backend: PqcBackend,
    ek: bytes,
    pw_key: SecretBytes,
    *,
    key_id: str,
    alg: str,
    plaintext: SecretBytes,
    created: int,
    kdf_gen: int,
) -> bytes:
    """Seal ``plaintext`` for (token, passphrase).  Needs only the public ``ek``."""
    valid_key_id(key_id)
    ss, kem_ct = backend.mlkem1024_encapsulate(ek)
    nonce = os.urandom(NONCE_LEN)
    header = BlobHeader(key_id, alg, kem_ct, nonce, created, kdf_gen).to_cbor()
    prefix = PREFIX.pack(BLOB_MAGIC, len(header)) + header
    try:
        key = _blob_key(ss, pw_key, kem_ct, key_id, alg)
    finally:
        ss.wipe()
    try:
        sealed = bytearray(len(plaintext) + TAG_LEN)
        # AESGCM copies the key into OpenSSL; the object is dropped right after use.
        AESGCM(key.view()).encrypt_into(nonce, plaintext.view(), prefix, sealed)
    finally:
        key.wipe()
    return prefix + bytes(sealed)


def parse_blob(blob: bytes) -> tuple[BlobHeader, int]:
    """Check the framing and header; return the header and where the ciphertext starts."""
    if len(blob) > MAX_BLOB:
        raise BlobInvalid("blob too large")
    if len(blob) < PREFIX.size:
        raise BlobInvalid("blob truncated")
    magic, hlen = PREFIX.unpack_from(blob)
    start = PREFIX.size + hlen
    if magic != BLOB_MAGIC or hlen > MAX_HEADER or start + TAG_LEN > len(blob):
        raise BlobInvalid("not a pqhsm blob")
    return BlobHeader.from_cbor(blob[PREFIX.size : start]), start


def open_blob(
    decaps: MlKemDecapsulator, pw_key: SecretBytes, blob: bytes, *, key_id: str, alg: str
) -> SecretBytes:
    """Open a blob sealed for this token and passphrase; it must be ``key_id``'s ``alg`` blob.

    :raises BlobInvalid: anything wrong, one message for all causes.
    """
    header, start = parse_blob(blob)
    if header.key_id != key_id or header.alg != alg:
        raise BlobInvalid(f"blob does not belong to key {key_id}")
    ss = decaps.decapsulate(header.kem_ct)
    try:
        key = _blob_key(ss, pw_key, header.kem_ct, header.key_id, header.alg)
    finally:
        ss.wipe()
    out = SecretBytes(len(blob) - start - TAG_LEN)
    try:
        AESGCM(key.view()).decrypt_into(
            header.nonce, memoryview(blob)[start:], blob[:start], out.view()
        )
    except InvalidTag:
        out.wipe()
        raise BlobInvalid(
            f"blob for key {key_id} does not open (wrong passphrase, wrong token, or damaged)"
        ) from None
    finally:
        key.wipe()
    return out
