"""The project's own PKCS#11 module, libpqhsm-pkcs11.so (pkcs11_shim/c), against the server.

The module is compiled once per session into a temporary directory; real ``pkcs11-tool``
runs load it and reach :class:`pkcs11_shim.server.Server` (a background thread of this
process, over an appliance with an ecdsa-p256 key) through ``PQHSM_SERVER_ADDRESS``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from modkit import (
    SOURCE_DIR,
    VALGRIND,
    Build,
    asan_build,
    definitely_lost,
    make_module,
    module_env,
    serving,
    short_socket_dir,
)

from appliance.keys import KeyInfo
from appliance.secret import SecretBytes
from appliance.service import Appliance
from conftest import PIN, PKCS11_TOOL_LOGIN, pin_env
from pkcs11_shim.model import Pkcs11Model
from pkcs11_shim.server import Server

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool missing"),
]


@pytest.fixture(scope="session")
def module_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build libpqhsm-pkcs11.so with the project's Makefile into a temporary directory."""
    so = make_module(tmp_path_factory.mktemp("module")) / "libpqhsm-pkcs11.so"
    assert so.is_file()
    return so


Flavour = Build  # a build of the module and the environment its client process needs


@pytest.fixture(scope="session")
def asan_flavour(module_path: Path) -> Flavour:
    """The ``asan`` target (ASan + UBSan), preloading the runtime into pkcs11-tool."""
    asan = asan_build(module_path.parent)
    if asan is None:
        pytest.skip("libasan is not installed")
    return asan


@pytest.fixture(params=["plain", "asan"])
def flavour(request: pytest.FixtureRequest, module_path: Path) -> Flavour:
    if request.param == "asan":
        asan: Flavour = request.getfixturevalue("asan_flavour")
        return asan
    return Flavour(module_path, {})


