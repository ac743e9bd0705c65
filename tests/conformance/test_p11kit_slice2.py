"""Slice 2 of the PKCS#11 front end (DESIGN §8): client PINs with lockout, digests,
verification, key-pair generation, refused destruction, OpenSSL as a client, and the
per-connection limits (idle timeout, message size).

Like ``test_p11kit``, real clients load Debian's ``p11-kit-client.so`` and reach a
:class:`~pkcs11_shim.server.Server` running in a thread of the test process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from p11raw import ay as _ay
from p11raw import u32 as _u32
from p11raw import u64 as _u64
from test_p11kit import (
    CLIENT_MODULE,
    RawClient,
    Served,
    _private_template,
    _verify_raw,
)

from appliance import clientpins
from appliance.errors import CallerError, DeviceError, PinIncorrect, PinLocked
from appliance.keys import KeyInfo
from appliance.secret import SecretBytes
from appliance.service import Appliance
from conftest import PIN, pin_source, pkcs11_server
from pkcs11_shim.server import Server

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(not Path(CLIENT_MODULE).is_file(), reason="p11-kit-client.so missing"),
    pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool missing"),
]

CLIENT_PIN = b"client-pin-4321"
ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
CKR_PIN_INCORRECT, CKR_PIN_LOCKED = 0x0A0, 0x0A4
NULL = 0xFFFFFFFF


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="p11"))  # short: AF_UNIX paths max 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served2(appliance: Appliance, sockdir: Path) -> Iterator[Served]:
    """Two ECDSA keys, no client PIN store (the interim token-PIN fallback)."""
    p256 = appliance.create_key("ecdsa-p256", "s2-p256")
    p384 = appliance.create_key("ecdsa-p384", "s2-p384")
    with pkcs11_server(appliance, sockdir) as server:
        yield Served(appliance, server, p256, p384)


@pytest.fixture
def pinned(appliance: Appliance, sockdir: Path) -> Iterator[Served]:
    """The appliance with its own client PIN store (cheap Argon2id), no fallback PIN."""
    p256 = appliance.create_key("ecdsa-p256", "pin-p256")
    p384 = appliance.create_key("ecdsa-p384", "pin-p384")
    clientpins.set_pin(appliance.cfg.home, SecretBytes(CLIENT_PIN), profile=clientpins.TEST_PROFILE)
    with pkcs11_server(appliance, sockdir, client_pin=None) as server:
        yield Served(appliance, server, p256, p384)


def _by_label(app: Appliance, label: str) -> KeyInfo:
    (key,) = [k for k in app.keys() if k.label == label]
    return key


# -- 1. client PINs -----------------------------------------------------------------------


def test_pin_store_counts_locks_and_resets(tmp_path: Path) -> None:
    home = tmp_path
    assert not clientpins.exists(home)
    with pytest.raises(CallerError):
        clientpins.set_pin(home, SecretBytes(b"123"), profile=clientpins.TEST_PROFILE)
    with pytest.raises(TypeError):
        clientpins.set_pin(home, CLIENT_PIN, profile=clientpins.TEST_PROFILE)  # type: ignore[arg-type]
    clientpins.set_pin(home, SecretBytes(CLIENT_PIN), profile=clientpins.TEST_PROFILE)
    store = home / clientpins.STORE_FILE
    with pytest.raises(TypeError):
        clientpins.verify(home, "pin")  # type: ignore[arg-type]
    assert clientpins.failures(home) == 0  # a bad type is not an attempt
    assert store.stat().st_mode & 0o777 == 0o600
    assert CLIENT_PIN not in store.read_bytes()
    assert b"$argon2id$" in store.read_bytes()
    with pytest.raises(PinIncorrect):
        clientpins.verify(home, b"wrong")
    assert clientpins.failures(home) == 1
    clientpins.verify(home, bytearray(CLIENT_PIN))  # success resets the counter
    assert clientpins.failures(home) == 0
    for _ in range(clientpins.MAX_FAILURES):
        with pytest.raises(PinIncorrect):
            clientpins.verify(home, memoryview(b"wrong"))
    with pytest.raises(PinLocked):
        clientpins.verify(home, CLIENT_PIN)  # the right PIN no longer helps
    assert clientpins.failures(home) == clientpins.MAX_FAILURES  # read back from the file
    clientpins.set_pin(home, SecretBytes(CLIENT_PIN), profile=clientpins.TEST_PROFILE)
    clientpins.verify(home, CLIENT_PIN)
    store.write_bytes(b"not cbor")  # a damaged store is the device's problem
    with pytest.raises(DeviceError):
        clientpins.verify(home, CLIENT_PIN)


def test_pin_attempt_counted_before_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed during the Argon2id check has already counted the attempt."""
    clientpins.set_pin(tmp_path, SecretBytes(CLIENT_PIN), profile=clientpins.TEST_PROFILE)

    def killed(*_: object) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr("appliance.argon2id.matches", killed)
    with pytest.raises(KeyboardInterrupt):
        clientpins.verify(tmp_path, CLIENT_PIN)
    assert clientpins.failures(tmp_path) == 1


