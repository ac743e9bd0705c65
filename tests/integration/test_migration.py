"""The migration engine and recovery on a real SoftHSM2 token (DESIGN §6)."""

from __future__ import annotations

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass

from appliance.errors import PolicyDenied, StateError
from appliance.keys import KeyState
from appliance.migration import plan_path
from appliance.secret import SecretBytes
from appliance.service import Appliance
from appliance.signing import load_public_key, verify_signature
from conftest import PASSPHRASE, TokenSpec, make_config

pytestmark = pytest.mark.softhsm

S = KeyState


def reopen(app: Appliance, token: TokenSpec) -> Appliance:
    cfg = app.cfg
    app.close()
    return Appliance.open(cfg, pin=token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))


def token_has_private(token: TokenSpec, cka_id: bytes) -> bool:
    """Ask the token directly, in a separate session, as an auditor would."""
    lib = pkcs11.lib(token.module)
    with lib.get_token(token_label=token.label).open() as s:
        return any(
            True
            for _ in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id})
        )


def test_plan_path() -> None:
    assert plan_path(S.CLASSICAL, S.PQC_ONLY) == [
        (S.CLASSICAL, S.HYBRID),
        (S.HYBRID, S.FINALIZING),
        (S.FINALIZING, S.PQC_ONLY),
    ]
    assert plan_path(S.CLASSICAL, S.PQC_PREFERRED) == [
        (S.CLASSICAL, S.HYBRID),
        (S.HYBRID, S.PQC_PREFERRED),
    ]
    assert plan_path(S.PQC_PREFERRED, S.PQC_ONLY) == [
        (S.PQC_PREFERRED, S.FINALIZING),
        (S.FINALIZING, S.PQC_ONLY),
    ]
    assert plan_path(S.PQC_PREFERRED, S.CLASSICAL) == [
        (S.PQC_PREFERRED, S.HYBRID),
        (S.HYBRID, S.CLASSICAL),
    ]
    for frm in (S.FINALIZING, S.PQC_ONLY):
        with pytest.raises(PolicyDenied, match="nothing leads back"):
            plan_path(frm, S.HYBRID)


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p256", "ecdsa-secp256k1"])
def test_full_migration_erases_before_pqc_only(
    appliance: Appliance, fresh_token: TokenSpec, key_type: str
) -> None:
    app = appliance
    k = app.create_key(key_type, "m1")
    assert k.cka_id is not None
    classical_pub = load_public_key(app.public_key_pem_of(k))
    k = app.migrate(k, S.HYBRID)
    assert k.state is S.HYBRID
    assert k.pqc_public is not None
    assert app.keystore.blob_path(k.key_id).exists()
    verify_signature(classical_pub, b"m", app.sign(k, b"m", kind="classical"))  # legacy verifiers
    pq_pub = load_public_key(app.public_key_pem_of(k, part="ml-dsa"))
    verify_signature(pq_pub, b"m", app.sign(k, b"m", kind="ml-dsa"))
    k = app.migrate(k, S.PQC_PREFERRED, reason="cut-over week 1")
    k = app.migrate(k, S.FINALIZING)
    cka_id = k.cka_id
    assert cka_id is not None
    assert token_has_private(fresh_token, cka_id)  # FINALIZING still holds it
    k = app.migrate(k, S.PQC_ONLY)
    assert k.state is S.PQC_ONLY
    assert not token_has_private(fresh_token, cka_id)  # I1
    with pytest.raises(StateError, match="classical private key is gone"):
        app.sign(k, b"m", kind="classical")
    verify_signature(pq_pub, b"m", app.sign(k, b"m"))  # default is ML-DSA now
    # the WAL kept the classical public key as a backup, and every edge in order
    types = [
        (r.fields.get("from"), r.fields.get("to"))
        for r in app.wal.records()
        if r.type == "key.transition"
    ]
    assert types == [
        ("CLASSICAL", "HYBRID"),
        ("HYBRID", "PQC_PREFERRED"),
        ("PQC_PREFERRED", "FINALIZING"),
        ("FINALIZING", "PQC_ONLY"),
    ]
    fin = next(r for r in app.wal.records() if r.fields.get("to") == "FINALIZING")
    assert fin.fields["classical_spki"] == k.classical_spki
    with pytest.raises(StateError, match="already PQC_ONLY"):
        app.migrate(k, S.PQC_ONLY)
    with pytest.raises(PolicyDenied):
        app.migrate(k, S.HYBRID, allow_backward=True, reason="no way back")


def test_backward_edges_need_allow_and_reason(appliance: Appliance) -> None:
    app = appliance
    k = app.migrate(app.create_key("ed448", "b1"), S.PQC_PREFERRED)
    with pytest.raises(PolicyDenied, match="allow-backward"):
        app.migrate(k, S.HYBRID)
    with pytest.raises(PolicyDenied, match="reason"):
        app.migrate(k, S.HYBRID, allow_backward=True)
    k = app.migrate(k, S.CLASSICAL, allow_backward=True, reason="verifier fleet not ready")
    assert k.state is S.CLASSICAL
    assert k.pqc_public is None
    assert not app.keystore.blob_path(k.key_id).exists()  # deleted after its record
    back = [r for r in app.wal.records() if r.fields.get("to") == "CLASSICAL"]
    assert back[0].fields["reason"] == "verifier fleet not ready"
    assert app.sign(k, b"still classical")


