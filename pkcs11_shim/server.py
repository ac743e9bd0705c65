"""p11-kit RPC server on a Unix socket (DESIGN §8).

The socket file is 0600 inside a directory only its owner can enter (0700), and every
peer's uid (``SO_PEERCRED``) must be ours or root's.  One thread serves each connection:
after the one-byte version handshake (the client offers 0, p11-kit, or 0x50, the pqhsm
extension of libpqhsm-pkcs11.so, and we echo it; any other byte closes the connection), the
client sends frames as three writes (header, options, body), read here with exact
lengths.  A frame that does not parse closes that connection only; every other client
keeps being served.

Limits per connection: a message part (options or body) larger than ``max_message``
(default and ceiling :data:`~pkcs11_shim.rpc.MAX_MESSAGE`) closes the connection before
the part is read; so does ``idle_timeout`` seconds (default 300) without a byte from the
client, whether between messages or inside one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Final

from appliance.errors import ConfigError
from pkcs11_shim.dispatch import dispatch
from pkcs11_shim.model import Client, Pkcs11Model
from pkcs11_shim.rpc import HEADER, MAX_MESSAGE, Header, ProtocolError, encode_frame

__all__ = ["Server"]

log = logging.getLogger(__name__)

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
PROTOCOL_VERSION: Final = 0
#: Version byte of the pqhsm extension v1 (libpqhsm-pkcs11.so only; README).
EXTENSION_VERSION: Final = 0x50
MAX_CONNECTIONS: Final = 64
DEFAULT_IDLE_TIMEOUT: Final = 300.0


class _Closed(Exception):
    """The peer closed the connection."""


def _recv_exact(sock: socket.socket, n: int, *, at_start: bool = False) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if at_start and not buf:
                raise _Closed
            raise ProtocolError("connection closed inside a message")
        buf += chunk
    return bytes(buf)


def _check_socket_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{directory}: the socket directory must be ours and mode 0700")


class Server:
    """Serves a :class:`Pkcs11Model` on ``socket_path`` until :meth:`close`."""

    def __init__(
        self,
        model: Pkcs11Model,
        socket_path: Path,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_message: int = MAX_MESSAGE,
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
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._acceptor: threading.Thread | None = None

    @property
    def address(self) -> str:
        """The value for ``P11_KIT_SERVER_ADDRESS``."""
        return f"unix:path={self.path}"

    def start(self) -> None:
        """Bind and listen, then accept connections in a background thread."""
        _check_socket_dir(self.path.parent)
        if self.path.is_socket():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._acceptor = threading.Thread(target=self._accept_loop, name="p11-accept", daemon=True)
        self._acceptor.start()
        log.info("serving PKCS#11 on %s", self.path)

    def wait(self) -> None:
        """Block until :meth:`close` is called."""
        self._closing.wait()

    def close(self) -> None:
        """Stop accepting, close every connection and remove the socket file."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=5)
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log.info("PKCS#11 server stopped")

    def _accept_loop(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                break
            if not self._peer_allowed(conn):
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="p11-conn", daemon=True)
            with self._lock:
                if self._closing.is_set():
                    conn.close()
                    break
                if len(self._conns) >= MAX_CONNECTIONS:
                    log.warning("refused a PKCS#11 client: %d connections open", MAX_CONNECTIONS)
                    conn.close()
                    continue
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

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

    def _serve(self, conn: socket.socket) -> None:
        client = Client(self.model)
        conn.settimeout(self.idle_timeout)
        try:
            version = _recv_exact(conn, 1, at_start=True)[0]
            log.debug("client offers protocol version %d", version)
            if version == EXTENSION_VERSION:
                client.extended = True
            elif version != PROTOCOL_VERSION:
                raise ProtocolError(f"unsupported protocol version {version}")
            conn.sendall(bytes((version,)))
            while not self._closing.is_set():
                header = Header.parse(_recv_exact(conn, HEADER.size, at_start=True))
                if max(header.options_len, header.body_len) > self.max_message:
                    raise ProtocolError("message over the size limit")
                _recv_exact(conn, header.options_len)  # the client's module name
                body = _recv_exact(conn, header.body_len)
                reply = dispatch(client, body)
                conn.sendall(encode_frame(header.code, reply))
        except _Closed:
            pass
        except ProtocolError as exc:
            log.warning("closing a PKCS#11 connection: %s", exc)
        except TimeoutError:
            log.info("closing a PKCS#11 connection idle for %g s", self.idle_timeout)
        except OSError as exc:
            if not self._closing.is_set():
                log.info("PKCS#11 connection ended: %s", type(exc).__name__)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()
