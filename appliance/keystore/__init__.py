"""Dual-compromise keystore: passphrase KDF, token-wrapped ML-KEM-1024 key, sealed blobs."""

from appliance.keystore.blob import BLOB_MAGIC, BlobHeader, open_blob, parse_blob, seal_blob
from appliance.keystore.kdf import (
    ARGON2ID,
    KDF_NAMES,
    PBKDF2_SHA3,
    KdfParams,
    calibrate,
    derive_pw_key,
)
from appliance.keystore.store import MLDSA_ALG, Keystore, KeystoreHeader

__all__ = [
    "ARGON2ID",
    "BLOB_MAGIC",
    "KDF_NAMES",
    "MLDSA_ALG",
    "PBKDF2_SHA3",
    "BlobHeader",
    "KdfParams",
    "Keystore",
    "KeystoreHeader",
    "calibrate",
    "derive_pw_key",
    "open_blob",
    "parse_blob",
    "seal_blob",
]
