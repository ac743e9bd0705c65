"""The PKCS#11 server under hostile and concurrent clients (issue 6, items 5 and 6).

- Hypothesis drives thousands of frames over live connections: every call the server
  knows, with its real signature string and generated fields (real session and object
  handles among random ones), plus mutated and truncated frames.  Each frame must get a
  well-formed reply echoing its request code, or a closed connection — never a hang, a
  crashed event loop, or a reply carrying the PIN — and a second client that signs
  between examples must keep being served.
- A peer running as another uid is refused by ``SO_PEERCRED`` even when the socket's
  directory and file are opened up by mistake; without that mistake it cannot even
  connect.
- A slow client (a long call on a worker, or one that stops reading a big reply) does
  not stall a fast one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p11raw import ay as _ay
from p11raw import private_key_template
from p11raw import u32 as _u32
from p11raw import u64 as _u64

from appliance import clientpins
from appliance.errors import CKR
from appliance.keys import KeyInfo, KeyState
from appliance.secret import SecretBytes
from appliance.service import Appliance
from conftest import PIN, pkcs11_server
from pkcs11_shim import dispatch as dispatch_module
from pkcs11_shim import model as model_module
from pkcs11_shim.dispatch import CALLS, PIN_CALLS
from pkcs11_shim.model import SLOT_ID, CkrError, Client, cka_id_of
from pkcs11_shim.rpc import HANDSHAKE, Attribute, AttrValue, Mechanism, Reader, request_body
from pkcs11_shim.server import Server

pytestmark = [pytest.mark.conformance, pytest.mark.softhsm]

CKA_CLASS, CKA_ID, CKA_LABEL = 0x000, 0x102, 0x003
CKO_PRIVATE_KEY = 3
CKM_ECDSA, CKM_SHA256 = 0x1041, 0x250
#: How many live frames the fuzz test sends (issue 6: "thousands of cases").
FUZZ_EXAMPLES = 2500
#: Hypothesis settings of the fuzz tests over live connections (reproducible runs).
LIVE_FUZZ = settings(
    deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


class Peer:
    """A raw p11-kit RPC connection (what a misbehaving client can send)."""

    def __init__(self, path: Path, timeout: float = 10.0, version: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.sock.sendall(bytes((version,)))
        if self.sock.recv(1) != bytes((version,)):
            raise ConnectionError("no handshake")
        self.code = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def frame(
        self, body: bytes, *, pieces: Callable[[int], None] | None = None
    ) -> tuple[int, bytes]:
        """Send one frame (as p11-kit does: header, options, body) and read the reply;
        with ``pieces``, in three writes, calling it after each but the last with the
        bytes sent so far (to wait until the server has read them)."""
        self.code += 1
        wire = struct.pack(">III", self.code, 6, len(body)) + b"client" + body
        parts = (wire[:5], wire[5:20], wire[20:]) if pieces else (wire,)
        for i, piece in enumerate(parts):
            self.sock.sendall(piece)
            if pieces is not None and i < len(parts) - 1:
                pieces(sum(map(len, parts[: i + 1])))
        code, olen, blen = struct.unpack(">III", self.recv_exact(12))
        return code, self.recv_exact(olen + blen)[olen:]

    def ok(self, call_id: int, sig: str, fields: bytes = b"") -> Reader:
        code, body = self.frame(request_body(call_id, sig, fields))
        assert code == self.code
        r = Reader(body)
        assert r.call_id == call_id, f"error reply CKR 0x{r.u():x}"
        return r

    def login_session(self) -> int:
        self.ok(1, "ayyay", _ay(HANDSHAKE) + b"\x00" + b"\x01" + _u32(0xFFFFFFFF))
        session = self.ok(10, "uu", _u64(SLOT_ID) + _u64(0x6)).u()
        self.ok(18, "uuay", _u64(session) + _u64(1) + _ay(PIN))
        return session

    def find_private(self, session: int, key: KeyInfo) -> int:
        template = private_key_template(cka_id_of(key))
        self.ok(26, "uaA", _u64(session) + _u32(2) + template)
        found = self.ok(27, "ufu", _u64(session) + _u32(4)).au()
        self.ok(28, "u", _u64(session))
        assert found is not None
        assert len(found) == 1
        return int(found[0])

    def sign(self, session: int, key_handle: int, digest: bytes) -> bytes:
        self.ok(42, "uMu", _u64(session) + _u32(CKM_ECDSA) + _u32(0xFFFFFFFF) + _u64(key_handle))
        sig = self.ok(43, "uayfy", _u64(session) + _ay(digest) + _u32(1024)).ay()
        assert sig is not None
        return sig


@dataclass
class Live:
    app: Appliance
    server: Server
    key: KeyInfo


@contextlib.contextmanager
def serving_model(appliance: Appliance) -> Iterator[Server]:
    """A started :class:`Server` over ``appliance`` on a short socket path."""
    sockdir = Path(tempfile.mkdtemp(prefix="p11"))  # short: AF_UNIX paths max 107 bytes
    try:
        with pkcs11_server(appliance, sockdir) as server:
            yield server
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def live(appliance: Appliance) -> Iterator[Live]:
    key = appliance.create_key("ecdsa-p256", "live-p256")
    with serving_model(appliance) as server:
        yield Live(appliance, server, key)


def _check_signature(key: KeyInfo, digest: bytes, raw: bytes) -> None:
    assert key.classical_spki is not None
    pub = load_der_public_key(key.classical_spki)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    half = len(raw) // 2
    der = encode_dss_signature(int.from_bytes(raw[:half]), int.from_bytes(raw[half:]))
    pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# -- the fuzz ---------------------------------------------------------------------------------


def _field(draw: st.DrawFn, code: str, handles: list[int]) -> bytes:
    """One generated request field of the given signature code."""
    ulong = st.one_of(
        st.sampled_from([*handles, 0, 1, SLOT_ID, CKM_ECDSA, CKM_SHA256, 0x1D, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
    )
    small = st.binary(max_size=80)
    if code == "u":
        return _u64(draw(ulong))
    if code == "y":
        return bytes([draw(st.integers(0, 255))])
    if code == "v":
        return draw(st.binary(min_size=2, max_size=2))
    if code in ("s", "z"):
        return _ay(draw(small))[1:]
    if code == "ay":
        kind = draw(st.integers(0, 3))
        if kind == 0:
            return b"\x00" + _u32(draw(st.integers(0, 2**32 - 1)))  # length only
        if kind == 1:
            return b"\x01" + _u32(0xFFFFFFFF)  # NULL
        return _ay(draw(st.sampled_from([PIN, *([b""] * 2)]) if kind == 2 else small))
    if code in ("fy", "fu"):
        return _u32(draw(st.sampled_from([0, 1, 32, 64, 4096, 2**32 - 1])))
    if code == "au":
        n = draw(st.integers(0, 4))
        return b"\x01" + _u32(n) + b"".join(_u64(draw(ulong)) for _ in range(n))
    if code == "fA":
        n = draw(st.integers(0, 4))
        return _u32(n) + b"".join(
            _u32(draw(st.sampled_from([CKA_CLASS, CKA_ID, CKA_LABEL, 0x11, 0x180])))
            + _u32(draw(st.integers(0, 300)))
            for _ in range(n)
        )
    if code == "aA":
        n = draw(st.integers(0, 3))
        out = _u32(n)
        for _ in range(n):
            value = draw(st.binary(max_size=16))
            out += _u32(draw(st.sampled_from([CKA_CLASS, CKA_ID, CKA_LABEL, 0x161])))
            out += b"\x01" + _u32(len(value)) + _u32(len(value)) + value
        return out
    if code == "M":
        mech = draw(st.sampled_from([CKM_ECDSA, CKM_SHA256, 0x1044, 0x1057, 0x1D, 0x80000000]))
        param = draw(st.one_of(st.just(None), small))
        return _u32(mech) + (_u32(0xFFFFFFFF) if param is None else _u32(len(param)) + param)
    raise AssertionError(code)


def _split(sig: str) -> list[str]:
    out, i = [], 0
    while i < len(sig):
        step = 2 if sig[i] in "af" else 1
        out.append(sig[i : i + step])
        i += step
    return out


@st.composite
def _frames(draw: st.DrawFn, handles: list[int]) -> bytes:
    """A request body: a known call with generated fields, or a damaged one."""
    call_id = draw(st.sampled_from([*sorted(CALLS), 9, 44, 999]))
    sig = CALLS[call_id].request if call_id in CALLS else draw(st.sampled_from(["u", "uay"]))
    fields = b"".join(_field(draw, code, handles) for code in _split(sig))
    body = request_body(call_id, sig, fields)
    damage = draw(st.integers(0, 5))
    if damage == 1:  # truncated
        body = body[: draw(st.integers(8, max(8, len(body) - 1)))]
    elif damage == 2:  # trailing garbage
        body += draw(st.binary(min_size=1, max_size=16))
    elif damage == 3:  # one byte flipped
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    return body


def test_live_fuzz_never_stops_the_server(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of generated frames over live connections; a signer keeps being served."""
    caplog.set_level(logging.DEBUG)
    canary = Peer(live.server.path)
    c_session = canary.login_session()
    c_key = canary.find_private(c_session, live.key)
    state: dict[str, Peer | None] = {"peer": None}
    handles: list[int] = []
    seen = {"replies": 0, "closed": 0}

    def connect() -> Peer:
        peer = Peer(live.server.path, timeout=5)
        session = peer.login_session()
        handles[:] = [session, peer.find_private(session, live.key)]
        state["peer"] = peer
        return peer

    connect()

    @settings(LIVE_FUZZ, max_examples=FUZZ_EXAMPLES)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        fresh = data.draw(st.integers(0, 49)) == 0  # a fresh connection now and then
        peer = state["peer"]
        if peer is None or fresh:
            if peer is not None:
                peer.close()
            peer = connect()
        body = data.draw(_frames(handles))
        try:
            code, reply = peer.frame(body)
        except (ConnectionError, BrokenPipeError, ConnectionResetError):
            seen["closed"] += 1  # a malformed frame closes its connection only
            peer.close()
            state["peer"] = None
            return
        seen["replies"] += 1
        assert code == peer.code
        assert PIN not in reply
        r = Reader(reply)
        assert r.call_id in (0, int.from_bytes(body[:4], "big"))

    one()
    peer = state["peer"]
    if peer is not None:
        peer.close()
    # The signer was served throughout and still is; the loop is alive.
    digest = os.urandom(32)
    _check_signature(live.key, digest, canary.sign(c_session, c_key, digest))
    canary.close()
    assert seen["replies"] > FUZZ_EXAMPLES // 4, seen
    assert_survived(live.server, seen, caplog)