@dataclass
class Served:
    app: Appliance
    server: Server
    key: KeyInfo
    module: Path

    @property
    def env(self) -> dict[str, str]:
        return module_env(self.server.address)

    def tool(
        self, *args: str, login: bool = False, pin: bytes = PIN, wrap: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[bytes]:
        return run_tool(self.module, self.env, *args, login=login, pin=pin, wrap=wrap)


def run_tool(
    module: Path,
    env: dict[str, str],
    *args: str,
    login: bool = False,
    pin: bytes = PIN,
    wrap: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    cmd = [*wrap, "pkcs11-tool", "--module", str(module)]
    if login:
        cmd += PKCS11_TOOL_LOGIN
    env = {**env, **pin_env(pin)}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def served(
    module_path: Path, softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("own") / "pqhsm"
    with serving(home, lambda app: app.create_key("ecdsa-p256", "own-p256")) as (app, srv, key):
        yield Served(app, srv, key, module_path)


def _verify_raw(key: KeyInfo, digest: bytes, raw: bytes) -> None:
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def _sign_args(key: KeyInfo, tmp: Path) -> tuple[str, ...]:
    assert key.cka_id is not None
    return (
        "--sign",
        "-m",
        "ECDSA",
        "--id",
        key.cka_id.hex(),
        "--input-file",
        str(tmp / "digest"),
        "--output-file",
        str(tmp / "sig"),
    )


def test_module_exports_only_pkcs11_symbols(module_path: Path) -> None:
    if shutil.which("nm") is None:
        pytest.skip("nm missing")
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(module_path)], capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert "C_GetFunctionList" in names
    assert all(n.startswith("C_") for n in names), names
    assert len(names) == 70  # the 68 v2.40 functions, C_GetInterfaceList, C_GetInterface


def test_info_slots_mechanisms(served: Served) -> None:
    r = served.tool("-I")
    assert r.returncode == 0, r.stderr
    assert b"pqhsm" in r.stdout
    assert b"Cryptoki version 3.0" in r.stdout  # OpenSC 0.23 asks C_GetInterface first
    r = served.tool("-L")
    assert r.returncode == 0, r.stderr
    assert served.app.token.info().label.encode() in r.stdout
    r = served.tool("-M")
    assert r.returncode == 0, r.stderr
    assert b"ECDSA" in r.stdout


def test_objects_after_login(served: Served) -> None:
    r = served.tool("-O")
    assert r.returncode == 0, r.stderr
    assert b"Public Key Object; EC" in r.stdout
    assert b"Private Key Object" not in r.stdout
    r = served.tool("-O", login=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count("Private Key Object; EC") == 1, out
    assert served.key.cka_id is not None
    assert served.key.cka_id.hex() in out
    assert served.key.label in out


def test_sign_ecdsa_verifies(served: Served, tmp_path: Path, flavour: Flavour) -> None:
    digest = hashlib.sha256(b"signed through libpqhsm-pkcs11.so").digest()
    (tmp_path / "digest").write_bytes(digest)
    env = {**served.env, **flavour.env}
    r = run_tool(flavour.module, env, *_sign_args(served.key, tmp_path), login=True)
    flavour.check(r)
    assert r.returncode == 0, r.stderr
    _verify_raw(served.key, digest, (tmp_path / "sig").read_bytes())


def test_generate_random(served: Served, tmp_path: Path) -> None:
    r = served.tool("--generate-random", "40000", "--output-file", str(tmp_path / "rnd"))
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "rnd").read_bytes()
    assert len(data) == 40000  # three chunks on the wire
    assert len(set(data)) > 200


def test_wrong_pin_fails(served: Served) -> None:
    r = served.tool("-O", login=True, pin=b"not-the-pin")
    assert r.returncode > 0
    assert b"CKR_PIN_INCORRECT" in r.stdout + r.stderr


# -- the C API directly (ctypes in a child process): init rules, fork, reconnect ----------

_CTYPES_CLIENT = r"""
import ctypes, os, sys

lib = ctypes.CDLL(sys.argv[1])
CK_ULONG = ctypes.c_ulong
fl = ctypes.c_void_p()
assert lib.C_GetFunctionList(ctypes.byref(fl)) == 0
ver = ctypes.cast(fl, ctypes.POINTER(ctypes.c_ubyte * 2)).contents
assert (ver[0], ver[1]) == (2, 40), tuple(ver)


def slots():
    n = CK_ULONG(0)
    return lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(n))


class InitArgs(ctypes.Structure):
    _fields_ = [("create", ctypes.c_void_p), ("destroy", ctypes.c_void_p),
                ("lock", ctypes.c_void_p), ("unlock", ctypes.c_void_p),
                ("flags", CK_ULONG), ("reserved", ctypes.c_void_p)]


out = []
out.append(slots())  # before C_Initialize
args = InitArgs(None, None, None, None, 2, None)  # CKF_OS_LOCKING_OK
out.append(lib.C_Initialize(ctypes.byref(args)))
out.append(lib.C_Initialize(None))  # twice
out.append(slots())
print(" ".join("%x" % v for v in out), flush=True)

pid = os.fork()
if pid == 0:
    res = [slots(), lib.C_Initialize(None), slots(), lib.C_Finalize(None)]
    print("child " + " ".join("%x" % v for v in res), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent %x" % slots(), flush=True)

sys.stdin.readline()  # the test restarts the server here
res = [slots(), slots(), lib.C_Finalize(None), slots()]
print("after " + " ".join("%x" % v for v in res), flush=True)
"""


def test_init_fork_and_reconnect(served: Served, module_path: Path) -> None:
    sockdir = short_socket_dir()
    path = sockdir / "p11.sock"
    model = Pkcs11Model(served.app, client_pin=SecretBytes(PIN))
    server = Server(model, path)
    server.start()
    env = {**served.env, "PQHSM_SERVER_ADDRESS": server.address}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTYPES_CLIENT, str(module_path)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        first = proc.stdout.readline().decode().split()
        # not initialized; init ok; already initialized; GetSlotList ok
        assert first == ["190", "0", "191", "0"], first
        child = proc.stdout.readline().decode().split()
        assert child == ["child", "190", "0", "0", "0"], child  # child reinitializes
        assert proc.stdout.readline().decode().split() == ["parent", "0"]
        server.close()  # drops the parent's connection
        server = Server(model, path)
        server.start()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        after = proc.stdout.readline().decode().split()
        # the lost connection is reported once (CKR_DEVICE_ERROR), the next call reconnects
        assert after == ["after", "30", "0", "0", "190"], after
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else b""
    finally:
        proc.kill()
        proc.wait()
        server.close()
        model.close()
        shutil.rmtree(sockdir, ignore_errors=True)


# -- the configuration file (applications that cannot set environment variables) -----------


def _conf_env(served: Served, conf: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in served.env.items()
        if k not in ("PQHSM_SERVER_ADDRESS", "P11_KIT_SERVER_ADDRESS", "PQHSM_EXTENSION")
    }
    env["PQHSM_PKCS11_CONF"] = str(conf)
    return env


def test_config_file_finds_the_server(served: Served, tmp_path: Path) -> None:
    conf = tmp_path / "pkcs11.conf"
    conf.write_text(f"# pqhsm module\n  server = {served.server.address}  \n")
    r = run_tool(served.module, _conf_env(served, conf), "-L")
    assert r.returncode == 0, r.stderr
    assert b"pqhsm" in r.stdout
    # the extension is on by default; "extension = off" shows what p11-kit-client shows
    mechs = run_tool(served.module, _conf_env(served, conf), "-M")
    assert b"ECDSA-SHA256" in mechs.stdout, mechs.stdout
    conf.write_text(f"server={served.server.address}\nextension = off\n")
    mechs = run_tool(served.module, _conf_env(served, conf), "-M")
    assert mechs.returncode == 0, mechs.stderr
    assert b"ECDSA-SHA256" not in mechs.stdout
    assert b"ECDSA" in mechs.stdout


def test_environment_wins_over_the_config_file(served: Served, tmp_path: Path) -> None:
    conf = tmp_path / "pkcs11.conf"
    conf.write_text("server = unix:path=/nonexistent/p11.sock\n")
    env = {**_conf_env(served, conf), "PQHSM_SERVER_ADDRESS": served.server.address}
    r = run_tool(served.module, env, "-L")
    assert r.returncode == 0, r.stderr
    r = run_tool(served.module, _conf_env(served, conf), "-L")
    assert r.returncode != 0  # only the config file's dead address is left


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage \x01\n" * 50,
        b"server = " + b"x" * 5000 + b"\n",
        b"x" * 3000,  # one over-long line and no newline at all
        b"server unix:path=/tmp/no-equals-sign\n",
        b"server = relative/path.sock\n",
        b"server = unix:path=/" + b"d" * 200 + b"\n",  # longer than sun_path
        b"",
    ],
)
def test_bad_config_files_are_a_clean_error(
    served: Served, tmp_path: Path, flavour: Flavour, content: bytes
) -> None:
    conf = tmp_path / "pkcs11.conf"
    conf.write_bytes(content)
    r = run_tool(flavour.module, {**_conf_env(served, conf), **flavour.env}, "-L")
    flavour.check(r)
    assert r.returncode == 1, r.stderr
    assert b"C_Initialize failed: rv = CKR_DEVICE_ERROR" in r.stderr, r.stderr


