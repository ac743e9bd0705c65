"""Signed checkpoints, audit-key rotation and anti-rollback on a real SoftHSM2 token."""

from __future__ import annotations

import os
import shutil

import pytest

from appliance import audit, codec
from appliance.errors import DeviceError, SignatureInvalid, StateError
from appliance.secret import SecretBytes
from appliance.service import Appliance
from appliance.wal import Wal
from conftest import PASSPHRASE, TokenSpec

pytestmark = pytest.mark.softhsm


def reopen(app: Appliance, token: TokenSpec, passphrase: bytes = PASSPHRASE) -> Appliance:
    cfg = app.cfg
    app.close()
    return Appliance.open(cfg, pin=token.pin_secret(), passphrase=SecretBytes(passphrase))


def test_checkpoint_verifies_from_public_keys_and_raises_the_counter(appliance: Appliance) -> None:
    app = appliance
    app.create_key("ed25519", "a")
    rec = app.checkpoint()
    assert rec.type == "checkpoint"
    assert rec.fields["head_seq"] == rec.seq - 1
    counter = audit.read_counter(app)
    assert counter == (rec.seq, rec.hash)
    report = audit.verify_audit(app.wal.directory)
    assert report.checkpoints == 1
    assert report.last_checkpoint_seq == rec.seq
    assert report.unsigned_tail == 0
    app.create_key("ed448", "b")
    assert audit.verify_audit(app.wal.directory).unsigned_tail == 1
    anchor = report.audit_keys[0]
    assert audit.verify_audit(app.wal.directory, anchor=anchor).checkpoints == 1
    with pytest.raises(SignatureInvalid, match="pinned anchor"):
        audit.verify_audit(app.wal.directory, anchor="00" * 32)


def test_rotation_is_signed_by_the_old_key_and_followed(appliance: Appliance) -> None:
    app = appliance
    app.checkpoint()
    old = audit.current_audit_key(app)
    assert old is not None
    assert app.rotate_audit_key() == 2
    app.checkpoint()
    report = audit.verify_audit(app.wal.directory)
    assert len(report.audit_keys) == 2
    assert report.checkpoints == 2
    # a checkpoint made with the retired key after the rotation is refused
    seq, head = app.wal.head
    sig_ed, sig_ml = audit._sign(app, old, audit._checkpoint_message(seq, head))
    app.append_record(
        "checkpoint",
        {"head_seq": seq, "head_hash": head, "key": 1, "sig_ed25519": sig_ed, "sig_mldsa": sig_ml},
    )
    app.wal.commit()
    with pytest.raises(SignatureInvalid, match="unauthorised key"):
        audit.verify_audit(app.wal.directory)


@pytest.mark.parametrize("part", ["sig_ed25519", "sig_mldsa", "head_hash"])
def test_forged_checkpoint_is_refused(appliance: Appliance, part: str) -> None:
    app = appliance
    key = audit.ensure_audit_key(app)
    seq, head = app.wal.head
    sig_ed, sig_ml = audit._sign(app, key, audit._checkpoint_message(seq, head))
    fields = {
        "head_seq": seq,
        "head_hash": head,
        "key": key.n,
        "sig_ed25519": sig_ed,
        "sig_mldsa": sig_ml,
    }
    original = fields[part]
    assert isinstance(original, bytes)
    bad = bytearray(original)
    bad[0] ^= 1
    fields[part] = bytes(bad)
    app.append_record("checkpoint", fields)
    app.wal.commit()
    with pytest.raises(SignatureInvalid):
        audit.verify_audit(app.wal.directory)


def test_checkpoint_needs_the_passphrase(appliance: Appliance) -> None:
    appliance.keystore.lock()
    with pytest.raises(StateError, match="unlock first"):
        appliance.checkpoint()


def test_rolled_back_wal_is_refused(appliance: Appliance, fresh_token: TokenSpec) -> None:
    app = appliance
    app.create_key("ecdsa-p256", "r")
    wal_dir = app.wal.directory
    saved = wal_dir.parent / "wal-before"
    shutil.copytree(wal_dir, saved)
    app.checkpoint()
    cfg = app.cfg
    app.close()
    shutil.rmtree(wal_dir)
    shutil.copytree(saved, wal_dir)
    with pytest.raises(DeviceError, match="rolled-back log"):
        Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=None)
    # a log that is as long but forked from the checkpointed one is refused too
    with Wal.open(wal_dir) as w:
        w.append_commit("note", {"text": "another history"})
        w.append_commit("note", {"text": "and more"})
    with pytest.raises(DeviceError, match="forked log"):
        Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=None)


def test_counter_survives_a_crash_between_create_and_destroy(
    appliance: Appliance, fresh_token: TokenSpec
) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    app = appliance
    rec = app.checkpoint()
    # two counter objects, as a crash inside write_data leaves them: the highest wins
    lib = pkcs11.lib(fresh_token.module)
    with lib.get_token(token_label=fresh_token.label).open(rw=True) as s:
        s.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.LABEL: audit.COUNTER_LABEL,
                Attribute.VALUE: codec.dumps({"seq": 0, "hash": b"\x00" * 32}),
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
            }
        )
    assert len(app.token.read_data(audit.COUNTER_LABEL)) == 2
    assert audit.read_counter(app) == (rec.seq, rec.hash)
    audit.check_anti_rollback(app)


def test_passphrase_change_keeps_the_audit_key_usable(
    appliance: Appliance, fresh_token: TokenSpec
) -> None:
    app = appliance
    app.checkpoint()
    new = b"a different passphrase"
    app.change_passphrase(SecretBytes(PASSPHRASE), SecretBytes(new))
    app.checkpoint()
    app = reopen(app, fresh_token, new)
    try:
        assert app.last_recovery is not None
        assert app.last_recovery.clean
        app.checkpoint()
        assert audit.verify_audit(app.wal.directory).checkpoints == 3
    finally:
        app.close()


def test_audit_blob_is_not_an_orphan(appliance: Appliance, fresh_token: TokenSpec) -> None:
    app = reopen(appliance, fresh_token)
    try:
        assert app.last_recovery is not None
        assert app.last_recovery.removed_orphans == []
        assert app.keystore.blob_path("audit-1").exists()
        assert os.stat(app.keystore.blob_path("audit-1")).st_mode & 0o777 == 0o600
    finally:
        app.close()