def assert_survived(server: Server, seen: dict[str, int], caplog: pytest.LogCaptureFixture) -> None:
    """After a fuzz run: the loop is alive, frames did close connections, and the log
    holds no PIN, internal error or traceback."""
    assert server._loop_thread is not None
    assert server._loop_thread.is_alive()
    assert seen["closed"] > 10, seen
    assert PIN.decode() not in caplog.text
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text


def test_half_frames_and_abrupt_closes(live: Live) -> None:
    """Frames cut anywhere, then the peer vanishes: nothing stays stuck."""
    full = request_body(3, "", b"")
    frame = struct.pack(">III", 1, 0, len(full)) + full
    for cut in range(len(frame)):
        p = Peer(live.server.path)
        p.sock.sendall(frame[:cut])
        p.close()
    p = Peer(live.server.path)
    p.ok(1, "ayyay", _ay(HANDSHAKE) + b"\x00" + b"\x01" + _u32(0xFFFFFFFF))
    assert p.ok(3, "").call_id == 3
    p.close()


# -- PINs do not linger ------------------------------------------------------------------------


@pytest.mark.parametrize("store", [False, True], ids=["interim token PIN", "client PIN store"])
def test_pins_are_wiped_from_every_server_buffer(
    live: Live, monkeypatch: pytest.MonkeyPatch, store: bool
) -> None:
    """A right and a wrong C_Login, and a C_SetPIN the server refuses: each request body
    (a bytearray, never bytes) and each PIN handed to the check end up all zeros, and
    neither PIN is left in the loop's receive buffer or a connection's buffer."""
    wrong = b"not-the-pin-0000"
    if store:
        home = live.server.model.pin_home
        clientpins.set_pin(home, SecretBytes(PIN), profile=clientpins.TEST_PROFILE)
    bodies: list[bytes | bytearray] = []
    pins: list[object] = []
    real_dispatch, real_check = dispatch_module.dispatch, model_module.Pkcs11Model.check_pin

    def dispatch(client: Client, body: bytes | bytearray) -> bytes:
        if int.from_bytes(body[:4], "big") in PIN_CALLS:
            bodies.append(body)
        return real_dispatch(client, body)

    def check_pin(self: model_module.Pkcs11Model, pin: SecretBytes) -> None:
        pins.append(pin)
        real_check(self, pin)

    monkeypatch.setattr("pkcs11_shim.server.dispatch", dispatch)
    monkeypatch.setattr(model_module.Pkcs11Model, "check_pin", check_pin)
    right = Peer(live.server.path)
    s = right.login_session()
    right.sign(s, right.find_private(s, live.key), os.urandom(32))  # logged in for real
    other = Peer(live.server.path)
    other.ok(1, "ayyay", _ay(HANDSHAKE) + b"\x00" + b"\x01" + _u32(0xFFFFFFFF))
    s2 = other.ok(10, "uu", _u64(SLOT_ID) + _u64(0x6)).u()
    replies = [
        Reader(other.frame(request_body(18, "uuay", _u64(s2) + _u64(1) + _ay(wrong)))[1]),
        Reader(other.frame(request_body(15, "uayay", _u64(s2) + _ay(PIN) + _ay(wrong)))[1]),
    ]
    assert [(r.call_id, r.u()) for r in replies] == [
        (0, CKR.PIN_INCORRECT),
        (0, CKR.FUNCTION_NOT_SUPPORTED),
    ]
    assert len(bodies) == 3
    assert len(pins) == 2
    for body in bodies:
        assert isinstance(body, bytearray)
        assert not any(body)
    for pin in pins:
        assert isinstance(pin, SecretBytes)
        assert not any(pin.view())
    buffers = [bytes(live.server._rbuf), *(bytes(c.inbuf) for c in live.server._conns.values())]
    for buf in buffers:
        assert PIN not in buf
        assert wrong not in buf
    right.close()
    other.close()