def test_over_long_line_does_not_hide_the_next(served: Served, tmp_path: Path) -> None:
    conf = tmp_path / "pkcs11.conf"
    conf.write_bytes(b"# " + b"y" * 4000 + b"\n" + f"server = {served.server.address}\n".encode())
    r = run_tool(served.module, _conf_env(served, conf), "-L")
    assert r.returncode == 0, r.stderr


def test_server_down_is_a_clean_error(served: Served, tmp_path: Path) -> None:
    sockdir = short_socket_dir()
    model = Pkcs11Model(served.app, client_pin=SecretBytes(PIN))
    server = Server(model, sockdir / "p11.sock")
    server.start()
    env = {**served.env, "PQHSM_SERVER_ADDRESS": server.address}
    try:
        assert run_tool(served.module, env, "-L").returncode == 0
    finally:
        server.close()
        model.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    for args in (("-L",), ("-O",)):
        r = run_tool(served.module, env, *args)
        assert r.returncode > 0, r  # an error exit, not a signal
        assert b"CKR_DEVICE_ERROR" in r.stdout + r.stderr
    r = run_tool(served.module, {**env, "PQHSM_SERVER_ADDRESS": "tcp:nothing"}, "-L")
    assert r.returncode > 0


# -- valgrind ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind missing")
def test_valgrind_list_and_sign(served: Served, tmp_path: Path) -> None:
    r = served.tool("-L", wrap=VALGRIND)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    digest = hashlib.sha256(b"under valgrind").digest()
    (tmp_path / "digest").write_bytes(digest)
    r = served.tool(*_sign_args(served.key, tmp_path), login=True, wrap=VALGRIND)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    _verify_raw(served.key, digest, (tmp_path / "sig").read_bytes())


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind missing")
def test_valgrind_hash_keypairgen_destroy(served: Served, tmp_path: Path) -> None:
    """The digest, key-generation and destroy paths under memcheck."""
    (tmp_path / "in").write_bytes(os.urandom(5000))  # multi-part in pkcs11-tool
    runs = [
        ("--hash", "-m", "SHA256", "--input-file", str(tmp_path / "in")),
        ("--keypairgen", "--key-type", "EC:secp384r1", "--label", "vg-gen", "--usage-sign"),
        ("--delete-object", "--type", "privkey", "--label", "vg-gen"),
    ]
    for args in runs:
        r = served.tool(*args, login=args[0] != "--hash", wrap=VALGRIND)
        assert r.returncode in (0, 1, 99), r.stderr.decode()[-3000:]
        ours = _module_errors(r.stderr)
        assert not ours, b"\n\n".join(ours).decode()
        if args[0] == "--delete-object":
            assert b"0x1b" in r.stderr  # CKR_ACTION_PROHIBITED
        elif args[0] == "--keypairgen":
            assert b"Key pair generated" in r.stdout, r.stdout
        else:
            assert r.returncode == 0, r.stderr.decode()[-3000:]


