"""A follower of a live appliance (``serve --processes``), in one process: the owner
(the ``appliance`` fixture) and a follower on its own token session, linked by the
control socket and the committed-length watermark exactly as the processes are."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from appliance import clientpins
from appliance.errors import ApplianceError, PinIncorrect, PinLocked, StateError
from appliance.keys import KeyKind, KeyState
from appliance.secret import SecretBytes
from appliance.service import Appliance
from appliance.wal import Wal
from conftest import PIN, wal_scan_starts
from pkcs11_shim.processes import OwnerLink, OwnerProxy, Watermark

pytestmark = pytest.mark.softhsm


def _verify_ecdsa(spki: bytes, der_sig: bytes, digest: bytes) -> None:
    key = serialization.load_der_public_key(spki)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der_sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def _sign_classically(app: Appliance, key_id: str, digest: bytes) -> bytes:
    """A prehashed classical signature by ``app`` (a follower signs these with its token)."""
    return app.sign(app.key(key_id), digest, kind="classical", prehashed=True)


@pytest.fixture
def link(appliance: Appliance) -> Iterator[OwnerLink]:
    link = OwnerLink(appliance)
    try:
        yield link
    finally:
        link.close()


@pytest.fixture
def pair(appliance: Appliance, link: OwnerLink) -> Iterator[tuple[Appliance, Appliance]]:
    """(owner, follower)."""
    watermark = Watermark.create()
    appliance.wal.on_commit(watermark.publish)
    assert watermark.read() == appliance.wal.committed_end
    proxy = OwnerProxy([link.pair() for _ in range(2)])
    reader = Watermark(os.dup(watermark.fd), writable=False)
    follower = Appliance.open_follower(
        appliance.cfg, pin=SecretBytes(PIN), committed_end=reader.read, writer=proxy
    )
    try:
        yield appliance, follower
    finally:
        follower.close()
        proxy.close()
        appliance.wal.on_commit(None)
        reader.close()
        watermark.close()


def test_wal_limit_needs_readonly(appliance: Appliance) -> None:
    with pytest.raises(ApplianceError, match="readonly"):
        Wal.open(appliance.cfg.home / "wal", limit=0)


def test_follower_sees_commits_and_nothing_past_them(pair: tuple[Appliance, Appliance]) -> None:
    owner, follower = pair
    assert follower.follower
    assert not owner.follower
    ec_key = owner.create_key("ecdsa-p256", "f-ec")
    assert follower.key(ec_key.key_id).label == "f-ec"
    # appended, not yet durable: a follower must not act on it
    owner.wal.append(
        "key.create",
        {
            "key_id": "ab" * 16,
            "label": "not-yet",
            "kind": KeyKind.MLDSA.value,
            "state": "PQC_ONLY",
            "pqc_public": b"x",
            "origin": "generated",
        },
    )
    assert "not-yet" not in [k.label for k in follower.keys()]
    owner.wal.commit()
    assert "not-yet" in [k.label for k in follower.keys()]


def test_follower_reads_only_what_the_owner_added(
    pair: tuple[Appliance, Appliance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keeping up costs what the owner committed since the last lookup: the follower
    scans the log from where it stopped, not from the start (a bulk migration commits
    thousands of times while followers sign)."""
    owner, follower = pair
    keys = [owner.create_key("ecdsa-p256", f"inc-{i}") for i in range(3)]
    follower.keys()
    starts = wal_scan_starts(monkeypatch)
    for key in keys:
        before = follower.wal.committed_end
        owner.migrate(owner.key(key.key_id), KeyState.HYBRID)
        assert follower.key(key.key_id).state is KeyState.HYBRID
        assert starts[-1] == before > 0
    assert len(starts) == len(keys)
    assert {k.key_id: k for k in follower.keys()} == {k.key_id: k for k in owner.keys()}


