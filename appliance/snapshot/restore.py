"""Verified restore (``pqhsm restore``): everything is checked before anything is written.

(1) Read the archive safely: regular files only (no links, devices, fifos), no absolute
    paths or ``..``, no duplicates, at most ``MAX_FILES`` entries, ``MAX_FILE`` bytes each
    and ``MAX_TOTAL`` in all (decompressed), so a tar bomb stops early.
(2) The manifest's signer must be on an explicit trust list — the audit keys the live log
    declares, or a trusted-keys file of fingerprints — never a key the snapshot declares
    about itself; both halves of its signature must verify with the trusted key.
(3) Every artifact's SHA3-256 and size must match; none may be missing or extra.
(4) The snapshot's log must verify, end where the manifest says, and not fork from the
    live log; a snapshot behind the live log or the token's anti-rollback counter is
    refused unless the operator allows a rollback with a reason, and even then no key may
    return to a state before FINALIZING once the live log or the token says it was
    finalized.  A snapshot whose log forks from either is always refused.
(5) Only then: stage the files in ``.restore/``, fsync, write ``.restore/READY`` (the
    commit point), move them into place, append a ``restore`` record, remove the journal.
    :func:`finish_restore` (called at every start) completes a restore that has READY and
    discards one that does not, so a crash leaves the old state or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.audit import AuditKey, audit_keys
from appliance.errors import CallerError, PolicyDenied, SignatureInvalid
from appliance.fsio import (
    FILE_MODE,
    ensure_private_dir,
    fault_point,
    fsync_dir,
    read_file,
    sync_filesystem,
    write_synced,
)
from appliance.secret import ct_equal
from appliance.snapshot.backup import BACKUP_CONTEXT, FORMAT, VERSION, canonical_json
from appliance.wal import Wal, verify_chain

__all__ = [
    "MAX_FILE",
    "MAX_FILES",
    "MAX_TOTAL",
    "BackupInvalid",
    "VerifiedBackup",
    "finish_restore",
    "read_backup",
    "read_fingerprints",
    "restore_into",
    "verify_backup",
]

MAX_FILES: Final = 200_000
MAX_FILE: Final = 256 << 20
MAX_TOTAL: Final = 4 << 30
JOURNAL: Final = ".restore"
_TOP: Final = ("wal", "keystore.cbor", "blobs")


class BackupInvalid(CallerError):
    """The archive is not a backup this appliance may restore.  Nothing was written."""


def read_backup(path: Path) -> dict[str, bytes]:
    """(1) Read every member into memory, refusing anything unsafe or oversized."""
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_FILES:
                    raise BackupInvalid(f"{path.name}: more than {MAX_FILES} entries")
                name = member.name
                pure = PurePosixPath(name)
                if pure.is_absolute() or ".." in pure.parts or name.startswith("/") or "\\" in name:
                    raise BackupInvalid(f"{path.name}: unsafe path {name!r}")
                if member.issym() or member.islnk():
                    raise BackupInvalid(f"{path.name}: {name!r} is a link")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise BackupInvalid(f"{path.name}: {name!r} is not a regular file")
                if member.size > MAX_FILE:
                    raise BackupInvalid(f"{path.name}: {name!r} is larger than {MAX_FILE} bytes")
                total += member.size
                if total > MAX_TOTAL:
                    raise BackupInvalid(f"{path.name}: unpacks to more than {MAX_TOTAL} bytes")
                norm = str(pure)
                if norm in files:
                    raise BackupInvalid(f"{path.name}: {name!r} appears twice")
                f = tar.extractfile(member)
                if f is None:
                    raise BackupInvalid(f"{path.name}: {name!r} cannot be read")
                data = f.read(MAX_FILE + 1)
                if len(data) != member.size:
                    raise BackupInvalid(f"{path.name}: {name!r} is truncated")
                files[norm] = data
    except FileNotFoundError:
        raise CallerError(f"{path}: no such file") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise BackupInvalid(f"{path.name}: not a readable .tar.gz ({type(exc).__name__})") from None
    return files


@dataclass(frozen=True)
class VerifiedBackup:
    files: dict[str, bytes]
    body: dict[str, Any]
    signer: AuditKey
    wal_seq: int
    wal_hash: bytes


def _trusted(
    live_wal_dir: Path | None, trusted_fingerprints: list[str]
) -> dict[str, AuditKey | None]:
    """Fingerprint -> key material we already hold (None: pinned by fingerprint only)."""
    out: dict[str, AuditKey | None] = {fp.lower(): None for fp in trusted_fingerprints}
    if live_wal_dir is not None and (live_wal_dir / "wal.log").exists():
        wal = Wal.open(live_wal_dir, readonly=True)
        try:
            for k in audit_keys(wal.records()):
                out[k.fingerprint()] = k
        finally:
            wal.close()
    return out


def verify_backup(
    path: Path, *, live_wal_dir: Path | None, trusted_fingerprints: tuple[str, ...] = ()
) -> VerifiedBackup:
    """(1)-(3): safe read, trusted hybrid signature, every artifact digest."""
    files = read_backup(path)
    raw = files.pop("manifest.json", None)
    if raw is None:
        raise BackupInvalid(f"{path.name}: no manifest.json")
    try:
        manifest = json.loads(raw)
        body, sigs = manifest["body"], manifest["signatures"]
        if body["format"] != FORMAT or body["version"] != VERSION:
            raise BackupInvalid(f"{path.name}: not a version-{VERSION} pqhsm backup")
        signer_info = body["signer"]
        declared = AuditKey(
            int(signer_info["audit_key"]),
            b"",
            bytes.fromhex(signer_info["ed25519_spki"]),
            bytes.fromhex(signer_info["ml-dsa-87"]),
            b"",
        )
        sig_ed, sig_ml = bytes.fromhex(sigs["ed25519"]), bytes.fromhex(sigs["ml-dsa-87"])
        artifacts: dict[str, Any] = body["artifacts"]
        wal_seq, wal_hash = int(body["wal_head"]["seq"]), bytes.fromhex(body["wal_head"]["hash"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BackupInvalid(f"{path.name}: malformed manifest") from None
    # (2) only a key we already trust may sign; the snapshot's own claim is not trust
    trust = _trusted(live_wal_dir, list(trusted_fingerprints))
    fp = declared.fingerprint()
    if fp not in trust:
        raise SignatureInvalid(f"{path.name}: signed by audit key {fp[:16]}…, which is not trusted")
    known = trust[fp]
    key = known if known is not None else declared
    if not isinstance(
        serialization.load_der_public_key(key.ed25519_spki), ed25519.Ed25519PublicKey
    ):
        raise SignatureInvalid(f"{path.name}: signer is not an Ed25519 + ML-DSA-87 audit key")
    key.verify(BACKUP_CONTEXT + canonical_json(body), sig_ed, sig_ml)
    # (3) exactly the artifacts the manifest lists, each with its digest
    if set(files) != set(artifacts):
        missing, extra = set(artifacts) - set(files), set(files) - set(artifacts)
        what = f"missing {sorted(missing)[:3]}" if missing else f"unlisted {sorted(extra)[:3]}"
        raise BackupInvalid(f"{path.name}: artifacts do not match the manifest ({what})")
    for name, data in files.items():
        want = artifacts[name]
        if len(data) != want.get("size") or not ct_equal(
            hashlib.sha3_256(data).digest(), bytes.fromhex(str(want.get("sha3_256")))
        ):
            raise BackupInvalid(f"{path.name}: {name} does not match its manifest digest")
    return VerifiedBackup(files, body, key, wal_seq, wal_hash)


@dataclass(frozen=True)
class Rollback:
    """An operator's explicit permission to restore an older state, and what guards it."""

    reason: str
    token_private_ids: frozenset[bytes]  # private keys the token still holds