def _module_errors(stderr: bytes) -> list[bytes]:
    """Valgrind records that are memory errors anywhere, or leaks allocated by our module.

    pkcs11-tool 0.23 itself leaks 33 bytes in --keypairgen (its own calloc, no module
    frame): that is not ours to fix, so a leak counts only with the module on its stack.
    """
    records = re.split(rb"==\d+== \n", stderr)
    out = []
    for rec in records:
        if re.search(rb"Invalid (read|write|free)|uninitialised|Mismatched free", rec):
            out.append(rec)
        elif b"definitely lost in loss record" in rec and b"libpqhsm-pkcs11" in rec:
            out.append(rec)
    return out


# -- a malformed server --------------------------------------------------------------

Reply = Callable[[int, int], bytes]  # (request code, call id) -> raw bytes to send


def _frame(code: int, body: bytes) -> bytes:
    return struct.pack(">III", code, 0, len(body)) + body


def _body(call_id: int, sig: bytes, fields: bytes = b"") -> bytes:
    return struct.pack(">II", call_id, len(sig)) + sig + fields


def _ok_init(code: int, call_id: int, then: Reply) -> bytes:
    return _frame(code, _body(1, b"")) if call_id == 1 else then(code, call_id)


_BAD_REPLIES: dict[str, Reply] = {
    "garbage": lambda code, cid: os.urandom(64),
    "truncated-header": lambda code, cid: b"\x00\x00",
    "wrong-code": lambda code, cid: _frame(code + 7, _body(cid, b"")),
    "huge-length": lambda code, cid: struct.pack(">III", code, 0, 0xFFFFFFF0),
    "short-body": lambda code, cid: struct.pack(">III", code, 0, 4) + b"\x00\x00\x00\x01",
    "error-with-ok": lambda code, cid: _frame(code, _body(0, b"u", struct.pack(">Q", 0))),
    "slots-truncated": lambda code, cid: _ok_init(
        code, cid, lambda c, i: _frame(c, _body(i, b"au", b"\x01\x00\x00\x00\x05\x00"))
    ),
    "slots-huge-count": lambda code, cid: _ok_init(
        code, cid, lambda c, i: _frame(c, _body(i, b"au", b"\x01\xff\xff\xff\xff"))
    ),
    "slots-wrong-signature": lambda code, cid: _ok_init(
        code, cid, lambda c, i: _frame(c, _body(i, b"ay", b"\x00\x00\x00\x00\x01"))
    ),
    "slots-trailing-bytes": lambda code, cid: _ok_init(
        code, cid, lambda c, i: _frame(c, _body(i, b"au", b"\x00\x00\x00\x00\x01junk"))
    ),
    "slots-bad-string-length": lambda code, cid: _ok_init(
        code,
        cid,
        lambda c, i: _frame(
            c,
            _body(i, b"au", b"\x01\x00\x00\x00\x01" + struct.pack(">Q", 1))
            if i == 4
            else _body(i, b"ssuvv", b"\x7f\xff\xff\xff"),
        ),
    ),
    "close": lambda code, cid: b"",
}


