"""Serial admin console: a line-oriented security-officer shell over a :class:`Transport`.

One *session* runs from the PIN prompt to ``logout``, ``exit``, an idle timeout or a
disconnect.  After login the officer may inspect the appliance, move keys along the
migration graph, verify the audit chain, lock/unlock the keystore and zeroize it.

Line discipline (:class:`LineEditor`, pure logic, no I/O):

* printable bytes are appended and echoed (nothing is echoed while a secret is typed);
* backspace (``0x08``) and DEL (``0x7f``) remove the last byte and echo ``"\\b \\b"``;
* CR or LF ends a line; CR LF counts once;
* Ctrl-C (``0x03``) cancels the line;
* a line longer than ``max_line`` is discarded as a whole and reported once;
* every other byte (binary garbage, a BREAK read as NUL, escape sequences' ESC) is ignored.

Security:

* The PIN is read straight into a :class:`~appliance.secret.SecretBytes` (never a ``str``),
  checked by the caller's ``check_pin`` (which must compare in constant time, e.g. against
  an Argon2id hash in ``appliance/keystore/kdf.py``; this module never imports ``argon2``),
  and wiped.  The same holds for the keystore passphrase of ``unlock``.
* Failed logins are counted in memory only; after ``lockout`` consecutive failures every
  further login is refused with ``locked`` until the console object is recreated (a
  restart).  A persistent counter is future work.
* Nothing secret is logged or echoed; commands are logged by verb only.  Never attach
  pyserial's ``spy://`` to this port while a secret crosses it.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

from appliance.audit import verify_audit
from appliance.errors import ApplianceError
from appliance.fsio import fsync_dir
from appliance.keys import KeyState
from appliance.secret import SecretBytes
from hardware.transport import SerialError, SerialTimeout, Transport

if TYPE_CHECKING:
    from appliance.service import Appliance

__all__ = [
    "AdminConsole",
    "EditEvent",
    "LineEditor",
    "LineResult",
    "SessionEnd",
]

log = logging.getLogger(__name__)

CRLF: Final = b"\r\n"
PROMPT: Final = b"pqhsm# "
PIN_PROMPT: Final = b"PIN: "
PASSPHRASE_PROMPT: Final = b"passphrase: "
BS: Final = 0x08
DEL: Final = 0x7F
CTRL_C: Final = 0x03
CR: Final = 0x0D
LF: Final = 0x0A

HELP: Final = (
    "help                  this text",
    "status                appliance status, one field per line",
    "keys                  label and state of every key",
    "key show LABEL        details of one key",
    "migrate LABEL STATE   move a key forward (" + ", ".join(s.value for s in KeyState) + ")",
    "audit verify          verify the WAL hash chain and signed checkpoints",
    "lock                  zeroize the passphrase key",
    "unlock                unlock the keystore (asks for the passphrase)",
    "zeroize               destroy keystore.cbor and every blob (asks for confirmation)",
    "logout                end this session",
    "exit                  end this session and stop the console",
)

USAGE: Final = {"key": "key show LABEL", "migrate": "migrate LABEL STATE", "audit": "audit verify"}

KNOWN_VERBS: Final = frozenset(
    {"help", "status", "keys", "key", "migrate", "audit", "lock", "unlock", "zeroize"}
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


class LineEditor:
    """Byte-at-a-time line editing into a fixed, wipeable buffer.

    The buffer is allocated once (``max_line`` bytes) and never grows, so a secret typed
    into it is never copied by a reallocation; :meth:`take` hands the line over as a
    :class:`SecretBytes` and wipes the buffer.

    :param max_line: the longest line accepted, in bytes.
    """

    def __init__(self, max_line: int = 256) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self._buf = SecretBytes(max_line)
        self._n = 0
        self._overflow = False
        self._after_cr = False
        self.secret = False

    def reset(self) -> None:
        """Forget the current line (the CR-LF state survives: it spans lines)."""
        self._buf.wipe()
        self._n = 0
        self._overflow = False

    def wipe(self) -> None:
        """Zero the buffer; call when the session ends."""
        self.reset()

    def _accepts(self, b: int) -> bool:
        if 0x20 <= b < DEL:
            return True
        return self.secret and b >= 0x80  # passphrases may be UTF-8; commands are ASCII

    def feed(self, b: int) -> tuple[bytes, LineResult | None]:
        """Process one received byte.

        :returns: the bytes to echo, and a result when a line ended or was cancelled.
        """
        after_cr, self._after_cr = self._after_cr, False
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
        if b in (BS, DEL):
            if self._overflow or self._n == 0:
                return b"", None
            self._n -= 1
            self._buf.view()[self._n] = 0
            return (b"" if self.secret else b"\b \b"), None
        if not self._accepts(b):
            return b"", None  # garbage, NUL from a BREAK, ESC ...
        if self._overflow:
            return b"", None
        if self._n >= self.max_line:
            self._overflow = True
            self._buf.wipe()
            self._n = 0
            return b"", None
        self._buf.view()[self._n] = b
        self._n += 1
        return (b"" if self.secret else bytes([b])), None

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


class AdminConsole:
    """The admin console of one appliance on one serial port.

    :param app: the opened appliance; the console never closes it.
    :param transport: the port, opened with a short read timeout (0.05 s to 0.2 s): the
        timeout is the polling period for the idle timer and :meth:`stop`.
    :param check_pin: returns whether a security-officer PIN is right; it must compare in
        constant time (an Argon2id verify, or :func:`hmac.compare_digest` of digests).
    :param lockout: consecutive failed logins after which the console refuses all logins.
    :param idle_timeout: seconds without a byte after which the session is logged out.
    :param max_line: longest accepted input line, in bytes.
    """

    def __init__(
        self,
        app: Appliance,
        transport: Transport,
        *,
        check_pin: Callable[[SecretBytes], bool],
        lockout: int = 5,
        idle_timeout: float = 300.0,
        max_line: int = 256,
    ) -> None:
        if lockout < 1:
            raise ValueError("lockout must be at least 1")
        self.app = app
        self.transport = transport
        self._check_pin = check_pin
        self.lockout = lockout
        self.idle_timeout = idle_timeout
        self.failures = 0
        self.zeroized = False
        self._editor = LineEditor(max_line)
        self._stop = threading.Event()
        self._pending = bytearray()
        self._pos = 0

    def locked_out(self) -> bool:
        """Whether logins are refused until restart."""
        return self.failures >= self.lockout

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

    def run(self) -> None:
        """Serve sessions until ``exit``, a disconnect or :meth:`stop`."""
        while True:
            why = self.serve_once()
            if why in (SessionEnd.EXIT, SessionEnd.DISCONNECT, SessionEnd.STOPPED):
                return

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
            self._editor.wipe()
            self._drop_pending()

    def _login(self) -> None:
        while True:
            try:
                pin = self._read_line(PIN_PROMPT, secret=True)
            except _Cancelled:
                continue
            except _TooLong:
                self._say("error: line too long")
                continue
            with pin:
                if self.locked_out():
                    self._say("locked")
                    continue
                ok = self._check_pin(pin)
            if ok:
                self.failures = 0
                return
            self.failures += 1
            log.warning("console: failed login %d of %d", self.failures, self.lockout)
            if self.locked_out():
                log.error("console: locked after %d failed logins", self.failures)
                self._say("locked")
            else:
                self._say("error: login incorrect")

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
            verb_name = words[0] if words[0] in KNOWN_VERBS else "(unknown)"
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
            case (("key" | "migrate" | "audit"), _):
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
        after = self.app.migrate(key, to, actor="console")
        self._say(f"ok: {after.label} {frm.value} -> {after.state.value}")

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


# -- entry point: pqhsm-console --------------------------------------------------------------

SO_CLIENT: Final = "so"  # the security officer's entry in the appliance's client PIN store


def so_pin_checker(home: Path) -> Callable[[SecretBytes], bool]:
    """Check the security officer's PIN against the appliance's Argon2id PIN store.

    The store counts failures durably before each check, so a lockout survives restarts
    (on top of the console's own per-process lockout).
    """
    from appliance import clientpins
    from appliance.errors import CredentialError

    def check(pin: SecretBytes) -> bool:
        try:
            clientpins.verify(home, pin.view(), client=SO_CLIENT)
        except CredentialError:
            return False
        return True

    return check


def main(argv: Sequence[str] | None = None) -> int:
    """``pqhsm-console serve --port PORT [--baud N]`` or ``pqhsm-console set-so-pin``."""
    import argparse
    import sys

    from appliance import clientpins
    from appliance.cli import get_secret, read_pin
    from appliance.config import load_config, resolve_home
    from appliance.service import Appliance

    parser = argparse.ArgumentParser(prog="pqhsm-console", description="serial admin console")
    parser.add_argument("--home", help="state directory (default $PQHSM_HOME or ./var/pqhsm)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the console on a serial port")
    serve.add_argument(
        "--port", required=True, help="device path or pyserial URL (socket://, loop://)"
    )
    serve.add_argument("--baud", type=int, default=115200)
    serve.add_argument("--idle-timeout", type=float, default=300.0)
    serve.add_argument("--pin-file", help="token PIN file (0600)")
    serve.add_argument("--pin-fd", type=int, help="read the token PIN from this fd")
    setp = sub.add_parser("set-so-pin", help="set the security officer's console PIN")
    setp.add_argument("--so-pin-file", help="file holding the new SO PIN (0600)")
    setp.add_argument("--so-pin-fd", type=int, help="read the new SO PIN from this fd")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="pqhsm-console: %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        home = resolve_home(args.home)
        cfg = load_config(home)
        if args.command == "set-so-pin":
            with get_secret(
                "security officer PIN",
                fd=args.so_pin_fd,
                file=args.so_pin_file,
                cfg_file=None,
                env="PQHSM_SO_CONSOLE_PIN",
                confirm=True,
            ) as so_pin:
                clientpins.set_pin(home, so_pin, client=SO_CLIENT)
            print("security officer PIN set", file=sys.stderr)  # noqa: T201 - the CLI's answer
            return 0
        if not clientpins.exists(home):
            raise ApplianceError(
                "no security officer PIN yet: run `pqhsm-console set-so-pin` first"
            )
        transport = Transport(args.port, baud=args.baud, timeout=0.1)
        with read_pin(args, cfg) as pin:
            app = Appliance.open(cfg, pin=pin, passphrase=None)
        try:
            AdminConsole(
                app, transport, check_pin=so_pin_checker(home), idle_timeout=args.idle_timeout
            ).run()
        finally:
            app.close()
            transport.close()
        return 0
    except ApplianceError as exc:
        print(f"error: {exc} [CKR_{exc.ckr.name}]", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
