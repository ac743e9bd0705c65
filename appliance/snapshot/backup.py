"""Signed snapshot backups (``pqhsm backup``).

A backup is a ``.tar.gz`` holding::

    manifest.json            {"body": {...}, "signatures": {"ed25519": hex, "ml-dsa-87": hex}}
    wal/wal.log              the log up to the head the manifest names
    keystore.cbor            the keystore header (the KEM seed stays sealed by the token)
    blobs/<id>.blob          every blob the log names, still dual-compromise encrypted
    public/<key_id>.pem      every key's public parts (what a verifier node needs)

The manifest body (canonical JSON: sorted keys, no spaces) carries the format and
version, creation time, appliance id, WAL head ``{seq, hash}``, the SHA3-256 and size of
every artifact, and the signer's public keys (the current audit key).  Both halves of the
audit key sign ``"pqhsm/backup/v1" || body``: the Ed25519 half inside the token, the
ML-DSA-87 half from its blob.  The file is named after the body's SHA3-256.

The snapshot is taken under the appliance lock, so it matches one WAL position while other
clients keep signing (signing appends nothing).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from appliance.audit import ensure_audit_key
from appliance.errors import CallerError
from appliance.fsio import atomic_write, fsync_dir
from appliance.keys import KeyInfo

if TYPE_CHECKING:
    from appliance.service import Appliance

__all__ = ["BACKUP_CONTEXT", "FORMAT", "VERSION", "BackupInfo", "canonical_json", "create_backup"]

FORMAT: Final = "pqhsm-backup"
VERSION: Final = 1
BACKUP_CONTEXT: Final = b"pqhsm/backup/v1"


def canonical_json(value: Any) -> bytes:
    """The one JSON encoding that gets signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    wal_seq: int
    artifacts: int
    size: int


def _public_pems(app: Appliance, key: KeyInfo) -> bytes:
    try:
        return app.public_key_pem_of(key)
    except Exception:  # noqa: BLE001 - a key with no live public part simply has none to export
        return b""


def create_backup(
    app: Appliance, out: Path | None = None, *, recovery_ek: bytes | None = None
) -> BackupInfo:
    """Write a signed backup; ``out`` is a directory (content-addressed name) or a file path.

    ``recovery_ek`` (an offline recovery-officer ML-KEM-1024 public key) adds the keystore's
    KEM seed sealed to it, so post-quantum keys can be restored onto a new token.
    """
    if not app.keystore.unlocked:
        raise CallerError("a backup is signed with the audit key's ML-DSA half: unlock first")
    with app._lock:  # one WAL position: nothing appends while we copy
        key = ensure_audit_key(app)
        seq, head = app.wal.head
        wal_end = app.wal.get(seq).offset + 8 + len(app.wal.get(seq).body) if seq >= 0 else 0
        with open(app.wal.path, "rb") as f:
            wal_bytes = f.read(wal_end)
        files: dict[str, bytes] = {
            "wal/wal.log": wal_bytes,
            "keystore.cbor": app.keystore.path.read_bytes(),
        }
        for blob_id in app.keystore.blob_ids():
            files[f"blobs/{blob_id}.blob"] = app.keystore.read_blob(blob_id)
        for k in app.keys():
            pem = _public_pems(app, k)
            if pem:
                files[f"public/{k.key_id}.pem"] = pem
        if recovery_ek is not None:
            from appliance.snapshot.recovery_key import seal_seed

            with app.keystore.unwrap_seed() as seed:
                files["recovery/kem-seed.sealed"] = seal_seed(
                    app.pqc, recovery_ek, seed, app.keystore.header().keystore_id
                )
    created_ms = time.time_ns() // 1_000_000
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created_ms": created_ms,
        "appliance_id": app.appliance_id,
        "wal_head": {"seq": seq, "hash": head.hex()},
        "artifacts": {
            name: {"sha3_256": hashlib.sha3_256(data).hexdigest(), "size": len(data)}
            for name, data in sorted(files.items())
        },
        "signer": {
            "audit_key": key.n,
            "ed25519_spki": key.ed25519_spki.hex(),
            "ml-dsa-87": key.mldsa_public.hex(),
            "fingerprint": key.fingerprint(),
        },
    }
    message = BACKUP_CONTEXT + canonical_json(body)
    from appliance.audit import _sign

    sig_ed, sig_ml = _sign(app, key, message)
    manifest = canonical_json(
        {"body": body, "signatures": {"ed25519": sig_ed.hex(), "ml-dsa-87": sig_ml.hex()}}
    )
    digest = hashlib.sha3_256(canonical_json(body)).hexdigest()
    if out is None:
        out = app.cfg.home.parent
    path = out / f"pqhsm-backup-{digest[:24]}.tar.gz" if out.is_dir() else out
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("manifest.json", manifest), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            info.mtime = created_ms // 1000
            tar.addfile(info, io.BytesIO(data))
    atomic_write(path, raw.getvalue(), point="backup")
    fsync_dir(path.parent)
    return BackupInfo(path=path, wal_seq=seq, artifacts=len(files), size=os.path.getsize(path))