class FakeServer:
    """Speaks the handshake, then answers every request with ``reply``."""

    def __init__(self, path: Path, reply: Reply, version: int = 0) -> None:
        self.path = path
        self.reply = reply
        self.version = version
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._serve(conn)
                except OSError:
                    pass

    @staticmethod
    def _exact(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self, conn: socket.socket) -> None:
        self._exact(conn, 1)
        conn.sendall(bytes((self.version,)))
        while True:
            code, olen, blen = struct.unpack(">III", self._exact(conn, 12))
            self._exact(conn, olen)
            body = self._exact(conn, blen)
            out = self.reply(code, struct.unpack(">I", body[:4])[0])
            if not out:
                return
            conn.sendall(out)
            if len(out) < 12:  # a truncated frame: hang up rather than keep the client waiting
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("kind", [*_BAD_REPLIES, "bad-version"])
def test_malformed_server_replies(flavour: Flavour, kind: str) -> None:
    sockdir = short_socket_dir()
    path = sockdir / "bad.sock"
    reply = _BAD_REPLIES.get(kind, _BAD_REPLIES["garbage"])
    fake = FakeServer(path, reply, version=1 if kind == "bad-version" else 0)
    env = module_env(f"unix:path={path}")
    env.update(flavour.env)
    try:
        r = run_tool(flavour.module, env, "-L")
    finally:
        fake.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    flavour.check(r)
    assert r.returncode >= 0, (r.returncode, r.stderr)  # not killed by a signal
    out = r.stdout + r.stderr
    assert b"CKR_DEVICE_ERROR" in out, out
    if not kind.startswith("slots-bad-string"):  # pkcs11-tool -L only reports that one
        assert r.returncode > 0, out


# -- mutated replies from the real server ------------------------------------------------


class MutatingProxy(FakeServer):
    """Relays to the real server and damages some replies (seeded: reproducible)."""

    def __init__(self, path: Path, upstream: Path, seed: int) -> None:
        self.upstream = upstream
        self.rng = random.Random(seed)  # noqa: S311 - reproducible test damage, not crypto
        super().__init__(path, lambda code, cid: b"")

    def _mutate(self, frame: bytes) -> tuple[bytes, bool]:
        """The frame to send and whether to hang up afterwards."""
        if self.rng.random() > 0.08:
            return frame, False
        header, body = frame[:12], bytearray(frame[12:])
        code = struct.unpack(">I", header[:4])[0]
        choice = self.rng.randrange(5)
        if choice == 0 and body:  # flip a byte
            body[self.rng.randrange(len(body))] ^= 1 << self.rng.randrange(8)
        elif choice == 1 and body:  # a shorter, self-consistent body
            del body[self.rng.randrange(len(body)) :]
        elif choice == 2:  # trailing junk
            body += os.urandom(self.rng.randrange(1, 16))
        elif choice == 3:  # a truncated frame, then hang up
            return frame[: self.rng.randrange(len(frame))], True
        else:  # a lying length
            fake = self.rng.choice([0, 7, len(body) + 1, 0x7FFFFFFF, 0xFFFFFFFF])
            return struct.pack(">III", code, 0, fake) + bytes(body), True
        return struct.pack(">III", code, 0, len(body)) + bytes(body), False

    def _serve(self, conn: socket.socket) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.settimeout(5)
            up.connect(str(self.upstream))
            up.sendall(self._exact(conn, 1))
            conn.sendall(self._exact(up, 1))
            while True:
                head = self._exact(conn, 12)
                _, olen, blen = struct.unpack(">III", head)
                up.sendall(head + self._exact(conn, olen) + self._exact(conn, blen))
                rhead = self._exact(up, 12)
                rbody = self._exact(up, struct.unpack(">III", rhead)[2])
                out, hang_up = self._mutate(rhead + rbody)
                conn.sendall(out)
                if hang_up:
                    return


