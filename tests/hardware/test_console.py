"""Admin console: the line editor byte by byte over ``loop://``, and whole sessions on a real
kernel pty (console on the slave through :class:`Transport`, the test on the master side).

The security officer's PIN is checked by the production checker (:func:`so_pin_checker`:
Argon2id, the attempt counted durably before the check) over a store in a temporary home,
with argon2-cffi's cheapest parameters.

With ``--serial-port PATH`` (tests/labline.py) the session tests that do not need
a stand-in appliance also run over that real port: a null-modem cable or USB-serial
adapter pair whose other end is ``--serial-peer PATH``.
"""

from __future__ import annotations

import logging
import os
import random
import select
import termios
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
from labline import SerialLine

from appliance import clientpins
from appliance.keys import KeyState
from appliance.secret import SecretBytes
from conftest import PASSPHRASE
from hardware.console import (
    PIN_PROMPT,
    PROMPT,
    SO_CLIENT,
    AdminConsole,
    EditEvent,
    LineEditor,
    LineResult,
    set_so_pin,
    so_pin_checker,
    so_store,
)
from hardware.transport import Transport

if TYPE_CHECKING:
    from appliance.service import Appliance

SO_PIN = b"so-pin-4711"  # test-only security-officer PIN


@pytest.fixture(autouse=True)
def _lab_line(serial_line: SerialLine | None) -> Iterator[None]:
    """``--serial-port``/``--serial-peer``: the session tests use the lab's real line."""
    Terminal.lab = serial_line
    yield
    Terminal.lab = None


@pytest.fixture
def so_home(tmp_path: Path) -> Path:
    """A home with only the officer's PIN store (cheap Argon2id parameters)."""
    home = tmp_path / "so-home"
    home.mkdir(mode=0o700)
    set_so_pin(home, SecretBytes(SO_PIN), profile=clientpins.TEST_PROFILE)
    return home


# -- line editor over loop:// -------------------------------------------------------------------


def edit(
    raw: bytes, *, secret: bool = False, max_line: int = 16
) -> tuple[bytes, list[tuple[EditEvent, bytes | None]]]:
    """Send ``raw`` through a pyserial ``loop://`` port and feed what arrives to an editor."""
    editor = LineEditor(max_line)
    editor.secret = secret
    echo = bytearray()
    results: list[tuple[EditEvent, bytes | None]] = []
    with Transport("loop://", timeout=0.05) as port:
        port.write(raw)
        got = port.read_exact(len(raw))
    assert got == raw
    for b in got:
        out, res = editor.feed(b)
        echo += out
        if res is not None:
            results.append(_unpack(res))
    return bytes(echo), results


def _unpack(res: LineResult) -> tuple[EditEvent, bytes | None]:
    if res.data is None:
        return res.event, None
    with res.data as data:
        return res.event, bytes(data.view())


def test_editor_plain_line_is_echoed() -> None:
    echo, results = edit(b"keys\r")
    assert echo == b"keys\r\n"
    assert results == [(EditEvent.LINE, b"keys")]


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_editor_line_endings_count_once(ending: bytes) -> None:
    _, results = edit(b"a" + ending + b"b" + ending)
    assert results == [(EditEvent.LINE, b"a"), (EditEvent.LINE, b"b")]


def test_editor_lf_cr_is_two_lines_and_empty_lines_are_lines() -> None:
    _, results = edit(b"a\n\rb\r\r\n")
    assert results == [
        (EditEvent.LINE, b"a"),
        (EditEvent.LINE, b""),
        (EditEvent.LINE, b"b"),
        (EditEvent.LINE, b""),
    ]


@pytest.mark.parametrize("bs", [b"\x08", b"\x7f"])
def test_editor_backspace_removes_last_char(bs: bytes) -> None:
    echo, results = edit(b"stattus" + bs * 3 + b"us\r")
    assert results == [(EditEvent.LINE, b"status")]
    assert echo == b"stattus" + b"\b \b" * 3 + b"us\r\n"


def test_editor_backspace_on_empty_line_does_nothing() -> None:
    echo, results = edit(b"\x7f\x08\x7fok\r")
    assert echo == b"ok\r\n"
    assert results == [(EditEvent.LINE, b"ok")]


def test_editor_ctrl_c_cancels_line() -> None:
    echo, results = edit(b"zeroize\x03keys\r")
    assert results == [(EditEvent.CANCEL, None), (EditEvent.LINE, b"keys")]
    assert b"^C\r\n" in echo


def test_editor_too_long_is_reported_once_then_recovers() -> None:
    _, results = edit(b"x" * 40 + b"\x7f" * 5 + b"\rshort\r", max_line=16)
    assert results == [(EditEvent.TOO_LONG, None), (EditEvent.LINE, b"short")]


