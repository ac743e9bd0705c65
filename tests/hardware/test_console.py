"""Admin console: the line editor byte by byte over ``loop://``, and whole sessions on a real
kernel pty (console on the slave through :class:`Transport`, the test on the master side).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import select
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import pytest

from appliance.keys import KeyState
from appliance.secret import SecretBytes
from conftest import PASSPHRASE
from hardware.console import (
    PIN_PROMPT,
    PROMPT,
    AdminConsole,
    EditEvent,
    LineEditor,
    LineResult,
)
from hardware.transport import Transport

if TYPE_CHECKING:
    from appliance.service import Appliance

SO_PIN = b"so-pin-4711"  # test-only security-officer PIN
_SO_PIN_DIGEST = hashlib.sha256(SO_PIN).digest()


def check_pin(pin: SecretBytes) -> bool:
    """Test verifier: constant-time compare of SHA-256 digests (no length leak)."""
    return hmac.compare_digest(hashlib.sha256(pin.view()).digest(), _SO_PIN_DIGEST)


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


def test_editor_rejects_bad_max_line() -> None:
    with pytest.raises(ValueError, match="max_line"):
        LineEditor(0)


# -- sessions on a real pty ---------------------------------------------------------------------


class Terminal:
    """The operator's side of a pty pair: raw master fd, read-until-marker helper."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.buf = bytearray()
        self.closed = False
        self.thread: threading.Thread | None = None

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
    app: Appliance, *, lockout: int = 5, idle_timeout: float = 30.0, max_line: int = 256
) -> Iterator[tuple[Terminal, AdminConsole]]:
    """Run :meth:`AdminConsole.run` in a thread on a pty; check it ended cleanly."""
    term = Terminal()
    transport = Transport(term.port, timeout=0.05)
    console = AdminConsole(
        app,
        transport,
        check_pin=check_pin,
        lockout=lockout,
        idle_timeout=idle_timeout,
        max_line=max_line,
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
        thread.join(5)
        transport.close()
        os.close(term.slave)
    assert not thread.is_alive()
    assert errors == []


class _NoAppliance:
    """Stands in for an appliance in tests that never get past the login."""

    appliance_id = "00"


def no_app() -> Appliance:
    return cast("Appliance", _NoAppliance())


def test_wrong_pin_then_right_pin_and_pin_not_echoed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with console_on_pty(no_app()) as (term, console):
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


def test_lockout_after_n_failures_refuses_right_pin() -> None:
    with console_on_pty(no_app(), lockout=3) as (term, console):
        term.expect(PIN_PROMPT)
        for _ in range(2):
            term.send(b"nope\r")
            assert b"error: login incorrect" in term.expect(PIN_PROMPT)
        term.send(b"nope\r")
        assert b"locked" in term.expect(PIN_PROMPT)
        assert console.locked_out()
        term.send(SO_PIN + b"\r")
        reply = term.expect(PIN_PROMPT)
        assert b"locked" in reply
        assert b"logged in" not in reply


def test_overlong_pin_and_ctrl_c_at_login() -> None:
    with console_on_pty(no_app(), max_line=32) as (term, console):
        term.expect(PIN_PROMPT)
        term.send(b"p" * 100 + b"\r")
        assert b"error: line too long" in term.expect(PIN_PROMPT)
        term.send(b"half\x03")
        term.expect(PIN_PROMPT)
        assert console.failures == 0
        term.send(SO_PIN + b"\r")
        term.expect(PROMPT)


def test_idle_timeout_logs_out() -> None:
    with console_on_pty(no_app(), idle_timeout=0.4) as (term, _):
        term.login()
        reply = term.expect(PIN_PROMPT, timeout=3)
        assert b"idle timeout: logged out" in reply


def test_disconnect_ends_session_cleanly() -> None:
    with console_on_pty(no_app()) as (term, _):
        term.login()
        term.send(b"hal")  # half a line, then the cable is pulled
        term.close()
    # console_on_pty asserted: the thread ended, without an exception


def test_stop_ends_run() -> None:
    with console_on_pty(no_app()) as (term, console):
        term.expect(PIN_PROMPT)
        console.stop()
        assert term.thread is not None
        term.thread.join(3)
        assert not term.thread.is_alive()


def test_console_survives_its_own_bugs_and_logs_no_unknown_verbs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with console_on_pty(no_app()) as (term, _):
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
def test_help_status_keys_key_show(appliance: Appliance) -> None:
    appliance.create_key("ecdsa-p256", "web")
    with console_on_pty(appliance) as (term, _):
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
def test_migrate_forward_then_backward_refused(appliance: Appliance) -> None:
    appliance.create_key("ecdsa-p256", "web")
    appliance.create_key("ed25519", "other")
    with console_on_pty(appliance) as (term, _):
        term.login()
        assert term.cmd("migrate web hybrid") == ["ok: web CLASSICAL -> HYBRID"]
        assert sorted(term.cmd("keys")) == ["other CLASSICAL", "web HYBRID"]
        reply = term.cmd("migrate web CLASSICAL")
        assert reply == [
            "error: HYBRID -> CLASSICAL goes backward: it needs --allow-backward and a --reason"
        ]
        assert term.cmd("migrate web SIDEWAYS")[0].startswith("error: unknown state 'SIDEWAYS'")
        assert term.cmd("migrate web HYBRID") == ["error: key 'web' is already HYBRID"]
        assert term.cmd("migrate ghost HYBRID") == ["error: no key matches 'ghost'"]
        assert term.cmd("migrate other HYBRID") == ["ok: other CLASSICAL -> HYBRID"]
    assert appliance.find("web").state is KeyState.HYBRID


@pytest.mark.softhsm
def test_audit_verify(appliance: Appliance) -> None:
    appliance.create_key("ed25519", "a")
    appliance.checkpoint()
    with console_on_pty(appliance) as (term, _):
        term.login()
        (line,) = term.cmd("audit verify")
        assert line.startswith("audit ok: records=")
        assert f"records={len(appliance.wal)}" in line
        assert "checkpoints=1" in line


@pytest.mark.softhsm
def test_lock_blocks_migration_and_unlock_restores_it(
    appliance: Appliance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    appliance.create_key("ecdsa-p256", "web")
    with console_on_pty(appliance) as (term, _):
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
def test_ctrl_c_at_passphrase_prompt_cancels(appliance: Appliance) -> None:
    with console_on_pty(appliance) as (term, _):
        term.login()
        term.cmd("lock")
        term.send(b"unlock\rcorrect\x03")
        assert b"cancelled" in term.expect(PROMPT)
        assert not appliance.keystore.unlocked


@pytest.mark.softhsm
def test_zeroize_needs_exact_phrase_then_removes_keystore(appliance: Appliance) -> None:
    appliance.create_key("ecdsa-p256", "web")
    appliance.migrate(appliance.find("web"), KeyState.HYBRID)
    home = appliance.cfg.home
    blobs = sorted((home / "blobs").glob("*.blob"))
    assert blobs
    phrase = f"ZEROIZE {appliance.appliance_id}"
    with console_on_pty(appliance) as (term, console):
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
def test_backspace_editing_on_the_wire(appliance: Appliance) -> None:
    appliance.create_key("ed25519", "a")
    with console_on_pty(appliance) as (term, _):
        term.login()
        term.send(b"kexx\x7f\x08\x7feys\r")  # "kexx" -> "k" -> "keys"
        out = term.expect(PROMPT)
        assert out == b"kexx" + b"\b \b" * 3 + b"eys\r\na CLASSICAL\r\n" + PROMPT


@pytest.mark.softhsm
def test_overlong_line_then_console_keeps_serving(appliance: Appliance) -> None:
    with console_on_pty(appliance, max_line=64) as (term, _):
        term.login()
        term.send(b"status " + b"A" * 500 + b"\r")
        out = term.expect(PROMPT)
        assert out.count(b"error: line too long") == 1
        assert term.cmd("keys") == ["(no keys)"]


@pytest.mark.softhsm
def test_binary_garbage_then_valid_command(appliance: Appliance) -> None:
    appliance.create_key("ed25519", "a")
    with console_on_pty(appliance) as (term, _):
        term.login()
        junk = random.Random(9).randbytes(200)  # noqa: S311 - reproducible test noise
        term.send(junk)
        term.send(b"\x03")  # whatever half line the noise left, cancel it
        term.drain()
        assert term.cmd("keys") == ["a CLASSICAL"]
        assert term.cmd("status")
    assert appliance.find("a").state is KeyState.CLASSICAL


@pytest.mark.softhsm
def test_disconnect_mid_session_leaves_appliance_working(appliance: Appliance) -> None:
    appliance.create_key("ed25519", "a")
    with console_on_pty(appliance) as (term, _):
        term.login()
        term.send(b"migrate a HYB")
        term.close()
    assert appliance.find("a").state is KeyState.CLASSICAL
    assert appliance.sign(appliance.find("a"), b"still works")


@pytest.mark.softhsm
def test_logout_then_exit(appliance: Appliance) -> None:
    with console_on_pty(appliance) as (term, console):
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