@pytest.mark.parametrize("seed", range(16))
def test_mutated_replies_never_crash(
    served: Served, asan_flavour: Flavour, tmp_path: Path, seed: int
) -> None:
    sockdir = short_socket_dir()
    proxy = MutatingProxy(sockdir / "mut.sock", served.server.path, seed)
    env = {**served.env, **asan_flavour.env, "PQHSM_SERVER_ADDRESS": f"unix:path={proxy.path}"}
    digest = hashlib.sha256(b"mutated").digest()
    (tmp_path / "digest").write_bytes(digest)
    try:
        for args, login in (
            (("-L",), False),
            (("-O",), True),
            (_sign_args(served.key, tmp_path), True),
        ):
            r = run_tool(asan_flavour.module, env, *args, login=login)
            asan_flavour.check(r)
            assert r.returncode >= 0, (args, r.returncode)  # never killed by a signal
    finally:
        proxy.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind missing")
@pytest.mark.parametrize("kind", ["garbage", "slots-truncated", "slots-huge-count", "close"])
def test_valgrind_malformed_server(module_path: Path, kind: str) -> None:
    sockdir = short_socket_dir()
    path = sockdir / "bad.sock"
    fake = FakeServer(path, _BAD_REPLIES[kind])
    env = module_env(f"unix:path={path}")
    try:
        r = run_tool(module_path, env, "-L", wrap=VALGRIND)
    finally:
        fake.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert r.returncode == 1, r.stderr.decode()[-3000:]  # pkcs11-tool's error, not 99
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    assert b"CKR_DEVICE_ERROR" in r.stdout + r.stderr


_THREADS_CLIENT = r"""
import ctypes, sys, threading

lib = ctypes.CDLL(sys.argv[1])
CK_ULONG = ctypes.c_ulong


class InitArgs(ctypes.Structure):
    _fields_ = [("create", ctypes.c_void_p), ("destroy", ctypes.c_void_p),
                ("lock", ctypes.c_void_p), ("unlock", ctypes.c_void_p),
                ("flags", CK_ULONG), ("reserved", ctypes.c_void_p)]


assert lib.C_Initialize(ctypes.byref(InitArgs(None, None, None, None, 2, None))) == 0
errors = []


def worker():
    h = CK_ULONG(0)
    rv = lib.C_OpenSession(CK_ULONG(1), CK_ULONG(4), None, None, ctypes.byref(h))
    if rv:
        errors.append(("open", rv))
        return
    buf = (ctypes.c_ubyte * 100)()
    for _ in range(40):
        n = CK_ULONG(0)
        for rv, what in ((lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(n)), "slots"),
                         (lib.C_GenerateRandom(h, buf, CK_ULONG(100)), "random")):
            if rv:
                errors.append((what, rv))
        if n.value != 1:
            errors.append(("count", n.value))
    errors.extend([("close", rv)] if (rv := lib.C_CloseSession(h)) else [])


threads = [threading.Thread(target=worker) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert lib.C_Finalize(None) == 0
print("errors", errors)
sys.exit(1 if errors else 0)
"""


