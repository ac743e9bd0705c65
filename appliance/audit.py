"""Signed WAL checkpoints, audit-key rotation and the token's anti-rollback counter (DESIGN §5).

The appliance audit key is a pair: Ed25519 inside the token and ML-DSA-87 in a blob.  Both
halves sign every checkpoint and every rotation, so the audit trail stays verifiable after
either family falls.

Records:

``audit.key``      ``{n, cka_id, ed25519_spki, mldsa_public, blob_sha3}`` — the first
                   audit key; the anchor of the chain of authorised keys (pin it with
                   ``pqhsm audit verify --anchor``).
``audit.rotate``   ``{n, cka_id, ed25519_spki, mldsa_public, blob_sha3, sig_ed25519,
                   sig_mldsa}`` — key n, signed by key n-1 over
                   ``"pqhsm/audit-rotate/v1" || CBOR{n, ed25519_spki, mldsa_public}``.
``checkpoint``     ``{head_seq, head_hash, key, sig_ed25519, sig_mldsa}`` — the current
                   audit key signs ``"pqhsm/checkpoint/v1" || u64 head_seq || head_hash``
                   where head is the record just before the checkpoint.

After a checkpoint is durable, the token's private ``CKO_DATA`` object ``pqhsm:wal-head``
is set to CBOR ``{seq, hash}`` of the checkpoint record.  At start a log whose head is
behind that counter, or whose record at that seq has another hash, is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance import codec
from appliance.algorithms import parse_alg
from appliance.errors import CallerError, DeviceError, SignatureInvalid, StateError
from appliance.pqc import active_backend
from appliance.secret import ct_equal
from appliance.token import TokenBackend
from appliance.wal import Wal, WalRecord, verify_chain

if TYPE_CHECKING:
    from appliance.service import Appliance

__all__ = [
    "COUNTER_LABEL",
    "AuditKey",
    "AuditReport",
    "audit_keys",
    "check_anti_rollback",
    "checkpoint",
    "current_audit_key",
    "ensure_audit_key",
    "rotate_audit_key",
    "verify_audit",
]

COUNTER_LABEL: Final = "pqhsm:wal-head"
CHECKPOINT_CTX: Final = b"pqhsm/checkpoint/v1"
ROTATE_CTX: Final = b"pqhsm/audit-rotate/v1"
_U64: Final = struct.Struct(">Q")


def _audit_id(n: int) -> str:
    return f"audit-{n}"


def _checkpoint_message(seq: int, head_hash: bytes) -> bytes:
    return CHECKPOINT_CTX + _U64.pack(seq) + head_hash


def _rotate_message(n: int, ed_spki: bytes, mldsa_public: bytes) -> bytes:
    return ROTATE_CTX + codec.dumps({"n": n, "ed25519_spki": ed_spki, "mldsa_public": mldsa_public})


@dataclass(frozen=True)
class AuditKey:
    n: int
    cka_id: bytes
    ed25519_spki: bytes
    mldsa_public: bytes
    blob_sha3: bytes

    @classmethod
    def from_fields(cls, f: Any) -> AuditKey:
        try:
            return cls(
                int(f["n"]),
                bytes(f["cka_id"]),
                bytes(f["ed25519_spki"]),
                bytes(f["mldsa_public"]),
                bytes(f["blob_sha3"]),
            )
        except (KeyError, TypeError, ValueError):
            raise DeviceError("malformed audit key record") from None

    def fields(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "cka_id": self.cka_id,
            "ed25519_spki": self.ed25519_spki,
            "mldsa_public": self.mldsa_public,
            "blob_sha3": self.blob_sha3,
        }

    def verify(self, message: bytes, sig_ed25519: bytes, sig_mldsa: bytes) -> None:
        """Both halves must verify (strict)."""
        pub = serialization.load_der_public_key(self.ed25519_spki)
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise SignatureInvalid("audit key is not Ed25519")
        try:
            pub.verify(sig_ed25519, message)
        except Exception:  # noqa: BLE001 - InvalidSignature and malformed input alike
            raise SignatureInvalid("audit signature invalid (Ed25519 part)") from None
        try:
            active_backend().mldsa87_verify(self.mldsa_public, message, sig_mldsa)
        except (SignatureInvalid, CallerError):
            raise SignatureInvalid("audit signature invalid (ML-DSA-87 part)") from None

    def fingerprint(self) -> str:
        h = hashes.Hash(hashes.SHA3_256())
        h.update(self.ed25519_spki)
        h.update(self.mldsa_public)
        return h.finalize().hex()


def audit_keys(records: Any) -> list[AuditKey]:
    """Every audit key the log declares, oldest first, with blob digests kept current
    through passphrase changes (which reseal the audit blobs too)."""
    keys: list[AuditKey] = []
    for rec in records:
        if rec.type in ("audit.key", "audit.rotate"):
            keys.append(AuditKey.from_fields(rec.fields))
        elif rec.type == "keystore.passphrase":
            blobs = rec.fields.get("blobs", {})
            keys = [replace(k, blob_sha3=blobs.get(_audit_id(k.n), k.blob_sha3)) for k in keys]
    return keys


def current_audit_key(app: Appliance) -> AuditKey | None:
    keys = audit_keys(app.wal.records())
    return keys[-1] if keys else None


def _make_audit_key(app: Appliance, n: int) -> AuditKey:
    cka_id = _audit_id(n).encode()
    app.keystore._require()
    if app.token.has_private_key(cka_id):  # left by a crash before its record: start over
        app.token.destroy_private_key(cka_id)
    spki = app.token.generate_keypair(parse_alg("ed25519"), cka_id, f"pqhsm:audit:{n}")
    if app.keystore.blob_path(_audit_id(n)).exists():
        app.keystore.remove_blob(_audit_id(n))
    public, digest = app.keystore.new_mldsa(_audit_id(n))
    return AuditKey(n, cka_id, spki, public, digest)


def _sign(app: Appliance, key: AuditKey, message: bytes) -> tuple[bytes, bytes]:
    sig_ed = app.token.sign(parse_alg("ed25519"), key.cka_id, message)
    signer = app.keystore.open_mldsa(
        _audit_id(key.n), expect_public=key.mldsa_public, expect_digest=key.blob_sha3
    )
    return sig_ed, signer.sign(message)


def ensure_audit_key(app: Appliance) -> AuditKey:
    """The current audit key, creating the first one (``audit.key``) if there is none."""
    key = current_audit_key(app)
    if key is not None:
        return key
    key = _make_audit_key(app, 1)
    app.append_record("audit.key", key.fields())
    app.wal.commit()
    return key


def rotate_audit_key(app: Appliance) -> AuditKey:
    """Make audit key n+1 and record it, signed by key n (which is then retired)."""
    old = ensure_audit_key(app)
    new = _make_audit_key(app, old.n + 1)
    sig_ed, sig_ml = _sign(app, old, _rotate_message(new.n, new.ed25519_spki, new.mldsa_public))
    app.append_record("audit.rotate", {**new.fields(), "sig_ed25519": sig_ed, "sig_mldsa": sig_ml})
    app.wal.commit()
    return new


def rotate_after_token_loss(app: Appliance) -> AuditKey:
    """After a restore onto a new token the old audit key's Ed25519 half is gone with the old
    token; its ML-DSA-87 half (recovered with the keystore) alone signs the next key, and the
    record says so (``recovered: true``).  Verification accepts that one-part signature only
    on records marked this way."""
    old = current_audit_key(app)
    if old is None:
        return ensure_audit_key(app)
    new = _make_audit_key(app, old.n + 1)
    signer = app.keystore.open_mldsa(
        _audit_id(old.n), expect_public=old.mldsa_public, expect_digest=old.blob_sha3
    )
    sig_ml = signer.sign(_rotate_message(new.n, new.ed25519_spki, new.mldsa_public))
    app.append_record(
        "audit.rotate", {**new.fields(), "sig_ed25519": b"", "sig_mldsa": sig_ml, "recovered": True}
    )
    app.wal.commit()
    return new


def checkpoint(app: Appliance) -> WalRecord:
    """Sign the head with the audit key, append the checkpoint, then raise the token counter."""
    if not app.keystore.unlocked:
        raise StateError("a checkpoint is signed with the audit key's ML-DSA half: unlock first")
    key = ensure_audit_key(app)
    seq, head = app.wal.head
    sig_ed, sig_ml = _sign(app, key, _checkpoint_message(seq, head))
    app.append_record(
        "checkpoint",
        {
            "head_seq": seq,
            "head_hash": head,
            "key": key.n,
            "sig_ed25519": sig_ed,
            "sig_mldsa": sig_ml,
        },
    )
    app.wal.commit()
    cp_seq, cp_hash = app.wal.head
    app.token.write_data(COUNTER_LABEL, codec.dumps({"seq": cp_seq, "hash": cp_hash}))
    return app.wal.get(cp_seq)


def read_counter(app: Appliance) -> tuple[int, bytes] | None:
    """The highest (seq, hash) among the token's counter objects (a crash may leave two)."""
    return read_token_counter(app.token)