_PRE_FINAL: Final = ("CLASSICAL", "HYBRID", "PQC_PREFERRED")


def _guard_finalized(snap: Wal, live_wal_dir: Path | None, rollback: Rollback) -> None:
    """No key may go back to a state before FINALIZING once the live log or the token says
    it was finalized (its classical private key erased)."""
    from appliance.keys import replay

    snap_keys = replay(snap.records())
    live_keys = {}
    if live_wal_dir is not None and (live_wal_dir / "wal.log").exists():
        live = Wal.open(live_wal_dir, readonly=True)
        try:
            live_keys = replay(live.records())
        finally:
            live.close()
    for key_id, k in snap_keys.items():
        if k.state.value not in _PRE_FINAL or k.kind.value != "classical":
            continue
        now = live_keys.get(key_id)
        if now is not None and now.state.value not in _PRE_FINAL:
            raise PolicyDenied(
                f"key {k.label!r} is {now.state.value} in the live log; a restore may "
                f"not bring it back to {k.state.value}"
            )
        if k.cka_id is not None and k.cka_id not in rollback.token_private_ids:
            raise PolicyDenied(
                f"key {k.label!r}: the token no longer holds its classical private key "
                f"(finalized); a restore may not bring it back to {k.state.value}"
            )


def _check_log(
    vb: VerifiedBackup,
    scratch: Path,
    live_wal_dir: Path | None,
    counter: tuple[int, bytes] | None,
    rollback: Rollback | None = None,
) -> None:
    """(4) the snapshot's log verifies, ends at the manifest's head, never forks from the
    live log or the token counter, and is not behind either unless the operator allowed a
    rollback (which still may not un-finalize a key)."""
    wal_dir = scratch / "wal"
    ensure_private_dir(wal_dir)
    write_synced(wal_dir / "wal.log", vb.files["wal/wal.log"], point="restore.check")
    seq, head = verify_chain(wal_dir)
    if seq != vb.wal_seq or not ct_equal(head, vb.wal_hash):
        raise BackupInvalid("the snapshot's log does not end where its manifest says")
    snap = Wal.open(wal_dir, readonly=True)
    try:
        if counter is not None:
            c_seq, c_hash = counter
            if seq < c_seq:
                if rollback is None:
                    raise PolicyDenied(
                        f"the snapshot ends at seq {seq}, behind the token's "
                        f"anti-rollback counter (seq {c_seq}): refused (see --allow-rollback)"
                    )
            elif not ct_equal(snap.get(c_seq).hash, c_hash):
                raise PolicyDenied(
                    "the snapshot's log forks from the one the token counter names: refused"
                )
        if live_wal_dir is not None and (live_wal_dir / "wal.log").exists():
            live = Wal.open(live_wal_dir, readonly=True)
            try:
                live_seq, _ = live.head
                common = min(seq, live_seq)
                if common >= 0 and not ct_equal(snap.get(common).hash, live.get(common).hash):
                    raise PolicyDenied(
                        f"the snapshot's log forks from the live log at or before seq {common}"
                    )
                if seq < live_seq and rollback is None:
                    raise PolicyDenied(
                        f"the snapshot ends at seq {seq}, behind the live log (seq "
                        f"{live_seq}): refused (see --allow-rollback)"
                    )
            finally:
                live.close()
        if rollback is not None:
            _guard_finalized(snap, live_wal_dir, rollback)
    finally:
        snap.close()


