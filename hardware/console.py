"""Serial admin console: a line-oriented security-officer shell over a :class:`Transport`.

One *session* runs from the PIN prompt to ``logout``, ``exit``, an idle timeout or a
disconnect.  After login the officer may inspect the appliance, move keys along the
migration graph, verify the audit chain, write a signed backup, lock/unlock the keystore
and zeroize it.

Line discipline (:class:`LineEditor`, pure logic, no I/O):

* printable bytes are inserted at the cursor and echoed (nothing is echoed while a secret
  is typed);
* backspace (``0x08``) and DEL (``0x7f``) remove the byte before the cursor (``"\\b \\b"``
  at the end of a line); ANSI cursor keys move, Home/End/Delete edit, up/down recall
  earlier commands (see :class:`LineEditor`);
* CR or LF ends a line; CR LF counts once;
* Ctrl-C (``0x03``) cancels the line;
* a line longer than ``max_line`` is discarded as a whole and reported once;
* every other byte (binary garbage, a BREAK read as NUL, unknown escape sequences) is
  ignored and never echoed.

Security:

* The PIN is read straight into a :class:`~appliance.secret.SecretBytes` (never a ``str``),
  checked by the caller's ``check_pin`` (which must compare in constant time), and wiped.
  The same holds for the keystore passphrase of ``unlock``.
* Lockout: the production checker, :func:`so_pin_checker`, is the PKCS#11 front end's rule
  (:mod:`appliance.clientpins`): the attempt is counted durably *before* the PIN is
  checked, ``max_failures`` consecutive failures lock the officer out across restarts,
  and only ``pqhsm console --set-so-pin`` unlocks.  The officer's entry lives in a store
  of its own (``$PQHSM_HOME/console/clients.cbor``), so it never changes how PKCS#11
  clients log in.
* Only command lines whose verb is known enter the history (never a PIN, a passphrase,
  the zeroize confirmation, or a secret typed at the wrong prompt), and the history is
  wiped when the session ends.
* ``migrate`` moves keys forward only; a move to FINALIZING or PQC_ONLY (which erases the
  classical private key) asks for the key's label again, so one mistyped line cannot
  destroy a key.
* ``backup`` writes only inside the operator's backup directory (``--backup-dir``): a
  sub-folder typed on the line must be relative, without ``..``, and must still be inside
  after symbolic links are resolved.
* Nothing secret is logged or echoed; commands are logged by verb only.  Never attach
  pyserial's ``spy://`` to this port while a secret crosses it.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

from appliance import clientpins
from appliance.audit import verify_audit
from appliance.errors import ApplianceError, CallerError, DeviceError, PinIncorrect, PinLocked
from appliance.fsio import ensure_private_dir, fsync_dir
from appliance.keys import KeyState
from appliance.secret import SecretBytes
from hardware.transport import SerialError, SerialTimeout, Transport

if TYPE_CHECKING:
    from appliance.service import Appliance

__all__ = [
    "SO_CLIENT",
    "AdminConsole",
    "EditEvent",
    "LineEditor",
    "LineResult",
    "SessionEnd",
    "confine",
    "main",
    "run_command",
    "set_so_pin",
    "so_pin_checker",
    "so_pin_exists",
    "so_store",
]

log = logging.getLogger(__name__)

CRLF: Final = b"\r\n"
PROMPT: Final = b"pqhsm# "
PIN_PROMPT: Final = b"PIN: "
PASSPHRASE_PROMPT: Final = b"passphrase: "
BS: Final = 0x08
DEL: Final = 0x7F
CTRL_C: Final = 0x03
ESC: Final = 0x1B
CR: Final = 0x0D
LF: Final = 0x0A

HELP: Final = (
    "help                  this text",
    "status                appliance status, one field per line",
    "keys                  label and state of every key",
    "key show LABEL        details of one key",
    "migrate LABEL STATE   move a key forward (" + ", ".join(s.value for s in KeyState) + ")",
    "                      FINALIZING and PQC_ONLY erase the classical key: asks for the label",
    "audit verify          verify the WAL hash chain and signed checkpoints",
    "backup [FOLDER]       write a signed snapshot into the backup directory (or FOLDER in it)",
    "lock                  zeroize the passphrase key",
    "unlock                unlock the keystore (asks for the passphrase)",
    "zeroize               destroy keystore.cbor and every blob (asks for confirmation)",
    "logout                end this session",
    "exit                  end this session and stop the console",
)

USAGE: Final = {
    "key": "key show LABEL",
    "migrate": "migrate LABEL STATE",
    "audit": "audit verify",
    "backup": "backup [FOLDER]",
}

ONE_WAY: Final = frozenset({KeyState.FINALIZING, KeyState.PQC_ONLY})

KNOWN_VERBS: Final = frozenset(
    {"help", "status", "keys", "key", "migrate", "audit", "backup", "lock", "unlock", "zeroize"}
    | {"logout", "exit"}
)


class EditEvent(enum.Enum):
    """What a completed call to :meth:`LineEditor.feed` produced."""

    LINE = "line"  # a line ended with CR or LF
    CANCEL = "cancel"  # Ctrl-C
    TOO_LONG = "too_long"  # the line exceeded max_line and was discarded


@dataclass(frozen=True)
class LineResult:
    """One finished line (or its cancellation); ``data`` is only set for ``LINE``."""

    event: EditEvent
    data: SecretBytes | None = None


class _Esc(enum.Enum):
    NONE = 0
    ESC = 1  # after ESC
    CSI = 2  # after ESC [
    SS3 = 3  # after ESC O


# CSI n ~ codes (VT220 / xterm): Home, Insert, Delete, End, Home, End
_TILDE_HOME: Final = frozenset({b"1", b"7"})
_TILDE_END: Final = frozenset({b"4", b"8"})
_TILDE_DELETE: Final = b"3"
_MAX_CSI: Final = 16  # parameter bytes kept; a longer sequence is consumed and dropped


class LineEditor:
    """Byte-at-a-time line editing into a fixed, wipeable buffer.

    The buffer is allocated once (``max_line`` bytes) and never grows, so a secret typed
    into it is never copied by a reallocation; a finished line is handed over as a
    :class:`SecretBytes` and the buffer is wiped.

    Editing (command lines only; while :attr:`secret` is set, cursor keys and history are
    consumed and ignored, and nothing is echoed): left/right (``ESC [ D``/``ESC [ C``, also
    ``ESC O D``/``C``) move the cursor and typing inserts at it; Home/End (``ESC [ H``/``F``,
    ``ESC O H``/``F``, ``ESC [ 1 ~``/``4 ~``/``7 ~``/``8 ~``); Delete (``ESC [ 3 ~``)
    removes the byte under the cursor, backspace the one before it; up/down (``ESC [ A``/
    ``B``) walk :attr:`history`.  Every other escape sequence (function keys, Insert, PgUp,
    Alt-x, private modes) is consumed whole and never echoed.  The echo only uses printable
    bytes, ``\\b`` and spaces, so it works on any terminal.

    :param max_line: the longest line accepted, in bytes.
    :param history_size: how many earlier lines :meth:`remember` keeps.
    """

    def __init__(self, max_line: int = 256, *, history_size: int = 32) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self.history_size = history_size
        self._buf = SecretBytes(max_line)
        self._n = 0
        self._cur = 0
        self._overflow = False
        self._after_cr = False
        self._esc = _Esc.NONE
        self._csi = bytearray()
        #: earlier command lines, oldest first (never secrets: see :meth:`remember`)
        self.history: list[bytes] = []
        self._hist = 0  # index into history; len(history) = the line being typed
        self._draft = b""
        self.secret = False

    def reset(self) -> None:
        """Forget the current line (the CR-LF state survives: it spans lines)."""
        self._buf.wipe()
        self._n = 0
        self._cur = 0
        self._overflow = False
        self._esc = _Esc.NONE
        self._csi.clear()
        self._hist = len(self.history)
        self._draft = b""

    def wipe(self) -> None:
        """Zero the buffer and forget the history; call when the session ends."""
        self.reset()
        self.history.clear()
        self._hist = 0

    def remember(self, line: bytes) -> None:
        """Add a finished command line to the history (the caller decides what is safe)."""
        if not line or (self.history and self.history[-1] == line):
            return
        self.history.append(bytes(line))
        del self.history[: -self.history_size]
        self._hist = len(self.history)

    def _accepts(self, b: int) -> bool:
        if 0x20 <= b < DEL:
            return True
        return self.secret and b >= 0x80  # passphrases may be UTF-8; commands are ASCII

    def _echo(self, data: bytes) -> bytes:
        return b"" if self.secret else data

    def feed(self, b: int) -> tuple[bytes, LineResult | None]:
        """Process one received byte.

        :returns: the bytes to echo, and a result when a line ended or was cancelled.
        """
        after_cr, self._after_cr = self._after_cr, False
        if self._esc is not _Esc.NONE:
            done, echo = self._escape(b)
            if done:
                return echo, None
            # a control byte broke the sequence off: it is handled as itself below
        if b in (CR, LF):
            if b == LF and after_cr:
                return b"", None  # the LF of a CR LF pair
            self._after_cr = b == CR
            if self._overflow:
                self.reset()
                return CRLF, LineResult(EditEvent.TOO_LONG)
            return CRLF, self._take()
        if b == CTRL_C:
            self.reset()
            return b"^C" + CRLF, LineResult(EditEvent.CANCEL)
        if b == ESC:
            self._esc = _Esc.ESC
            return b"", None
        if self._overflow:
            return b"", None
        if b in (BS, DEL):
            return self._echo(self._backspace()), None
        if not self._accepts(b):
            return b"", None  # garbage, NUL from a BREAK ...
        if self._n >= self.max_line:
            self._overflow = True
            self._buf.wipe()
            self._n = self._cur = 0
            return b"", None
        return self._echo(self._insert(b)), None

    # -- escape sequences ----------------------------------------------------------------------

    def _escape(self, b: int) -> tuple[bool, bytes]:
        """Advance the escape parser; ``(False, b"")`` when ``b`` must be handled as itself."""
        if b in (CR, LF, CTRL_C, ESC):
            self._esc = _Esc.NONE  # an unfinished sequence never swallows Enter or Ctrl-C
            self._csi.clear()
            return False, b""
        state = self._esc
        if state is _Esc.ESC:
            if b == ord("["):
                self._esc = _Esc.CSI
            elif b == ord("O"):
                self._esc = _Esc.SS3
            else:
                self._esc = _Esc.NONE  # Alt-x and the like: ESC and x are dropped
            return True, b""
        if state is _Esc.SS3:
            self._esc = _Esc.NONE
            return True, self._key(b, b"")
        # CSI: parameter bytes 0x30-0x3F, intermediates 0x20-0x2F, one final 0x40-0x7E
        if 0x20 <= b <= 0x3F:
            if len(self._csi) < _MAX_CSI:
                self._csi.append(b)
            return True, b""
        self._esc = _Esc.NONE
        params = bytes(self._csi)
        self._csi.clear()
        if 0x40 <= b <= 0x7E:
            return True, self._key(b, params)
        return True, b""  # a malformed sequence: dropped with its bytes

    def _key(self, final: int, params: bytes) -> bytes:
        """The echo for one complete cursor-key sequence; unknown ones do nothing."""
        if self.secret or self._overflow:
            return b""
        key = chr(final)
        if key == "~":
            if params in _TILDE_HOME:
                key = "H"
            elif params in _TILDE_END:
                key = "F"
            elif params == _TILDE_DELETE:
                return self._delete()
            else:
                return b""  # Insert, PgUp, PgDn, F5-F12 ...
        match key:
            case "D":
                return self._move_to(self._cur - 1)
            case "C":
                return self._move_to(self._cur + 1)
            case "H":
                return self._move_to(0)
            case "F":
                return self._move_to(self._n)
            case "A":
                return self._recall(-1)
            case "B":
                return self._recall(+1)
        return b""

    # -- buffer edits (each returns its echo) ----------------------------------------------------

    def _tail(self, start: int) -> bytes:
        return bytes(self._buf.view()[start : self._n])

    def _insert(self, b: int) -> bytes:
        view = self._buf.view()
        if self.secret:  # always at the end: no tail is copied out of the secret
            view[self._n] = b
            self._n += 1
            self._cur = self._n
            return b""
        cur, n = self._cur, self._n
        view[cur + 1 : n + 1] = view[cur:n]
        view[cur] = b
        self._n += 1
        self._cur += 1
        rest = self._tail(self._cur)
        return bytes([b]) + rest + b"\b" * len(rest)

    def _backspace(self) -> bytes:
        if self._cur == 0:
            return b""
        if self.secret:
            self._n = self._cur = self._cur - 1
            self._buf.view()[self._n] = 0
            return b""
        self._cur -= 1
        return b"\b" + self._remove_at_cursor()

    def _delete(self) -> bytes:
        if self._cur >= self._n:
            return b""
        return self._remove_at_cursor()

    def _remove_at_cursor(self) -> bytes:
        view = self._buf.view()
        cur, n = self._cur, self._n
        view[cur : n - 1] = view[cur + 1 : n]
        view[n - 1] = 0
        self._n -= 1
        rest = self._tail(cur)
        return rest + b" " + b"\b" * (len(rest) + 1)

    def _move_to(self, pos: int) -> bytes:
        pos = max(0, min(pos, self._n))
        if pos < self._cur:
            out = b"\b" * (self._cur - pos)
        else:
            out = bytes(self._buf.view()[self._cur : pos])  # retype: moves right
        self._cur = pos
        return out

    def _recall(self, step: int) -> bytes:
        target = self._hist + step
        if not 0 <= target <= len(self.history):
            return b""
        if self._hist == len(self.history):
            self._draft = self._tail(0)  # a command being typed, never a secret
        self._hist = target
        line = self.history[target] if target < len(self.history) else self._draft
        return self._replace(line[: self.max_line])

    def _replace(self, line: bytes) -> bytes:
        old = self._n
        out = self._move_to(0)
        self._buf.wipe()
        self._buf.view()[: len(line)] = line
        self._n = self._cur = len(line)
        out += line
        if old > len(line):
            pad = old - len(line)
            out += b" " * pad + b"\b" * pad
        return out

    def _take(self) -> LineResult:
        line = SecretBytes(self._buf.view()[: self._n])
        self.reset()
        return LineResult(EditEvent.LINE, line)


class SessionEnd(enum.Enum):
    """Why :meth:`AdminConsole.serve_once` returned."""

    LOGOUT = "logout"
    EXIT = "exit"
    IDLE = "idle"
    DISCONNECT = "disconnect"
    STOPPED = "stopped"


class _EndSession(Exception):
    def __init__(self, why: SessionEnd) -> None:
        super().__init__(why.value)
        self.why = why


class _Cancelled(Exception):
    pass


class _TooLong(Exception):
    pass


def _fmt(value: object) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


BACKUP_NAME: Final = re.compile(r"pqhsm-backup-([0-9a-f]+)\.tar\.gz")
_SAFE_PART: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def confine(root: Path, relative: str) -> Path:
    """The folder ``root/relative``, refused unless it stays inside ``root``.

    ``relative`` is typed on the serial line: it must be relative, each part a plain name
    (letters, digits, ``.``, ``_``, ``-``; no ``..``), and the result must still be inside
    ``root`` once symbolic links are resolved.

    :raises CallerError: the path would leave ``root`` or is not a plain relative name.
    """
    if relative.startswith("/") or "\\" in relative:
        raise CallerError("backup folder must be relative to the backup directory")
    parts = [p for p in relative.split("/") if p]
    if not parts or any(p in (".", "..") or not _SAFE_PART.fullmatch(p) for p in parts):
        raise CallerError("backup folder must be plain names (letters, digits, . _ -), no ..")
    base = root.resolve(strict=True)
    target = base.joinpath(*parts)
    if not target.resolve().is_relative_to(base):
        raise CallerError("backup folder leaves the backup directory")
    return target


class AdminConsole:
    """The admin console of one appliance on one serial port.

    :param app: the opened appliance; the console never closes it.
    :param transport: the port, opened with a short read timeout (0.05 s to 0.2 s): the
        timeout is the polling period for the idle timer and :meth:`stop`.
    :param check_pin: returns if a security-officer PIN is right, raises
        :class:`~appliance.errors.PinIncorrect` if not and
        :class:`~appliance.errors.PinLocked` when logins are locked; it must compare in
        constant time and count failures itself (:func:`so_pin_checker` does both, durably).
    :param idle_timeout: seconds without a byte after which the session is logged out.
    :param max_line: longest accepted input line, in bytes.
    :param backup_dir: the folder ``backup`` writes into; ``None`` refuses ``backup``.
    :param fail_delay: seconds before a refused login is answered.
    """

    def __init__(
        self,
        app: Appliance,
        transport: Transport,
        *,
        check_pin: Callable[[SecretBytes], None],
        idle_timeout: float = 300.0,
        max_line: int = 256,
        backup_dir: Path | None = None,
        fail_delay: float = 1.0,
    ) -> None:
        self.app = app
        self.fail_delay = fail_delay
        self.transport = transport
        self._check_pin = check_pin
        self.idle_timeout = idle_timeout
        self.backup_dir = backup_dir
        self.failures = 0  # failed logins seen by this process (the checker keeps the count)
        self.zeroized = False
        self._editor = LineEditor(max_line)
        self._stop = threading.Event()
        self._pending = bytearray()
        self._pos = 0

    def stop(self) -> None:
        """Ask :meth:`run` to return at its next read poll (thread-safe)."""
        self._stop.set()

    # -- I/O -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            self.transport.write(data)
        except SerialError as exc:
            log.info("console port: %s", exc.why)
            raise _EndSession(SessionEnd.DISCONNECT) from None

    def _say(self, *lines: str) -> None:
        self._write(b"".join(line.encode("utf-8", "replace") + CRLF for line in lines))

    def _next_byte(self) -> int:
        deadline = time.monotonic() + self.idle_timeout
        while self._pos >= len(self._pending):
            if self._stop.is_set():
                raise _EndSession(SessionEnd.STOPPED)
            try:
                data = self.transport.read_available()
                if not data:
                    data = self.transport.read_exact(1)
            except SerialTimeout:
                data = b""
            except SerialError as exc:
                log.info("console port: %s", exc.why)
                raise _EndSession(SessionEnd.DISCONNECT) from None
            if data:
                # Transport hands out bytes, which cannot be wiped; they are copied into the
                # wipeable pending buffer at once and dropped.
                self._pending += data
                del data
            elif time.monotonic() >= deadline:
                raise _EndSession(SessionEnd.IDLE)
        b = self._pending[self._pos]
        self._pos += 1
        if self._pos == len(self._pending):
            self._drop_pending()
        return b

    def _drop_pending(self) -> None:
        """Zero the received-bytes buffer in place (it may hold a PIN), then empty it."""
        self._pending[:] = bytes(len(self._pending))
        self._pending.clear()
        self._pos = 0

    def _read_line(self, prompt: bytes, *, secret: bool = False) -> SecretBytes:
        """Prompt and read one line.

        :raises _Cancelled: Ctrl-C.
        :raises _TooLong: the line was discarded.
        :raises _EndSession: idle timeout, disconnect or stop.
        """
        self._editor.secret = secret
        self._editor.reset()
        self._write(prompt)
        try:
            while True:
                echo, result = self._editor.feed(self._next_byte())
                if echo:
                    self._write(echo)
                if result is None:
                    continue
                if result.event is EditEvent.CANCEL:
                    raise _Cancelled
                if result.event is EditEvent.TOO_LONG:
                    raise _TooLong
                if result.data is not None:  # always set for EditEvent.LINE
                    return result.data
        finally:
            self._editor.reset()
            self._editor.secret = False

    def _read_text(self, prompt: bytes) -> str:
        with self._read_line(prompt) as line:
            # Not secret: command lines are ASCII by construction of LineEditor.
            return bytes(line.view()).decode("ascii")

    # -- sessions --------------------------------------------------------------------------

    def run(self) -> SessionEnd:
        """Serve sessions until ``exit``, a disconnect or :meth:`stop`; say which."""
        while True:
            why = self.serve_once()
            if why in (SessionEnd.EXIT, SessionEnd.DISCONNECT, SessionEnd.STOPPED):
                return why

    def serve_forever(self, reopen: Callable[[], Transport], *, retry: float = 1.0) -> SessionEnd:
        """Like :meth:`run`, but a port that vanishes is reopened when it comes back.

        A USB-serial adapter that is unplugged, or a console server that drops the line,
        ends the session (nothing half-typed is executed); the console then tries
        ``reopen()`` every ``retry`` seconds until it succeeds or :meth:`stop` is called.

        :returns: :attr:`SessionEnd.EXIT` or :attr:`SessionEnd.STOPPED`.
        """
        while True:
            why = self.run()
            if why is not SessionEnd.DISCONNECT:
                return why
            self.transport.close()
            log.warning("console port %s is gone; waiting for it to come back", self.transport.port)
            while True:
                if self._stop.wait(retry):
                    return SessionEnd.STOPPED
                try:
                    self.transport = reopen()
                except SerialError as exc:
                    log.debug("console port: %s", exc.why)
                    continue
                log.warning("console port %s is back", self.transport.port)
                break

    def serve_once(self) -> SessionEnd:
        """Run one session: login, then commands until it ends.  Never raises on input.

        :returns: why the session ended.
        """
        try:
            try:
                self._login()
                self._say(f"logged in to appliance {self.app.appliance_id}", "type `help`")
                log.info("console: security officer logged in")
                self._commands()
            except _EndSession as end:
                if end.why is SessionEnd.IDLE:
                    self._say("", "idle timeout: logged out")
                raise
        except _EndSession as end:
            log.info("console session ended: %s", end.why.value)
            return end.why
        finally:
            self._editor.wipe()  # the line and this officer's history
            self._drop_pending()

    def _login(self) -> None:
        refused_logged = False
        while True:
            try:
                pin = self._read_line(PIN_PROMPT, secret=True)
            except _Cancelled:
                continue
            except _TooLong:
                self._say("error: line too long")
                continue
            with pin:
                if len(pin) == 0:
                    continue  # Enter to wake the line is no login attempt: nothing counted
                try:
                    self._check_pin(pin)
                except PinLocked:
                    if not refused_logged:  # a flood of attempts is logged once
                        log.error("console: security officer login refused: locked")
                        refused_logged = True
                    self._refuse("locked")
                    continue
                except PinIncorrect:
                    self.failures += 1
                    log.warning("console: failed login")
                    self._refuse("error: login incorrect")
                    continue
                except ApplianceError as exc:  # e.g. an unreadable PIN store: say so, go on
                    log.error("console: login check failed: %s", exc)
                    self._refuse(f"error: {exc}")
                    continue
            self.failures = 0
            return

    def _refuse(self, answer: str) -> None:
        """Answer a refused login after ``fail_delay`` seconds, dropping what was typed
        meanwhile: guessing stays slow, and a line that echoes the console back to itself
        cannot spin through attempts."""
        if self._stop.wait(self.fail_delay):
            raise _EndSession(SessionEnd.STOPPED)
        self._drop_pending()
        try:
            self.transport.read_available()
        except SerialError as exc:
            log.info("console port: %s", exc.why)
            raise _EndSession(SessionEnd.DISCONNECT) from None
        self._say(answer)

    def _commands(self) -> NoReturn:
        while True:
            try:
                line = self._read_text(PROMPT)
            except _Cancelled:
                continue
            except _TooLong:
                self._say("error: line too long")
                continue
            words = line.split()
            if not words:
                continue
            known = words[0] in KNOWN_VERBS
            if known:  # a PIN typed at the wrong prompt is an unknown verb: never kept
                self._editor.remember(line.strip().encode("ascii"))
            verb_name = words[0] if known else "(unknown)"
            try:
                self._dispatch(words)
            except _Cancelled:
                self._say("cancelled")
            except _TooLong:
                self._say("error: line too long")
            except ApplianceError as exc:
                self._say(f"error: {exc}")
            except _EndSession:
                raise
            except Exception as exc:  # noqa: BLE001 - the console must survive its own bugs
                log.error("console command %s failed: %s", verb_name, type(exc).__name__)
                self._say(f"error: internal error ({type(exc).__name__})")

    def _dispatch(self, words: list[str]) -> None:
        verb, args = words[0], words[1:]
        # Only known verbs are logged: a passphrase typed at the wrong prompt stays out of logs.
        log.info("console command: %s", verb if verb in KNOWN_VERBS else "(unknown)")
        if self.zeroized and verb not in ("help", "logout", "exit"):
            self._say("error: appliance was zeroized; only logout and exit remain")
            return
        match verb, args:
            case "help", []:
                self._say(*HELP)
            case "status", []:
                self._say(*(f"{k}: {_fmt(v)}" for k, v in self.app.status().to_json().items()))
            case "keys", []:
                keys = self.app.keys()
                self._say(*([f"{k.label} {k.state.value}" for k in keys] or ["(no keys)"]))
            case "key", ["show", selector]:
                info = self.app.find(selector).to_json()
                self._say(*(f"{k}: {_fmt(v)}" for k, v in info.items()))
            case "migrate", [selector, state]:
                self._migrate(selector, state)
            case "audit", ["verify"]:
                report = verify_audit(self.app.wal.directory)
                fields = " ".join(f"{k}={_fmt(v)}" for k, v in report.to_json().items())
                self._say(f"audit ok: {fields}")
            case "backup", ([] | [_]):
                self._backup(args[0] if args else None)
            case "lock", []:
                self.app.lock()
                self._say("keystore locked")
            case "unlock", []:
                with self._read_line(PASSPHRASE_PROMPT, secret=True) as passphrase:
                    self.app.keystore.unlock(passphrase)
                self._say("keystore unlocked")
            case "zeroize", []:
                self._zeroize()
            case "logout", []:
                self._say("bye")
                raise _EndSession(SessionEnd.LOGOUT)
            case "exit", []:
                self._say("bye")
                raise _EndSession(SessionEnd.EXIT)
            case (
                ("help" | "status" | "keys" | "lock" | "unlock" | "zeroize" | "logout" | "exit"),
                _,
            ):
                self._say(f"error: {verb} takes no arguments")
            case (("key" | "migrate" | "audit" | "backup"), _):
                self._say(f"error: usage: {USAGE[verb]}")
            case _:
                self._say(f"error: unknown command {verb!r} (try `help`)")

    def _migrate(self, selector: str, state: str) -> None:
        try:
            to = KeyState[state.upper()]
        except KeyError:
            names = ", ".join(s.value for s in KeyState)
            self._say(f"error: unknown state {state!r} (one of {names})")
            return
        key = self.app.find(selector)
        frm = key.state
        order = list(KeyState)
        if order.index(to) < order.index(frm):
            self._say(
                f"error: {frm.value} -> {to.value} goes backward; the console moves keys forward "
                "only (backward moves need `pqhsm migrate --allow-backward --reason`)"
            )
            return
        if to in ONE_WAY and frm not in ONE_WAY:
            # One line must not erase a key: FINALIZING commits to erasing the classical
            # private key (recovery finishes it), so the officer types the label again.
            self._say(
                f"{to.value} is one-way: the classical private key of {key.label!r} "
                "will be erased from the token"
            )
            if self._read_text(b"type the key's label to confirm: ") != key.label:
                self._say("error: confirmation does not match; nothing changed")
                return
        after = self.app.migrate(key, to, actor="console")
        self._say(f"ok: {after.label} {frm.value} -> {after.state.value}")

    def _backup(self, folder: str | None) -> None:
        """Write a signed snapshot (content-addressed name) into the backup directory."""
        if self.backup_dir is None:
            self._say("error: no backup directory configured (start the console with --backup-dir)")
            return
        if not self.backup_dir.is_dir():
            self._say(f"error: backup directory {self.backup_dir} does not exist")
            return
        root = self.backup_dir.resolve()
        target = root
        if folder is not None:
            target = confine(self.backup_dir, folder)
            step = root
            for part in target.relative_to(root).parts:  # each new folder 0700, not just the leaf
                step = step / part
                try:
                    step.mkdir(mode=0o700, exist_ok=True)
                except OSError as exc:
                    raise DeviceError(
                        f"cannot create backup folder {part}: {exc.strerror}"
                    ) from None
                if not step.resolve().is_relative_to(root):  # swapped for a link meanwhile
                    raise CallerError("backup folder leaves the backup directory")
        try:
            info = self.app.backup(target)
        except OSError as exc:
            raise DeviceError(f"cannot write the backup: {exc.strerror}") from None
        match = BACKUP_NAME.fullmatch(info.path.name)
        snapshot = match.group(1) if match else info.path.name
        rel = info.path.relative_to(root)
        log.info("console: backup written (wal seq %d)", info.wal_seq)
        self._say(
            f"backup ok: id={snapshot} path={rel} wal_seq={info.wal_seq} "
            f"artifacts={info.artifacts} size={info.size}"
        )

    def _zeroize(self) -> None:
        phrase = f"ZEROIZE {self.app.appliance_id}"
        self._say("this destroys keystore.cbor and every sealed blob; the WAL is kept")
        typed = self._read_text(f"type '{phrase}' to confirm: ".encode())
        if typed != phrase:
            self._say("error: confirmation phrase does not match; nothing removed")
            return
        log.warning("console: zeroize confirmed")
        self.app.lock()
        home = self.app.keystore.home
        removed: list[str] = []
        blob_dir = self.app.keystore.blob_dir
        if blob_dir.is_dir():
            for blob in sorted(blob_dir.glob("*.blob")):
                blob.unlink()
                removed.append(f"blobs/{blob.name}")
            fsync_dir(blob_dir)
        store = self.app.keystore.path
        if store.exists():
            store.unlink()
            removed.insert(0, store.name)
        fsync_dir(home)
        self.zeroized = True
        nblobs = sum(1 for r in removed if r.startswith("blobs/"))
        has_store = "keystore.cbor" if store.name in removed else "no keystore.cbor"
        self._say(
            f"zeroized: removed {has_store} and {nblobs} blob(s); WAL kept as evidence",
            *(f"removed {r}" for r in removed),
        )


# -- entry points: pqhsm console, pqhsm-console --------------------------------------------

SO_CLIENT: Final = "so"  # the security officer's entry in the console's PIN store
SO_STORE_DIR: Final = "console"  # $PQHSM_HOME/console/clients.cbor


def so_store(home: Path) -> Path:
    """The folder of the officer's PIN store (apart from the PKCS#11 clients' store)."""
    return Path(home) / SO_STORE_DIR


def set_so_pin(
    home: Path, pin: SecretBytes, *, profile: clientpins.Argon2Profile = clientpins.DEFAULT_PROFILE
) -> None:
    """Set the security officer's PIN (Argon2id) and clear its lockout."""
    ensure_private_dir(so_store(home))
    clientpins.set_pin(so_store(home), pin, client=SO_CLIENT, profile=profile)


def so_pin_exists(home: Path) -> bool:
    """Whether a security-officer PIN was set for ``home``."""
    return clientpins.exists(so_store(home))


def so_pin_checker(
    home: Path, *, max_failures: int = clientpins.MAX_FAILURES
) -> Callable[[SecretBytes], None]:
    """Check the officer's PIN with the PKCS#11 front end's lockout rule.

    Each attempt is counted durably before the Argon2id check, so a crash or a pulled plug
    during the check still counts; ``max_failures`` consecutive failures raise
    :class:`~appliance.errors.PinLocked` for every later attempt, across restarts, until
    :func:`set_so_pin`.
    """
    store = so_store(home)

    def check(pin: SecretBytes) -> None:
        clientpins.verify(store, pin.view(), client=SO_CLIENT, max_failures=max_failures)

    return check


def run_command(args: argparse.Namespace, home: Path) -> int:
    """Serve the console (or, with ``--set-so-pin``, set the officer's PIN).

    :raises ApplianceError: every failure, with a one-line message (no traceback).
    """
    from appliance.cli import get_secret, read_pin
    from appliance.config import load_config
    from appliance.errors import ConfigError
    from appliance.service import Appliance

    if args.set_so_pin:
        with get_secret(
            "security officer PIN",
            fd=args.so_pin_fd,
            file=args.so_pin_file,
            cfg_file=None,
            env="PQHSM_SO_CONSOLE_PIN",
            confirm=True,
        ) as so_pin:
            set_so_pin(home, so_pin)
        sys.stderr.write("security officer PIN set\n")
        return 0
    if not args.port:
        raise ConfigError("give --port (a device path or a pyserial URL) or --set-so-pin")
    if args.baud <= 0:
        raise ConfigError(f"--baud must be a positive line speed, not {args.baud}")
    if args.idle_timeout <= 0 or args.reconnect_interval <= 0:
        raise ConfigError("--idle-timeout and --reconnect-interval must be positive")
    if args.backup_dir is not None and not args.backup_dir.is_dir():
        raise ConfigError(f"--backup-dir {args.backup_dir}: not a folder")
    if not so_pin_exists(home):
        raise ConfigError("no security officer PIN yet: run `pqhsm console --set-so-pin` first")
    cfg = load_config(home)

    def reopen() -> Transport:
        return Transport(args.port, baud=args.baud, timeout=0.1)

    transport = reopen()
    try:
        with read_pin(args, cfg) as pin:
            app = Appliance.open(cfg, pin=pin, passphrase=None)
    except BaseException:
        transport.close()
        raise
    console = AdminConsole(
        app,
        transport,
        check_pin=so_pin_checker(home),
        idle_timeout=args.idle_timeout,
        backup_dir=args.backup_dir,
    )
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda *_: console.stop())
    try:
        why = console.serve_forever(reopen, retry=args.reconnect_interval)
        log.info("console stopped: %s", why.value)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.transport.close()
        app.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``pqhsm-console serve --port PORT [--baud N]`` or ``pqhsm-console set-so-pin``.

    The older spelling of ``pqhsm console``; both run :func:`run_command`.
    """
    from appliance.cli import add_console_arguments
    from appliance.config import resolve_home

    parser = argparse.ArgumentParser(prog="pqhsm-console", description="serial admin console")
    parser.add_argument("--home", help="state directory (default $PQHSM_HOME or ./var/pqhsm)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the console on a serial port")
    add_console_arguments(serve)
    setp = sub.add_parser("set-so-pin", help="set the security officer's console PIN")
    setp.add_argument("--so-pin-file", help="file holding the new SO PIN (0600)")
    setp.add_argument("--so-pin-fd", type=int, help="read the new SO PIN from this fd")
    args = parser.parse_args(argv)
    if args.command == "set-so-pin":
        args.set_so_pin = True
    elif args.set_so_pin:
        parser.error("use `pqhsm-console set-so-pin`")
    logging.basicConfig(
        level=logging.WARNING, format="pqhsm-console: %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        return run_command(args, resolve_home(args.home))
    except ApplianceError as exc:
        sys.stderr.write(f"error: {exc} [CKR_{exc.ckr.name}]\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