def test_client_pin_replaces_token_pin(pinned: Served) -> None:
    r = pinned.tool("-O", login=True, pin=PIN)  # the token PIN is not a client PIN
    assert r.returncode != 0
    assert b"CKR_PIN_INCORRECT" in r.stdout + r.stderr
    r = pinned.tool("-O", login=True, pin=CLIENT_PIN)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().count("Private Key Object; EC") == 2


def test_lockout_survives_restart_and_set_pin_clears_it(
    pinned: Served, sockdir: Path, tmp_path: Path
) -> None:
    for _ in range(clientpins.MAX_FAILURES):
        r = pinned.tool("-O", login=True, pin=b"wrong-pin")
        assert b"CKR_PIN_INCORRECT" in r.stdout + r.stderr
    r = pinned.tool("-O", login=True, pin=CLIENT_PIN)
    assert r.returncode != 0
    assert b"CKR_PIN_LOCKED" in r.stdout + r.stderr
    r = pinned.tool("-T")
    assert b"user PIN locked" in r.stdout, r.stdout  # CKF_USER_PIN_LOCKED
    pinned.server.close()
    with pkcs11_server(pinned.app, sockdir, client_pin=None) as server:  # a restarted server
        again = Served(pinned.app, server, pinned.p256, pinned.p384)
        r = again.tool("-O", login=True, pin=CLIENT_PIN)
        assert b"CKR_PIN_LOCKED" in r.stdout + r.stderr
        pin_file = tmp_path / "client-pin"
        pin_file.write_bytes(CLIENT_PIN + b"\n")
        pin_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PQHSM_")}
        cmd = [sys.executable, "-m", "pkcs11_shim", "set-pin", "--home"]
        cmd += [str(pinned.app.cfg.home), "--pin-file", str(pin_file), "--kdf-profile", "test"]
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert CLIENT_PIN not in done.stdout + done.stderr
        r = again.tool("-O", login=True, pin=CLIENT_PIN)
        assert r.returncode == 0, r.stderr