def test_editor_exactly_max_line_fits() -> None:
    _, results = edit(b"y" * 16 + b"\r" + b"y" * 17 + b"\r", max_line=16)
    assert results == [(EditEvent.LINE, b"y" * 16), (EditEvent.TOO_LONG, None)]


def test_editor_ignores_binary_garbage() -> None:
    junk = bytes(b for b in range(256) if b not in (0x03, 0x08, 0x0A, 0x0D, 0x7F))
    junk = bytes(b for b in junk if not 0x20 <= b < 0x7F)
    echo, results = edit(b"k" + junk + b"eys\r")
    assert results == [(EditEvent.LINE, b"keys")]
    assert echo == b"keys\r\n"


def test_editor_secret_mode_echoes_nothing_and_keeps_utf8() -> None:
    pw = "pässwörd".encode()
    echo, results = edit(pw + b"x\x7f\r", secret=True)
    assert results == [(EditEvent.LINE, pw)]
    assert echo == b"\r\n"


LEFT, RIGHT, UP, DOWN = b"\x1b[D", b"\x1b[C", b"\x1b[A", b"\x1b[B"


def edit_with(editor: LineEditor, raw: bytes) -> tuple[bytes, list[bytes | None]]:
    """Feed ``raw`` (through ``loop://``) to an existing editor; lines as bytes."""
    with Transport("loop://", timeout=0.05) as port:
        port.write(raw)
        got = port.read_exact(len(raw))
    echo = bytearray()
    lines: list[bytes | None] = []
    for b in got:
        out, res = editor.feed(b)
        echo += out
        if res is not None:
            lines.append(_unpack(res)[1])
    return bytes(echo), lines


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (b"kys" + LEFT * 2 + b"e\r", b"keys"),  # insert in the middle
        (b"eys" + b"\x1b[H" + b"k\r", b"keys"),  # Home (xterm)
        (b"eys" + b"\x1bOH" + b"k\r", b"keys"),  # Home (application cursor mode)
        (b"eys" + b"\x1b[1~" + b"k\r", b"keys"),  # Home (VT220)
        (b"eys" + b"\x1b[7~" + b"k\r", b"keys"),  # Home (rxvt)
        (b"key" + LEFT * 3 + b"\x1b[F" + b"s\r", b"keys"),  # End
        (b"key" + LEFT * 3 + b"\x1b[4~" + b"s\r", b"keys"),  # End (VT220)
        (b"key" + b"\x1bOD" * 3 + b"\x1bOF" + b"s\r", b"keys"),  # SS3 left, End
        (b"kxeys" + LEFT * 4 + b"\x1b[3~\r", b"keys"),  # Delete under the cursor
        (b"keys" + b"\x1b[3~\r", b"keys"),  # Delete at the end: nothing
        (b"ke" + LEFT * 5 + RIGHT * 9 + b"ys\r", b"keys"),  # clamped at both ends
        (b"kexys" + LEFT * 2 + b"\x7f\r", b"keys"),  # backspace before the cursor
        (b"k" + LEFT + b"\x7f\x7f" + RIGHT + b"eys\r", b"keys"),  # backspace at column 0
    ],
)
def test_editor_cursor_keys(raw: bytes, line: bytes) -> None:
    _, lines = edit_with(LineEditor(32), raw)
    assert lines == [line]


def test_editor_cursor_echo_redraws_the_tail() -> None:
    echo, _ = edit_with(LineEditor(32), b"kys" + LEFT * 2 + b"e" + b"\x1b[3~" + b"\r")
    # left twice: two \b; "e" inserted: e + tail "ys" + two \b; Delete: tail "s" + " " + \b\b
    assert echo == b"kys" + b"\b\b" + b"eys\b\b" + b"s \b\b" + b"\r\n"


@pytest.mark.parametrize(
    "seq",
    [
        b"\x1b[15~",  # F5
        b"\x1b[2~",  # Insert
        b"\x1b[5~",  # PgUp
        b"\x1bOP",  # F1
        b"\x1b[1;5P",  # Ctrl-F1
        b"\x1bx",  # Alt-x
        b"\x1b[200~",  # bracketed paste start
        b"\x1b[?25h",  # a private-mode sequence echoed back by a confused terminal
        b"\x1b[" + b"9" * 200 + b"Z",  # absurdly long parameters
        b"\x1b[\x01",  # a control byte inside CSI: the sequence is dropped
    ],
)
def test_editor_unknown_escape_sequences_are_consumed(seq: bytes) -> None:
    echo, lines = edit_with(LineEditor(32), b"ke" + seq + b"ys\r")
    assert lines == [b"keys"]
    assert echo == b"keys\r\n"  # nothing of the sequence is echoed
    assert b"\x1b" not in echo


def test_editor_enter_and_ctrl_c_break_an_unfinished_sequence() -> None:
    editor = LineEditor(32)
    _, lines = edit_with(editor, b"keys\x1b[\rstatus\x1b\x03help\x1b\x1b[D\x1b[3~\r")
    assert lines == [b"keys", None, b"hel"]


