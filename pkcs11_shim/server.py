"""p11-kit RPC server on a Unix socket (DESIGN §8).

The socket file is 0600 inside a directory only its owner can enter (0700), and every
peer's uid (``SO_PEERCRED``) must be ours or root's.  After the one-byte version handshake
(the client offers 0, p11-kit, or 0x50-0x53, the pqhsm extension of libpqhsm-pkcs11.so, and
we echo it; any other byte closes the connection), the client sends frames as three writes
(header, options, body).  A frame that does not parse closes that connection only; every
other client keeps being served.

Concurrency (issue 6: "don't let one slow client stall others").  One event-loop thread
owns every socket (``epoll``): it reads whatever has arrived, cuts complete frames out of
a per-connection buffer and answers the short calls itself.  Those are nearly all calls,
and the token's classical signatures among them: handing a ~0.15 ms token call to a
worker thread cost more than it saved (measured with 8 clients: server CPU per ECDSA
signature 430 µs inline, 660 µs through the pool).  Calls that may take long
(:func:`~pkcs11_shim.dispatch.runs_long`: Argon2id logins, key generation with its WAL
fsync, ML-DSA, dual and composite signing, which ``cryptography`` does without the GIL,
and messages over 64 KiB) go to a small worker pool; the connection is taken out of the
loop until its reply is ready, so a client never has two calls in flight, and the loop
keeps serving everyone else.  A multiplexed connection (extension v3, v4) is the exception:
its client may have several calls out at once (one per application thread), so the loop
keeps reading it, answers its short calls at once and runs its long signatures and
verifications of different sessions side by side, each worker sending its reply as soon
as it is ready (:func:`~pkcs11_shim.dispatch.plan` says which requests must wait for the
calls in flight).  The worker that answered such a connection, when the loop has
nothing of it to do, waits a few milliseconds on its socket for the next request
(:meth:`Server._linger`): a client signing ML-DSA in a loop then skips two thread
wake-ups per signature.  Replies that do not fit the socket buffer wait in the
connection's output buffer (``EPOLLOUT``); no thread ever blocks on a slow reader.

Against a thread per connection (slice 1) this cut the syscalls per message (one
``recv`` usually takes the three writes of a frame together) and the hand-offs of the GIL
between up to 64 threads; ``bench/bench_pkcs11.py`` has the numbers.

Limits per connection: a message part (options or body) larger than ``max_message``
(default and ceiling :data:`~pkcs11_shim.rpc.MAX_MESSAGE`) closes the connection as soon
as its header is read; so does ``idle_timeout`` seconds (default 300) without a byte from
the client, whether between messages or inside one (swept every quarter of the timeout,
at most every second).  At most :data:`MAX_CONNECTIONS`
connections are open at once.

Processes (``serve --processes N``, :mod:`pkcs11_shim.processes`): the server that owns
the appliance accepts every connection and hands every N-th one to a follower process
over a socketpair (``followers``); a follower's server (``inbox``) has no listening socket
and serves what it is handed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from appliance.errors import ConfigError
from pkcs11_shim.dispatch import PIN_CALLS, Plan, dispatch, plan, runs_long
from pkcs11_shim.model import Client, Pkcs11Model
from pkcs11_shim.options import DEFAULT_IDLE_TIMEOUT
from pkcs11_shim.rpc import HEADER, MAX_MESSAGE, ProtocolError, encode_frame

__all__ = ["DEFAULT_IDLE_TIMEOUT", "MAX_CONNECTIONS", "Server", "listen_private"]

log = logging.getLogger(__name__)

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CALL_ID: Final = struct.Struct(">I")
PROTOCOL_VERSION: Final = 0
#: Version bytes of the pqhsm extension (libpqhsm-pkcs11.so only; README): v1, and v2,
#: whose C_SignInit reply carries the signature length.  Each is echoed; modules of
#: either version keep working against this server.
EXTENSION_VERSION: Final = 0x50
EXTENSION_VERSION_2: Final = 0x51
#: v3: v2, and the connection is multiplexed: a client may send requests while earlier
#: ones run, and replies come back as they are ready, each with its request's code.
EXTENSION_VERSION_3: Final = 0x52
#: v4: v3, and a repeated signature may travel as one request (C_SignInit + C_Sign,
#: :data:`~pkcs11_shim.dispatch.CALL_SIGN_ONCE`): one round trip per signature.
EXTENSION_VERSION_4: Final = 0x53
MAX_CONNECTIONS: Final = 64
#: Calls of one multiplexed connection running on workers at once; more wait their turn.
MAX_IN_FLIGHT: Final = 16
#: Bytes taken from a socket per ``recv`` (a whole frame of the usual calls).
_RECV_CHUNK: Final = 256 * 1024
#: Worker threads for the long calls: enough to keep every core signing ML-DSA and
#: still answer a login (Argon2id) while they do.
_WORKERS: Final = max(4, 2 * (os.cpu_count() or 1))
#: How long a worker that answered a multiplexed connection waits on its socket for the
#: connection's next request (see :meth:`Server._linger`), and how many may wait at once.
_LINGER_MS: Final = 5
_LINGERERS: Final = _WORKERS // 2
#: Bytes a lingering worker takes from a socket per ``recv`` (a whole signing request).
_LINGER_CHUNK: Final = 64 * 1024

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT


def listen_private(path: Path, backlog: int) -> socket.socket:
    """A Unix socket listening on ``path``: mode 0600 from the start, in a 0700 folder
    of ours (created if missing); a stale socket file there is replaced."""
    check_socket_dir(path.parent)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def check_socket_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{directory}: the socket directory must be ours and mode 0700")


class _Conn:
    """One client connection, owned by the loop thread except while ``busy``: then the
    worker running its call owns it, and answers on its socket (see _reply_from_worker),
    or a worker waits on it for its next request (``held``, see Server._linger).

    A multiplexed connection (extension v3, ``mux``) also has calls running on workers
    while the loop goes on serving it (``inflight``, on the sessions ``running``); those
    workers send their replies under ``lock``, which guards the socket's sends, ``outbuf``,
    ``inflight``, ``running``, ``stalled`` (a request waits for in-flight calls) and
    ``parked`` (what such a worker leaves for the one holding the connection).
    """

    __slots__ = (
        "armed",
        "busy",
        "client",
        "deadline",
        "fd",
        "handbacks",
        "handshaken",
        "held",
        "inbuf",
        "inflight",
        "lock",
        "mux",
        "outbuf",
        "parked",
        "reading",
        "running",
        "sock",
        "stalled",
    )

    def __init__(self, sock: socket.socket, client: Client, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.client = client
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.handshaken = False
        self.busy = False  # a worker is running this connection's call
        self.deadline = deadline  # idle timeout: closed when no byte arrives by then
        self.armed = 0  # the events registered with epoll (0: not registered)
        self.mux = False
        self.inflight = 0
        self.running: set[int | None] = set()
        self.stalled = False
        #: A multiplexed connection the loop is serving right now (an event, a hand-back)
        #: and the hand-backs queued for the loop: while either is set no worker may take
        #: the connection over to wait for its next request (Server._linger).
        self.reading = False
        self.handbacks = 0
        self.held = False  # a worker waits on it for its next request (with busy)
        #: A call's worker that had to give the connection back to the loop (a reply not
        #: sent whole, or an error) while another worker held it leaves that here for the
        #: holder: "" (the loop sends and serves what is left) or the error (the loop
        #: closes it).  The holder hands it over when it lets the connection go.
        self.parked: str | None = None
        self.lock = threading.Lock()

    def mask(self) -> int:
        """The epoll events this connection waits for now."""
        if self.outbuf:
            return _OUT  # no new request until the last reply is out (bounds memory)
        return 0 if self.busy or self.stalled else _IN


class Server:
    """Serves a :class:`Pkcs11Model` on ``socket_path`` until :meth:`close`."""

    def __init__(
        self,
        model: Pkcs11Model,
        socket_path: Path,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_message: int = MAX_MESSAGE,
        followers: Sequence[socket.socket] = (),
        inbox: socket.socket | None = None,
    ) -> None:
        if idle_timeout <= 0:
            raise ConfigError("the idle timeout must be positive")
        if not 1024 <= max_message <= MAX_MESSAGE:
            raise ConfigError(f"the message limit must be 1024 to {MAX_MESSAGE} bytes")
        self.model = model
        self.path = Path(socket_path).absolute()
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self._sock: socket.socket | None = None
        self._epoll: select.epoll | None = None
        self._wake_r, self._wake_w = -1, -1
        self._conns: dict[int, _Conn] = {}
        self._done: collections.deque[tuple[_Conn, bytes | None, str | None]] = collections.deque()
        #: Multiplexed connections a worker handed back: a waiting request, a reply left
        #: in ``outbuf``, or an error (then the connection is closed).
        self._mux_done: collections.deque[tuple[_Conn, str | None]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self._closing = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._close_lock = threading.Lock()
        self._closer: threading.Thread | None = None  # the thread running close()
        self._closed = threading.Event()
        self._rbuf = bytearray(_RECV_CHUNK)  # the loop's receive buffer, reused
        self._rview = memoryview(self._rbuf)
        self._lingering = 0  # workers waiting on a connection (_claim), under _linger_lock
        self._linger_lock = threading.Lock()
        self._local = threading.local()  # a lingering worker's receive buffer
        #: The owner's hand-off sockets, one per follower; accepted connections go round
        #: them and this server (``_turn``).  A follower's: where connections arrive.
        self._followers = list(followers)
        self._turn = 0
        self._inbox = inbox

    @property
    def address(self) -> str:
        """The value for ``P11_KIT_SERVER_ADDRESS``."""
        return f"unix:path={self.path}"

    def start(self) -> None:
        """Bind and listen (a follower: take connections from its inbox), then serve from
        a background event-loop thread."""
        sock = listen_private(self.path, 64) if self._inbox is None else self._inbox
        sock.setblocking(False)
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ep = select.epoll()
        ep.register(sock.fileno(), _IN)
        ep.register(self._wake_r, _IN)
        self._epoll = ep
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="p11-work")
        self._loop_thread = threading.Thread(target=self._loop, name="p11-loop", daemon=True)
        self._loop_thread.start()
        log.info("serving PKCS#11 on %s", self.path)

    def wait(self) -> None:
        """Block until :meth:`close` is called."""
        self._closing.wait()

    def close(self) -> None:
        """Stop accepting, close every connection and remove the socket file.  A second
        call (another thread's) waits until the first one is done."""
        me = threading.current_thread()
        with self._close_lock:
            closer = self._closer
            if closer is None:
                self._closer = me
            self._closing.set()
        if closer is not None:
            if me is not closer and me is not self._loop_thread:
                self._closed.wait(timeout=30)
            return
        self._wake()
        loop = self._loop_thread
        if loop is not None and loop is not threading.current_thread():
            loop.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._teardown()
        if self._inbox is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        log.info("PKCS#11 server stopped")
        self._closed.set()

    # -- the loop --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        ep, lsock = self._epoll, self._sock
        if ep is None or lsock is None:
            return
        lfd, wake, conns = lsock.fileno(), self._wake_r, self._conns
        # Idle connections are swept a few times per timeout, not checked at every wake-up.
        sweep_every = min(self.idle_timeout / 4, 1.0)
        next_sweep = time.monotonic() + sweep_every
        try:
            while not self._closing.is_set():
                for fd, ev in ep.poll(max(next_sweep - time.monotonic(), 0.0)):
                    conn = conns.get(fd)
                    if conn is not None:
                        self._on_event(conn, ev)
                    elif fd == lfd:
                        self._accept(lsock)
                    elif fd == wake:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake, 4096)
                        self._finish_long_calls()
                        self._finish_parallel_calls()
                now = time.monotonic()
                if now >= next_sweep:
                    self._expire_idle(now)
                    next_sweep = now + sweep_every
        except Exception:  # a bug here must not leave clients hanging on a dead loop
            log.exception("PKCS#11 event loop failed; stopping the server")
            self._closing.set()

    def _expire_idle(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            with conn.lock:  # a worker may be about to take it over (_linger)
                if conn.busy or conn.inflight:
                    continue
                conn.reading = True  # for good: it is closed now
            log.info("closing a PKCS#11 connection idle for %g s", self.idle_timeout)
            self._drop(conn)

    def _accept(self, lsock: socket.socket) -> None:
        if self._inbox is not None:
            self._adopt(lsock)
            return
        while True:
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", type(exc).__name__)
                return
            if not self._peer_allowed(sock):
                sock.close()
                continue
            if self._hand_off(sock):
                continue
            self._serve_here(sock)

    def _hand_off(self, sock: socket.socket) -> bool:
        """Pass ``sock`` to the follower whose turn it is (the owner); False when it is
        this server's turn or the follower is gone (then this server serves it)."""
        if not self._followers:
            return False
        turn = self._turn % (len(self._followers) + 1)
        self._turn += 1
        if turn == 0:
            return False
        try:
            socket.send_fds(self._followers[turn - 1], [b"c"], [sock.fileno()])
        except OSError as exc:
            log.warning("a follower process is gone (%s); serving its share here", exc)
            del self._followers[turn - 1]
            return False
        sock.close()
        return True

    def _adopt(self, inbox: socket.socket) -> None:
        """A follower: take the connections the owner handed over; the owner gone (the
        inbox closed) stops this server."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(inbox, 64, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data, fds = b"", []
                log.warning("hand-off socket failed: %s", type(exc).__name__)
            if not data and not fds:
                log.warning("the owner process is gone; stopping")
                threading.Thread(target=self.close, name="p11-close", daemon=True).start()
                return
            for fd in fds:
                self._serve_here(socket.socket(fileno=fd))

    def _serve_here(self, sock: socket.socket) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            log.warning("refused a PKCS#11 client: %d connections open", MAX_CONNECTIONS)
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock, Client(self.model), time.monotonic() + self.idle_timeout)
        self._conns[conn.fd] = conn
        self._rearm(conn)

    @staticmethod
    def _peer_allowed(conn: socket.socket) -> bool:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError:
            return False
        _pid, uid, _gid = _PEERCRED.unpack(creds)
        if uid not in (os.getuid(), 0):
            log.warning("refused a PKCS#11 client with uid %d", uid)
            return False
        return True

    def _rearm(self, conn: _Conn) -> None:
        """Register the connection for what it waits for; a busy one leaves epoll, so a
        hang-up while its worker runs cannot spin the loop."""
        ep, mask = self._epoll, conn.mask()
        if ep is None or mask == conn.armed:
            return
        if mask and conn.armed:
            ep.modify(conn.fd, mask)
        elif mask:
            ep.register(conn.fd, mask)
        else:
            ep.unregister(conn.fd)
        conn.armed = mask

    def _on_event(self, conn: _Conn, ev: int) -> None:
        if not conn.mux:
            self._serve_event(conn, ev)
            return
        with conn.lock:
            if conn.held:  # a worker waits on it (_linger): not ours now
                return
            conn.reading = True
        try:
            self._serve_event(conn, ev)
        finally:
            conn.reading = False

    def _serve_event(self, conn: _Conn, ev: int) -> None:
        try:
            if ev & _OUT or (conn.outbuf and ev & (select.EPOLLERR | select.EPOLLHUP)):
                self._flush(conn)
                if conn.outbuf:
                    return
                self._rearm(conn)
                self._process(conn)
                return
            n = conn.sock.recv_into(self._rbuf)
            if not n:
                if conn.inbuf:
                    log.warning("closing a PKCS#11 connection: connection closed inside a message")
                self._drop(conn)
                return
            conn.deadline = time.monotonic() + self.idle_timeout
            if not conn.inbuf and self._answer_whole(conn, n):
                return
            conn.inbuf += self._rview[:n]
            self._process(conn)
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:
            log.warning("closing a PKCS#11 connection: %s", exc)
            self._drop(conn)
        except OSError as exc:
            if not self._closing.is_set():
                log.info("PKCS#11 connection ended: %s", type(exc).__name__)
            self._drop(conn)

    def _answer_whole(self, conn: _Conn, n: int) -> bool:
        """Answer the request when the ``n`` bytes just read into the loop's buffer are one
        whole frame of a short call on a plain connection, the usual case: straight from
        that buffer, not through the connection's.  False for anything else (a
        multiplexed connection, part of a frame or more than one, a PIN, a long call),
        which :meth:`_process` then takes as it comes.

        :raises ProtocolError: the frame's header is refused; the connection must be closed.
        :raises OSError: the connection failed.
        """
        if conn.mux or conn.busy or conn.outbuf or not conn.handshaken:
            return False
        frame = self._frame(self._rview[:n])
        if frame is None or frame[2] != n or frame[3]:
            return False
        code, start, _end, _secret = frame
        body = bytes(self._rview[start:n])
        if runs_long(conn.client, body):
            return False
        self._send(conn, encode_frame(code, dispatch(conn.client, body)))
        return True

    def _process(self, conn: _Conn) -> None:
        """Answer every complete frame in the buffer, or hand one to a worker.

        :raises ProtocolError: the connection must be closed.
        """
        buf = conn.inbuf
        while not (conn.busy or conn.outbuf or conn.stalled) and conn.fd in self._conns:
            if not conn.handshaken:
                if not buf:
                    return
                version = buf[0]
                del buf[:1]
                log.debug("client offers protocol version %d", version)
                if version in (
                    EXTENSION_VERSION,
                    EXTENSION_VERSION_2,
                    EXTENSION_VERSION_3,
                    EXTENSION_VERSION_4,
                ):
                    conn.client.extended = True
                    conn.client.sized_sign_init = version != EXTENSION_VERSION
                    conn.client.sign_once = version == EXTENSION_VERSION_4
                    conn.mux = version in (EXTENSION_VERSION_3, EXTENSION_VERSION_4)
                elif version != PROTOCOL_VERSION:
                    raise ProtocolError(f"unsupported protocol version {version}")
                conn.handshaken = True
                self._send(conn, bytes((version,)))
                continue
            frame = self._frame(buf)
            if frame is None:
                return
            code, start, end, secret = frame
            body = self._take_secret(buf, start, end) if secret else bytes(buf[start:end])
            if conn.mux:
                if not self._start_mux(conn, code, body):
                    if isinstance(body, bytearray):  # read again when it may run
                        body[:] = bytes(len(body))
                    return  # the request stays in the buffer until it may run
                self._consume(buf, end, secret)
                continue
            self._consume(buf, end, secret)
            if runs_long(conn.client, body):
                conn.busy = True
                self._rearm(conn)
                self._submit(conn, self._long_call, conn, code, body)
                return
            self._send(conn, encode_frame(code, dispatch(conn.client, body)))

    def _frame(self, buf: bytearray | memoryview) -> tuple[int, int, int, bool] | None:
        """The first frame in ``buf``: its code, where its body starts and ends, and
        whether it carries a PIN (:data:`PIN_CALLS`); None until all of it is there.

        :raises ProtocolError: its header is one the server refuses.
        """
        if len(buf) < HEADER.size:
            return None
        code, options_len, body_len = HEADER.unpack_from(buf)
        if max(options_len, body_len) > self.max_message:
            raise ProtocolError("message over the size limit")
        if body_len < 8:
            raise ProtocolError("body too short")
        start = HEADER.size + options_len  # options: the client's module name
        end = start + body_len
        if len(buf) < end:
            return None
        return code, start, end, _CALL_ID.unpack_from(buf, start)[0] in PIN_CALLS

    @staticmethod
    def _take_secret(buf: bytearray, start: int, end: int) -> bytearray:
        """A request that carries a PIN, copied once into a buffer :func:`dispatch` wipes."""
        with memoryview(buf) as view:
            return bytearray(view[start:end])

    def _consume(self, buf: bytearray, end: int, secret: bool) -> None:
        """Drop the first ``end`` bytes of a connection's buffer; a request that carried a
        PIN is overwritten first, and so is the loop's receive buffer it came through."""
        if secret:
            buf[:end] = bytes(end)
            self._rview[:] = bytes(len(self._rview))
        del buf[:end]

    def _submit(self, conn: _Conn, call: Callable[..., None], *args: object) -> None:
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("no worker pool")
            pool.submit(call, *args)
        except RuntimeError:  # the server is closing: this client is done
            self._drop(conn)

    def _start_mux(self, conn: _Conn, code: int, body: bytes | bytearray) -> bool:
        """Run or hand off one request of a multiplexed connection; False when it must
        wait for calls in flight (the connection then stops reading: ``stalled``).

        :raises ProtocolError: the connection must be closed.
        """
        how, session = plan(conn.client, body)
        with conn.lock:
            if conn.inflight and (
                how in (Plan.ALONE, Plan.INLINE_ALONE)
                or session in conn.running
                or (how is Plan.PARALLEL and conn.inflight >= MAX_IN_FLIGHT)
            ):
                conn.stalled = True
            elif how is Plan.PARALLEL:
                conn.inflight += 1
                conn.running.add(session)
        if conn.stalled:
            self._rearm(conn)
            return False
        if how is Plan.INLINE or how is Plan.INLINE_ALONE:
            self._send(conn, encode_frame(code, dispatch(conn.client, body)))
            return True
        if how is Plan.ALONE:
            conn.busy = True
            self._rearm(conn)
            self._submit(conn, self._long_call, conn, code, body)
        else:
            self._submit(conn, self._parallel_call, conn, code, body, session)
        return True

    def _parallel_call(
        self, conn: _Conn, code: int, body: bytes | bytearray, session: int | None
    ) -> None:
        """Worker side of a multiplexed connection's call: run it and send its reply,
        beside the loop and other workers serving the same connection; then, when the loop
        has nothing of the connection's to do, wait here for its next request (_linger)."""
        call: tuple[int, bytes | bytearray, int | None] | None = (code, body, session)
        while call is not None:
            if not self._answer_parallel(conn, *call):
                return
            call = self._linger(conn)

    def _answer_parallel(
        self, conn: _Conn, code: int, body: bytes | bytearray, session: int | None
    ) -> bool:
        """Run one call of a multiplexed connection and send its reply; True when this
        worker has then taken the connection over (``busy``) to wait for its next request."""
        error, claimed = None, False
        try:
            frame = encode_frame(code, dispatch(conn.client, body))
        except ProtocolError as exc:
            frame, error = b"", str(exc)
        except Exception as exc:  # dispatch turns failures into replies; a bug must not
            log.exception("PKCS#11 worker failed: %s", type(exc).__name__)  # hang a client
            frame, error = b"", "internal error"
        with conn.lock:
            conn.inflight -= 1
            conn.running.discard(session)
            # Taken over before the reply goes out: the client may answer it at once, and
            # the loop must not wake for that (on one CPU it would spin on a connection it
            # may not read, and keep the GIL from this worker for a switch interval).
            claimed = error is None and self._claim(conn)
            if frame and not conn.outbuf and not self._closing.is_set():
                try:
                    frame = frame[conn.sock.send(frame) :]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    frame = b""  # the connection is gone; the loop has dropped or drops it
            conn.outbuf += frame
            handback = error is not None or conn.stalled or bool(conn.outbuf)
            if handback:
                if claimed:  # the loop sends the rest (it registers the connection again)
                    claimed = False
                    self._unclaim(conn)
                if conn.held:  # another worker waits on it: that one hands it over
                    conn.parked = error or conn.parked or ""
                    return False
                conn.handbacks += 1
        if handback:
            self._mux_done.append((conn, error))
            self._wake()
            return False
        return claimed

    def _claim(self, conn: _Conn) -> bool:
        """Take a multiplexed connection over from the loop (out of epoll, ``held``) when
        the loop has nothing of it to do: no bytes or reply waiting, no request waiting
        for calls in flight, the loop not serving it, no other worker holding it, a
        lingering slot free.  Calls of it may be in flight on other workers (a client's
        threads signing on their own sessions): they send their replies beside the
        holder, and leave it anything for the loop (``parked``).  Called with
        ``conn.lock`` held (the loop closes a connection under it: a closed one's
        descriptor may already be another connection's)."""
        if (
            conn.sock.fileno() < 0
            or conn.busy
            or conn.reading
            or conn.handbacks
            or conn.inbuf
            or conn.outbuf
            or conn.stalled
            or self._closing.is_set()
        ):
            return False
        with self._linger_lock:
            if self._lingering >= _LINGERERS:
                return False
            self._lingering += 1
        try:
            if self._epoll is None:
                raise ValueError("no epoll")
            if conn.armed:
                self._epoll.unregister(conn.fd)
        except (OSError, ValueError):  # the server is closing under us
            with self._linger_lock:
                self._lingering -= 1
            return False
        conn.armed = 0
        conn.busy = conn.held = True
        return True

    def _unclaim(self, conn: _Conn) -> None:
        """Undo :meth:`_claim` (the connection stays out of epoll, ``armed`` 0, for the
        loop to register again)."""
        conn.busy = conn.held = False
        with self._linger_lock:
            self._lingering -= 1

    def _linger(self, conn: _Conn) -> tuple[int, bytes, int | None] | None:
        """Wait up to :data:`_LINGER_MS` on a connection this worker took over for its
        next request, and return it when it is a call to run here (a long signature or
        verification, whole in one read); anything else goes back to the loop.

        A client signing ML-DSA in a loop sends its next request a fraction of a
        millisecond after its reply: read here, it skips waking the loop thread and then
        a worker (one module client on the CI VM, client latency minus signing time at
        the median: 286-366 -> 255-356 us over 7 alternating runs, within the VM's noise;
        pinned to one CPU 173-212 -> 141-159 us).  While the worker waits the connection
        is out of epoll and ``busy``, so the loop leaves it alone; the next call goes back
        into epoll before it runs, so the client's other threads are served beside it.
        Other threads' calls may be in flight meanwhile (each on its own session): a
        client's threads sharing the module's one connection then have their requests
        read by the worker that answered last, not by the loop (two C client threads,
        client turnaround from reply to next request, mean 317-330 -> 254-279 us).
        """
        try:
            waiting = select.poll()
            waiting.register(conn.fd, select.POLLIN)
            if not waiting.poll(_LINGER_MS) or self._closing.is_set() or conn.parked is not None:
                self._let_go(conn, to_loop=False)
                return None
            call = self._read_next(conn)
            self._let_go(conn, to_loop=call is None or bool(conn.inbuf))
            return call
        except OSError as exc:
            self._done.append((conn, None, f"connection ended: {type(exc).__name__}"))
            self._wake()
            return None
        finally:
            with self._linger_lock:
                self._lingering -= 1

    def _read_next(self, conn: _Conn) -> tuple[int, bytes, int | None] | None:
        """Read what arrived on a connection this worker holds into its buffer; the first
        request, taken out and made ready to run here, when it is a whole call to run
        beside others (:data:`Plan.PARALLEL`), else None (the loop takes the buffer over).

        :raises OSError: the connection failed.
        """
        rbuf: bytearray | None = getattr(self._local, "buf", None)
        if rbuf is None:
            rbuf = self._local.buf = bytearray(_LINGER_CHUNK)
        try:
            n = conn.sock.recv_into(rbuf)
        except (BlockingIOError, InterruptedError):
            return None
        buf = conn.inbuf
        buf += memoryview(rbuf)[:n]
        rbuf[:n] = bytes(n)  # it may have carried a PIN: the loop's buffer is wiped too
        if not n:
            return None  # the client is gone: the loop sees the end of the stream
        conn.deadline = time.monotonic() + self.idle_timeout
        try:
            frame = self._frame(buf)
        except ProtocolError:
            return None  # the loop refuses it
        if frame is None or frame[3]:
            return None  # part of a frame, or a PIN (the loop's path wipes it)
        code, start, end, _secret = frame
        body = bytes(buf[start:end])
        how, session = plan(conn.client, body)
        if how is not Plan.PARALLEL:
            return None
        with conn.lock:
            if session in conn.running or conn.inflight >= MAX_IN_FLIGHT:
                return None  # it waits for a call in flight: the loop holds it back
            conn.inflight += 1
            conn.running.add(session)
        del buf[:end]
        return code, body, session

    def _let_go(self, conn: _Conn, *, to_loop: bool) -> None:
        """Give up a connection this worker holds: back into epoll, or (``to_loop``: bytes
        are buffered, or a call's worker parked a hand-back meanwhile) to the loop, which
        serves what is left or closes it on a parked error."""
        with conn.lock:
            if conn.parked is None and not to_loop:
                self._release(conn)
                return
        self._done.append((conn, b"", None))  # _finish_long_calls takes ``parked``
        self._wake()

    def _release(self, conn: _Conn) -> None:
        """Give a connection a worker held back to the loop's epoll."""
        conn.armed = _IN  # before it is registered: the loop may see it at once
        conn.busy = conn.held = False
        try:
            if self._epoll is None:
                raise ValueError("no epoll")
            self._epoll.register(conn.fd, _IN)
        except (OSError, ValueError):  # the server is closing under us
            conn.armed, conn.busy = 0, True
            self._done.append((conn, None, "server closing"))
            self._wake()

    def _finish_parallel_calls(self) -> None:
        while self._mux_done:
            conn, error = self._mux_done.popleft()
            try:
                if self._conns.get(conn.fd) is not conn:
                    continue  # dropped meanwhile
                if error is not None:
                    log.warning("closing a PKCS#11 connection: %s", error)
                    self._drop(conn)
                    continue
                conn.stalled = False
                self._resume(conn, b"")
            finally:
                with conn.lock:
                    conn.handbacks -= 1

    def _long_call(self, conn: _Conn, code: int, body: bytes | bytearray) -> None:
        """Worker side: run one call and answer it, or queue the reply for the loop."""
        try:
            frame: bytes | None = encode_frame(code, dispatch(conn.client, body))
            error = None
        except ProtocolError as exc:
            frame, error = None, str(exc)
        except Exception as exc:  # dispatch turns failures into replies; a bug must not
            log.exception("PKCS#11 worker failed: %s", type(exc).__name__)  # hang a client
            frame, error = None, "internal error"
        if frame is not None:
            frame = self._reply_from_worker(conn, frame)
            if not frame:
                return
        self._done.append((conn, frame, error))
        self._wake()

    def _reply_from_worker(self, conn: _Conn, frame: bytes) -> bytes:
        """Send the reply from the worker and give the connection back to epoll; what is
        left for the loop (b"" when nothing is).

        While a connection is busy it is out of epoll and the loop leaves it alone, so the
        worker may use its socket.  Answering here saves waking the loop thread and handing
        it the GIL before the client sees its reply (one ML-DSA client, A/B on the CI VM:
        416 -> 446 signatures/s).  Anything unusual (frames queued behind the call, a
        reply the socket does not take at once, the server closing) goes back to the loop.
        """
        ep = self._epoll
        if conn.inbuf or ep is None or self._closing.is_set():
            return frame
        try:
            n = conn.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            return frame
        except OSError:
            return frame  # the loop's own send fails the same way and drops the client
        if n < len(frame):
            return frame[n:]
        conn.deadline = time.monotonic() + self.idle_timeout
        self._release(conn)
        return b""

    def _finish_long_calls(self) -> None:
        while self._done:
            conn, frame, error = self._done.popleft()
            with conn.lock:
                conn.busy = conn.held = False
                conn.reading = True  # no worker takes it over until this is done
                parked, conn.parked = conn.parked, None
            try:
                if self._conns.get(conn.fd) is not conn:
                    continue  # dropped meanwhile
                conn.deadline = time.monotonic() + self.idle_timeout
                if frame is None or parked:
                    log.warning("closing a PKCS#11 connection: %s", error or parked)
                    self._drop(conn)
                    continue
                if parked is not None:  # a call ended while a worker held it
                    conn.stalled = False
                self._resume(conn, frame)
            finally:
                conn.reading = False

    def _resume(self, conn: _Conn, reply: bytes) -> None:
        """Send ``reply`` (if any), then serve the frames that waited in the buffer."""
        try:
            if reply:
                self._send(conn, reply)
            else:
                self._rearm(conn)
            self._process(conn)
        except ProtocolError as exc:
            log.warning("closing a PKCS#11 connection: %s", exc)
            self._drop(conn)
        except OSError as exc:
            log.info("PKCS#11 connection ended: %s", type(exc).__name__)
            self._drop(conn)

    def _send(self, conn: _Conn, data: bytes) -> None:
        """Send now what the socket takes; keep the rest for ``EPOLLOUT``."""
        with conn.lock:
            if conn.outbuf:
                conn.outbuf += data
                return
            try:
                n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n < len(data):
                conn.outbuf += data[n:]
        self._rearm(conn)

    def _flush(self, conn: _Conn) -> None:
        with conn.lock:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del conn.outbuf[:n]

    def _drop(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        if conn.armed and self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(conn.fd)
            conn.armed = 0
        with conn.lock, contextlib.suppress(OSError):  # no worker is sending on it now
            conn.sock.close()

    def _teardown(self) -> None:
        for conn in list(self._conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self._drop(conn)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._epoll is not None:
            self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
