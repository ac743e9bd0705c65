"""Signed backup and verified restore on a real SoftHSM2 token (issue 8, first slice)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from appliance import audit
from appliance.config import Config, write_config
from appliance.errors import ApplianceError, PolicyDenied, SignatureInvalid
from appliance.keystore import PBKDF2_SHA3, calibrate
from appliance.secret import SecretBytes
from appliance.service import Appliance, restore_backup
from appliance.snapshot import BackupInvalid, verify_backup
from appliance.snapshot import restore as restore_mod
from conftest import PASSPHRASE, TokenSpec, make_config, new_token

pytestmark = pytest.mark.softhsm


def tree_digest(home: Path) -> dict[str, str]:
    """Every file under the home (token store aside) and its hash: to prove nothing changed."""
    return {
        str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(home.rglob("*"))
        if p.is_file()
    }


def rebuild(
    src: Path,
    dst: Path,
    *,
    drop: str | None = None,
    replace: dict[str, bytes] | None = None,
    extra: list[tarfile.TarInfo] | None = None,
) -> Path:
    """Copy a backup archive with changes, keeping everything else byte-for-byte."""
    with tarfile.open(src, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
    with tarfile.open(dst, "w:gz") as out:
        for m, data in members:
            if m.name == drop:
                continue
            data = (replace or {}).get(m.name, data)
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
        for info in extra or []:
            out.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return dst


def do_restore(
    app_cfg: Config, path: Path, token: TokenSpec, trusted: tuple[str, ...] = ()
) -> dict[str, Any]:
    return restore_backup(
        app_cfg,
        path,
        pin=token.pin_secret(),
        passphrase=SecretBytes(PASSPHRASE),
        trusted_fingerprints=trusted,
    )


@pytest.fixture
def backed_up(appliance: Appliance, tmp_path: Path) -> tuple[Appliance, Path]:
    app = appliance
    app.create_key("ecdsa-p256", "c1")
    app.migrate(app.create_key("ed25519", "h1"), __import__("appliance.keys").keys.KeyState.HYBRID)
    app.create_key("ml-dsa-87", "pq1")
    out = tmp_path / "backups"
    out.mkdir()
    info = app.backup(out)
    assert info.path.name.startswith("pqhsm-backup-")
    return app, info.path


def test_backup_is_complete_and_verifies(backed_up: tuple[Appliance, Path]) -> None:
    app, path = backed_up
    vb = verify_backup(path, live_wal_dir=app.wal.directory)
    assert vb.wal_seq == app.wal.head[0]
    names = set(vb.files)
    assert {"wal/wal.log", "keystore.cbor"} <= names
    assert {f"blobs/{b}.blob" for b in app.keystore.blob_ids()} <= names
    assert {f"public/{k.key_id}.pem" for k in app.keys()} <= names
    assert path.stat().st_mode & 0o777 == 0o600


def refused(
    app: Appliance, token: TokenSpec, path: Path, exc: type[ApplianceError], match: str
) -> None:
    cfg = app.cfg
    before = tree_digest(cfg.home / "wal") | {
        "keystore": hashlib.sha256(app.keystore.path.read_bytes()).hexdigest()
    }
    app.close()
    try:
        with pytest.raises(exc, match=match):
            do_restore(cfg, path, token)
        after = tree_digest(cfg.home / "wal") | {
            "keystore": hashlib.sha256((cfg.home / "keystore.cbor").read_bytes()).hexdigest()
        }
        assert after == before  # nothing written
        assert not (cfg.home / ".restore").exists()
    finally:
        Appliance.open(cfg, pin=token.pin_secret(), passphrase=None).close()


def test_tampering_and_unsafe_archives_are_refused(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec, tmp_path: Path
) -> None:
    app, path = backed_up
    with tarfile.open(path, "r:gz") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        blob = next(m.name for m in tar if m.name.startswith("blobs/"))
        blob_bytes = tar.extractfile(blob).read()  # type: ignore[union-attr]
    manifest["body"]["created_ms"] += 1
    tampered_blob = bytearray(blob_bytes)
    tampered_blob[-1] ^= 1

    def info(name: str, kind: bytes, size: int = 0, link: str = "") -> tarfile.TarInfo:
        t = tarfile.TarInfo(name)
        t.type, t.size, t.linkname = kind, size, link
        return t

    cases: list[tuple[Path, type[ApplianceError], str]] = [
        (
            rebuild(
                path, tmp_path / "m.tgz", replace={"manifest.json": json.dumps(manifest).encode()}
            ),
            SignatureInvalid,
            "audit signature invalid",
        ),
        (
            rebuild(path, tmp_path / "a.tgz", replace={blob: bytes(tampered_blob)}),
            BackupInvalid,
            "digest",
        ),
        (rebuild(path, tmp_path / "missing.tgz", drop=blob), BackupInvalid, "missing"),
        (
            rebuild(
                path, tmp_path / "extra.tgz", extra=[info("blobs/evil.blob", tarfile.REGTYPE, 3)]
            ),
            BackupInvalid,
            "unlisted",
        ),
        (
            rebuild(path, tmp_path / "dotdot.tgz", extra=[info("../evil", tarfile.REGTYPE, 3)]),
            BackupInvalid,
            "unsafe path",
        ),
        (
            rebuild(path, tmp_path / "abs.tgz", extra=[info("/etc/evil", tarfile.REGTYPE, 3)]),
            BackupInvalid,
            "unsafe path",
        ),
        (
            rebuild(
                path,
                tmp_path / "sym.tgz",
                extra=[info("blobs/s", tarfile.SYMTYPE, link="/etc/passwd")],
            ),
            BackupInvalid,
            "is a link",
        ),
        (
            rebuild(
                path,
                tmp_path / "hard.tgz",
                extra=[info("blobs/h", tarfile.LNKTYPE, link="keystore.cbor")],
            ),
            BackupInvalid,
            "is a link",
        ),
        (
            rebuild(path, tmp_path / "dev.tgz", extra=[info("blobs/d", tarfile.CHRTYPE)]),
            BackupInvalid,
            "not a regular file",
        ),
        (
            rebuild(path, tmp_path / "nomanifest.tgz", drop="manifest.json"),
            BackupInvalid,
            "no manifest",
        ),
    ]
    truncated = tmp_path / "trunc.tgz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases.append((truncated, BackupInvalid, "not a readable"))
    for bad, exc, match in cases:
        refused(app, fresh_token, bad, exc, match)
        app = Appliance.open(
            app.cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE)
        )
    app.close()


def test_a_tar_bomb_stops_early(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, path = backed_up
    monkeypatch.setattr(restore_mod, "MAX_TOTAL", 5_000)
    refused(app, fresh_token, path, BackupInvalid, "unpacks to more than")


def test_wrong_and_self_declared_signers_are_not_trusted(
    backed_up: tuple[Appliance, Path], tmp_path: Path, fresh_token: TokenSpec
) -> None:
    app, _ = backed_up
    other_token = new_token()
    other = Appliance.initialize(
        make_config(tmp_path / "other", other_token),
        pin=other_token.pin_secret(),
        passphrase=SecretBytes(PASSPHRASE),
        kdf=calibrate(PBKDF2_SHA3, pbkdf2_iterations=1000),
    )
    foreign = other.backup(tmp_path)
    other.close()
    # the foreign snapshot is self-consistent and validly signed, but by a key nobody trusts here
    refused(app, fresh_token, foreign.path, SignatureInvalid, "not trusted")


def test_old_and_forked_snapshots_are_refused(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec, tmp_path: Path
) -> None:
    app, old = backed_up
    app.create_key("ed448", "later")  # the live log moves past the snapshot
    refused(app, fresh_token, old, PolicyDenied, "behind the live log")
    app = Appliance.open(app.cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    # fork: a copy of the home takes another history from the same point
    cfg = app.cfg
    app.close()
    fork_home = tmp_path / "fork"
    shutil.copytree(cfg.home, fork_home)
    app = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    app.create_key("ed25519", "only-here")
    ahead = app.backup(tmp_path)  # ahead of the fork, but on another branch
    app.close()
    fork_cfg = make_config(fork_home, fresh_token)
    fork = Appliance.open(
        fork_cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE)
    )
    fork.create_key("ed25519", "only-there")
    refused(fork, fresh_token, ahead.path, PolicyDenied, "forks from the live log")


def test_restore_behind_the_token_counter_is_refused(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec, tmp_path: Path
) -> None:
    app, old = backed_up
    app.create_key("ed448", "x")
    app.checkpoint()  # the token now remembers a later head
    fresh_home = tmp_path / "empty"
    fresh_home.mkdir(mode=0o700)
    write_config(make_config(fresh_home, fresh_token))
    fp = audit.current_audit_key(app)
    assert fp is not None
    app.close()
    with pytest.raises(PolicyDenied, match="anti-rollback counter"):
        do_restore(
            make_config(fresh_home, fresh_token), old, fresh_token, trusted=(fp.fingerprint(),)
        )
    assert not (fresh_home / "wal").exists()


def test_disaster_recovery_onto_an_empty_home(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec, tmp_path: Path
) -> None:
    app, path = backed_up
    labels = sorted(k.label for k in app.keys())
    signer = audit.current_audit_key(app)
    assert signer is not None
    app.close()
    new_home = tmp_path / "replacement-disk"
    new_home.mkdir(mode=0o700)
    cfg = make_config(new_home, fresh_token)
    write_config(cfg)
    with pytest.raises(SignatureInvalid, match="not trusted"):  # no live log: trust must be given
        do_restore(cfg, path, fresh_token)
    out = do_restore(cfg, path, fresh_token, trusted=(signer.fingerprint(),))
    assert out["damaged"] == {}
    back = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        assert sorted(k.label for k in back.keys()) == labels
        for k in back.keys():
            assert back.sign(k, b"after the restore")
        assert any(r.type == "restore" for r in back.wal.records())  # a restore is a record
        assert audit.verify_audit(back.wal.directory).checkpoints >= 1
    finally:
        back.close()


def test_same_state_restore_and_interrupted_journal(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec
) -> None:
    app, path = backed_up
    cfg = app.cfg
    app.close()
    out = do_restore(cfg, path, fresh_token)
    assert out["restored_seq"] == out["previous_seq"]
    # a journal without READY (crash before the commit point) is discarded at start
    (cfg.home / ".restore" / "new").mkdir(parents=True)
    (cfg.home / ".restore" / "new" / "keystore.cbor").write_bytes(b"half-written")
    again = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        assert not (cfg.home / ".restore").exists()
        assert again.keystore.unlocked
    finally:
        again.close()


def test_rollback_needs_a_reason_and_never_unfinalizes(
    backed_up: tuple[Appliance, Path], fresh_token: TokenSpec
) -> None:
    from appliance.keys import KeyState

    app, old = backed_up
    cfg = app.cfg
    later = app.create_key("ed448", "later")
    app.checkpoint()
    app.close()

    def rollback(reason: str | None) -> dict[str, Any]:
        return restore_backup(
            cfg,
            old,
            pin=fresh_token.pin_secret(),
            passphrase=SecretBytes(PASSPHRASE),
            allow_rollback=True,
            reason=reason,
        )

    with pytest.raises(PolicyDenied, match="needs a --reason"):
        rollback(None)
    out = rollback("the last hour of changes was a mistake")
    assert out["restored_seq"] < out["previous_seq"]
    app = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        assert later.key_id not in {k.key_id for k in app.keys()}
        rec = [r for r in app.wal.records() if r.type == "restore"][-1]
        assert rec.fields["rollback"] is True
        assert rec.fields["reason"] == "the last hour of changes was a mistake"
        assert audit.read_counter(app) == app.wal.head  # the counter follows the new, signed head
        # now finalize the HYBRID key, then try to roll back to the snapshot where it was HYBRID
        h1 = app.find("h1")
        app.migrate(h1, KeyState.PQC_ONLY)
        app.checkpoint()
    finally:
        app.close()
    with pytest.raises(PolicyDenied, match="may not bring it back"):
        rollback("try to resurrect the classical key")
    app = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        assert app.find("h1").state is KeyState.PQC_ONLY
    finally:
        app.close()


def test_disaster_recovery_onto_a_new_token_with_the_recovery_key(
    appliance: Appliance, tmp_path: Path
) -> None:
    from appliance.pqc import active_backend
    from appliance.snapshot.recovery_key import (
        create_recovery_key,
        load_recovery_public,
        load_recovery_seed,
    )

    app = appliance
    app.create_key("ecdsa-p256", "classical-only")
    app.migrate(
        app.create_key("ed25519", "hybrid"), __import__("appliance.keys").keys.KeyState.HYBRID
    )
    pq = app.create_key("ml-dsa-87", "pq")
    seed_path, pub_path = create_recovery_key(active_backend(), tmp_path / "officer")
    assert seed_path.stat().st_mode & 0o777 == 0o600
    signer = audit.current_audit_key(app)
    assert signer is not None
    plain = app.backup(tmp_path)  # no recovery seal
    sealed = app.backup(tmp_path / "sealed.tar.gz", recovery_ek=load_recovery_public(pub_path))
    pq_pub = Appliance.public_key_pem_of(pq)
    app.close()
    # the old token is gone: a new token, a new disk
    new = new_token()
    home = tmp_path / "new-site"
    home.mkdir(mode=0o700)
    cfg = make_config(home, new)
    write_config(cfg)
    trusted = (signer.fingerprint(),)
    with pytest.raises(PolicyDenied, match="belongs to another token"):
        restore_backup(
            cfg,
            plain.path,
            pin=new.pin_secret(),
            passphrase=SecretBytes(PASSPHRASE),
            trusted_fingerprints=trusted,
        )
    assert not (home / "wal").exists()
    with pytest.raises(Exception, match="no recovery-sealed seed"):
        restore_backup(
            cfg,
            plain.path,
            pin=new.pin_secret(),
            passphrase=SecretBytes(PASSPHRASE),
            trusted_fingerprints=trusted,
            recovery_seed=load_recovery_seed(seed_path),
        )
    out = restore_backup(
        cfg,
        sealed.path,
        pin=new.pin_secret(),
        passphrase=SecretBytes(PASSPHRASE),
        trusted_fingerprints=trusted,
        recovery_seed=load_recovery_seed(seed_path),
    )
    assert out["unrecoverable_classical_keys"] == ["classical-only", "hybrid"]  # by design, by name
    back = Appliance.open(cfg, pin=new.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        from appliance.signing.policy import Policy, load_public_keys, verify

        verify(
            load_public_keys(pq_pub), b"m", back.sign(back.find("pq"), b"m"), policy=Policy.STRICT
        )
        report = audit.verify_audit(back.wal.directory)
        assert report.recovered_rotations == 1
        assert report.unsigned_tail == 0
        assert set(back.damaged) == {back.find("classical-only").key_id, back.find("hybrid").key_id}
    finally:
        back.close()