def test_threads_share_one_connection(served: Served, asan_flavour: Flavour) -> None:
    """Eight threads (CKF_OS_LOCKING_OK) through the ASan/UBSan build."""
    env = {**served.env, **asan_flavour.env}
    r = subprocess.run(
        [sys.executable, "-c", _THREADS_CLIENT, str(asan_flavour.module)],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    asan_flavour.check(r)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the hand-written header against the system's p11-kit header (layout and values) -----

SYSTEM_HEADER_DIR = Path("/usr/include/p11-kit-1")


def _probe_program(names: list[str], header: str) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        f"#include {header}",
        "int main(void) {",
    ]
    for t in ("CK_INFO", "CK_SLOT_INFO", "CK_TOKEN_INFO", "CK_SESSION_INFO", "CK_ATTRIBUTE"):
        lines.append(f'printf("sizeof {t} %zu\\n", sizeof({t}));')
    for t in ("CK_MECHANISM", "CK_MECHANISM_INFO", "CK_C_INITIALIZE_ARGS", "CK_FUNCTION_LIST"):
        lines.append(f'printf("sizeof {t} %zu\\n", sizeof({t}));')
    for member in ("C_GetFunctionList", "C_Sign", "C_GenerateRandom", "C_WaitForSlotEvent"):
        lines.append(f'printf("offset {member} %zu\\n", offsetof(CK_FUNCTION_LIST, {member}));')
    for name in names:
        lines += [
            f"#ifdef {name}",
            f'printf("value {name} %lx\\n", (unsigned long)({name}));',
            "#endif",
        ]
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(
    not (SYSTEM_HEADER_DIR / "p11-kit" / "pkcs11.h").is_file(), reason="p11-kit headers missing"
)
def test_header_matches_the_system_header(module_path: Path, tmp_path: Path) -> None:
    names = sorted(
        set(
            re.findall(
                r"^#define (CK[AFHKMNOPRSU]_\w+) ",
                (SOURCE_DIR / "pkcs11.h").read_text(),
                re.MULTILINE,
            )
        )
    )
    assert len(names) > 80
    results = []
    for header, flags in (
        ('"pkcs11.h"', ["-I", str(SOURCE_DIR)]),
        ("<p11-kit/pkcs11.h>", ["-I", str(SYSTEM_HEADER_DIR)]),
    ):
        src = tmp_path / "probe.c"
        src.write_text(_probe_program(names, header))
        exe = tmp_path / "probe"
        cc = subprocess.run(
            ["gcc", "-std=c99", "-Wall", "-Werror", *flags, str(src), "-o", str(exe)],
            capture_output=True,
            check=False,
        )
        assert cc.returncode == 0, cc.stderr.decode()
        out = subprocess.run([str(exe)], capture_output=True, check=True).stdout.decode()
        results.append(dict(line.rsplit(" ", 1) for line in out.splitlines()))
    ours, system = results
    shared = {k for k in ours if k in system}
    assert len(shared) > 60  # most constants exist in both; the 3.2 PQC ones only in ours
    assert {k: ours[k] for k in shared} == {k: system[k] for k in shared}
    pqc = {k: int(ours[f"value {k}"], 16) for k in PQC_CONSTANTS}
    assert pqc == PQC_CONSTANTS