def read_token_counter(token: TokenBackend) -> tuple[int, bytes] | None:
    best: tuple[int, bytes] | None = None
    for raw in token.read_data(COUNTER_LABEL):
        try:
            m = codec.loads_map(raw, "anti-rollback counter")
            seq, h = int(m["seq"]), bytes(m["hash"])
        except (CallerError, KeyError, TypeError, ValueError):
            raise DeviceError("the token's anti-rollback counter is malformed") from None
        if best is None or seq > best[0]:
            best = (seq, h)
    return best


def check_anti_rollback(app: Appliance) -> None:
    """Refuse a WAL that is behind, or forked from, the token's anti-rollback counter."""
    counter = read_counter(app)
    if counter is None:
        return
    seq, h = counter
    head_seq, _ = app.wal.head
    if head_seq < seq:
        raise DeviceError(
            f"the WAL ends at seq {head_seq} but the token's anti-rollback counter "
            f"says seq {seq} was checkpointed: refusing a rolled-back log"
        )
    if not ct_equal(app.wal.get(seq).hash, h):
        raise DeviceError(
            f"the WAL's record {seq} differs from the one the token counter "
            "names: refusing a forked log"
        )


@dataclass
class AuditReport:
    records: int = 0
    head_seq: int = -1
    head_hash: str = ""
    audit_keys: list[str] = field(default_factory=list)
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    unsigned_tail: int = 0
    recovered_rotations: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "audit_keys": self.audit_keys,
            "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "unsigned_tail": self.unsigned_tail,
            "recovered_rotations": self.recovered_rotations,
        }


