"""Real PKCS#11 clients against the p11-kit RPC front end (DESIGN §8).

``pkcs11-tool`` (OpenSC) and python-pkcs11 load Debian's ``p11-kit-client.so`` and reach
:class:`pkcs11_shim.server.Server` through ``P11_KIT_SERVER_ADDRESS``; the server runs in
a background thread of the test process over the ``appliance`` fixture.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from p11raw import ay as _ay
from p11raw import private_key_template
from p11raw import u32 as _u32
from p11raw import u64 as _u64

from appliance.errors import CKR
from appliance.keys import KeyInfo, KeyState
from appliance.secret import SecretBytes
from appliance.service import Appliance
from conftest import PIN, PKCS11_TOOL_LOGIN, pin_env, run_cli
from pkcs11_shim.launch import child_env, throwaway_init_args
from pkcs11_shim.model import SLOT_ID, Pkcs11Model
from pkcs11_shim.rpc import HANDSHAKE, Reader
from pkcs11_shim.server import Server

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(not Path(CLIENT_MODULE).is_file(), reason="p11-kit-client.so missing"),
    pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool missing"),
]


@dataclass
class Served:
    app: Appliance
    server: Server
    p256: KeyInfo
    p384: KeyInfo

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": self.server.address}

    def tool(
        self, *args: str, login: bool = False, pin: bytes = PIN
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = ["pkcs11-tool", "--module", CLIENT_MODULE]
        if login:
            cmd += PKCS11_TOOL_LOGIN
        env = {**self.env, **pin_env(pin)}
        return subprocess.run([*cmd, *args], env=env, capture_output=True, timeout=30, check=False)


@pytest.fixture
def served(appliance: Appliance) -> Iterator[Served]:
    p256 = appliance.create_key("ecdsa-p256", "p11-p256")
    p384 = appliance.create_key("ecdsa-p384", "p11-p384")
    model = Pkcs11Model(appliance, client_pin=SecretBytes(PIN))
    sockdir = Path(tempfile.mkdtemp(prefix="p11"))  # short: AF_UNIX paths max 107 bytes
    server = Server(model, sockdir / "p11.sock")
    server.start()
    try:
        yield Served(appliance, server, p256, p384)
    finally:
        server.close()
        model.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_info_slots_mechanisms(served: Served) -> None:
    r = served.tool("-I")
    assert r.returncode == 0, r.stderr
    assert b"pqhsm" in r.stdout
    r = served.tool("-L")
    assert r.returncode == 0, r.stderr
    label = served.app.token.info().label
    assert label.encode() in r.stdout
    r = served.tool("-M")
    assert r.returncode == 0, r.stderr
    assert b"ECDSA" in r.stdout


def test_objects_after_login(served: Served) -> None:
    r = served.tool("-O")
    assert r.returncode == 0, r.stderr
    assert b"Public Key Object" in r.stdout
    assert b"Private Key Object" not in r.stdout
    r = served.tool("-O", login=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count("Private Key Object; EC") == 2, out
    assert out.count("Public Key Object; EC") == 2, out
    for key in (served.p256, served.p384):
        assert key.cka_id is not None
        assert key.cka_id.hex() in out
        assert key.label in out


def _verify_raw(key: KeyInfo, digest: bytes, raw: bytes, algo: hashes.HashAlgorithm) -> None:
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    half = len(raw) // 2
    der = encode_dss_signature(int.from_bytes(raw[:half]), int.from_bytes(raw[half:]))
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    pub.verify(der, digest, ec.ECDSA(Prehashed(algo)))


@pytest.mark.parametrize("which", ["p256", "p384"])
def test_sign_ecdsa_with_pkcs11_tool(served: Served, tmp_path: Path, which: str) -> None:
    key: KeyInfo = getattr(served, which)
    assert key.cka_id is not None
    message = b"signed through p11-kit-client.so"
    digest = hashlib.sha256(message).digest()
    (tmp_path / "digest").write_bytes(digest)
    r = served.tool(
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
    raw = (tmp_path / "sig").read_bytes()
    assert len(raw) == (64 if which == "p256" else 96)
    _verify_raw(key, digest, raw, hashes.SHA256())


def test_wrong_pin_fails(served: Served) -> None:
    r = served.tool("-O", login=True, pin=b"not-the-pin")
    assert r.returncode != 0
    assert b"CKR_PIN_INCORRECT" in r.stdout + r.stderr


def test_two_clients_at_once(served: Served, tmp_path: Path) -> None:
    assert served.p256.cka_id is not None
    digest = hashlib.sha256(b"two at once").digest()
    (tmp_path / "digest").write_bytes(digest)
    procs = [
        subprocess.Popen(
            [
                "pkcs11-tool",
                "--module",
                CLIENT_MODULE,
                *PKCS11_TOOL_LOGIN,
                "--sign",
                "-m",
                "ECDSA",
                "--id",
                served.p256.cka_id.hex(),
                "--input-file",
                str(tmp_path / "digest"),
                "--output-file",
                str(tmp_path / f"sig{i}"),
            ],
            env={**served.env, **pin_env(PIN)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    for i in range(3):
        _verify_raw(served.p256, digest, (tmp_path / f"sig{i}").read_bytes(), hashes.SHA256())


def test_objects_follow_key_state(served: Served) -> None:
    app = served.app
    app.migrate(served.p256, KeyState.HYBRID)
    r = served.tool("-O", login=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().count("Private Key Object; EC") == 2  # HYBRID still signs ECDSA
    app.migrate(app.key(served.p256.key_id), KeyState.FINALIZING)
    app.migrate(app.key(served.p256.key_id), KeyState.PQC_ONLY)
    r = served.tool("-O", login=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count("Private Key Object; EC") == 1
    assert served.p256.label not in out


_PYTHON_PKCS11_CLIENT = """
import hashlib, os, sys
import pkcs11
from pkcs11 import Attribute as A, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PinIncorrect

lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
try:
    token.open(user_pin="wrong-pin")
    raise SystemExit("wrong PIN accepted")
except PinIncorrect:
    pass
digest = hashlib.sha256(b"python-pkcs11").digest()
with token.open(user_pin=os.environ["TEST_PIN"]) as session:
    for cka_id in sys.argv[3:]:
        priv = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, id=bytes.fromhex(cka_id)
        )
        assert priv[A.SENSITIVE] is True
        print(priv[A.LABEL], priv.sign(digest, mechanism=Mechanism.ECDSA).hex())
    assert len(session.generate_random(256)) == 32
"""


def test_python_pkcs11_through_client(served: Served) -> None:
    """python-pkcs11 (asks the size first, then signs) through p11-kit-client.so.

    It runs in a child process, as a real application does: the test process already holds
    SoftHSM2 through python-pkcs11 for the appliance, and the client's module state stays
    apart from it.
    """
    keys = [served.p256, served.p384]
    ids = [k.cka_id.hex() for k in keys if k.cka_id is not None]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PYTHON_PKCS11_CLIENT,
            CLIENT_MODULE,
            served.app.token.info().label,
            *ids,
        ],
        env={**served.env, "TEST_PIN": PIN.decode()},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split()
    digest = hashlib.sha256(b"python-pkcs11").digest()
    for key, (label, sig) in zip(keys, zip(lines[::2], lines[1::2], strict=True), strict=True):
        assert label == key.label
        _verify_raw(key, digest, bytes.fromhex(sig), hashes.SHA256())


# -- raw protocol: what library clients cannot easily provoke ---------------------------------

CKA_CLASS, CKA_ID, CKA_VALUE, CKA_SIGN = 0x000, 0x102, 0x011, 0x108
CKO_PRIVATE_KEY = 3
CKM_ECDSA = 0x1041


class RawClient:
    """A minimal p11-kit RPC client speaking the wire protocol directly."""

    def __init__(self, served: Served) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(served.server.path))
        self.sock.sendall(b"\x00")
        assert self.sock.recv(1) == b"\x00"
        self.code = 0

    def close(self) -> None:
        self.sock.close()

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def send_raw(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def call(self, call_id: int, sig: str, fields: bytes = b"") -> Reader:
        from pkcs11_shim.rpc import request_body

        self.code += 1
        body = request_body(call_id, sig, fields)
        self.sock.sendall(struct.pack(">III", self.code, 4, len(body)))
        self.sock.sendall(b"test")
        self.sock.sendall(body)
        code, olen, blen = struct.unpack(">III", self._recv(12))
        assert code == self.code
        assert olen == 0
        return Reader(self._recv(blen))

    def ok(self, call_id: int, sig: str, fields: bytes = b"") -> Reader:
        r = self.call(call_id, sig, fields)
        assert r.call_id == call_id, f"error reply CKR 0x{r.u():x}"
        return r

    def error(self, call_id: int, sig: str, fields: bytes = b"") -> int:
        r = self.call(call_id, sig, fields)
        assert (r.call_id, r.signature) == (0, "u")
        return r.u()

    def is_closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def start(self, *, login: bool) -> int:
        self.ok(1, "ayyay", _ay(HANDSHAKE) + b"\x00" + b"\x01" + _u32(0xFFFFFFFF))
        session = self.ok(10, "uu", _u64(SLOT_ID) + _u64(0x4)).u()
        if login:
            self.ok(18, "uuay", _u64(session) + _u64(1) + _ay(PIN))
        return session

    def find(self, session: int, template: bytes, count: int) -> list[int]:
        self.ok(26, "uaA", _u64(session) + _u32(count) + template)
        found = self.ok(27, "ufu", _u64(session) + _u32(16)).au()
        self.ok(28, "u", _u64(session))
        assert found is not None
        return list(found)


def _private_template(key: KeyInfo) -> bytes:
    assert key.cka_id is not None
    return private_key_template(key.cka_id)


@pytest.fixture
def raw(served: Served) -> Iterator[RawClient]:
    c = RawClient(served)
    yield c
    c.close()


def test_raw_private_objects_need_login(served: Served, raw: RawClient) -> None:
    s = raw.start(login=False)
    assert raw.find(s, _private_template(served.p256), 2) == []
    raw.ok(18, "uuay", _u64(s) + _u64(1) + _ay(PIN))
    assert len(raw.find(s, _private_template(served.p256), 2)) == 1


def test_raw_sign_size_query_and_operation_state(served: Served, raw: RawClient) -> None:
    s = raw.start(login=True)
    [key] = raw.find(s, _private_template(served.p256), 2)
    assert raw.error(43, "uayfy", _u64(s) + _ay(b"x" * 32) + _u32(64)) == 0x091  # not init
    raw.ok(42, "uMu", _u64(s) + _u32(CKM_ECDSA) + _u32(0xFFFFFFFF) + _u64(key))
    mech = _u32(CKM_ECDSA) + _u32(0xFFFFFFFF)
    assert raw.error(42, "uMu", _u64(s) + mech + _u64(key)) == CKR.OPERATION_ACTIVE
    digest = hashlib.sha256(b"raw").digest()
    r = raw.ok(43, "uayfy", _u64(s) + _ay(digest) + _u32(0))  # size query
    assert r.y() == 0
    assert struct.unpack(">I", r._take(4))[0] == 64
    r = raw.ok(43, "uayfy", _u64(s) + _ay(digest) + _u32(10))  # too small: still active
    assert r.y() == 0
    r = raw.ok(43, "uayfy", _u64(s) + _ay(digest) + _u32(64))
    sig = r.ay()
    assert sig is not None
    _verify_raw(served.p256, digest, sig, hashes.SHA256())
    assert raw.error(43, "uayfy", _u64(s) + _ay(digest) + _u32(64)) == CKR.OPERATION_NOT_INITIALIZED


def test_raw_sensitive_and_unknown_attributes(served: Served, raw: RawClient) -> None:
    s = raw.start(login=True)
    [key] = raw.find(s, _private_template(served.p384), 2)
    tmpl = _u32(3) + _u32(CKA_SIGN) + _u32(1) + _u32(CKA_VALUE) + _u32(0) + _u32(0x7777) + _u32(0)
    r = raw.ok(24, "uufA", _u64(s) + _u64(key) + tmpl)
    attrs = r.aa()
    assert attrs[0].value is True
    assert attrs[1].value is None
    assert attrs[2].value is None
    assert r.u() == CKR.ATTRIBUTE_SENSITIVE
    r = raw.ok(24, "uufA", _u64(s) + _u64(key) + _u32(1) + _u32(CKA_ID) + _u32(1))
    assert r.aa()[0].value is None
    assert r.u() == CKR.BUFFER_TOO_SMALL


def test_raw_unknown_call_and_malformed_message(served: Served, raw: RawClient) -> None:
    raw.start(login=False)
    assert raw.error(20, "uaA", _u64(1) + _u32(0)) == CKR.FUNCTION_NOT_SUPPORTED  # CreateObject
    raw.ok(3, "")  # the connection is still good
    raw.send_raw(struct.pack(">III", 99, 0, 12) + _u32(5) + _u32(1) + b"q" + b"\x00\x00\x00")
    assert raw.is_closed()
    other = RawClient(served)  # everyone else is still served
    try:
        other.start(login=False)
        other.send_raw(struct.pack(">III", 1, 0, 0xFFFFFFF0))
        assert other.is_closed()
    finally:
        other.close()
    third = RawClient(served)
    try:
        third.start(login=True)
        third.ok(64, "ufy", _u64(1) + _u32(16))
    finally:
        third.close()


def test_raw_handles_invalid_after_migration(served: Served, raw: RawClient) -> None:
    s = raw.start(login=True)
    [key] = raw.find(s, _private_template(served.p256), 2)
    app = served.app
    app.migrate(served.p256, KeyState.HYBRID)
    mech = _u32(CKM_ECDSA) + _u32(0xFFFFFFFF)
    raw.ok(42, "uMu", _u64(s) + mech + _u64(key))  # HYBRID still signs ECDSA
    digest = hashlib.sha256(b"hybrid").digest()
    sig = raw.ok(43, "uayfy", _u64(s) + _ay(digest) + _u32(64)).ay()
    assert sig is not None
    _verify_raw(served.p256, digest, sig, hashes.SHA256())
    app.migrate(app.key(served.p256.key_id), KeyState.FINALIZING)
    app.migrate(app.key(served.p256.key_id), KeyState.PQC_ONLY)
    mech = _u32(CKM_ECDSA) + _u32(0xFFFFFFFF)
    assert raw.error(42, "uMu", _u64(s) + mech + _u64(key)) == CKR.KEY_HANDLE_INVALID
    assert raw.error(24, "uufA", _u64(s) + _u64(key) + _u32(1) + _u32(CKA_ID) + _u32(0)) == (
        CKR.OBJECT_HANDLE_INVALID
    )
    [other] = raw.find(s, _private_template(served.p384), 2)
    assert other != key


@pytest.mark.parametrize(
    "entry",
    [
        [sys.executable, "-m", "pkcs11_shim", "serve", "--home", "{home}"],
        [sys.executable, "-m", "appliance", "--home", "{home}", "serve"],
    ],
    ids=["python-m-pkcs11_shim", "pqhsm-serve"],
)
def test_serve_entry_point(tmp_path: Path, entry: list[str]) -> None:
    """``pqhsm serve`` and ``python -m pkcs11_shim serve`` read the PIN like ``pqhsm`` and
    stop on SIGTERM."""
    home = tmp_path / "pqhsm"
    init = run_cli(
        *throwaway_init_args(tmp_path / "secrets"),
        home=home,
    )
    assert init.returncode == 0, init.stderr.decode()
    made = run_cli("key", "create", "--type", "ecdsa-p256", "--label", "served", home=home)
    assert made.returncode == 0, made.stderr.decode()
    pin_files = [
        p for p in (tmp_path / "secrets").iterdir() if "pin" in p.name and "so" not in p.name
    ]
    assert len(pin_files) == 1, pin_files
    pin = pin_files[0].read_bytes().strip()
    sockdir = Path(tempfile.mkdtemp(prefix="p11"))
    sock = sockdir / "s"
    env = child_env()
    proc = subprocess.Popen(
        [*(a.replace("{home}", str(home)) for a in entry), "--socket", str(sock)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line == f"P11_KIT_SERVER_ADDRESS=unix:path={sock}", proc.stderr
        assert sock.stat().st_mode & 0o777 == 0o600
        r = subprocess.run(
            ["pkcs11-tool", "--module", CLIENT_MODULE, *PKCS11_TOOL_LOGIN, "-O"],
            env={**env, **pin_env(pin), "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert b"served" in r.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_random_frames_never_stop_the_server(served: Served) -> None:
    """Garbage frames get an error reply or a closed connection; others keep working."""
    rng = random.Random(1234)  # noqa: S311 - reproducible test input, not crypto
    for _ in range(40):
        c = RawClient(served)
        try:
            if rng.random() < 0.5:
                c.start(login=False)
            body = rng.randbytes(rng.randrange(0, 64))
            if rng.random() < 0.5 and len(body) >= 8:
                call_id = rng.choice([1, 3, 4, 18, 24, 26, 42, 43, 64, 999])
                sig = rng.choice(["ayyay", "uufA", "uaA", "uMu", "uayfy", "u"]).encode()
                body = _u32(call_id) + _u32(len(sig)) + sig + body
            c.send_raw(struct.pack(">III", 7, 0, len(body)) + body)
            c.sock.settimeout(2)
            try:
                data = c.sock.recv(12)
            except OSError:
                data = b""
            if data:
                assert len(data) >= 4
                assert struct.unpack(">I", data[:4])[0] == 7
        finally:
            c.close()
    good = RawClient(served)
    try:
        s = good.start(login=True)
        assert len(good.find(s, _private_template(served.p384), 2)) == 1
    finally:
        good.close()