def test_set_pin_refuses_a_pin_in_argv(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pkcs11_shim", "set-pin", "--home", str(tmp_path)]
    r = subprocess.run([*cmd, "--pin", "1234"], capture_output=True, timeout=60, check=False)
    assert r.returncode == 2
    assert b"error:" in r.stderr
    assert not clientpins.exists(tmp_path)


def test_raw_login_lockout(pinned: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = RawClient(pinned)
    try:
        s = c.start(login=False)
        login = 18
        for _ in range(clientpins.MAX_FAILURES):
            fields = _u64(s) + _u64(1) + _ay(b"nope")
            assert c.error(login, "uuay", fields) == CKR_PIN_INCORRECT
        fields = _u64(s) + _u64(1) + _ay(CLIENT_PIN)
        assert c.error(login, "uuay", fields) == CKR_PIN_LOCKED
    finally:
        c.close()
    text = caplog.text.encode()
    assert b"PinLocked" in text
    assert CLIENT_PIN not in text
    assert b"nope" not in text


def test_fallback_warns_once(served2: Served, caplog: pytest.LogCaptureFixture) -> None:
    """Without a PIN store the token PIN is the client PIN, and the log says so once."""
    for pin in (b"wrong", PIN, PIN):
        served2.tool("-O", login=True, pin=pin)
    warnings = [r for r in caplog.records if "no client PIN store" in r.getMessage()]
    assert len(warnings) == 1
    assert PIN not in caplog.text.encode()


# -- 2. digests, verification, generation, destruction ------------------------------------


def test_mechanism_list(served2: Served) -> None:
    r = served2.tool("-M")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for name in ("SHA256, digest", "SHA384, digest", "SHA512, digest"):
        assert name in out
    assert "ECDSA-KEY-PAIR-GEN" in out
    assert "generate_key_pair" in out
    assert "sign, verify" in out


@pytest.mark.parametrize("mech", ["SHA256", "SHA384", "SHA512"])
def test_hash_with_pkcs11_tool(served2: Served, tmp_path: Path, mech: str) -> None:
    data = os.urandom(3000)
    (tmp_path / "in").write_bytes(data)
    r = served2.tool("--hash", "-m", mech, "--input-file", str(tmp_path / "in"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == hashlib.new(mech.lower(), data).digest()


def test_pkcs11_tool_self_test(served2: Served) -> None:
    r = served2.tool("--test", login=True)
    assert r.returncode == 0, r.stderr
    assert b"No errors" in r.stdout, r.stdout


@pytest.mark.parametrize("which", ["p256", "p384"])
def test_verify_with_pkcs11_tool(served2: Served, tmp_path: Path, which: str) -> None:
    key: KeyInfo = getattr(served2, which)
    digest = hashlib.sha256(b"verify me").digest()
    (tmp_path / "digest").write_bytes(digest)
    common = ["-m", "ECDSA", "--label", key.label, "--input-file", str(tmp_path / "digest")]
    r = served2.tool("--sign", *common, "--output-file", str(tmp_path / "sig"), login=True)
    assert r.returncode == 0, r.stderr
    r = served2.tool("--verify", *common, "--signature-file", str(tmp_path / "sig"), login=True)
    assert r.returncode == 0, r.stderr
    assert b"Signature is valid" in r.stdout
    bad = bytearray((tmp_path / "sig").read_bytes())
    bad[5] ^= 1
    (tmp_path / "bad").write_bytes(bytes(bad))
    r = served2.tool("--verify", *common, "--signature-file", str(tmp_path / "bad"), login=True)
    assert b"Invalid signature" in r.stdout  # C_Verify: CKR_SIGNATURE_INVALID (exit code 0)
    assert b"Signature is valid" not in r.stdout


@pytest.mark.parametrize(
    ("curve", "alg"), [("prime256v1", "ecdsa-p256"), ("secp384r1", "ecdsa-p384")]
)
def test_keypairgen_with_pkcs11_tool(served2: Served, tmp_path: Path, curve: str, alg: str) -> None:
    label = f"gen-{curve}"
    r = served2.tool(
        "--keypairgen", "--key-type", f"EC:{curve}", "--label", label, "--usage-sign", login=True
    )
    assert r.returncode == 0, r.stderr
    key = _by_label(served2.app, label)
    assert key.classical_alg == alg
    assert key.origin == "generated"
    assert key.cka_id is not None
    assert key.cka_id.hex() in r.stdout.decode()
    digest = hashlib.sha384(b"fresh key").digest()
    (tmp_path / "digest").write_bytes(digest)
    r = served2.tool(
        "--sign",
        "-m",
        "ECDSA",
        "--id",
        key.cka_id.hex(),
        "--input-file",
        str(tmp_path / "digest"),
        "--output-file",
        str(tmp_path / "sig"),
        login=True,
    )
    assert r.returncode == 0, r.stderr
    _verify_raw(key, digest, (tmp_path / "sig").read_bytes(), hashes.SHA384())


def test_keypairgen_asking_for_derive_is_refused(served2: Served) -> None:
    """pkcs11-tool's default EC template sets CKA_DERIVE; appliance keys cannot derive."""
    before = len(served2.app.keys())
    r = served2.tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", "x", login=True)
    assert r.returncode != 0
    assert b"CKR_TEMPLATE_INCONSISTENT" in r.stderr
    assert len(served2.app.keys()) == before


def test_destroy_is_prohibited(served2: Served) -> None:
    r = served2.tool(
        "--delete-object", "--type", "privkey", "--label", served2.p256.label, login=True
    )
    assert r.returncode != 0
    assert b"0x1b" in r.stderr  # CKR_ACTION_PROHIBITED (name unknown to this OpenSC)
    assert served2.app.key(served2.p256.key_id).label == served2.p256.label


_PYTHON_PKCS11_SLICE2 = """
import hashlib, os, sys
import pkcs11
from pkcs11 import Attribute as A, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import encode_named_curve_parameters

lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
with token.open(user_pin=os.environ["TEST_PIN"], rw=True) as session:
    data = os.urandom(5000)
    assert session.digest(data, mechanism=Mechanism.SHA256) == hashlib.sha256(data).digest()
    assert session.digest(data, mechanism=Mechanism.SHA512) == hashlib.sha512(data).digest()
    parts = [data[:100], data[100:]]  # DigestUpdate + DigestFinal
    assert session.digest(parts, mechanism=Mechanism.SHA384) == hashlib.sha384(data).digest()
    params = session.create_domain_parameters(
        KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters("secp384r1")}, local=True
    )
    pub, priv = params.generate_keypair(
        store=True, label="py-gen", capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY
    )
    assert priv[A.SENSITIVE] is True and priv[A.EXTRACTABLE] is False
    digest = hashlib.sha384(b"python-pkcs11 slice 2").digest()
    sig = priv.sign(digest, mechanism=Mechanism.ECDSA)
    assert pub.verify(digest, sig, mechanism=Mechanism.ECDSA)
    assert not pub.verify(digest, bytes([sig[0] ^ 1]) + sig[1:], mechanism=Mechanism.ECDSA)
    assert not pub.verify(digest, sig[:-1], mechanism=Mechanism.ECDSA)  # LEN_RANGE -> False
    try:
        priv.destroy()
        raise SystemExit("destroyed")
    except PKCS11Error as exc:  # python-pkcs11 has no class for CKR_ACTION_PROHIBITED
        assert "0x1b" in str(exc), exc
    print(priv[A.ID].hex(), sig.hex(), digest.hex())
"""


def test_python_pkcs11_generate_digest_verify(served2: Served) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PYTHON_PKCS11_SLICE2,
            CLIENT_MODULE,
            served2.app.token.info().label,
        ],
        env={**served2.env, "TEST_PIN": PIN.decode()},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    cka_id, sig, digest = proc.stdout.decode().split()
    key = _by_label(served2.app, "py-gen")
    assert key.classical_alg == "ecdsa-p384"
    assert key.cka_id == bytes.fromhex(cka_id)
    _verify_raw(key, bytes.fromhex(digest), bytes.fromhex(sig), hashes.SHA384())


def test_raw_digest_size_query_and_generation_errors(served2: Served) -> None:
    c = RawClient(served2)
    try:
        s = c.start(login=False)
        digest_init, digest, gen = 37, 38, 59
        c.ok(digest_init, "uM", _u64(s) + _u32(0x250) + _u32(NULL))
        assert c.error(digest_init, "uM", _u64(s) + _u32(0x250) + _u32(NULL)) == 0x090  # ACTIVE
        r = c.ok(digest, "uayfy", _u64(s) + _ay(b"abc") + _u32(0))  # size query
        assert r.ay() is None
        r = c.ok(digest, "uayfy", _u64(s) + _ay(b"abc") + _u32(32))
        assert r.ay() == hashlib.sha256(b"abc").digest()
        assert c.error(digest, "uayfy", _u64(s) + _ay(b"abc") + _u32(32)) == 0x091
        assert c.error(digest_init, "uM", _u64(s) + _u32(0x220) + _u32(NULL)) == 0x070  # SHA1

        p256 = bytes.fromhex("06082a8648ce3d030107")
        ec_params = _u32(0x180) + b"\x01" + _u32(len(p256)) + _u32(len(p256)) + p256
        mech = _u32(0x1040) + _u32(NULL)
        tpl = _u32(1) + ec_params
        empty = _u32(0)
        assert c.error(gen, "uMaAaA", _u64(s) + mech + tpl + empty) == 0x101  # not logged in
        c.ok(18, "uuay", _u64(s) + _u64(1) + _ay(PIN))
        assert c.error(gen, "uMaAaA", _u64(s) + mech + tpl + empty) == 0x0B5  # read-only
        rw = c.ok(10, "uu", _u64(1) + _u64(0x6)).u()
        bad_curve = _u32(0x180) + b"\x01" + _u32(7) + _u32(7) + bytes.fromhex("06052b8104000a")
        assert c.error(gen, "uMaAaA", _u64(rw) + mech + _u32(1) + bad_curve + empty) == 0x140
        cka_id = _u32(0x102) + b"\x01" + _u32(2) + _u32(2) + b"id"
        assert c.error(gen, "uMaAaA", _u64(rw) + mech + tpl + _u32(1) + cka_id) == 0x010
        r = c.ok(gen, "uMaAaA", _u64(rw) + mech + tpl + empty)
        pub_h, priv_h = r.u(), r.u()
        assert pub_h != priv_h
        verify_init, verify, sign_init, sign = 48, 49, 42, 43
        ecdsa = _u32(0x1041) + _u32(NULL)
        assert c.error(verify_init, "uMu", _u64(rw) + ecdsa + _u64(priv_h)) == 0x068
        c.ok(sign_init, "uMu", _u64(rw) + ecdsa + _u64(priv_h))
        digest32 = hashlib.sha256(b"raw").digest()
        sig = c.ok(sign, "uayfy", _u64(rw) + _ay(digest32) + _u32(64)).ay()
        assert sig is not None
        assert len(sig) == 64
        c.ok(verify_init, "uMu", _u64(rw) + ecdsa + _u64(pub_h))
        c.ok(verify, "uayay", _u64(rw) + _ay(digest32) + _ay(sig))
        c.ok(verify_init, "uMu", _u64(rw) + ecdsa + _u64(pub_h))
        bad = _ay(bytes([sig[0] ^ 1]) + sig[1:])
        assert c.error(verify, "uayay", _u64(rw) + _ay(digest32) + bad) == 0x0C0
        c.ok(verify_init, "uMu", _u64(rw) + ecdsa + _u64(pub_h))
        assert c.error(verify, "uayay", _u64(rw) + _ay(digest32) + _ay(sig[:-1])) == 0x0C1
        assert c.error(verify, "uayay", _u64(rw) + _ay(digest32) + _ay(sig)) == 0x091  # ended
        assert c.error(22, "uu", _u64(rw) + _u64(priv_h)) == 0x01B  # DestroyObject
        assert c.error(22, "uu", _u64(rw) + _u64(999)) == 0x082
        assert len(c.find(rw, _private_template(served2.p256), 2)) == 1
    finally:
        c.close()
    generated = [k for k in served2.app.keys() if k.label.startswith("p11-")]
    assert len(generated) == 1
    assert generated[0].classical_alg == "ecdsa-p256"


# -- 3. OpenSSL through the libp11 engine -------------------------------------------------


@pytest.mark.skipif(not ENGINE.is_file(), reason=f"libp11 engine missing: {ENGINE}")
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_openssl_engine_signs(served2: Served, tmp_path: Path) -> None:
    conf = tmp_path / "openssl.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nengines = engine_section\n"
        "[engine_section]\npkcs11 = pkcs11_section\n"
        f"[pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {ENGINE}\n"
        f"MODULE_PATH = {CLIENT_MODULE}\ninit = 0\n"
    )
    env = {**served2.env, "OPENSSL_CONF": str(conf)}
    key = served2.p256
    uri = f"pkcs11:object={key.label};type=private;{pin_source(tmp_path, PIN)}"
    message = b"signed by openssl through the engine"
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "digest").write_bytes(hashlib.sha256(message).digest())
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    (tmp_path / "pub.pem").write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    base = ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-sign"]
    r = subprocess.run(
        [*base, "-inkey", uri, "-in", str(tmp_path / "digest"), "-out", str(tmp_path / "sig")],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    der = (tmp_path / "sig").read_bytes()
    pub.verify(der, hashlib.sha256(message).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    dgst = ["openssl", "dgst", "-engine", "pkcs11", "-keyform", "engine", "-sha256"]
    r = subprocess.run(
        [*dgst, "-sign", uri, "-out", str(tmp_path / "sig2"), str(tmp_path / "msg")],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    pub.verify((tmp_path / "sig2").read_bytes(), message, ec.ECDSA(hashes.SHA256()))
    check = ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem")]
    r = subprocess.run(  # and openssl itself agrees, against the exported public key
        [*check, "-signature", str(tmp_path / "sig2"), str(tmp_path / "msg")],
        env={k: v for k, v in env.items() if k != "OPENSSL_CONF"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert b"Verified OK" in r.stdout


# -- 4. per-connection limits --------------------------------------------------------------


@dataclass
class _Limited:
    app: Appliance
    server: Server
    p384: KeyInfo


@pytest.fixture
def limited(appliance: Appliance, sockdir: Path) -> Iterator[_Limited]:
    p384 = appliance.create_key("ecdsa-p384", "lim-p384")
    with pkcs11_server(appliance, sockdir, idle_timeout=0.5, max_message=4096) as server:
        yield _Limited(appliance, server, p384)


def test_idle_connection_is_closed(limited: _Limited) -> None:
    idle = RawClient(limited)  # type: ignore[arg-type]
    busy = RawClient(limited)  # type: ignore[arg-type]
    try:
        idle.start(login=False)
        s = busy.start(login=True)
        for _ in range(4):  # keeps talking: never idle for 0.5 s
            time.sleep(0.2)
            assert len(busy.find(s, _private_template(limited.p384), 2)) == 1
        idle.sock.settimeout(5)
        assert idle.is_closed()
        time.sleep(0.8)
        assert busy.is_closed()
    finally:
        idle.close()
        busy.close()
    late = RawClient(limited)  # type: ignore[arg-type]
    try:
        late.start(login=True)
    finally:
        late.close()


def test_oversized_message_closes_only_that_connection(limited: _Limited) -> None:
    big = RawClient(limited)  # type: ignore[arg-type]
    good = RawClient(limited)  # type: ignore[arg-type]
    try:
        s = good.start(login=True)
        big.start(login=False)
        body = _u32(64) + _u32(3) + b"ufy" + b"\x00" * 5000  # over the 4096-byte limit
        big.send_raw(struct.pack(">III", 9, 0, len(body)))
        big.sock.settimeout(5)
        assert big.is_closed()
        # A message just under the limit is still served.
        r = good.ok(64, "ufy", _u64(s) + _u32(3000))
        assert len(r.ay() or b"") == 3000
    finally:
        big.close()
        good.close()