#: PKCS#11 3.2 post-quantum constants, as listed in DESIGN §8.
PQC_CONSTANTS = {
    "CKK_ML_KEM": 0x49,
    "CKK_ML_DSA": 0x4A,
    "CKK_SLH_DSA": 0x4B,
    "CKA_PARAMETER_SET": 0x61D,
    "CKA_SEED": 0x637,
    "CKA_ENCAPSULATE": 0x633,
    "CKA_DECAPSULATE": 0x634,
    "CKM_ML_KEM_KEY_PAIR_GEN": 0x0F,
    "CKM_ML_KEM": 0x17,
    "CKM_ML_DSA_KEY_PAIR_GEN": 0x1C,
    "CKM_ML_DSA": 0x1D,
    "CKM_HASH_ML_DSA": 0x1F,
    "CKP_ML_DSA_44": 1,
    "CKP_ML_DSA_65": 2,
    "CKP_ML_DSA_87": 3,
    "CKP_ML_KEM_512": 1,
    "CKP_ML_KEM_768": 2,
    "CKP_ML_KEM_1024": 3,
    "CKH_HEDGE_PREFERRED": 0,
    "CKH_HEDGE_REQUIRED": 1,
    "CKH_DETERMINISTIC_REQUIRED": 2,
}


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
    priv = session.get_key(
        object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, id=bytes.fromhex(sys.argv[3])
    )
    assert priv[A.SENSITIVE] is True
    assert priv[A.LABEL] == sys.argv[4]
    print(priv.sign(digest, mechanism=Mechanism.ECDSA).hex())
    assert len(session.generate_random(256)) == 32
"""


def test_python_pkcs11_size_queries(served: Served, asan_flavour: Flavour) -> None:
    """python-pkcs11 asks every size first (attributes, signature) through the ASan build."""
    assert served.key.cka_id is not None
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _PYTHON_PKCS11_CLIENT,
            str(asan_flavour.module),
            served.app.token.info().label,
            served.key.cka_id.hex(),
            served.key.label,
        ],
        env={**served.env, **asan_flavour.env, "TEST_PIN": PIN.decode()},
        capture_output=True,
        timeout=60,
        check=False,
    )
    asan_flavour.check(r)
    assert r.returncode == 0, r.stderr.decode()
    digest = hashlib.sha256(b"python-pkcs11").digest()
    _verify_raw(served.key, digest, bytes.fromhex(r.stdout.decode().strip()))


# -- pkcs11-tool's key generation and self-test through the module ------------------------


def test_keypairgen_through_the_module(served: Served, tmp_path: Path) -> None:
    """An appliance key made by pkcs11-tool through libpqhsm-pkcs11.so, then used."""
    r = served.tool(
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "mod-gen",
        "--usage-sign",
        login=True,
    )
    assert r.returncode == 0, r.stderr
    key = next(k for k in served.app.keys() if k.label == "mod-gen")
    assert key.origin == "generated"
    assert key.cka_id is not None
    assert key.cka_id.hex() in r.stdout.decode()
    digest = hashlib.sha256(b"generated through the module").digest()
    (tmp_path / "digest").write_bytes(digest)
    r = served.tool(*_sign_args(key, tmp_path), login=True)
    assert r.returncode == 0, r.stderr
    _verify_raw(key, digest, (tmp_path / "sig").read_bytes())


def test_pkcs11_tool_self_test_through_the_module(served: Served) -> None:
    r = served.tool("--test", "--allow-sw", login=True)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    assert b"No errors" in r.stdout, r.stdout


@pytest.mark.parametrize(("mech", "size"), [("SHA256", 3000), ("SHA384", 70_000), ("SHA512", 0)])
def test_hash_through_the_module(
    served: Served, tmp_path: Path, flavour: Flavour, mech: str, size: int
) -> None:
    """C_Digest (small inputs) and C_DigestUpdate/Final (pkcs11-tool's multi-part path for
    inputs over 1 KiB) forwarded, plain and ASan builds."""
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    r = run_tool(
        flavour.module,
        {**served.env, **flavour.env},
        "--hash",
        "-m",
        mech,
        "--input-file",
        str(tmp_path / "in"),
    )
    flavour.check(r)
    assert r.returncode == 0, r.stderr
    assert r.stdout == hashlib.new(mech.lower(), data).digest()


def test_destroy_through_the_module_is_prohibited(served: Served) -> None:
    """Keys leave only through migration; C_DestroyObject is forwarded and refused."""
    r = served.tool("--delete-object", "--type", "privkey", "--label", served.key.label, login=True)
    assert r.returncode != 0
    assert b"0x1b" in r.stderr  # CKR_ACTION_PROHIBITED (name unknown to this OpenSC)
    assert served.app.key(served.key.key_id).label == served.key.label
