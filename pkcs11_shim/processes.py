"""Server processes beside the one that owns the appliance (``serve --processes N``).

One Python process serves PKCS#11 on one core (its event loop holds the GIL), so the
server can start N-1 *followers*: processes of their own, each with its own token session
and event loop, that serve connections the owner hands them (docs/server-scaling.md).

* **Hand-off.** The owner accepts every connection, checks its peer credentials, and
  passes every N-th one to a follower over a socketpair (``SCM_RIGHTS``), so clients are
  spread evenly and a follower never listens itself.
* **Following.** A follower reads the WAL without its lock, never past the owner's last
  commit, which the owner publishes in a shared 8-byte page (:class:`Watermark`) from the
  WAL's commit hook, after the fsync; the follower reads again when it moved before it
  looks a key up (:meth:`Appliance.open_follower <appliance.service.Appliance.open_follower>`).
* **Writing and sealed keys.** A follower signs classically with the token. It holds no
  passphrase and no sealed key: key creation and every signature that needs ML-DSA-87
  (ML-DSA, dual, composite) go to the owner over control socketpairs the follower
  inherited at its start (:class:`OwnerLink`, :class:`OwnerProxy`), as length-prefixed
  CBOR maps.  They have no name in the file system: no other process, not even one of the
  same uid, can reach them and skip the PKCS#11 client login.

A follower exits when the owner goes away (its hand-off socket closes); the owner stops
its followers when it stops.  Nothing secret crosses the control sockets: messages to
sign and signatures, key types and labels, error names.  The token PIN reaches a
follower once, through a pipe at start (``--pin-fd``).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Sequence
from typing import Any, Final

from appliance import codec, errors
from appliance.errors import ApplianceError, DeviceError
from appliance.secret import SecretBytes
from appliance.service import Appliance
from pkcs11_shim.rpc import MAX_MESSAGE

__all__ = ["Followers", "OwnerLink", "OwnerProxy", "Watermark"]

log = logging.getLogger(__name__)

_LEN: Final = struct.Struct(">I")
_U64: Final = struct.Struct("<Q")
#: Control socketpairs per follower: its requests to the owner in flight at once (its
#: worker pool's long calls: ML-DSA signatures, key generation).
CONTROL_SOCKETS: Final = 8
#: A control message: a message to sign (at most MAX_MESSAGE) and a little more.
_MAX_CONTROL: Final = MAX_MESSAGE + 4096


class Watermark:
    """The owner's committed WAL length, in a shared page (a ``memfd``) followers map.

    The owner writes it under the WAL's mutex after each commit (values only grow); a
    reader takes a value two reads in a row agree on, so an 8-byte copy caught half-way
    is never used.
    """

    __slots__ = ("_map", "fd")

    def __init__(self, fd: int, *, writable: bool) -> None:
        self.fd = fd
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self._map = mmap.mmap(fd, _U64.size, access=access)

    @classmethod
    def create(cls) -> Watermark:
        fd = os.memfd_create("pqhsm-wal-committed", os.MFD_CLOEXEC)
        os.ftruncate(fd, _U64.size)
        return cls(fd, writable=True)

    def publish(self, end: int) -> None:
        _U64.pack_into(self._map, 0, end)

    def read(self) -> int:
        last: int = _U64.unpack_from(self._map, 0)[0]
        while True:
            now: int = _U64.unpack_from(self._map, 0)[0]
            if now == last:
                return now
            last = now

    def close(self) -> None:
        self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _send_msg(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = codec.dumps(obj)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def _recv_msg(sock: socket.socket) -> dict[str, Any] | None:
    """One message; None when the peer closed between messages.

    :raises DeviceError: a malformed or oversized message, or one cut short.
    """
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > _MAX_CONTROL:
        raise DeviceError("control message over the size limit")
    body = _recv_exact(sock, n)
    if body is None:
        raise DeviceError("control connection closed inside a message")
    try:
        return codec.loads_map(body, "control message")
    except ApplianceError as exc:
        raise DeviceError(f"bad control message: {exc}") from None


class OwnerLink:
    """In the owner: answers its followers' requests, one thread per control socket.

    The control sockets are socketpairs made when a follower starts and inherited by it
    alone: there is no name to connect to, so no other process (not even one of the same
    uid, which could otherwise skip the PKCS#11 client login) can ask the owner to sign.
    """

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def pair(self) -> socket.socket:
        """A new control socketpair: this side is served at once; the other (returned)
        is for one follower to inherit (the caller closes its copy after the spawn)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            self._conns.add(ours)
        thread = threading.Thread(target=self._serve, args=(ours,), name="owner-link", daemon=True)
        self._threads.append(thread)
        thread.start()
        return theirs

    def _serve(self, conn: socket.socket) -> None:
        try:
            while (msg := _recv_msg(conn)) is not None:
                _send_msg(conn, self._answer(msg))
        except (OSError, DeviceError) as exc:
            if not self._closing.is_set():
                log.warning("follower control connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        app = self.app
        try:
            op = msg.get("op")
            if op == "create_key":
                key = app.create_key(str(msg["type"]), str(msg["label"]))
                return {"ok": key.key_id}
            if op == "sign":
                context = msg["context"]
                message = msg["message"]
                if not isinstance(context, bytes) or not isinstance(message, bytes):
                    raise DeviceError("bad control message")
                kind = msg["kind"]
                sig = app.sign(
                    app.key(str(msg["key_id"])),
                    message,
                    kind=None if kind is None else str(kind),
                    raw=bool(msg["raw"]),
                    context=context,
                    prehashed=bool(msg["prehashed"]),
                )
                return {"ok": sig}
            raise DeviceError(f"unknown control operation {op!r}")
        except ApplianceError as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        except (KeyError, TypeError, ValueError):
            return {"error": "DeviceError", "message": "bad control message"}
        except Exception as exc:  # a bug must not kill the follower's connection silently
            log.exception("follower request failed: %s", type(exc).__name__)
            return {"error": "DeviceError", "message": "internal error in the owner process"}

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)


class OwnerProxy:
    """In a follower: the owner's :class:`OwnerLink`, as an
    :class:`appliance.service.Writer`, over the control sockets it inherited.
    Thread-safe: each call takes an idle socket (waiting when all are in use), so the
    owner serves a follower's concurrent requests side by side."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self._idle = list(socks)
        self._open = len(self._idle)
        self._cond = threading.Condition()

    def _call(self, msg: dict[str, Any]) -> Any:
        with self._cond:
            while not self._idle:
                if not self._open:
                    raise DeviceError("the owner process is not reachable")
                self._cond.wait()
            sock = self._idle.pop()
        reply: dict[str, Any] | None = None
        try:
            _send_msg(sock, msg)
            reply = _recv_msg(sock)
            if reply is None:
                raise DeviceError("the owner process closed the control connection")
        except (OSError, DeviceError) as exc:
            reply = None
            raise DeviceError(f"the owner process did not answer: {exc}") from None
        finally:
            with self._cond:
                if reply is None:  # this socket is broken: never used again
                    sock.close()
                    self._open -= 1
                else:
                    self._idle.append(sock)
                self._cond.notify()
        if "error" in reply:
            text = str(reply.get("message", ""))
            cls = getattr(errors, str(reply["error"]), None)
            if not (isinstance(cls, type) and issubclass(cls, ApplianceError)):
                raise DeviceError(text)
            try:
                error = cls(text)
            except TypeError:  # an error class with more to say than a message
                raise DeviceError(text) from None
            raise error
        return reply["ok"]

    def create_key(self, key_type: str, label: str) -> str:
        return str(self._call({"op": "create_key", "type": key_type, "label": label}))

    def sign(
        self,
        key_id: str,
        message: bytes,
        *,
        kind: str | None,
        raw: bool,
        context: bytes,
        prehashed: bool,
    ) -> bytes:
        sig = self._call(
            {
                "op": "sign",
                "key_id": key_id,
                "message": bytes(message),
                "kind": kind,
                "raw": raw,
                "context": bytes(context),
                "prehashed": prehashed,
            }
        )
        if not isinstance(sig, bytes):
            raise DeviceError("the owner process answered a signature that is not bytes")
        return sig

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for sock in idle:
            sock.close()


class Followers:
    """In the owner: the follower processes, their hand-off sockets, the watermark and
    the control link; :meth:`close` stops them all."""

    def __init__(
        self,
        app: Appliance,
        n: int,
        argv: Sequence[str],
        pin: SecretBytes,
        *,
        control_sockets: int = CONTROL_SOCKETS,
        start_timeout: float = 60.0,
    ) -> None:
        """Start ``n`` followers: ``argv`` (a ``serve`` command line for this home and
        socket) plus ``--pin-fd`` and ``--follower``; each gets the PIN through a pipe and
        ``control_sockets`` control socketpairs (its concurrent requests to the owner).

        :raises DeviceError: a follower did not start (it logged why on stderr).
        """
        self.app = app
        self.watermark = Watermark.create()
        app.wal.on_commit(self.watermark.publish)  # publishes the current length too
        self.link = OwnerLink(app)
        self.sockets: list[socket.socket] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(n):
                self._spawn(argv, pin, control_sockets)
            for i, sock in enumerate(self.sockets):
                sock.settimeout(start_timeout)
                try:
                    ready = sock.recv(1)
                except OSError:
                    ready = b""
                if ready != b"R":
                    raise DeviceError(f"server process {i + 1} of {n + 1} did not start")
                sock.settimeout(None)
        except BaseException:
            self.close()
            raise

    def _spawn(self, argv: Sequence[str], pin: SecretBytes, control_sockets: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        controls = [self.link.pair() for _ in range(control_sockets)]
        r, w = os.pipe()
        try:
            fds = [theirs.fileno(), self.watermark.fd, *(c.fileno() for c in controls)]
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
                [*argv, "--pin-fd", str(r), "--follower", ",".join(map(str, fds))],
                pass_fds=(r, *fds),
            )
        except BaseException:
            os.close(w)
            ours.close()
            raise
        finally:
            os.close(r)
            theirs.close()
            for c in controls:
                c.close()
        self.sockets.append(ours)
        self.procs.append(proc)
        try:
            with memoryview(pin.view()) as view:
                os.write(w, view)
        finally:
            os.close(w)

    def close(self) -> None:
        """Close the hand-off sockets (each follower then stops), wait for the processes,
        and release the control link and the watermark."""
        for sock in self.sockets:
            sock.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.app.wal.on_commit(None)
        self.link.close()
        self.watermark.close()