# -- peer credentials -------------------------------------------------------------------------

_CONNECT_AS_OTHER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("no-access"); sys.exit(0)
try:
    s.sendall(b"\\x00")
    print("closed" if s.recv(1) == b"" else "served")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""


#: A Python the other uid can run (the venv's lives under root's home, out of its reach).
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
@pytest.mark.skipif(not Path(SYSTEM_PYTHON).is_file(), reason=f"{SYSTEM_PYTHON} missing")
def test_peer_with_another_uid_is_refused(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """Layer 1: the 0700 directory keeps uid 65534 out; layer 2: SO_PEERCRED."""
    caplog.set_level(logging.INFO)
    path = live.server.path

    def attempt() -> str:
        proc = subprocess.run(
            [SYSTEM_PYTHON, "-c", _CONNECT_AS_OTHER, str(path)],
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert attempt() == "no-access"
    os.chmod(path.parent, 0o711)  # noqa: S103 - an operator's mistake, made on purpose
    os.chmod(path, 0o666)  # noqa: S103
    try:
        assert attempt() == "closed"
    finally:
        os.chmod(path, 0o600)
        os.chmod(path.parent, 0o700)
    assert "refused a PKCS#11 client with uid 65534" in caplog.text
    p = Peer(path)  # our own uid is still served
    p.ok(1, "ayyay", _ay(HANDSHAKE) + b"\x00" + b"\x01" + _u32(0xFFFFFFFF))
    p.close()


# -- one slow client does not stall the others ------------------------------------------------


def test_a_client_that_stops_reading_does_not_stall_others(live: Live) -> None:
    """A peer requests 1 MiB replies and never reads them; a signer is served meanwhile."""
    hog = Peer(live.server.path)
    hog.ok(1, "ayyay", _ay(HANDSHAKE) + b"\x00" + b"\x01" + _u32(0xFFFFFFFF))
    session = hog.ok(10, "uu", _u64(SLOT_ID) + _u64(0x4)).u()
    big = request_body(64, "ufy", _u64(session) + _u32(900_000))  # C_GenerateRandom
    for i in range(8):  # far more than the socket buffers hold
        hog.sock.sendall(struct.pack(">III", 100 + i, 0, len(big)) + big)
    signer = Peer(live.server.path)
    s = signer.login_session()
    k = signer.find_private(s, live.key)
    started = time.monotonic()
    for _ in range(20):
        digest = os.urandom(32)
        _check_signature(live.key, digest, signer.sign(s, k, digest))
    assert time.monotonic() - started < 10
    signer.close()
    hog.close()


def test_long_calls_run_beside_short_ones(live: Live) -> None:
    """Logins (a worker) and signatures (the loop) from many clients at once, all correct."""
    errors: list[Exception] = []

    def client() -> None:
        try:
            p = Peer(live.server.path)
            s = p.login_session()
            k = p.find_private(s, live.key)
            for _ in range(25):
                digest = os.urandom(32)
                _check_signature(live.key, digest, p.sign(s, k, digest))
                p.ok(19, "u", _u64(s))  # logout, login again: a long call each time
                p.ok(18, "uuay", _u64(s) + _u64(1) + _ay(PIN))
            p.close()
        except Exception as exc:  # noqa: BLE001 - reported below, with the thread's failure
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


# -- handles resolve without walking the keystore ----------------------------------------------


def test_signing_with_a_handle_does_not_walk_every_key(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C_SignInit/C_GetAttributeValue find the object by handle (O(1) in the key count),
    and still see a key's state change: after PQC_ONLY the stale handle is invalid."""
    c = Client(live.server.model)
    c.initialize(HANDSHAKE)
    s = c.open_session(SLOT_ID, 0x6)
    c.login(s, 1, PIN)
    c.find_init(s, [])
    handles = c.find(s, 64)
    c.find_final(s)
    private = [h for h in handles if c._objects[h][1] == CKO_PRIVATE_KEY]
    assert len(private) == 1

    def walked() -> list[KeyInfo]:
        raise AssertionError("walked every key of the keystore")

    real_keys = live.app.keys
    monkeypatch.setattr(live.app, "keys", walked)
    digest = os.urandom(32)
    c.sign_init(s, Mechanism(CKM_ECDSA), private[0])
    _check_signature(live.key, digest, c.sign(s, digest))
    attrs, rv = c.get_attributes(s, private[0], [(CKA_LABEL, 64)])
    assert rv == 0
    assert attrs[0].value == b"live-p256"
    monkeypatch.setattr(live.app, "keys", real_keys)
    live.app.migrate(live.key, KeyState.HYBRID)
    live.app.migrate(live.app.key(live.key.key_id), KeyState.PQC_ONLY)
    monkeypatch.setattr(live.app, "keys", walked)
    with pytest.raises(CkrError) as err:
        c.sign_init(s, Mechanism(CKM_ECDSA), private[0])
    assert err.value.rv == CKR.KEY_HANDLE_INVALID


def test_find_by_id_or_label_builds_only_that_keys_objects(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C_FindObjectsInit with CKA_ID/CKA_LABEL (python-pkcs11's get_key, pkcs11: URIs)
    builds attributes for the named key's objects only, not for every key."""
    others = [live.app.create_key("ecdsa-p256", f"other-{i}") for i in range(12)]
    c = Client(live.server.model)
    c.initialize(HANDSHAKE)
    s = c.open_session(SLOT_ID, 0x6)
    c.login(s, 1, PIN)
    built: list[str] = []
    real = model_module.object_attributes

    def counting(key: KeyInfo, cls: int) -> dict[int, AttrValue]:
        built.append(key.label)
        return real(key, cls)

    monkeypatch.setattr(model_module, "object_attributes", counting)
    target = others[7]
    assert target.cka_id is not None
    for template in (
        [Attribute(CKA_ID, target.cka_id)],
        [Attribute(CKA_LABEL, target.label.encode())],
        [Attribute(CKA_CLASS, CKO_PRIVATE_KEY), Attribute(CKA_ID, target.cka_id)],
    ):
        built.clear()
        c.find_init(s, template)
        found = c.find(s, 16)
        c.find_final(s)
        assert set(built) == {target.label}, built
        assert len(found) == (1 if len(template) == 2 else 2)
    built.clear()
    c.find_init(s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY)])
    assert len(c.find(s, 64)) == 1 + len(others)
    c.find_final(s)
    assert len(set(built)) == 1 + len(others)  # no name: every key is looked at


# -- the plain signing path answers as the general one -----------------------------------------


def _sign_init_body(session: int, mech: int, key: int, param: bytes | None = None) -> bytes:
    param_field = _u32(0xFFFFFFFF) if param is None else _u32(len(param)) + param
    return request_body(42, "uMu", _u64(session) + _u32(mech) + param_field + _u64(key))


def _sign_body(session: int, data: bytes | None, size: int) -> bytes:
    data_field = b"\x01" + _u32(0xFFFFFFFF) if data is None else b"\x01" + _u32(len(data)) + data
    return request_body(43, "uayfy", _u64(session) + data_field + _u32(size))


def test_plain_signing_requests_answer_as_the_general_path(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C_SignInit and C_Sign in their usual shape skip the field-by-field Reader
    (dispatch._plain_signing); every answer, errors and size queries included, and the
    operation state it leaves are the general path's.  Two clients on one model get the
    same requests, one through each path."""
    fast, general = Client(live.server.model), Client(live.server.model)
    handles = []
    for c in (fast, general):
        c.initialize(HANDSHAKE)
        s = c.open_session(SLOT_ID, 0x6)
        c.login(s, 1, PIN)
        c.find_init(s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY)])
        handles.append((s, c.find(s, 8)[0]))
        c.find_final(s)
    assert handles[0] == handles[1]  # same numbering: the same bodies fit both clients
    s, key = handles[0]
    digest = os.urandom(32)
    steps = [
        _sign_body(s, digest, 512),  # no operation
        _sign_init_body(s, CKM_ECDSA, key),
        _sign_init_body(s, CKM_ECDSA, key),  # one is active
        _sign_body(s, digest, 0),  # size query: the operation stays
        _sign_body(s, digest, 10),  # short buffer: the same
        _sign_body(s, digest, 0xFFFFFFFF),  # NULL buffer with a length
        _sign_body(s, digest, 512),  # the signature; the operation ends
        _sign_body(s, digest, 512),
        _sign_init_body(s, CKM_ECDSA, key, b""),  # empty parameter
        _sign_body(s, b"", 512),  # empty digest: CKR_ARGUMENTS_BAD, ends it
        _sign_body(s, digest, 512),
        _sign_init_body(s, CKM_ECDSA, key, b"\x01"),  # a parameter: the general path
        _sign_init_body(s, CKM_SHA256, key),  # not a signing mechanism
        _sign_init_body(s, CKM_ECDSA, key + 1000),  # no such key
        _sign_init_body(s + 1000, CKM_ECDSA, key),  # no such session
        _sign_init_body(s, CKM_ECDSA, key),
        _sign_body(s, None, 512),  # NULL data
        _sign_init_body(s, CKM_ECDSA, key),
        _sign_body(s + 1000, digest, 512),
        _sign_body(s, digest, 512),
    ]
    took_plain: list[bool] = []
    real_plain = dispatch_module._plain_signing

    def watched(client: Client, body: bytes | bytearray) -> bytes | None:
        reply = real_plain(client, body)
        took_plain.append(reply is not None)
        return reply

    for body in steps:
        monkeypatch.setattr(dispatch_module, "_plain_signing", watched)
        got = dispatch_module.dispatch(fast, body)
        monkeypatch.setattr(dispatch_module, "_plain_signing", lambda c, b: None)
        want = dispatch_module.dispatch(general, body)
        if want[:4] == _u32(43) and len(want) == 4 + 4 + 2 + 1 + 4 + 64:  # two signatures
            assert len(got) == len(want)
            assert got[:15] == want[:15]
            _check_signature(live.key, digest, got[15:])
            _check_signature(live.key, digest, want[15:])
        else:
            assert got == want, body.hex()
        assert fast.sessions[s] == general.sessions[s]
    # Only the mechanism with a parameter and the NULL data took the general path.
    assert took_plain.count(False) == 2, took_plain


def test_a_request_read_whole_answers_as_one_read_in_pieces(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that arrives in one read is answered straight from the loop's receive
    buffer (Server._answer_whole); one that arrives in pieces goes through the
    connection's buffer.  The same requests, sent each way by two clients, get the same
    answers: session info, a signature with its size query (verified), an error reply,
    and a frame the server refuses (both connections closed)."""
    took: dict[int, bool] = {}  # frame code -> answered from the loop's buffer
    real = Server._answer_whole

    def watched(self: Server, conn: object, n: int) -> bool:
        code = int.from_bytes(self._rbuf[:4], "big") if n >= 4 else None
        whole = real(self, conn, n)  # type: ignore[arg-type]
        if code is not None:  # recorded after the reply went out: the test waits for it
            took[code] = whole
        return whole

    monkeypatch.setattr(Server, "_answer_whole", watched)

    def read_by_server(n: int) -> None:  # the piece is in the connection's buffer
        deadline = time.monotonic() + 10
        while sum(len(c.inbuf) for c in list(live.server._conns.values())) < n:
            assert time.monotonic() < deadline, "the server did not read the piece"
            time.sleep(0.001)

    digest = os.urandom(32)
    answers = []
    for split in (False, True):
        pieces = read_by_server if split else None
        p = Peer(live.server.path)
        s = p.login_session()
        key = p.find_private(s, live.key)
        p.code = 1000 * (1 + split)  # codes of their own in each round
        got = []
        for body in (
            request_body(13, "u", _u64(s)),  # C_GetSessionInfo
            _sign_init_body(s, CKM_ECDSA, key),
            _sign_body(s, digest, 0),  # the size query
            _sign_body(s, digest, 512),
            _sign_body(s, digest, 512),  # no operation now: an error reply
        ):
            code, reply = p.frame(body, pieces=pieces)
            assert code == p.code
            got.append(reply)
        codes = range(p.code - 4, p.code + 1)
        deadline = time.monotonic() + 10
        while not all(c in took for c in codes) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [took.get(c) for c in codes] == [not split] * 5  # asked at a first read
        if not split:  # two frames in one write (usually one read): both answered
            two = request_body(13, "u", _u64(s))
            p.sock.sendall(2 * (struct.pack(">III", 77, 0, len(two)) + two))
            for _ in range(2):
                code, _olen, blen = struct.unpack(">III", p.recv_exact(12))
                assert (code, p.recv_exact(blen)) == (77, got[0])
        *replies, signature = got[:4]
        _check_signature(live.key, digest, signature[-64:])
        answers.append([*replies, got[3][:-64], got[4]])
        p.code += 1  # a body too short to hold a call id: the connection is closed
        bad = struct.pack(">III", p.code, 0, 4) + b"\0\0\0\x03"
        p.sock.sendall(bad[:7])
        if split:
            read_by_server(7)
        p.sock.sendall(bad[7:])
        with pytest.raises(ConnectionError):
            p.recv_exact(1)
        p.close()
    assert answers[0] == answers[1]
    assert Reader(answers[0][4]).u() == CKR.OPERATION_NOT_INITIALIZED