def verify_audit(wal_dir: Path, *, anchor: str | None = None) -> AuditReport:
    """Verify the hash chain, every rotation and every checkpoint from public keys alone.

    :param anchor: the expected fingerprint of the first audit key (SHA3-256 hex), if pinned.
    :raises WalCorrupted: the chain is broken.
    :raises SignatureInvalid: a checkpoint or rotation does not verify.
    """
    head_seq, head_hash = verify_chain(wal_dir)
    report = AuditReport(head_seq=head_seq, head_hash=head_hash.hex())
    wal = Wal.open(wal_dir, readonly=True)
    try:
        key: AuditKey | None = None
        for rec in wal.records():
            report.records += 1
            f = rec.fields
            if rec.type == "audit.key":
                if key is not None:
                    raise SignatureInvalid(f"seq {rec.seq}: a second unsigned audit key")
                key = AuditKey.from_fields(f)
                if anchor is not None and key.fingerprint() != anchor.lower():
                    raise SignatureInvalid("the first audit key is not the pinned anchor")
                report.audit_keys.append(key.fingerprint())
            elif rec.type == "audit.rotate":
                if key is None:
                    raise SignatureInvalid(f"seq {rec.seq}: rotation without an audit key")
                new = AuditKey.from_fields(f)
                if new.n != key.n + 1:
                    raise SignatureInvalid(
                        f"seq {rec.seq}: audit key {new.n} does not follow {key.n}"
                    )
                message = _rotate_message(new.n, new.ed25519_spki, new.mldsa_public)
                if f.get("recovered") is True:
                    # the old Ed25519 half was lost with its token (restore onto a new one):
                    # the ML-DSA-87 half alone vouches for the next key, and says so
                    try:
                        active_backend().mldsa87_verify(
                            key.mldsa_public, message, bytes(f.get("sig_mldsa", b""))
                        )
                    except (SignatureInvalid, CallerError):
                        raise SignatureInvalid(
                            f"seq {rec.seq}: recovered rotation does not verify"
                        ) from None
                    report.recovered_rotations += 1
                else:
                    key.verify(
                        message, bytes(f.get("sig_ed25519", b"")), bytes(f.get("sig_mldsa", b""))
                    )
                key = new
                report.audit_keys.append(key.fingerprint())
            elif rec.type == "checkpoint":
                if key is None or f.get("key") != key.n:
                    raise SignatureInvalid(f"seq {rec.seq}: checkpoint by an unauthorised key")
                cp_seq, cp_hash = int(f["head_seq"]), bytes(f["head_hash"])
                if cp_seq != rec.seq - 1 or not ct_equal(wal.get(cp_seq).hash, cp_hash):
                    raise SignatureInvalid(
                        f"seq {rec.seq}: checkpoint names a head that is not its predecessor"
                    )
                key.verify(
                    _checkpoint_message(cp_seq, cp_hash),
                    bytes(f["sig_ed25519"]),
                    bytes(f["sig_mldsa"]),
                )
                report.checkpoints += 1
                report.last_checkpoint_seq = rec.seq
        last = report.last_checkpoint_seq
        report.unsigned_tail = report.records - (last + 1 if last is not None else 0)
    finally:
        wal.close()
    return report
