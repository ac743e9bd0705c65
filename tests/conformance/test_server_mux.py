"""Multiplexed connections (pqhsm extension v3, version byte 0x52): one connection carries
the calls of many application threads at once.

A client on such a connection may send requests while earlier ones run; the server answers
short calls on its event loop at once, runs long signatures and verifications of different
sessions side by side on its workers, and sends every reply as soon as it is ready, with
its request's code.  Calls of one session stay in order, and calls that change what every
session sees (login state, the session table, objects) wait until nothing is in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa
from hypothesis import given, settings
from hypothesis import strategies as st
from p11raw import ay as _ay
from p11raw import u32 as _u32
from p11raw import u64 as _u64
from test_server_live import LIVE_FUZZ, Peer, _frames, assert_survived, serving_model

from appliance.keys import KeyInfo
from appliance.service import Appliance
from conftest import PIN
from pkcs11_shim import dispatch as dispatch_module
from pkcs11_shim import server as server_module
from pkcs11_shim.dispatch import CALL_SIGN_ONCE, _session_of
from pkcs11_shim.model import SLOT_ID
from pkcs11_shim.rpc import ProtocolError, Reader, request_body
from pkcs11_shim.server import EXTENSION_VERSION_3, EXTENSION_VERSION_4, Server

pytestmark = [pytest.mark.conformance, pytest.mark.softhsm]

CKM_ML_DSA = 0x1D
NULL = 0xFFFFFFFF


class MuxPeer(Peer):
    """A raw connection that speaks extension v3: requests go out without waiting."""

    def __init__(self, path: Path, version: int = EXTENSION_VERSION_3) -> None:
        super().__init__(path, timeout=20, version=version)
        self.code = 1000

    @staticmethod
    def wire(code: int, call_id: int, sig: str, fields: bytes) -> bytes:
        body = request_body(call_id, sig, fields)
        return struct.pack(">III", code, 6, len(body)) + b"client" + body

    def reply(self) -> tuple[int, Reader]:
        code, olen, blen = struct.unpack(">III", self.recv_exact(12))
        return code, Reader(self.recv_exact(olen + blen)[olen:])

    def setup(self, sessions: int) -> list[int]:
        """Sessions (the first one logged in: login is per application)."""
        handles = [self.login_session()]
        handles += [self.ok(10, "uu", _u64(SLOT_ID) + _u64(0x6)).u() for _ in range(sessions - 1)]
        return handles

    def sign_init(self, session: int, key: int) -> int:
        """C_SignInit for ML-DSA-87; the extended reply is the signature length."""
        return self.ok(42, "uMu", _u64(session) + _u32(CKM_ML_DSA) + _u32(NULL) + _u64(key)).u()

    def try_sign_init(self, session: int, key: int) -> bool:
        """C_SignInit for ML-DSA-87; False on an error reply or a closed connection."""
        self.code += 1
        fields = _u64(session) + _u32(CKM_ML_DSA) + _u32(NULL) + _u64(key)
        try:
            self.sock.sendall(self.wire(self.code, 42, "uMu", fields))
            code, r = self.reply()
        except OSError:
            return False
        return code == self.code and r.call_id == 42

    def sign_frame(self, code: int, session: int, message: bytes) -> bytes:
        return self.wire(code, 43, "uayfy", _u64(session) + _ay(message) + _u32(8192))

    def once_frame(self, code: int, session: int, key: int, message: bytes) -> bytes:
        """C_SignInit + C_Sign for ML-DSA-87 in one request (extension v4)."""
        init = _u64(session) + _u32(CKM_ML_DSA) + _u32(NULL) + _u64(key)
        return self.wire(code, CALL_SIGN_ONCE, "uMuayfy", init + _ay(message) + _u32(8192))


@dataclass
class Mux:
    app: Appliance
    server: Server
    key: KeyInfo

    def peer(self) -> MuxPeer:
        return MuxPeer(self.server.path)

    def check(self, signature: bytes | None, message: bytes) -> None:
        assert signature is not None
        assert self.key.pqc_public is not None
        mldsa.MLDSA87PublicKey.from_public_bytes(self.key.pqc_public).verify(signature, message)

    def signs_once(self, peer: MuxPeer, code: int, session: int, key: int, message: bytes) -> None:
        """``peer`` signs ``message`` in one request (v4) and the next reply is its right
        signature."""
        peer.sock.sendall(peer.once_frame(code, session, key, message))
        got, r = peer.reply()
        assert got == code
        self.check(r.ay(), message)

    def signs_till_held(self, peer: MuxPeer, code: int, session: int, key: int) -> None:
        """``peer`` (this server's one connection) signs on ``session`` until the worker
        that sent the reply waits on the connection.  The loop serves a request's bytes
        until it has handed the call to a worker; a worker whose call ends before that
        (the loop thread descheduled on a loaded machine) leaves the connection to the
        loop, and only the next signature's worker may take it over."""
        (conn,) = self.server._conns.values()
        for _ in range(50):
            self.signs_once(peer, code, session, key, os.urandom(40))
            if conn.held:
                return
        raise AssertionError("no worker took the connection over in 50 signatures")

    def still_signs(self, message: bytes) -> None:
        """A new client signs ``message`` with the ML-DSA key and the signature verifies."""
        peer = self.peer()
        (s,) = peer.setup(1)
        peer.sign_init(s, peer.find_private(s, self.key))
        peer.sock.sendall(peer.sign_frame(700, s, message))
        code, r = peer.reply()
        assert code == 700
        self.check(r.ay(), message)
        peer.close()


@pytest.fixture
def mux(appliance: Appliance) -> Iterator[Mux]:
    key = appliance.create_key("ml-dsa-87", "mux-mldsa")
    with serving_model(appliance) as server:
        yield Mux(appliance, server, key)


def _hold_signatures(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every C_Sign wait on its worker until the returned event is set (at most 10 s,
    so a server that answered nothing else meanwhile fails the test instead of hanging)."""
    release = threading.Event()
    real = dispatch_module.dispatch

    def held_dispatch(client: object, body: bytes) -> bytes:
        if int.from_bytes(body[:4], "big") == 43:
            release.wait(10)
        return real(client, body)  # type: ignore[arg-type]

    monkeypatch.setattr("pkcs11_shim.server.dispatch", held_dispatch)
    return release


def test_short_replies_overtake_signatures_in_flight(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C_GetSessionInfo sent behind two signatures is answered while both still run (the
    signatures are held on their workers until that reply is in, so the order is certain
    however the machine schedules threads)."""
    p = mux.peer()
    s1, s2, s3 = p.setup(3)
    key = p.find_private(s1, mux.key)
    assert p.sign_init(s1, key) == p.sign_init(s2, key) == 4627
    release = _hold_signatures(monkeypatch)
    m1, m2 = os.urandom(40), os.urandom(41)
    p.sock.sendall(
        p.sign_frame(101, s1, m1)
        + p.sign_frame(102, s2, m2)
        + p.wire(103, 13, "u", _u64(s3))  # C_GetSessionInfo, on a third session
    )
    first, info = p.reply()
    release.set()
    assert first == 103  # answered on the loop while both signatures were held
    assert info.call_id == 13
    replies = dict(p.reply() for _ in range(2))
    assert sorted(replies) == [101, 102]
    mux.check(replies[101].ay(), m1)
    mux.check(replies[102].ay(), m2)
    p.close()


@pytest.mark.parametrize(
    ("call_id", "on"),
    [(13, "same"), (19, "other")],
    ids=["same-session call", "logout on another session"],
)
def test_calls_wait_for_the_signature_in_flight(mux: Mux, call_id: int, on: str) -> None:
    """C_GetSessionInfo on the signing session waits for the signature (a session's calls
    stay in order); so does C_Logout on another session (it changes every session's
    login state): the signature is made while logged in, the next one is refused."""
    p = mux.peer()
    s1, s2 = p.setup(2)
    key = p.find_private(s1, mux.key)
    p.sign_init(s1, key)
    m = os.urandom(32)
    second = p.wire(302, call_id, "u", _u64(s1 if on == "same" else s2))
    p.sock.sendall(p.sign_frame(301, s1, m) + second)
    (c1, r1), (c2, r2) = p.reply(), p.reply()
    assert (c1, c2) == (301, 302)
    mux.check(r1.ay(), m)
    assert r2.call_id == call_id
    if call_id == 19:
        init = _u64(s1) + _u32(CKM_ML_DSA) + _u32(NULL) + _u64(key)
        p.sock.sendall(p.wire(303, 42, "uMu", init))
        code, r3 = p.reply()
        assert code == 303
        assert r3.call_id == 0  # an error reply:
        assert r3.u() == 0x101  # CKR_USER_NOT_LOGGED_IN


def test_signatures_of_different_sessions_overlap(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four signatures sent at once run on workers side by side (a slowed dispatch makes
    the overlap certain), and every one is right."""
    running, peak, lock = [0], [0], threading.Lock()
    real = dispatch_module.dispatch

    def slow_dispatch(client: object, body: bytes) -> bytes:
        slow = int.from_bytes(body[:4], "big") == 43
        if slow:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.2)
        try:
            return real(client, body)  # type: ignore[arg-type]
        finally:
            if slow:
                with lock:
                    running[0] -= 1

    monkeypatch.setattr("pkcs11_shim.server.dispatch", slow_dispatch)
    p = mux.peer()
    sessions = p.setup(4)
    key = p.find_private(sessions[0], mux.key)
    messages = {}
    for i, s in enumerate(sessions):
        p.sign_init(s, key)
        messages[400 + i] = os.urandom(16 + i)
    p.sock.sendall(
        b"".join(p.sign_frame(c, s, messages[c]) for c, s in zip(messages, sessions, strict=True))
    )
    replies = dict(p.reply() for _ in sessions)
    assert sorted(replies) == sorted(messages)
    for code, r in replies.items():
        mux.check(r.ay(), messages[code])
    assert peak[0] >= 2


def _read_until_closed(peer: MuxPeer) -> None:
    for _ in range(10):
        peer.reply()


def test_a_client_gone_mid_flight_leaves_the_server_serving(mux: Mux) -> None:
    gone = mux.peer()
    sessions = gone.setup(3)
    key = gone.find_private(sessions[0], mux.key)
    for s in sessions:
        gone.sign_init(s, key)
    gone.sock.sendall(b"".join(gone.sign_frame(500 + s, s, b"bye") for s in sessions))
    gone.close()  # before any reply
    bad = mux.peer()
    (s,) = bad.setup(1)
    bad.sign_init(s, bad.find_private(s, mux.key))
    bad.sock.sendall(bad.sign_frame(600, s, b"x") + b"\xff" * 40)  # then garbage
    with pytest.raises(ConnectionError):  # the garbage closes that connection
        _read_until_closed(bad)
    mux.still_signs(b"still here")


#: Examples of the multiplexed fuzz: each sends a batch of 3-5 frames at once.
MUX_FUZZ_EXAMPLES = 400


def test_fuzz_batches_beside_signatures_in_flight(
    mux: Mux, caplog: pytest.LogCaptureFixture
) -> None:
    """Generated frames (test_server_live's generator) sent in one write between two real
    ML-DSA signatures, so they meet calls in flight: every reply carries one of the
    batch's codes once and echoes its call or is an error; real signatures verify; a
    frame that does not parse closes only its connection; the server keeps serving."""
    caplog.set_level(logging.DEBUG)
    state: dict[str, tuple[MuxPeer, list[int], int] | None] = {"peer": None}
    seen = {"replies": 0, "closed": 0, "signed": 0}

    def connect() -> tuple[MuxPeer, list[int], int]:
        peer = mux.peer()
        sessions = peer.setup(3)
        key = peer.find_private(sessions[0], mux.key)
        state["peer"] = (peer, sessions, key)
        return peer, sessions, key

    @settings(LIVE_FUZZ, max_examples=MUX_FUZZ_EXAMPLES)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        current = state["peer"]
        peer, sessions, key = current if current is not None else connect()
        bodies = data.draw(st.lists(_frames([sessions[2], key]), min_size=1, max_size=3))
        if not all(peer.try_sign_init(s, key) for s in sessions[:2]):
            peer.close()  # the last batch logged out, or left an operation active
            peer, sessions, key = connect()
            for s in sessions[:2]:
                peer.sign_init(s, key)
        s1, s2, _ = sessions
        peer.code += 10
        m1, m2 = os.urandom(8), os.urandom(9)
        batch: dict[int, tuple[int, bytes | None]] = {
            peer.code + 1: (43, m1),
            peer.code + 2: (43, m2),
        }
        wire = peer.sign_frame(peer.code + 1, s1, m1)
        for i, body in enumerate(bodies):
            code = peer.code + 3 + i
            batch[code] = (int.from_bytes(body[:4], "big"), None)
            wire += struct.pack(">III", code, 6, len(body)) + b"client" + body
        wire += peer.sign_frame(peer.code + 2, s2, m2)
        peer.code += 3 + len(bodies)
        answered: set[int] = set()
        try:
            peer.sock.sendall(wire)
            while len(answered) < len(batch):
                code, r = peer.reply()
                assert code in batch
                assert code not in answered
                answered.add(code)
                call_id, message = batch[code]
                assert r.call_id in (0, call_id)
                if message is not None and r.call_id == 43:
                    mux.check(r.ay(), message)
                    seen["signed"] += 1
                seen["replies"] += 1
        except (ConnectionError, BrokenPipeError, ConnectionResetError):
            seen["closed"] += 1  # a malformed frame closes its connection only
            peer.close()
            state["peer"] = None

    one()
    current = state["peer"]
    if current is not None:
        current[0].close()
    mux.still_signs(b"after the fuzz")
    assert seen["signed"] > MUX_FUZZ_EXAMPLES // 4, seen
    assert_survived(mux.server, seen, caplog)


def _hold_call(monkeypatch: pytest.MonkeyPatch, call_id: int) -> tuple[threading.Event, list[int]]:
    """Make each request ``call_id`` from now on wait on its worker until the returned
    event is set (at most 10 s); the list counts the ones dispatched so far."""
    release, seen = threading.Event(), [0]
    real = dispatch_module.dispatch

    def held_dispatch(client: object, body: bytes) -> bytes:
        if int.from_bytes(body[:4], "big") == call_id:
            seen[0] += 1
            release.wait(10)
        return real(client, body)  # type: ignore[arg-type]

    monkeypatch.setattr("pkcs11_shim.server.dispatch", held_dispatch)
    return release, seen


def _count_lingering_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The call ids a worker waiting on its connection read and ran itself."""
    ran: list[int] = []
    real = Server._read_next

    def read_next(self: Server, conn: object) -> tuple[int, bytes, int | None] | None:
        call = real(self, conn)  # type: ignore[arg-type]
        if call is not None:
            ran.append(int.from_bytes(call[1][:4], "big"))
        return call

    monkeypatch.setattr(Server, "_read_next", read_next)
    return ran


@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """Every thread of this process (test client and server alike; threads started
    meanwhile inherit it) on the first CPU it may use, then back."""
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    before = {t: os.sched_getaffinity(t) for t in tasks}
    cpu = min(os.sched_getaffinity(0))
    for t in tasks:
        os.sched_setaffinity(t, {cpu})
    try:
        yield
    finally:
        for t, cpus in before.items():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(t, cpus)


def test_a_signer_in_a_loop_is_read_by_the_worker_that_answered_it(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v4 client signing ML-DSA in a loop: the worker that sent a reply waits on the
    connection and runs the next signature itself, and the loop thread never wakes for
    it, even with client and server on one CPU, where the client answers a reply before
    the worker runs again (the loop then woke, could not read the connection, and kept
    the GIL from the worker: 5 ms stalls); every signature is right, and the short calls
    that follow (read by that worker too) still reach the loop: session info, a logout
    that ends the next signature's login."""
    monkeypatch.setattr(server_module, "_LINGER_MS", 2000)  # the next request always comes
    ran = _count_lingering_reads(monkeypatch)
    woke: list[bool] = []
    real_event = Server._on_event

    def on_event(self: Server, conn: Any, ev: int) -> None:
        woke.append(conn.held)
        real_event(self, conn, ev)

    monkeypatch.setattr(Server, "_on_event", on_event)
    p = MuxPeer(mux.server.path, EXTENSION_VERSION_4)
    (s,) = p.setup(1)
    key = p.find_private(s, mux.key)
    woke.clear()
    with _one_cpu():
        for i in range(8):
            m = os.urandom(20 + i)
            mux.signs_once(p, 800 + i, s, key, m)
    assert ran == [CALL_SIGN_ONCE] * 7  # all but the first, which the loop read
    assert woke == [False]  # the loop woke for the first request only
    p.sock.sendall(p.wire(810, 13, "u", _u64(s)))  # C_GetSessionInfo
    code, info = p.reply()
    assert (code, info.call_id) == (810, 13)
    p.sock.sendall(p.wire(811, 19, "u", _u64(s)))  # C_Logout
    assert p.reply()[0] == 811
    p.sock.sendall(p.once_frame(812, s, key, b"after logout"))
    code, refused = p.reply()
    assert (code, refused.call_id, refused.u()) == (812, 0, 0x101)  # CKR_USER_NOT_LOGGED_IN
    assert ran == [CALL_SIGN_ONCE] * 7
    p.close()


def test_a_call_the_waiting_worker_runs_leaves_the_connection_to_the_loop(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signature a waiting worker reads goes back into the loop's hands before it
    runs: while it is held, a call on another session is answered, and a second
    signature on that session runs beside it."""
    monkeypatch.setattr(server_module, "_LINGER_MS", 2000)
    ran = _count_lingering_reads(monkeypatch)
    p = MuxPeer(mux.server.path, EXTENSION_VERSION_4)
    s1, s2 = p.setup(2)
    key = p.find_private(s1, mux.key)
    mux.signs_till_held(p, 900, s1, key)
    ran.clear()
    release, seen = _hold_call(monkeypatch, CALL_SIGN_ONCE)
    m1, m2 = os.urandom(31), os.urandom(32)
    p.sock.sendall(p.once_frame(901, s1, key, m1))  # held, on that worker
    p.sock.sendall(p.wire(902, 13, "u", _u64(s2)))
    code, info = p.reply()
    assert (code, info.call_id) == (902, 13)  # answered while 901 is held
    p.sock.sendall(p.once_frame(903, s2, key, m2))  # held too, on another worker
    deadline = time.monotonic() + 10
    while seen[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen[0] == 2  # both held signatures are running at once
    release.set()
    replies = dict(p.reply() for _ in range(2))
    mux.check(replies[901].ay(), m1)
    mux.check(replies[903].ay(), m2)
    assert ran[0] == CALL_SIGN_ONCE  # 901 was read by the worker that sent the last 900
    p.close()


def test_a_worker_never_waits_on_a_connection_the_loop_closed(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone while its signature runs: the loop closes its socket, and the next
    client is given the same descriptor.  The worker that finishes the signature must
    not take that descriptor for its own connection's (it would steal the new client's
    requests from the loop)."""
    monkeypatch.setattr(server_module, "_LINGER_MS", 2000)
    release = _hold_signatures(monkeypatch)
    gone = mux.peer()
    (s,) = gone.setup(1)
    gone.sign_init(s, gone.find_private(s, mux.key))
    (old_fd,) = mux.server._conns
    gone.sock.sendall(gone.sign_frame(950, s, b"gone"))
    gone.close()
    deadline = time.monotonic() + 10
    while mux.server._conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mux.server._conns  # the loop closed it; the signature is still held
    nxt = mux.peer()
    nxt.sock.settimeout(5)
    (s2,) = nxt.setup(1)
    assert list(mux.server._conns) == [old_fd]  # the descriptor came back
    release.set()
    time.sleep(0.2)  # the held signature ends and its worker tries to send
    key = nxt.find_private(s2, mux.key)
    nxt.sign_init(s2, key)
    nxt.sock.sendall(nxt.sign_frame(951, s2, b"next"))
    code, r = nxt.reply()
    assert code == 951
    mux.check(r.ay(), b"next")
    nxt.close()


def test_only_so_many_workers_wait_on_connections(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting workers are capped (_LINGERERS), so they never take the whole pool: with a
    cap of one, three clients that signed leave one worker waiting, and all three (and a
    fourth that logs in, which needs a worker) are served."""
    monkeypatch.setattr(server_module, "_LINGER_MS", 2000)
    monkeypatch.setattr(server_module, "_LINGERERS", 1)
    peers = [MuxPeer(mux.server.path, EXTENSION_VERSION_4) for _ in range(3)]
    sessions = [p.setup(1)[0] for p in peers]
    keys = [p.find_private(s, mux.key) for p, s in zip(peers, sessions, strict=True)]
    for rnd in range(2):
        for i, (p, s, key) in enumerate(zip(peers, sessions, keys, strict=True)):
            m = os.urandom(24 + i)
            mux.signs_once(p, 1100 + 10 * rnd + i, s, key, m)
        assert mux.server._lingering == 1
    mux.still_signs(b"a fourth client")
    for p in peers:
        p.close()


def test_a_pin_read_by_a_waiting_worker_is_wiped_from_its_buffer(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C_Login sent right after a signature is read by the worker waiting on the
    connection; it goes on to the loop (which wipes its own copies) and is answered
    (already logged in), and the worker's receive buffer holds no byte of it after."""
    monkeypatch.setattr(server_module, "_LINGER_MS", 2000)
    buffers: list[bytes] = []
    real = Server._read_next

    def read_next(self: Server, conn: Any) -> tuple[int, bytes, int | None] | None:
        call = real(self, conn)
        buffers.append(bytes(self._local.buf))  # this worker thread's buffer
        return call

    monkeypatch.setattr(Server, "_read_next", read_next)
    p = MuxPeer(mux.server.path, EXTENSION_VERSION_4)
    (s,) = p.setup(1)
    key = p.find_private(s, mux.key)
    for i in range(3):
        mux.signs_till_held(p, 1200 + i, s, key)
        p.sock.sendall(p.wire(1210 + i, 18, "uuay", _u64(s) + _u64(1) + _ay(PIN)))
        code, login = p.reply()
        assert (code, login.call_id, login.u()) == (1210 + i, 0, 0x100)  # ALREADY_LOGGED_IN
    assert len(buffers) == 3  # each login came through the waiting worker
    assert all(not any(b) for b in buffers)
    p.close()


@dataclass
class _SessionHold:
    """SignOnce requests of one session wait on their workers until ``release`` (at most
    10 s); each such call's dispatch start and end are recorded, and with ``fail`` set
    the held call raises ProtocolError once released (its connection must be closed)."""

    session: int = 0
    only_first: bool = False
    fail: bool = False
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: threading.Event = dataclasses.field(default_factory=threading.Event)
    spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)


def _hold_session(monkeypatch: pytest.MonkeyPatch, hold: _SessionHold) -> None:
    real = dispatch_module.dispatch

    def held_dispatch(client: object, body: bytes) -> bytes:
        if body[:4] != CALL_SIGN_ONCE.to_bytes(4, "big") or _session_of(body) != hold.session:
            return real(client, body)  # type: ignore[arg-type]
        start = time.monotonic()
        try:
            if not (hold.only_first and hold.spans):
                hold.started.set()
                hold.release.wait(10)
                if hold.fail:
                    raise ProtocolError("held call failed")
            return real(client, body)  # type: ignore[arg-type]
        finally:
            hold.spans.append((start, time.monotonic()))

    monkeypatch.setattr("pkcs11_shim.server.dispatch", held_dispatch)


def _one_held(
    mux: Mux,
    monkeypatch: pytest.MonkeyPatch,
    hold: _SessionHold,
    linger_ms: int,
    code: int,
    message: bytes,
) -> tuple[MuxPeer, int, int]:
    """A v4 client with two sessions whose second one's signature of ``message`` (request
    ``code``) is now held on its worker; the client, its first session and the key."""
    monkeypatch.setattr(server_module, "_LINGER_MS", linger_ms)
    _hold_session(monkeypatch, hold)
    p = MuxPeer(mux.server.path, EXTENSION_VERSION_4)
    s1, hold.session = p.setup(2)
    key = p.find_private(s1, mux.key)
    p.sock.sendall(p.once_frame(code, hold.session, key, message))
    assert hold.started.wait(10), "the held call never started"
    return p, s1, key


def test_a_worker_waits_on_a_connection_while_another_session_signs(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's two threads on one connection: while one thread's signature runs (held
    here), the worker that answered the other thread takes the connection over and reads
    that thread's next requests itself (a connection with a call in flight used to be
    left to the loop: each request cost a wake-up of the loop thread and a hand-off to
    a worker); every signature is right."""
    ran = _count_lingering_reads(monkeypatch)
    held = os.urandom(33)
    hold = _SessionHold()
    p, s1, key = _one_held(mux, monkeypatch, hold, 2000, 1300, held)
    for i in range(6):
        m = os.urandom(20 + i)
        mux.signs_once(p, 1301 + i, s1, key, m)
    # All but the first (the loop's) as a rule; on a loaded machine the loop may still be
    # leaving the connection when a worker would take it, and then reads one more.
    assert ran.count(CALL_SIGN_ONCE) == len(ran) >= 3
    hold.release.set()
    code, r = p.reply()
    assert code == 1300
    mux.check(r.ay(), held)
    p.close()


def test_a_waiting_worker_leaves_a_busy_sessions_request_to_wait(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second signature on a session whose first one still runs, read by the worker
    waiting on the connection, is not run beside it: it waits (the loop holds it back)
    and runs once the first is done, so the session's replies come in order."""
    first, second = os.urandom(34), os.urandom(35)
    hold = _SessionHold(only_first=True)
    p, s1, key = _one_held(mux, monkeypatch, hold, 2000, 1400, first)
    mux.signs_till_held(p, 1401, s1, key)
    p.sock.sendall(p.once_frame(1402, hold.session, key, second))
    time.sleep(0.2)  # time to run it, were it run beside the first
    assert len(hold.spans) == 0  # neither has ended, and the second has not started
    hold.release.set()
    (c1, r1), (c2, r2) = p.reply(), p.reply()
    assert (c1, c2) == (1400, 1402)
    mux.check(r1.ay(), first)
    mux.check(r2.ay(), second)
    (_, end_first), (start_second, _) = hold.spans
    assert start_second >= end_first


def test_a_call_failing_while_a_worker_waits_closes_the_connection(
    mux: Mux, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A call whose request turns out malformed while another worker waits on its
    connection: that worker hands the connection to the loop, which closes it (the
    failing call's worker never does, so a descriptor the loop closed and reused is
    never waited on); the server goes on serving."""
    hold = _SessionHold(fail=True)
    p, s1, key = _one_held(mux, monkeypatch, hold, 300, 1500, b"fails")
    mux.signs_till_held(p, 1501, s1, key)
    with caplog.at_level(logging.WARNING, logger="pkcs11_shim.server"):
        hold.release.set()
        with pytest.raises(ConnectionError):
            _read_until_closed(p)
    assert "closing a PKCS#11 connection: held call failed" in caplog.text
    mux.still_signs(b"still serving")


def test_a_reply_not_sent_whole_while_a_worker_waits_still_goes_out(
    mux: Mux, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signature whose reply the socket takes only in part while another worker waits
    on the connection: that worker hands the connection to the loop, which sends the
    rest once the client reads, and the connection goes on serving."""
    held = os.urandom(37)
    hold = _SessionHold()
    p, s1, key = _one_held(mux, monkeypatch, hold, 300, 1600, held)
    mux.signs_till_held(p, 1601, s1, key)
    (conn,) = mux.server._conns.values()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's least
    assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 4627
    hold.release.set()
    time.sleep(0.5)  # the held reply is sent in part; the waiting worker's wait ends
    code, r = p.reply()
    assert code == 1600
    mux.check(r.ay(), held)
    again = os.urandom(39)
    mux.signs_once(p, 1602, s1, key, again)
    p.close()
