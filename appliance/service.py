"""The running appliance: one token session, one keystore, one WAL writer.

Every state change is a WAL record fsync'd before the call returns; key state is replayed
from the WAL at open.  Operations name keys by label, key id or ``pkcs11:`` URI.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import ChainMap, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from appliance.algorithms import ClassicalAlg, parse_alg
from appliance.audit import (
    check_anti_rollback,
    checkpoint,
    ensure_audit_key,
    rotate_after_token_loss,
    rotate_audit_key,
)
from appliance.config import Config, write_config
from appliance.errors import (
    CallerError,
    KeyExists,
    NoSuchKey,
    NotInitialized,
    PolicyDenied,
    StateError,
)
from appliance.fsio import ensure_private_dir, remove_stale_temps
from appliance.keys import KeyInfo, KeyKind, KeyState, apply_record, parse_selector, replay
from appliance.keystore import KdfParams, Keystore
from appliance.migration.engine import BulkResult, MigrationEngine, Progress
from appliance.migration.recovery import RecoveryReport, recover
from appliance.pqc import MlDsaSigner, PqcBackend, active_backend, backend_info
from appliance.secret import BytesLike, SecretBytes
from appliance.signing import composite
from appliance.signing.dual import sign_dual
from appliance.snapshot.backup import BackupInfo, create_backup
from appliance.token import TokenBackend
from appliance.token.pkcs11 import Pkcs11Token
from appliance.wal import Wal, WalRecord

__all__ = ["Appliance", "Status"]

log = logging.getLogger(__name__)

MAX_LABEL: Final = 128
MAX_MESSAGE: Final = 64 << 20


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_label(label: str) -> str:
    if not label or len(label.encode()) > MAX_LABEL or any(ord(c) < 0x20 for c in label):
        raise CallerError(f"label must be 1 to {MAX_LABEL} printable bytes")
    return label


@dataclass(frozen=True, slots=True)
class Status:
    home: str
    appliance_id: str
    token: dict[str, str]
    keystore: dict[str, Any]
    pqc_backend: dict[str, Any]
    wal: dict[str, Any]
    keys_by_state: dict[str, int]
    keys_total: int
    needs_migration: list[str]
    damaged: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "appliance_id": self.appliance_id,
            "token": self.token,
            "keystore": self.keystore,
            "pqc_backend": self.pqc_backend,
            "wal": self.wal,
            "keys_by_state": self.keys_by_state,
            "keys_total": self.keys_total,
            "needs_migration": self.needs_migration,
            "damaged": self.damaged,
        }


class Writer(Protocol):
    """What a follower (:meth:`Appliance.open_follower`) asks of the process that owns
    the WAL: the calls that write it, and the signatures that need the sealed keys."""

    def create_key(self, key_type: str, label: str) -> str:
        """Create a key; its id once the owner committed it."""
        ...

    def sign(
        self,
        key_id: str,
        message: bytes,
        *,
        kind: str | None,
        raw: bool,
        context: bytes,
        prehashed: bool,
    ) -> bytes:
        """Sign as :meth:`Appliance.sign` does, in the owner."""
        ...


class Appliance:
    """An opened appliance.  Use :meth:`initialize` once, then :meth:`open`."""

    def __init__(
        self, cfg: Config, token: TokenBackend, keystore: Keystore, wal: Wal, pqc: PqcBackend
    ) -> None:
        self.cfg = cfg
        self.token = token
        self.keystore = keystore
        self.wal = wal
        self.pqc = pqc
        self._lock = threading.RLock()
        self._keys = replay(wal.records())
        self.damaged: dict[str, str] = {}
        self.engine = MigrationEngine(self)
        self.last_recovery: RecoveryReport | None = None
        self.signer_cache_size = 1024
        self._signers: OrderedDict[str, tuple[bytes | None, MlDsaSigner]] = OrderedDict()
        init = next(iter(wal.records()), None)
        self.appliance_id = init.fields.get("appliance_id", b"").hex() if init is not None else ""
        #: Set on a follower (:meth:`open_follower`): the owner's committed WAL length, and
        #: the owner itself for what a follower may not do alone.
        self._committed_end: Callable[[], int] | None = None
        self._writer: Writer | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def initialize(
        cls, cfg: Config, *, pin: SecretBytes, passphrase: SecretBytes, kdf: KdfParams
    ) -> Appliance:
        """Create the keystore and the WAL's genesis record on an already initialized token."""
        home = cfg.home
        if (home / "keystore.cbor").exists() or (home / "wal" / "wal.log").exists():
            raise KeyExists(f"{home} already holds an appliance")
        ensure_private_dir(home)
        cfg.apply_environment()
        token = Pkcs11Token.open(cfg.token, pin)
        try:
            pqc = active_backend()
            keystore = Keystore(home, token, pqc)
            header = keystore.create(passphrase, kdf)
            write_config(cfg)
            wal = Wal.open(home / "wal")
            info = token.info()
            wal.append_commit(
                "appliance.init",
                {
                    "appliance_id": os.urandom(16),
                    "keystore_id": header.keystore_id,
                    "token_label": info.label,
                    "token_serial": info.serial,
                    "kdf": kdf.alg,
                    "version": 1,
                },
            )
            app = cls(cfg, token, keystore, wal, pqc)
            ensure_audit_key(app)
        except BaseException:
            token.close()
            raise
        return app

    @classmethod
    def open(
        cls,
        cfg: Config,
        *,
        pin: SecretBytes,
        passphrase: SecretBytes | None,
        _after_rollback_restore: bool = False,
    ) -> Appliance:
        """Log in to the token, open the WAL, recover, and unlock when a passphrase is given."""
        if not (cfg.home / "keystore.cbor").exists():
            raise NotInitialized(f"{cfg.home}: no appliance here (run `pqhsm init`)")
        cfg.apply_environment()
        token = Pkcs11Token.open(cfg.token, pin)
        wal: Wal | None = None
        try:
            from appliance.snapshot.restore import finish_restore

            if finish_restore(cfg.home):  # a restore committed just before a crash
                log.warning("completed an interrupted restore")
            wal = Wal.open(cfg.home / "wal")
            pqc = active_backend()
            app = cls(cfg, token, Keystore(cfg.home, token, pqc), wal, pqc)
            if not _after_rollback_restore:  # restore_backup re-checkpoints right after
                check_anti_rollback(app)
            app._recover_passphrase_change()
            app.recover()
            if passphrase is not None:
                app.keystore.unlock(passphrase)
        except BaseException:
            if wal is not None:
                wal.close()
            token.close()
            raise
        return app

    @classmethod
    def open_follower(
        cls,
        cfg: Config,
        *,
        pin: SecretBytes,
        committed_end: Callable[[], int],
        writer: Writer,
    ) -> Appliance:
        """A second view of an appliance another process has open (the *owner*), for a
        PKCS#11 server process beside it (``serve --processes``).

        It logs in to the token with its own session and reads the WAL without the lock,
        never past ``committed_end()`` (what the owner's last commit made durable), and
        reads again whenever that moved before it looks a key up, so a request that starts
        after a commit sees it.  It signs classically with the token; what needs the
        sealed keys (ML-DSA-87, dual, composite) and key creation go to ``writer``: the
        keystore stays locked here and no passphrase enters this process.  Everything else
        that writes refuses (the WAL is read-only).
        """
        if not (cfg.home / "keystore.cbor").exists():
            raise NotInitialized(f"{cfg.home}: no appliance here (run `pqhsm init`)")
        cfg.apply_environment()
        token = Pkcs11Token.open(cfg.token, pin)
        try:
            wal = Wal.open(cfg.home / "wal", readonly=True, limit=committed_end())
            pqc = active_backend()
            app = cls(cfg, token, Keystore(cfg.home, token, pqc), wal, pqc)
        except BaseException:
            token.close()
            raise
        app._committed_end = committed_end
        app._writer = writer
        return app

    @property
    def follower(self) -> bool:
        """Opened with :meth:`open_follower`."""
        return self._writer is not None

    def _follow(self) -> None:
        """A follower: apply what the owner committed since the last read.

        Only the new records are read and applied (:meth:`Wal.follow`), so keeping up
        costs what the owner added, not a replay of the whole log: during a bulk migration
        the owner commits thousands of times while followers sign.
        """
        committed = self._committed_end
        if committed is None:
            return
        end = committed()
        with self._lock:
            if end == self.wal.committed_end:
                return
            # The owner publishes only growing commits (Wal.follow refuses anything less).
            for rec in self.wal.records(self.wal.follow(end)):
                apply_record(self._keys, rec.type, rec.fields, rec.seq)

    def lock(self) -> None:
        """Zeroize the passphrase key and drop every cached ML-DSA signer, at once."""
        with self._lock:
            self._signers.clear()
            self.keystore.lock()

    def close(self) -> None:
        """Zeroize, close the token session and release the WAL."""
        with self._lock:
            self._signers.clear()
            self.keystore.lock()
            self.token.close()
            self.wal.close()

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recover_passphrase_change(self) -> None:
        """Roll an interrupted passphrase change forward (WAL has it) or back (it does not)."""
        for d in (self.cfg.home, self.keystore.blob_dir):
            for name in remove_stale_temps(d):
                log.warning("removed %s left by an interrupted write", name)
        pending = self.keystore.pending_generation()
        committed = (
            any(
                r.type == "keystore.passphrase" and r.fields.get("gen") == pending
                for r in self.wal.records()
            )
            if pending is not None
            else False
        )
        if pending is not None and committed:
            log.warning(
                "finishing a passphrase change interrupted after its WAL record (gen %s)", pending
            )
            self.keystore.commit_change()
        elif list(self.keystore.blob_dir.glob("*.blob.new")) or pending is not None:
            log.warning("discarding a passphrase change interrupted before its WAL record")
            self.keystore.rollback_change()

    # -- WAL -----------------------------------------------------------------------------------

    def append_record(self, rtype: str, fields: dict[str, Any]) -> None:
        """Check a record against the key state, append it (not yet durable), fold it in.

        The check runs on a copy-on-write overlay first, so a record that replay would
        refuse never reaches the log.
        """
        with self._lock:
            trial: ChainMap[str, KeyInfo] = ChainMap({}, self._keys)
            apply_record(trial, rtype, {**fields, "ts": 0}, len(self.wal))
            rec = self.wal.append(rtype, fields)
            apply_record(self._keys, rec.type, rec.fields, rec.seq)

    def _commit(self, rtype: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.append_record(rtype, fields)
            self.wal.commit()

    def recover(self) -> RecoveryReport:
        """Finish interrupted finalizations, check every key, drop orphan blobs (idempotent)."""
        with self._lock:
            report = recover(self)
            self.damaged = dict(report.damaged)
            self.last_recovery = report
            return report

    # -- audit -----------------------------------------------------------------------------------

    def checkpoint(self) -> WalRecord:
        """Sign the WAL head with the audit key and raise the token's anti-rollback counter."""
        with self._lock:
            return checkpoint(self)

    def rotate_audit_key(self) -> int:
        """Make the next audit key, signed by the current one; returns its number."""
        with self._lock:
            return rotate_audit_key(self).n

    # -- snapshots -------------------------------------------------------------------------------

    def backup(self, out: Path | None = None, *, recovery_ek: bytes | None = None) -> BackupInfo:
        """A signed snapshot of the log, keystore header, blobs and public keys."""
        return create_backup(self, out, recovery_ek=recovery_ek)

    # -- migration -------------------------------------------------------------------------------

    def migrate(
        self,
        key: KeyInfo,
        to: KeyState,
        *,
        allow_backward: bool = False,
        reason: str | None = None,
        actor: str = "operator",
    ) -> KeyInfo:
        """Move one key to ``to``; each edge is durable before the next starts."""
        if key.key_id in self.damaged:
            raise StateError(
                f"key {key.label!r} is DAMAGED ({self.damaged[key.key_id]}); "
                "run `pqhsm recover` after repairing it"
            )
        if key.state is KeyState.CLASSICAL:
            self.keystore._require()  # a new blob is sealed under the passphrase
        return self.engine.migrate(
            key, to, allow_backward=allow_backward, reason=reason, actor=actor
        )

    def migrate_all(
        self,
        to: KeyState,
        *,
        reason: str | None = None,
        actor: str = "operator",
        batch: int = 256,
        progress: Progress | None = None,
    ) -> BulkResult:
        """Move every key that is behind ``to`` forward, many records per fsync."""
        if any(k.state is KeyState.CLASSICAL and k.kind is KeyKind.CLASSICAL for k in self.keys()):
            self.keystore._require()
        return self.engine.migrate_all(
            to, reason=reason, actor=actor, batch=batch, progress=progress
        )

    # -- keys ----------------------------------------------------------------------------------

    def keys(self) -> list[KeyInfo]:
        self._follow()
        with self._lock:
            return sorted(self._keys.values(), key=lambda k: (k.created, k.key_id))

    def key(self, key_id: str) -> KeyInfo:
        self._follow()
        with self._lock:
            try:
                return self._keys[key_id]
            except KeyError:
                raise NoSuchKey(f"no key with id {key_id}") from None

    def find(self, selector: str) -> KeyInfo:
        self._follow()
        with self._lock:
            return parse_selector(selector).match(self._keys, self.token.info().label)

    def _check_new_label(self, label: str) -> None:
        _check_label(label)
        if any(k.label == label for k in self._keys.values()):
            raise KeyExists(f"a key labelled {label!r} already exists")

    def create_key(self, key_type: str, label: str) -> KeyInfo:
        """Create a key: a classical type in the token, or ``ml-dsa-87`` in a sealed blob."""
        if self._writer is not None:  # a follower: the owner creates and commits it
            key_id = self._writer.create_key(key_type, label)
            return self.key(key_id)
        with self._lock:
            self._check_new_label(label)
            cka_id = os.urandom(16)
            key_id = cka_id.hex()
            if key_type == "ml-dsa-87":
                public, digest = self.keystore.new_mldsa(key_id)
                self._commit(
                    "key.create",
                    {
                        "key_id": key_id,
                        "label": label,
                        "kind": KeyKind.MLDSA.value,
                        "state": KeyState.PQC_ONLY.value,
                        "pqc_public": public,
                        "blob_sha3": digest,
                        "origin": "generated",
                    },
                )
                return self._keys[key_id]
            if key_type in COMPOSITE_TYPES:
                return self._create_composite(key_type, label, cka_id)
            alg = parse_alg(key_type)
            spki = self.token.generate_keypair(alg, cka_id, label)
            self._commit(
                "key.create",
                {
                    "key_id": key_id,
                    "label": label,
                    "kind": KeyKind.CLASSICAL.value,
                    "state": KeyState.CLASSICAL.value,
                    "classical_alg": alg.name,
                    "cka_id": cka_id,
                    "classical_spki": spki,
                    "origin": "generated",
                },
            )
            return self._keys[key_id]

    def _create_composite(self, key_type: str, label: str, cka_id: bytes) -> KeyInfo:
        """A composite key: a fresh classical keypair in the token and a fresh ML-DSA-87 blob.

        Security: the draft forbids reusing either component elsewhere, so neither part is
        ever taken from an existing key, and the parts never sign alone.
        """
        params = composite.parse_composite_alg(key_type)
        self.keystore._require()
        key_id = cka_id.hex()
        alg = parse_alg(params.classical)
        spki = self.token.generate_keypair(alg, cka_id, label)
        public, digest = self.keystore.new_mldsa(key_id)
        self._commit(
            "key.create",
            {
                "key_id": key_id,
                "label": label,
                "kind": KeyKind.COMPOSITE.value,
                "state": KeyState.HYBRID.value,
                "composite_alg": params.alg.value,
                "classical_alg": alg.name,
                "cka_id": cka_id,
                "classical_spki": spki,
                "pqc_public": public,
                "blob_sha3": digest,
                "origin": "generated",
            },
        )
        return self._keys[key_id]

    def adopt_key(
        self, *, label: str | None = None, cka_id: bytes | None = None, new_label: str | None = None
    ) -> KeyInfo:
        """Take an existing token keypair under management (it stays where it is).

        Security: refuses a private key that is not sensitive or is extractable: I2 says no
        classical private key may ever exist outside the token.
        """
        with self._lock:
            found = self.token.find_keypair(label=label, cka_id=cka_id)
            if not found.sensitive or found.extractable:
                raise PolicyDenied(
                    f"token key {found.label!r} is "
                    f"{'extractable' if found.extractable else 'not sensitive'}; only keys that "
                    "can never leave the token are adopted"
                )
            if not found.cka_id:
                raise CallerError(f"token key {found.label!r} has an empty CKA_ID; set one first")
            key_id = found.cka_id.hex()
            if key_id in self._keys:
                raise KeyExists(f"token key {found.label!r} is already managed as {key_id}")
            managed_label = new_label or found.label or key_id
            self._check_new_label(managed_label)
            self._commit(
                "key.create",
                {
                    "key_id": key_id,
                    "label": managed_label,
                    "kind": KeyKind.CLASSICAL.value,
                    "state": KeyState.CLASSICAL.value,
                    "classical_alg": found.alg.name,
                    "cka_id": found.cka_id,
                    "classical_spki": found.spki,
                    "origin": "adopted",
                },
            )
            return self._keys[key_id]

    @staticmethod
    def public_key_pem_of(key: KeyInfo, *, part: str | None = None) -> bytes:
        """SPKI PEM of a key's parts.

        ``part`` is ``classical``, ``ml-dsa`` or ``all``; by default every part the key
        signs with in its state, classical first (so a tool that reads one PEM block, like
        ``openssl``, gets the part a legacy verifier checks).
        """
        if key.kind is KeyKind.COMPOSITE:
            if part not in (None, "all", "composite"):
                raise CallerError(
                    f"key {key.label!r} is composite: it exports one composite public key"
                )
            params = composite.parse_composite_alg(key.composite_alg or "")
            return composite.public_key_pem(params, composite_public_key(key))
        live = _live_parts(key)
        parts = live if part in (None, "all") else [part]
        if not parts:
            raise StateError(f"key {key.label!r} has no public key in state {key.state.value}")
        out = b""
        for name in parts:
            if name == "classical":
                if key.classical_spki is None:
                    raise StateError(f"key {key.label!r} has no classical public key")
                der = key.classical_spki
            elif name == "ml-dsa":
                if key.pqc_public is None:
                    raise StateError(f"key {key.label!r} has no ML-DSA-87 public key")
                der = mldsa.MLDSA87PublicKey.from_public_bytes(key.pqc_public).public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            else:
                raise CallerError(f"unknown public key part {name!r} (classical, ml-dsa or all)")
            out += serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return out

    # -- signing ---------------------------------------------------------------------------------

    def sign(
        self,
        key: KeyInfo,
        message: BytesLike,
        *,
        kind: str | None = None,
        raw: bool = False,
        context: bytes = b"",
        deterministic: bool = False,
        prehashed: bool = False,
    ) -> bytes:
        """Sign with what the key's state allows (DESIGN §7).

        ``prehashed`` (classical ECDSA only) signs a digest the caller computed, as
        ``CKM_ECDSA`` does for PKCS#11 clients.

        ``kind`` is ``classical``, ``ml-dsa`` or ``dual``.  By default CLASSICAL keys sign
        classically, HYBRID and PQC_PREFERRED keys sign dual (OR-mode), FINALIZING and
        PQC_ONLY keys (and keys born ML-DSA-87) sign with ML-DSA-87 only.
        """
        if deterministic:
            raise CallerError(
                "deterministic ML-DSA signing is not available: the "
                f"{self.pqc.name} backend signs hedged (randomized) only"
            )
        if len(message) > MAX_MESSAGE:
            raise CallerError(f"message larger than {MAX_MESSAGE} bytes")
        msg = bytes(message)
        current = self.key(key.key_id)
        if current.key_id in self.damaged:
            raise StateError(f"key {current.label!r} is DAMAGED: {self.damaged[current.key_id]}")
        live = _live_parts(current)
        if self._writer is not None and (
            current.kind is KeyKind.COMPOSITE or (kind or _default_kind(live)) != "classical"
        ):  # a follower holds no sealed key: the owner signs what needs one
            return self._writer.sign(
                current.key_id, msg, kind=kind, raw=raw, context=context, prehashed=prehashed
            )
        if current.kind is KeyKind.COMPOSITE:
            if kind not in (None, "composite"):
                raise StateError(
                    f"key {current.label!r} is a composite key: its parts never "
                    "sign alone (draft-ietf-lamps-pq-composite-sigs)"
                )
            return self._sign_composite(current, msg, context)
        if kind is None:
            kind = _default_kind(live)
        if kind == "classical":
            if "classical" not in live:
                raise StateError(
                    f"key {current.label!r} is {current.state.value}: its classical "
                    "private key is gone; sign with ML-DSA-87"
                )
            if context:
                raise CallerError("classical signatures take no context")
            if prehashed and (current.classical_alg or "").startswith("ed"):
                raise CallerError("EdDSA signs the message itself, not a digest")
            return self._classical_sign(current, raw=raw, prehashed=prehashed)(msg)
        if kind == "ml-dsa":
            if "ml-dsa" not in live:
                raise StateError(
                    f"key {current.label!r} is {current.state.value}: it has no "
                    "ML-DSA-87 key yet (migrate it to HYBRID)"
                )
            if raw:
                raise CallerError("--raw applies to ECDSA signatures only")
            return self._mldsa_signer(current).sign(msg, context)
        if kind == "dual":
            if live != ["classical", "ml-dsa"]:
                raise StateError(
                    f"key {current.label!r} is {current.state.value}: dual signatures "
                    "need both parts (HYBRID or PQC_PREFERRED)"
                )
            if raw:
                raise CallerError("--raw applies to plain ECDSA signatures only")
            if current.classical_alg is None or current.classical_spki is None:
                raise StateError(f"key {current.label!r} has no classical part recorded")
            return sign_dual(
                current.classical_alg,
                current.classical_spki,
                self._classical_sign(current),
                self._mldsa_signer(current),
                msg,
                context,
            )
        raise CallerError(f"unknown signature kind {kind!r} (classical, ml-dsa or dual)")

    def _sign_composite(self, key: KeyInfo, message: bytes, context: bytes) -> bytes:
        params = composite.parse_composite_alg(key.composite_alg or "")
        if key.cka_id is None or key.classical_alg is None:
            raise StateError(f"key {key.label!r} has no token key recorded")
        alg, cka_id = parse_alg(key.classical_alg), key.cka_id
        prehashed = params.classical_hash is not None

        def classical(data: bytes) -> bytes:
            return self.token.sign(alg, cka_id, data, prehashed=prehashed)

        return composite.sign(
            params,
            self._mldsa_signer(key),
            classical,
            message,
            context,
            composite_public=composite_public_key(key),
        )

    def _classical_sign(
        self, key: KeyInfo, *, raw: bool = False, prehashed: bool = False
    ) -> Callable[[bytes], bytes]:
        if key.cka_id is None or key.classical_alg is None:
            raise StateError(f"key {key.label!r} has no token key recorded")
        alg, cka_id = parse_alg(key.classical_alg), key.cka_id
        return lambda m: self.token.sign(alg, cka_id, m, raw=raw, prehashed=prehashed)

    def _mldsa_signer(self, key: KeyInfo) -> MlDsaSigner:
        """An opened ML-DSA-87 signer, from a bounded LRU cache while unlocked.

        Security: cached signers hold expanded keys inside OpenSSL until evicted, the
        keystore is locked, or the appliance closes.
        """
        with self._lock:
            if not self.keystore.unlocked:  # a lock must stop cached signers too
                self._signers.clear()
                raise StateError("keystore is locked")
            hit = self._signers.get(key.key_id)
            if hit is not None and hit[0] == key.blob_sha3:
                self._signers.move_to_end(key.key_id)
                return hit[1]
        signer = self.keystore.open_mldsa(
            key.key_id, expect_public=key.pqc_public, expect_digest=key.blob_sha3
        )
        with self._lock:
            self._signers[key.key_id] = (key.blob_sha3, signer)
            while len(self._signers) > self.signer_cache_size:
                self._signers.popitem(last=False)
        return signer

    # -- passphrase --------------------------------------------------------------------------------

    def change_passphrase(self, old: SecretBytes, new: SecretBytes) -> int:
        """Re-encrypt every blob under ``new``.  The WAL record is the commit point."""
        with self._lock:
            self._signers.clear()
            gen, digests = self.keystore.prepare_change(old, new)
            self._commit("keystore.passphrase", {"gen": gen, "blobs": digests})
            self.keystore.commit_change()
            self.keystore.unlock(new)
            return len(digests)

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> Status:
        with self._lock:
            info = self.token.info()
            header = self.keystore.header()
            counts = {s.value: 0 for s in KeyState}
            for k in self._keys.values():
                counts[k.state.value] += 1
            seq, head = self.wal.head
            bi = backend_info()
            return Status(
                home=str(self.cfg.home),
                appliance_id=self.appliance_id,
                token={
                    "module": info.module,
                    "label": info.label,
                    "serial": info.serial,
                    "manufacturer": info.manufacturer,
                    "model": info.model,
                },
                keystore={
                    "unlocked": self.keystore.unlocked,
                    "kdf": header.kdf.alg,
                    "passphrase_generation": header.kdf.gen,
                    "blobs": len(self.keystore.blob_ids()),
                    "kem": "ML-KEM-1024 (seed wrapped by the token)",
                },
                pqc_backend={
                    "active": bi.active,
                    "liboqs_available": bi.liboqs_available,
                    "liboqs_library": bi.liboqs_library,
                    "liboqs_version": bi.liboqs_version,
                    "liboqs_problem": bi.liboqs_problem,
                },
                wal={"records": len(self.wal), "head_seq": seq, "head_hash": head.hex()},
                keys_by_state=counts,
                keys_total=len(self._keys),
                needs_migration=sorted(
                    k.label
                    for k in self._keys.values()
                    if k.kind is KeyKind.CLASSICAL and k.state is not KeyState.PQC_ONLY
                ),
                damaged={
                    (self._keys[i].label if i in self._keys else i): why
                    for i, why in self.damaged.items()
                },
            )


COMPOSITE_TYPES: Final = tuple(a.value for a in composite.CompositeAlg)


def supported_key_types() -> list[str]:
    return [a.value for a in ClassicalAlg] + ["ml-dsa-87", *COMPOSITE_TYPES]


def _default_kind(live: list[str]) -> str:
    """The signature a key makes when none is asked for: dual with both parts alive."""
    return "dual" if len(live) == 2 else live[0]


def _live_parts(key: KeyInfo) -> list[str]:
    """The parts a key signs with in its state: classical first, then ML-DSA-87."""
    parts = []
    if key.kind is KeyKind.COMPOSITE:
        return ["composite"]
    if key.kind is KeyKind.CLASSICAL and key.state in (
        KeyState.CLASSICAL,
        KeyState.HYBRID,
        KeyState.PQC_PREFERRED,
    ):
        parts.append("classical")
    if key.pqc_public is not None:
        parts.append("ml-dsa")
    return parts


def composite_public_key(key: KeyInfo) -> bytes:
    """mldsaPK || tradPK of a composite key, from what the WAL recorded."""
    params = composite.parse_composite_alg(key.composite_alg or "")
    if key.pqc_public is None or key.classical_spki is None:
        raise StateError(f"key {key.label!r} lacks a recorded part")
    trad = serialization.load_der_public_key(key.classical_spki)
    if isinstance(trad, ec.EllipticCurvePublicKey):
        raw = trad.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    else:
        raw = trad.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return composite.encode_public_key(params, key.pqc_public, raw)


def restore_backup(
    cfg: Config,
    path: Path,
    *,
    pin: SecretBytes,
    passphrase: SecretBytes | None,
    trusted_fingerprints: tuple[str, ...] = (),
    allow_rollback: bool = False,
    reason: str | None = None,
    recovery_seed: SecretBytes | None = None,
) -> dict[str, Any]:
    """Verify a backup completely, then swap it in and record the restore in the log.

    ``recovery_seed`` (the offline recovery officer's ML-KEM-1024 seed) restores onto a new
    token: the KEM seed is re-sealed with the new token's wrap key, classical keys are
    reported as unrecoverable by name, and the audit key is rotated by its ML-DSA half.

    Trusted signers: the audit keys of the live log, plus ``trusted_fingerprints`` (for a
    disaster recovery onto an empty home).  Nothing is written unless every check passes.
    ``allow_rollback`` (with a reason, and the passphrase to re-sign the head) permits a
    snapshot behind the live log or the token counter; it never un-finalizes a key.
    """
    from appliance.audit import read_token_counter
    from appliance.snapshot.restore import Rollback, restore_into, verify_backup

    if allow_rollback and (reason is None or not reason.strip()):
        raise PolicyDenied("--allow-rollback needs a --reason (it is kept in the log)")
    if allow_rollback and passphrase is None:
        raise PolicyDenied("a rollback restore re-signs the log head: it needs the passphrase")
    cfg.apply_environment()
    token = Pkcs11Token.open(cfg.token, pin)
    try:
        counter = read_token_counter(token)
        rollback = (
            Rollback(reason or "", frozenset(token.private_key_ids())) if allow_rollback else None
        )
    finally:
        token.close()
    live = cfg.home / "wal"
    live_seq = -1
    if (live / "wal.log").exists():
        w = Wal.open(live, readonly=True)
        live_seq = w.head[0]
        w.close()
    vb = verify_backup(
        path,
        live_wal_dir=live if live_seq >= 0 else None,
        trusted_fingerprints=trusted_fingerprints,
    )
    ensure_private_dir(cfg.home)
    onto_new_token = recovery_seed is not None
    if recovery_seed is not None:
        _reseal_for_new_token(cfg, vb.files, pin=pin, recovery_seed=recovery_seed)
    else:
        _check_same_token(cfg, vb.files["keystore.cbor"], pin=pin)
    restore_into(cfg.home, vb, counter=counter, rollback=rollback)
    app = Appliance.open(
        cfg, pin=pin, passphrase=passphrase, _after_rollback_restore=rollback is not None
    )
    try:
        fields: dict[str, Any] = {
            "snapshot_seq": vb.wal_seq,
            "snapshot_hash": vb.wal_hash,
            "previous_seq": live_seq,
            "signer": vb.signer.fingerprint(),
            "archive": path.name,
            "rollback": rollback is not None,
        }
        if reason:
            fields["reason"] = reason
        unrecoverable = sorted(
            app.key(i).label for i in app.damaged if i in {k.key_id for k in app.keys()}
        )
        if onto_new_token:
            fields["new_token"] = True
            fields["unrecoverable"] = unrecoverable
        app._commit("restore", fields)
        if onto_new_token and app.keystore.unlocked:
            rotate_after_token_loss(app)  # the old audit key's Ed25519 half stayed in the old token
        if app.keystore.unlocked:
            app.checkpoint()  # after a rollback this also moves the token counter to the new head
        return {
            "restored_seq": vb.wal_seq,
            "previous_seq": live_seq,
            "keys": len(app.keys()),
            "signer": vb.signer.fingerprint(),
            "damaged": dict(app.damaged),
            "unrecoverable_classical_keys": unrecoverable if onto_new_token else [],
        }
    finally:
        app.close()


def _reseal_for_new_token(
    cfg: Config, files: dict[str, bytes], *, pin: SecretBytes, recovery_seed: SecretBytes
) -> None:
    """Open the backup's recovery-sealed KEM seed and seal it with the new token's wrap key."""
    from appliance.keystore.store import KeystoreHeader
    from appliance.snapshot.recovery_key import open_seed

    sealed = files.get("recovery/kem-seed.sealed")
    if sealed is None:
        raise CallerError(
            "this backup carries no recovery-sealed seed (it was made without "
            "--recovery-key); it can only be restored onto its own token"
        )
    header = KeystoreHeader.decode(files["keystore.cbor"], cfg.home / "keystore.cbor")
    pqc = active_backend()
    token = Pkcs11Token.open(cfg.token, pin)
    try:
        with open_seed(pqc, recovery_seed, sealed, header.keystore_id) as seed:
            files["keystore.cbor"] = Keystore(cfg.home, token, pqc).header_for_new_token(
                files["keystore.cbor"], seed
            )
    finally:
        token.close()


def _check_same_token(cfg: Config, header_bytes: bytes, *, pin: SecretBytes) -> None:
    """Refuse, before anything is written, a backup whose KEM seed this token cannot unwrap."""
    from appliance.errors import BlobInvalid, TokenNotPresent
    from appliance.keystore.store import SEED_AAD, KeystoreHeader

    header = KeystoreHeader.decode(header_bytes, cfg.home / "keystore.cbor")
    token = Pkcs11Token.open(cfg.token, pin)
    try:
        token.wrap_decrypt(
            header.twk_label, header.seed_sealed, SEED_AAD + header.keystore_id
        ).wipe()
    except (BlobInvalid, TokenNotPresent):
        raise PolicyDenied(
            "this backup's keystore belongs to another token; restoring onto a new "
            "token needs the recovery officer's --recovery-seed"
        ) from None
    finally:
        token.close()