def test_follower_signs_classically_and_forwards_the_rest(
    pair: tuple[Appliance, Appliance],
) -> None:
    owner, follower = pair
    ec_key = owner.create_key("ecdsa-p256", "f-ec2")
    digest = hashlib.sha256(b"follower").digest()
    sig = _sign_classically(follower, ec_key.key_id, digest)
    assert ec_key.classical_spki is not None
    _verify_ecdsa(ec_key.classical_spki, sig, digest)
    # created through the follower: the owner creates and commits it, the follower sees it
    ml = follower.create_key("ml-dsa-87", "f-ml")
    assert owner.key(ml.key_id).label == "f-ml"
    assert ml.pqc_public is not None
    sig = follower.sign(ml, b"forwarded", context=b"ctx")
    mldsa.MLDSA87PublicKey.from_public_bytes(ml.pqc_public).verify(sig, b"forwarded", b"ctx")
    # the owner's errors come back as the same error classes
    with pytest.raises(ApplianceError) as info:
        follower.create_key("ml-dsa-87", "f-ml")
    with pytest.raises(type(info.value)):
        owner.create_key("ml-dsa-87", "f-ml")


def test_finalized_key_never_signs_classically_from_a_follower(
    pair: tuple[Appliance, Appliance],
) -> None:
    owner, follower = pair
    key = owner.create_key("ecdsa-p256", "f-fin")
    digest = hashlib.sha256(b"before").digest()
    assert _sign_classically(follower, key.key_id, digest)
    stale_end = follower.wal.committed_end
    owner.migrate(key, KeyState.HYBRID)
    assert follower.key(key.key_id).state is KeyState.HYBRID
    dual = follower.sign(follower.key(key.key_id), b"dual")  # forwarded: needs ML-DSA
    assert len(dual) > 4627
    owner.migrate(owner.key(key.key_id), KeyState.PQC_ONLY)
    assert follower.key(key.key_id).state is KeyState.PQC_ONLY
    with pytest.raises(StateError):
        _sign_classically(follower, key.key_id, digest)
    # a follower that had not seen the commit still cannot: the token object is gone
    stale = Appliance.open_follower(
        owner.cfg,
        pin=SecretBytes(PIN),
        committed_end=lambda: stale_end,
        writer=OwnerProxy([]),
    )
    try:
        assert stale.key(key.key_id).state is KeyState.CLASSICAL
        with pytest.raises(ApplianceError):
            stale.sign(stale.key(key.key_id), digest, kind="classical", prehashed=True)
    finally:
        stale.close()


def test_follower_refuses_what_only_the_owner_writes(pair: tuple[Appliance, Appliance]) -> None:
    owner, follower = pair
    key = owner.create_key("ecdsa-p256", "f-ro")
    with pytest.raises(ApplianceError):
        follower.migrate(follower.key(key.key_id), KeyState.HYBRID)
    assert owner.key(key.key_id).state is KeyState.CLASSICAL


def test_owner_gone_is_a_clear_error() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    proxy = OwnerProxy([ours])
    with pytest.raises(ApplianceError, match="owner process did not answer"):
        proxy.create_key("ecdsa-p256", "x")
    with pytest.raises(ApplianceError, match="owner process is not reachable"):
        proxy.create_key("ecdsa-p256", "x")  # its one socket is gone


def test_client_pin_failures_add_up_across_processes(tmp_path: Path) -> None:
    """Two processes failing logins at once: every failure counts, and the lockout
    comes at MAX_FAILURES (the store's read-modify-write holds an flock)."""
    clientpins.set_pin(tmp_path, SecretBytes(b"right-pin"), profile=clientpins.TEST_PROFILE)

    def fail(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(PinIncorrect, PinLocked):
                clientpins.verify(tmp_path, b"wrong-pin")

    pid = os.fork()
    if pid == 0:  # the second process: its own threading lock, the same store
        code = 0
        try:
            fail(3)
        except Exception:  # noqa: BLE001 - reported through the exit status
            code = 1
        os._exit(code)
    fail(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert clientpins.failures(tmp_path) == clientpins.MAX_FAILURES
    with pytest.raises(PinLocked):
        clientpins.verify(tmp_path, b"right-pin")


def test_owner_link_survives_bad_control_messages(
    pair: tuple[Appliance, Appliance], link: OwnerLink
) -> None:
    owner, follower = pair
    for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x03abc", b"\x00\x00\x00\x10short"):
        with link.pair() as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            assert s.recv(100) == b""  # the owner closes that connection
    proxy = OwnerProxy([link.pair()])
    try:
        with pytest.raises(ApplianceError, match="unknown control operation"):
            proxy._call({"op": "format-disk"})
        with pytest.raises(ApplianceError, match="bad control message"):
            proxy._call({"op": "sign", "key_id": "x"})
    finally:
        proxy.close()
    key = follower.create_key("ecdsa-p256", "after-junk")  # still serving
    assert owner.key(key.key_id).label == "after-junk"