def restore_into(
    home: Path,
    vb: VerifiedBackup,
    *,
    counter: tuple[int, bytes] | None,
    rollback: Rollback | None = None,
) -> None:
    """(4)-(5): check the log, then swap the state in through a journal."""
    journal = home / JOURNAL
    if journal.exists():
        shutil.rmtree(journal)
    ensure_private_dir(journal)
    try:
        _check_log(
            vb,
            journal / "check",
            home / "wal" if (home / "wal").exists() else None,
            counter,
            rollback,
        )
    except BaseException:
        shutil.rmtree(journal)  # refused before the commit point: leave no trace
        raise
    shutil.rmtree(journal / "check")
    stage = journal / "new"
    for name, data in vb.files.items():
        if not name.startswith(("wal/", "blobs/")) and name != "keystore.cbor":
            continue  # public/ is for verifiers; the appliance rebuilds it from the log
        dst = stage / name
        ensure_private_dir(dst.parent)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    fault_point("restore.staged")
    # one syncfs makes every staged file and folder durable before the commit point
    sync_filesystem(journal)
    fault_point("restore.synced")
    write_synced(journal / "READY", b"1", point="restore.ready")  # the commit point
    fsync_dir(journal)
    finish_restore(home)


def finish_restore(home: Path) -> bool:
    """Complete a committed restore (READY present) or discard an uncommitted one."""
    journal = home / JOURNAL
    if not journal.exists():
        return False
    if not (journal / "READY").exists():
        shutil.rmtree(journal)
        fsync_dir(home)
        return False
    stage, old = journal / "new", journal / "old"
    ensure_private_dir(old)
    for top in _TOP:
        src = stage / top
        if not src.exists():
            continue
        cur = home / top
        if cur.exists() and not (old / top).exists():
            os.replace(cur, old / top)
        os.replace(src, home / top)
        fault_point("restore.swap")
    fsync_dir(home)
    shutil.rmtree(journal)
    fsync_dir(home)
    return True


def read_fingerprints(path: Path) -> list[str]:
    """A trusted-keys file: one audit-key fingerprint (hex) per line, ``#`` comments."""
    out = []
    for line in read_file(path).decode("utf-8", "replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if len(line) != 64 or any(c not in "0123456789abcdefABCDEF" for c in line):
                raise CallerError(f"{path}: {line[:20]!r} is not a SHA3-256 fingerprint")
            out.append(line.lower())
    return out