def test_optimistic_from_check(appliance: Appliance) -> None:
    app = appliance
    stale = app.create_key("ecdsa-p384", "o1")
    app.migrate(stale, S.HYBRID)
    # a caller holding an old view cannot push the key along an edge it has left
    with pytest.raises(StateError, match="expected CLASSICAL"):
        app.engine._edge(stale, S.CLASSICAL, S.HYBRID, reason=None, actor="t")


def test_born_pqc_keys_do_not_migrate(appliance: Appliance) -> None:
    k = appliance.create_key("ml-dsa-87", "pq")
    with pytest.raises(StateError, match="born ml-dsa-87"):
        appliance.migrate(k, S.HYBRID)


def test_bulk_migration_groups_fsyncs(appliance: Appliance, fresh_token: TokenSpec) -> None:
    app = appliance
    keys = [app.create_key("ed25519", f"bulk-{i}") for i in range(24)]
    app.create_key("ml-dsa-87", "bulk-pq")
    seen: list[tuple[int, int]] = []
    res = app.migrate_all(S.HYBRID, batch=10, progress=lambda d, t: seen.append((d, t)))
    assert sorted(res.migrated) == sorted(k.key_id for k in keys)
    assert seen[-1] == (24, 24)
    assert res.fsyncs == 3  # one WAL fsync per batch of 10
    res = app.migrate_all(S.PQC_ONLY, batch=24)
    assert len(res.migrated) == 24
    assert res.fsyncs == 2  # FINALIZING then PQC_ONLY, one group commit each
    assert res.skipped  # the born-PQC key and nothing else
    for k in keys:
        assert k.cka_id is not None
        assert not token_has_private(fresh_token, k.cka_id)
        assert app.key(k.key_id).state is S.PQC_ONLY


def test_recovery_finishes_an_interrupted_finalization(
    appliance: Appliance, fresh_token: TokenSpec
) -> None:
    app = appliance
    k = app.migrate(app.create_key("ecdsa-p256", "f1"), S.FINALIZING)
    assert k.cka_id is not None
    app = reopen(app, fresh_token)
    try:
        assert app.last_recovery is not None
        assert app.last_recovery.finished == [k.key_id]
        assert app.key(k.key_id).state is S.PQC_ONLY
        assert not token_has_private(fresh_token, k.cka_id)
        n = len(app.wal)
        app = reopen(app, fresh_token)  # idempotent: nothing more to do
        assert len(app.wal) == n
        assert app.last_recovery is not None
        assert app.last_recovery.clean
    finally:
        app.close()


def test_recovery_marks_damage_and_keeps_other_keys(
    appliance: Appliance, fresh_token: TokenSpec
) -> None:
    app = appliance
    lost_blob = app.migrate(app.create_key("ed25519", "d1"), S.HYBRID)
    lost_token_key = app.create_key("ecdsa-p256", "d2")
    fine = app.migrate(app.create_key("ed25519", "d3"), S.HYBRID)
    app.keystore.blob_path(lost_blob.key_id).unlink()
    lib = pkcs11.lib(fresh_token.module)
    with lib.get_token(token_label=fresh_token.label).open(rw=True) as s:
        for obj in s.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: lost_token_key.cka_id}
        ):
            obj.destroy()
    orphan = app.keystore.blob_dir / "deadbeef.blob"
    orphan.write_bytes(b"left by a crash")
    app = reopen(app, fresh_token)
    try:
        report = app.last_recovery
        assert report is not None
        assert set(report.damaged) == {lost_blob.key_id, lost_token_key.key_id}
        assert "blob is missing" in report.damaged[lost_blob.key_id]
        assert "token no longer holds" in report.damaged[lost_token_key.key_id]
        assert report.removed_orphans == ["deadbeef"]
        assert report.appended == 0
        with pytest.raises(StateError, match="DAMAGED"):
            app.sign(app.key(lost_blob.key_id), b"m")
        with pytest.raises(StateError, match="DAMAGED"):
            app.migrate(app.key(lost_token_key.key_id), S.HYBRID)
        assert app.sign(app.key(fine.key_id), b"m")  # everything else keeps working
        assert app.sign(app.key(fine.key_id), b"m", kind="ml-dsa")
    finally:
        app.close()


def test_state_replays_identically(
    appliance: Appliance, fresh_token: TokenSpec, app_home: object
) -> None:
    app = appliance
    app.migrate(app.create_key("ed25519", "r1"), S.PQC_PREFERRED)
    app.migrate(app.create_key("ed448", "r2"), S.PQC_ONLY)
    before = {k.key_id: (k.state, k.pqc_public, k.blob_sha3) for k in app.keys()}
    app = reopen(app, fresh_token)
    try:
        assert {k.key_id: (k.state, k.pqc_public, k.blob_sha3) for k in app.keys()} == before
    finally:
        app.close()


def test_make_config_is_reusable(fresh_token: TokenSpec, tmp_path: object) -> None:
    from pathlib import Path

    assert make_config(Path("/x"), fresh_token).token_label == fresh_token.label


def test_a_record_replay_would_refuse_never_reaches_the_log(appliance: Appliance) -> None:
    from appliance.errors import DeviceError

    app = appliance
    k = app.create_key("ed25519", "guard")
    n = len(app.wal)
    size = app.wal.path.stat().st_size
    for bad in ({"from": "HYBRID", "to": "FINALIZING"}, {"from": "CLASSICAL", "to": "PQC_ONLY"}):
        with pytest.raises(DeviceError):
            app.append_record(
                "key.transition", {"key_id": k.key_id, "alg": "ed25519", "actor": "t", **bad}
            )
    assert len(app.wal) == n
    assert app.wal.path.stat().st_size == size
    assert app.key(k.key_id).state is S.CLASSICAL