def test_editor_history_up_down_and_draft() -> None:
    editor = LineEditor(32)
    for line in (b"status", b"keys", b"keys"):
        editor.remember(line)
    editor.remember(b"")
    assert editor.history == [b"status", b"keys"]  # no empty lines, no repeats
    _, lines = edit_with(editor, UP + b"\r")
    assert lines == [b"keys"]
    _, lines = edit_with(editor, UP * 5 + b"\r")  # stops at the oldest
    assert lines == [b"status"]
    _, lines = edit_with(editor, b"mig" + UP + UP + DOWN + DOWN + b"rate\r")  # draft kept
    assert lines == [b"migrate"]
    _, lines = edit_with(editor, DOWN + b"x\r")  # nothing newer: unchanged
    assert lines == [b"x"]
    echo, lines = edit_with(editor, b"key show web" + UP + b"\r")
    assert lines == [b"keys"]
    # redraw: back to column 0, the recalled line, blanks over the rest, back again
    assert echo.endswith(b"\b" * 12 + b"keys" + b" " * 8 + b"\b" * 8 + b"\r\n")


def test_editor_history_is_bounded_and_wiped() -> None:
    editor = LineEditor(32, history_size=3)
    for i in range(10):
        editor.remember(f"cmd{i}".encode())
    assert editor.history == [b"cmd7", b"cmd8", b"cmd9"]
    editor.wipe()
    assert editor.history == []


def test_editor_secret_mode_ignores_cursor_keys_and_history() -> None:
    editor = LineEditor(32)
    editor.remember(b"status")
    editor.secret = True
    echo, lines = edit_with(editor, b"pin" + UP + LEFT + b"\x1b[H" + b"X\x1b[3~\r")
    assert lines == [b"pinX"]
    assert echo == b"\r\n"


def test_editor_rejects_bad_max_line() -> None:
    with pytest.raises(ValueError, match="max_line"):
        LineEditor(0)


# -- sessions on a real pty ---------------------------------------------------------------------


class Terminal:
    """The operator's side of the console line, with a read-until-marker helper.

    By default a pty pair: the test holds the raw master, the console opens the slave.
    In a lab (``--serial-port``/``--serial-peer``, see labline.py) the test types into the
    peer end of a real null-modem cable and the console opens the real port; ``pty=True``
    keeps a test on a pty (it needs a hang-up that an RS-232 line cannot signal).
    """

    lab: SerialLine | None = None  # set from the pytest options by _lab_line below

    def __init__(self, *, pty: bool = False) -> None:
        line = None if pty else Terminal.lab
        self.baud = 9600
        self.slave: int | None
        if line is None:
            self.master, slave = os.openpty()
            tty.setraw(self.master)
            tty.setraw(slave)
            self.slave = slave
            self.port = os.ttyname(slave)
        else:
            self.master = os.open(line.peer, os.O_RDWR | os.O_NOCTTY)
            tty.setraw(self.master)
            attrs = termios.tcgetattr(self.master)
            speed = getattr(termios, f"B{line.baud}")
            attrs[4] = attrs[5] = speed
            attrs[2] = (attrs[2] & ~termios.CRTSCTS) | termios.CLOCAL | termios.CREAD
            termios.tcsetattr(self.master, termios.TCSANOW, attrs)
            termios.tcflush(self.master, termios.TCIOFLUSH)
            self.slave = None
            self.port = line.port
            self.baud = line.baud
        self.buf = bytearray()
        self.closed = False
        self.thread: threading.Thread | None = None

    def release(self) -> None:
        """Close the test's hold on the pty slave (nothing to do on a real line)."""
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _fill(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        self.buf += os.read(self.master, 4096)
        return True

    def expect(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Return everything up to and including ``marker``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (i := self.buf.find(marker)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout}s; got {bytes(self.buf)!r}")
            self._fill(left)
        out = bytes(self.buf[: i + len(marker)])
        del self.buf[: i + len(marker)]
        return out

    def drain(self, quiet: float = 0.3) -> bytes:
        """Read until the console has been silent for ``quiet`` seconds."""
        while self._fill(quiet):
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)

    def login(self) -> None:
        self.expect(PIN_PROMPT)
        self.send(SO_PIN + b"\r")
        self.expect(PROMPT)

    def cmd(self, line: str) -> list[str]:
        """Run one command; return the reply lines (without the echo and the next prompt)."""
        self.send(line.encode() + b"\r")
        out = self.expect(PROMPT).decode()
        lines = out.split("\r\n")
        assert lines[0] == line  # the echo
        assert lines[-1] == PROMPT.decode()
        return lines[1:-1]


@contextmanager
def console_on_pty(
    app: Appliance,
    home: Path,
    *,
    max_failures: int = 5,
    idle_timeout: float = 30.0,
    max_line: int = 256,
    backup_dir: Path | None = None,
    pty: bool = False,
    fail_delay: float = 0.0,
) -> Iterator[tuple[Terminal, AdminConsole]]:
    """Run :meth:`AdminConsole.run` in a thread on a pty (or the lab's line); check it ended
    cleanly.  On a real line, closing the test's end is no hang-up: the console is stopped.
    """
    term = Terminal(pty=pty)
    transport = Transport(term.port, baud=term.baud, timeout=0.05)
    console = AdminConsole(
        app,
        transport,
        check_pin=so_pin_checker(home, max_failures=max_failures),
        idle_timeout=idle_timeout,
        max_line=max_line,
        backup_dir=backup_dir,
        fail_delay=fail_delay,
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            console.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    thread = threading.Thread(target=target, name="console", daemon=True)
    thread.start()
    term.thread = thread
    try:
        yield term, console
    finally:
        term.close()  # a disconnect ends the session
        if term.slave is None:
            console.stop()  # a real line cannot signal the hang-up
        thread.join(5)
        transport.close()
        term.release()
    assert not thread.is_alive()
    assert errors == []


class _NoAppliance:
    """Stands in for an appliance in tests that never get past the login."""

    appliance_id = "00"


def no_app() -> Appliance:
    return cast("Appliance", _NoAppliance())


def test_wrong_pin_then_right_pin_and_pin_not_echoed(
    caplog: pytest.LogCaptureFixture, so_home: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    with console_on_pty(no_app(), so_home) as (term, console):
        term.expect(PIN_PROMPT)
        term.send(b"wrong-pin\r")
        reply = term.expect(PIN_PROMPT)
        assert b"error: login incorrect" in reply
        assert b"wrong" not in reply
        assert console.failures == 1
        term.send(SO_PIN + b"\r")
        reply = term.expect(PROMPT)
        assert b"logged in to appliance 00" in reply
        assert SO_PIN not in reply
        assert console.failures == 0
    assert SO_PIN.decode() not in caplog.text
    assert "wrong-pin" not in caplog.text


def test_lockout_after_n_failures_refuses_right_pin(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home, max_failures=3) as (term, console):
        term.expect(PIN_PROMPT)
        for i in range(3):
            term.send(b"nope\r")
            assert b"error: login incorrect" in term.expect(PIN_PROMPT)
            assert clientpins.failures(so_store(so_home), SO_CLIENT) == i + 1
        term.send(SO_PIN + b"\r")  # the right PIN, now refused without being checked
        reply = term.expect(PIN_PROMPT)
        assert b"locked" in reply
        assert b"logged in" not in reply
        assert console.failures == 3
    assert clientpins.failures(so_store(so_home), SO_CLIENT) == 3


def test_lockout_survives_a_console_restart(so_home: Path) -> None:
    """The PKCS#11 front end's rule: counted durably, so a restart does not reset it."""
    with console_on_pty(no_app(), so_home, max_failures=3) as (term, _):
        term.expect(PIN_PROMPT)
        for _ in range(2):
            term.send(b"guess\r")
            assert b"error: login incorrect" in term.expect(PIN_PROMPT)
    # a new console process reads the same store: one attempt left, then locked
    with console_on_pty(no_app(), so_home, max_failures=3) as (term, console):
        assert console.failures == 0
        term.expect(PIN_PROMPT)
        term.send(b"guess\r")
        assert b"error: login incorrect" in term.expect(PIN_PROMPT)
    with console_on_pty(no_app(), so_home, max_failures=3) as (term, _):
        term.expect(PIN_PROMPT)
        term.send(SO_PIN + b"\r")
        reply = term.expect(PIN_PROMPT)
        assert b"locked" in reply
        assert b"logged in" not in reply
    # only setting the PIN again (the operator, --set-so-pin) unlocks
    set_so_pin(so_home, SecretBytes(SO_PIN), profile=clientpins.TEST_PROFILE)
    with console_on_pty(no_app(), so_home, max_failures=3) as (term, _):
        term.login()


def test_refused_login_is_slow_and_flood_is_logged_once(
    so_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with console_on_pty(no_app(), so_home, max_failures=3, fail_delay=0.3) as (term, console):
        term.expect(PIN_PROMPT)
        t0 = time.monotonic()
        term.send(b"nope\r")
        term.expect(PIN_PROMPT)
        assert time.monotonic() - t0 >= 0.3
        term.send(b"nope\rtyped-ahead-during-the-delay\r")  # dropped, never checked
        assert b"login incorrect" in term.expect(PIN_PROMPT)
        assert term.drain(0.5) == b""  # one answer only: the typed-ahead line was not a try
        assert console.failures == 2
        assert clientpins.failures(so_store(so_home), SO_CLIENT) == 2
        term.send(b"nope\r")
        term.expect(PIN_PROMPT)
        for _ in range(3):
            term.send(SO_PIN + b"\r")
            assert b"locked" in term.expect(PIN_PROMPT)
    assert clientpins.failures(so_store(so_home), SO_CLIENT) == 3
    assert caplog.text.count("login refused: locked") == 1
    assert "typed-ahead" not in caplog.text


def test_enter_at_the_pin_prompt_is_not_an_attempt(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home, max_failures=2) as (term, console):
        term.expect(PIN_PROMPT)
        for _ in range(5):
            term.send(b"\r")  # waking the line up
            term.expect(PIN_PROMPT)
        assert console.failures == 0
        assert clientpins.failures(so_store(so_home), SO_CLIENT) == 0
        term.send(SO_PIN + b"\r")
        term.expect(PROMPT)


def test_overlong_pin_and_ctrl_c_at_login(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home, max_line=32) as (term, console):
        term.expect(PIN_PROMPT)
        term.send(b"p" * 100 + b"\r")
        assert b"error: line too long" in term.expect(PIN_PROMPT)
        term.send(b"half\x03")
        term.expect(PIN_PROMPT)
        assert console.failures == 0
        term.send(SO_PIN + b"\r")
        term.expect(PROMPT)


def test_idle_timeout_logs_out(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home, idle_timeout=0.4) as (term, _):
        term.login()
        reply = term.expect(PIN_PROMPT, timeout=3)
        assert b"idle timeout: logged out" in reply


def test_disconnect_ends_session_cleanly(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home, pty=True) as (term, _):
        term.login()
        term.send(b"hal")  # half a line, then the cable is pulled
        term.close()
    # console_on_pty asserted: the thread ended, without an exception


def test_stop_ends_run(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home) as (term, console):
        term.expect(PIN_PROMPT)
        console.stop()
        assert term.thread is not None
        term.thread.join(3)
        assert not term.thread.is_alive()


def test_console_survives_its_own_bugs_and_logs_no_unknown_verbs(
    caplog: pytest.LogCaptureFixture, so_home: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    with console_on_pty(no_app(), so_home) as (term, _):
        term.login()
        # the stand-in has no status(): an AttributeError inside the command
        assert term.cmd("status") == ["error: internal error (AttributeError)"]
        assert term.cmd("hunter2-typed-at-the-wrong-prompt") == [
            "error: unknown command 'hunter2-typed-at-the-wrong-prompt' (try `help`)"
        ]
        assert term.cmd("help")
    assert "hunter2" not in caplog.text
    assert "console command: status" in caplog.text


@pytest.mark.softhsm
def test_help_status_keys_key_show(appliance: Appliance, so_home: Path) -> None:
    appliance.create_key("ecdsa-p256", "web")
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        help_lines = term.cmd("help")
        assert any(line.startswith("migrate LABEL STATE") for line in help_lines)
        status = term.cmd("status")
        assert f"appliance_id: {appliance.appliance_id}" in status
        assert "keys_total: 1" in status
        assert {line.split(":")[0] for line in status} == set(appliance.status().to_json())
        assert term.cmd("keys") == ["web CLASSICAL"]
        show = term.cmd("key show web")
        assert "label: web" in show
        assert "state: CLASSICAL" in show
        assert term.cmd("key show nope") == ["error: no key matches 'nope'"]
        assert term.cmd("key") == ["error: usage: key show LABEL"]
        assert term.cmd("frobnicate") == ["error: unknown command 'frobnicate' (try `help`)"]
        assert term.cmd("status now") == ["error: status takes no arguments"]
        assert term.cmd("   ") == []


@pytest.mark.softhsm
def test_migrate_forward_then_backward_refused(appliance: Appliance, so_home: Path) -> None:
    appliance.create_key("ecdsa-p256", "web")
    appliance.create_key("ed25519", "other")
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        assert term.cmd("migrate web hybrid") == ["ok: web CLASSICAL -> HYBRID"]
        assert sorted(term.cmd("keys")) == ["other CLASSICAL", "web HYBRID"]
        reply = term.cmd("migrate web CLASSICAL")
        assert reply == [
            "error: HYBRID -> CLASSICAL goes backward; the console moves keys forward only "
            "(backward moves need `pqhsm migrate --allow-backward --reason`)"
        ]
        assert term.cmd("migrate web SIDEWAYS")[0].startswith("error: unknown state 'SIDEWAYS'")
        assert term.cmd("migrate web HYBRID") == ["error: key 'web' is already HYBRID"]
        assert term.cmd("migrate ghost HYBRID") == ["error: no key matches 'ghost'"]
        assert term.cmd("migrate other HYBRID") == ["ok: other CLASSICAL -> HYBRID"]
    assert appliance.find("web").state is KeyState.HYBRID


@pytest.mark.softhsm
def test_audit_verify(appliance: Appliance, so_home: Path) -> None:
    appliance.create_key("ed25519", "a")
    appliance.checkpoint()
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        (line,) = term.cmd("audit verify")
        assert line.startswith("audit ok: records=")
        assert f"records={len(appliance.wal)}" in line
        assert "checkpoints=1" in line


@pytest.mark.softhsm
def test_lock_blocks_migration_and_unlock_restores_it(
    appliance: Appliance, caplog: pytest.LogCaptureFixture, so_home: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    appliance.create_key("ecdsa-p256", "web")
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        assert term.cmd("lock") == ["keystore locked"]
        assert not appliance.keystore.unlocked
        assert term.cmd("migrate web HYBRID") == ["error: keystore is locked"]
        term.send(b"unlock\r")
        term.expect(b"passphrase: ")
        term.send(b"not the passphrase\r")
        reply = term.expect(PROMPT)
        assert b"error: wrong passphrase" in reply
        assert b"not the" not in reply
        term.send(b"unlock\r")
        term.expect(b"passphrase: ")
        term.send(PASSPHRASE + b"\r")
        reply = term.expect(PROMPT)
        assert b"keystore unlocked" in reply
        assert PASSPHRASE not in reply
        assert term.cmd("migrate web HYBRID") == ["ok: web CLASSICAL -> HYBRID"]
    assert PASSPHRASE.decode() not in caplog.text
    assert "not the passphrase" not in caplog.text


@pytest.mark.softhsm
def test_ctrl_c_at_passphrase_prompt_cancels(appliance: Appliance, so_home: Path) -> None:
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        term.cmd("lock")
        term.send(b"unlock\rcorrect\x03")
        assert b"cancelled" in term.expect(PROMPT)
        assert not appliance.keystore.unlocked


@pytest.mark.softhsm
def test_zeroize_needs_exact_phrase_then_removes_keystore(
    appliance: Appliance, so_home: Path
) -> None:
    appliance.create_key("ecdsa-p256", "web")
    appliance.migrate(appliance.find("web"), KeyState.HYBRID)
    home = appliance.cfg.home
    blobs = sorted((home / "blobs").glob("*.blob"))
    assert blobs
    phrase = f"ZEROIZE {appliance.appliance_id}"
    with console_on_pty(appliance, so_home) as (term, console):
        term.login()
        for wrong in ("zeroize", f"ZEROIZE {appliance.appliance_id}x", "ZEROIZE"):
            term.send(b"zeroize\r")
            term.expect(b"to confirm: ")
            term.send(wrong.encode() + b"\r")
            assert b"nothing removed" in term.expect(PROMPT)
        assert (home / "keystore.cbor").exists()
        assert all(b.exists() for b in blobs)
        assert appliance.keystore.unlocked
        term.send(b"zeroize\r")
        assert phrase.encode() in term.expect(b"to confirm: ")
        term.send(phrase.encode() + b"\r")
        reply = term.expect(PROMPT).decode()
        n = len(blobs)
        assert f"zeroized: removed keystore.cbor and {n} blob(s); WAL kept as evidence" in reply
        assert all(f"removed blobs/{b.name}" in reply for b in blobs)
        assert console.zeroized
        assert term.cmd("keys")[0].startswith("error: appliance was zeroized")
    assert not (home / "keystore.cbor").exists()
    assert not any((home / "blobs").glob("*.blob"))
    assert (home / "wal" / "wal.log").stat().st_size > 0
    assert not appliance.keystore.unlocked


@pytest.mark.softhsm
def test_backspace_editing_on_the_wire(appliance: Appliance, so_home: Path) -> None:
    appliance.create_key("ed25519", "a")
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        term.send(b"kexx\x7f\x08\x7feys\r")  # "kexx" -> "k" -> "keys"
        out = term.expect(PROMPT)
        assert out == b"kexx" + b"\b \b" * 3 + b"eys\r\na CLASSICAL\r\n" + PROMPT


@pytest.mark.softhsm
def test_overlong_line_then_console_keeps_serving(appliance: Appliance, so_home: Path) -> None:
    with console_on_pty(appliance, so_home, max_line=64) as (term, _):
        term.login()
        term.send(b"status " + b"A" * 500 + b"\r")
        out = term.expect(PROMPT)
        assert out.count(b"error: line too long") == 1
        assert term.cmd("keys") == ["(no keys)"]


@pytest.mark.softhsm
def test_binary_garbage_then_valid_command(appliance: Appliance, so_home: Path) -> None:
    appliance.create_key("ed25519", "a")
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        junk = random.Random(9).randbytes(200)  # noqa: S311 - reproducible test noise
        term.send(junk)
        term.send(b"\x03")  # whatever half line the noise left, cancel it
        term.drain()
        assert term.cmd("keys") == ["a CLASSICAL"]
        assert term.cmd("status")
    assert appliance.find("a").state is KeyState.CLASSICAL


@pytest.mark.softhsm
def test_disconnect_mid_session_leaves_appliance_working(
    appliance: Appliance, so_home: Path
) -> None:
    appliance.create_key("ed25519", "a")
    with console_on_pty(appliance, so_home, pty=True) as (term, _):
        term.login()
        term.send(b"migrate a HYB")
        term.close()
    assert appliance.find("a").state is KeyState.CLASSICAL
    assert appliance.sign(appliance.find("a"), b"still works")


@pytest.mark.softhsm
def test_logout_then_exit(appliance: Appliance, so_home: Path) -> None:
    with console_on_pty(appliance, so_home) as (term, console):
        term.login()
        term.send(b"logout\r")
        assert b"bye" in term.expect(PIN_PROMPT)
        term.send(SO_PIN + b"\r")
        term.expect(PROMPT)
        term.send(b"exit\r")
        term.expect(b"bye")
        assert term.thread is not None
        term.thread.join(3)
        assert not term.thread.is_alive()  # exit stops run() with the port still open
        assert console.failures == 0


# -- history, BREAK, backup, audit, a port that vanishes -----------------------------------------


def test_history_over_the_wire_never_holds_secrets(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home) as (term, console):
        term.login()
        assert term.cmd("help")
        term.cmd("hunter2")  # a secret typed at the command prompt: unknown verb
        term.send(b"zeroize\r")
        term.expect(b"to confirm: ")
        term.send(b"ZEROIZE not-this-one\r")  # the confirmation never enters the history
        assert b"nothing removed" in term.expect(PROMPT)
        assert console._editor.history == [b"help", b"zeroize"]
        term.send(b"\x1b[A\x1b[A\r")  # up, up: "help"
        out = term.expect(PROMPT)
        assert b"migrate LABEL STATE" in out
        assert b"hunter2" not in out.split(b"\r\n")[0]
        term.send(b"logout\r")  # a new session starts with an empty history
        term.expect(PIN_PROMPT)
        assert console._editor.history == []
        term.send(SO_PIN + b"\r")
        term.expect(PROMPT)
        term.send(b"\x1b[A\r")  # nothing to recall: an empty line
        assert term.expect(PROMPT) == b"\r\n" + PROMPT


def test_break_and_nul_bytes_mid_line_are_ignored(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home) as (term, _):
        term.expect(PIN_PROMPT)
        term.send(b"so-pin")
        termios.tcsendbreak(term.master, 0)  # a BREAK on the line (a pty takes it quietly)
        term.send(b"\x00")  # what a serial port reads for a BREAK (no IGNBRK, no PARMRK)
        term.send(b"-4711\r")
        term.expect(PROMPT)
        term.send(b"he\x00\xff\x00\x00lp\r")  # with PARMRK: 0xff 0 0; in a command: ignored
        assert b"logout" in term.expect(PROMPT)


@pytest.mark.softhsm
def test_backup_writes_a_signed_snapshot_inside_the_backup_dir(
    appliance: Appliance, so_home: Path, tmp_path: Path
) -> None:
    from appliance.snapshot import verify_backup

    appliance.create_key("ed25519", "a")
    backups = tmp_path / "backups"
    backups.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (backups / "escape").symlink_to(outside)
    with console_on_pty(appliance, so_home, backup_dir=backups) as (term, _):
        term.login()
        (line,) = term.cmd("backup")
        assert line.startswith("backup ok: id=")
        fields = dict(f.split("=", 1) for f in line.removeprefix("backup ok: ").split())
        assert fields["path"] == f"pqhsm-backup-{fields['id']}.tar.gz"
        assert len(fields["id"]) == 24
        written = backups / fields["path"]
        assert written.stat().st_size == int(fields["size"])
        assert written.stat().st_mode & 0o777 == 0o600
        verified = verify_backup(written, live_wal_dir=appliance.wal.directory)
        assert verified.wal_seq == int(fields["wal_seq"])
        (line,) = term.cmd("backup site-a/2026")
        assert "path=site-a/2026/pqhsm-backup-" in line
        assert len(list((backups / "site-a" / "2026").glob("*.tar.gz"))) == 1
        for folder in (backups / "site-a", backups / "site-a" / "2026"):
            assert folder.stat().st_mode & 0o777 == 0o700
        for bad in ("..", "../x", "/tmp", "a/../../x", "./a", "a\\b", "-rf"):
            reply = term.cmd(f"backup {bad}")
            assert len(reply) == 1
            assert reply[0].startswith("error: backup folder must be"), (bad, reply)
        assert term.cmd("backup escape") == ["error: backup folder leaves the backup directory"]
        assert term.cmd("backup escape/deeper") == [
            "error: backup folder leaves the backup directory"
        ]
        assert term.cmd("backup a b") == ["error: usage: backup [FOLDER]"]
        term.cmd("lock")
        reply = term.cmd("backup")
        assert reply == ["error: a backup is signed with the audit key's ML-DSA half: unlock first"]
        assert term.cmd("keys") == ["a CLASSICAL"]  # still serving
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x").exists()
    assert len(list(backups.rglob("*.tar.gz"))) == 2


def test_backup_without_a_backup_dir_is_refused(so_home: Path) -> None:
    with console_on_pty(no_app(), so_home) as (term, _):
        term.login()
        assert term.cmd("backup") == [
            "error: no backup directory configured (start the console with --backup-dir)"
        ]


@pytest.mark.softhsm
def test_audit_verify_follows_live_migrations_and_reports_tampering(
    appliance: Appliance, so_home: Path
) -> None:
    appliance.create_key("ecdsa-p256", "web")
    appliance.checkpoint()
    wal = appliance.wal.directory / "wal.log"
    with console_on_pty(appliance, so_home) as (term, _):
        term.login()
        (before,) = term.cmd("audit verify")
        assert term.cmd("migrate web HYBRID") == ["ok: web CLASSICAL -> HYBRID"]
        assert term.cmd("migrate web PQC_PREFERRED") == ["ok: web HYBRID -> PQC_PREFERRED"]
        (after,) = term.cmd("audit verify")
        assert f"records={len(appliance.wal)}" in after
        assert before != after
        assert "checkpoints=1" in after
        # flip one byte inside the first record: the chain no longer verifies
        data = bytearray(wal.read_bytes())
        data[12] ^= 0x01
        original = wal.read_bytes()
        wal.write_bytes(bytes(data))
        try:
            (line,) = term.cmd("audit verify")
            assert line.startswith("error: ")
            assert "audit ok" not in line
        finally:
            wal.write_bytes(original)
        assert term.cmd("audit verify")[0].startswith("audit ok: ")
        assert term.cmd("keys") == ["web PQC_PREFERRED"]


def test_port_that_vanishes_is_reopened_when_it_comes_back(
    so_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A USB-serial adapter pulled mid-line and plugged back in (a udev-style symlink)."""
    caplog.set_level(logging.INFO)
    link = tmp_path / "ttyCONSOLE"
    first = Terminal(pty=True)
    link.symlink_to(first.port)
    console = AdminConsole(
        no_app(),
        Transport(str(link), timeout=0.05),
        check_pin=so_pin_checker(so_home),
        idle_timeout=30,
    )
    ended: list[object] = []

    def reopen() -> Transport:
        return Transport(str(link), timeout=0.05)

    thread = threading.Thread(
        target=lambda: ended.append(console.serve_forever(reopen, retry=0.05)), daemon=True
    )
    thread.start()
    second = Terminal(pty=True)
    try:
        first.login()
        first.send(b"exi")  # half a command, then the adapter is gone
        first.close()
        time.sleep(0.3)  # the console notices, then keeps trying the dead path
        assert thread.is_alive()
        tmp = tmp_path / "ttyCONSOLE.new"
        tmp.symlink_to(second.port)
        tmp.replace(link)  # plugged back in: the same name, a new device
        second.send(b"\r")
        second.login()
        assert second.cmd("help")
        second.send(b"exit\r")
        second.expect(b"bye")
        thread.join(5)
        assert not thread.is_alive()
        assert [getattr(e, "value", e) for e in ended] == ["exit"]
        assert "is gone; waiting for it to come back" in caplog.text
        assert "is back" in caplog.text
    finally:
        console.stop()
        thread.join(5)
        console.transport.close()
        second.close()
        for t in (first, second):
            t.release()


@pytest.mark.softhsm
def test_one_way_migration_needs_the_label_typed_again(appliance: Appliance, so_home: Path) -> None:
    appliance.create_key("ecdsa-p256", "web")
    with console_on_pty(appliance, so_home) as (term, console):
        term.login()
        term.send(b"migrate web pqc_only\r")
        assert b"PQC_ONLY is one-way" in term.expect(b"to confirm: ")
        term.send(b"wbe\r")
        assert b"nothing changed" in term.expect(PROMPT)
        assert appliance.find("web").state is KeyState.CLASSICAL
        term.send(b"migrate web PQC_ONLY\r")
        term.expect(b"to confirm: ")
        term.send(b"web\r")
        assert b"ok: web CLASSICAL -> PQC_ONLY" in term.expect(PROMPT)
        assert console._editor.history == [b"migrate web pqc_only", b"migrate web PQC_ONLY"]
        (line,) = term.cmd("audit verify")
        assert line.startswith("audit ok: ")
        assert term.cmd("migrate web FINALIZING")[0].startswith(
            "error: PQC_ONLY -> FINALIZING goes backward"
        )
    assert appliance.find("web").state is KeyState.PQC_ONLY
    assert appliance.sign(appliance.find("web"), b"post-quantum now")
