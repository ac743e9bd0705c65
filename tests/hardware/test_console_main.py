"""``pqhsm console`` end to end in a child process on a real pty, plus its bad-input answers.

The same run also checks the older spelling (``pqhsm-console serve`` / ``set-so-pin``, i.e.
``python -m hardware.console``), and that the appliance package never imports ``hardware``
(nor pyserial) unless one of these commands runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tty
from pathlib import Path

import pytest
from crashkit import make_base

from appliance import clientpins
from appliance.cli import main
from appliance.secret import SecretBytes
from conftest import read_until
from hardware.console import set_so_pin
from pkcs11_shim.launch import child_env

PQHSM = [sys.executable, "-m", "appliance"]
OLD = [sys.executable, "-m", "hardware.console"]
SO = b"officer-2468"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=child_env(), capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], rc: int = 1) -> str:
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def _serve(base: list[str], port: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*base, "--port", port, "--idle-timeout", "30", *extra],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes], *secrets: bytes) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert b"Traceback" not in err, err.decode()
    for secret in secrets:
        assert secret not in err


@pytest.mark.softhsm
def test_pqhsm_console_end_to_end_and_the_old_entry_point(tmp_path: Path) -> None:
    root = make_base(tmp_path / "base")
    home, secrets = root / "pqhsm", root / "secrets"
    pin_file = str(secrets / "token-pin")
    passphrase = (secrets / "passphrase").read_bytes().strip()
    console = [*PQHSM, "--home", str(home), "console"]
    no_pin = _run([*console, "--port", "loop://", "--pin-file", pin_file])
    assert _one_line_error(no_pin).startswith("error: no security officer PIN yet")
    setp = subprocess.run(
        [*console, "--set-so-pin", "--so-pin-fd", "0"],
        input=SO + b"\n",
        env=child_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert setp.returncode == 0, setp.stderr
    store = home / "console" / "clients.cbor"
    assert store.stat().st_mode & 0o777 == 0o600
    assert not (home / "clients.cbor").exists()  # PKCS#11 client logins are untouched
    backups = tmp_path / "backups"
    backups.mkdir()
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    proc = _serve(console, os.ttyname(slave), "--pin-file", pin_file, "--backup-dir", str(backups))
    try:
        os.write(master, b"\r")
        read_until(master, b"PIN: ")
        os.write(master, b"wrong-pin\r")
        assert b"login incorrect" in read_until(master, b"PIN: ")
        os.write(master, SO + b"\r")
        read_until(master, b"pqhsm# ")
        os.write(master, b"status\r")
        out = read_until(master, b"pqhsm# ")
        assert b"appliance_id" in out
        assert b"keys_total" in out
        os.write(master, b"backup\r")
        assert b"unlock first" in read_until(master, b"pqhsm# ")
        os.write(master, b"unlock\r")
        read_until(master, b"passphrase: ")
        os.write(master, passphrase + b"\r")
        out = read_until(master, b"pqhsm# ")
        assert b"keystore unlocked" in out
        assert passphrase not in out
        os.write(master, b"backup\r")
        out = read_until(master, b"pqhsm# ")
        assert b"backup ok: id=" in out
        assert len(list(backups.glob("pqhsm-backup-*.tar.gz"))) == 1
        os.write(master, b"exit\r")
        assert proc.wait(timeout=20) == 0
    finally:
        _finish(proc, SO, passphrase)
        os.close(master)
        os.close(slave)
    _old_entry_point_still_serves(home, secrets)


def _old_entry_point_still_serves(home: Path, secrets: Path) -> None:
    """``pqhsm-console serve`` / ``set-so-pin`` on the same home."""
    base = [*OLD, "--home", str(home)]
    setp = subprocess.run(
        [*base, "set-so-pin", "--so-pin-fd", "0"],
        input=SO + b"\n",
        env=child_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert setp.returncode == 0, setp.stderr
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    proc = _serve([*base, "serve"], os.ttyname(slave), "--pin-file", str(secrets / "token-pin"))
    try:
        os.write(master, b"\r")
        read_until(master, b"PIN: ")
        os.write(master, SO + b"\r")
        read_until(master, b"pqhsm# ")
        os.write(master, b"keys\r")
        assert b"(no keys)" in read_until(master, b"pqhsm# ")
        os.write(master, b"exit\r")
        assert proc.wait(timeout=20) == 0
    finally:
        _finish(proc, SO)
        os.close(master)
        os.close(slave)


@pytest.fixture
def so_only_home(tmp_path: Path) -> Path:
    """A home that has an officer PIN but no appliance: enough to reach the port checks."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    set_so_pin(home, SecretBytes(SO), profile=clientpins.TEST_PROFILE)
    return home


BAD_INPUT = [
    (["--port", "/dev/ttyNOSUCH9"], "error: serial port /dev/ttyNOSUCH9: cannot open: "),
    (["--port", "socket://127.0.0.1:1"], "error: serial port socket://127.0.0.1:1: cannot open"),
    (["--port", "nosuchscheme://x"], "error: serial port nosuchscheme://x: cannot open"),
    (["--port", "loop://", "--baud", "0"], "error: --baud must be a positive line speed"),
    (["--port", "loop://", "--baud", "-9600"], "error: --baud must be a positive line speed"),
    ([], "error: give --port"),
    (["--port", "loop://", "--backup-dir", "/nonexistent/b"], "error: --backup-dir"),
    (["--port", "loop://", "--idle-timeout", "0"], "error: --idle-timeout"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUT)
def test_bad_port_and_options_are_one_line_errors(
    so_only_home: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    rc = main(["--home", str(so_only_home), "console", *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(message), err
    assert err.count("\n") == 1, err


def test_unknown_port_from_the_real_command(so_only_home: Path) -> None:
    proc = _run([*PQHSM, "--home", str(so_only_home), "console", "--port", "/dev/ttyUSB97"])
    err = _one_line_error(proc)
    assert err.startswith("error: serial port /dev/ttyUSB97: cannot open: ")
    assert err.rstrip().endswith("[CKR_DEVICE_ERROR]")


def test_missing_pyserial_is_one_clear_line(tmp_path: Path) -> None:
    block = "import sys; sys.modules['serial'] = None; from appliance.cli import main; "
    for args in (["console", "--port", "loop://"], ["lab", "run", "lab.toml"]):
        proc = _run(
            [sys.executable, "-c", block + f"raise SystemExit(main({args!r}))"], cwd=tmp_path
        )
        err = _one_line_error(proc)
        assert "needs pyserial, which is not installed" in err


def test_appliance_never_imports_hardware_or_pyserial() -> None:
    """Importing the appliance and its CLI, and ``pqhsm console --help``, load neither."""
    probe = (
        "import sys, appliance, appliance.cli, appliance.service\n"
        "try:\n    appliance.cli.main(['console', '--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hardware', 'serial')))"
    )
    proc = _run([sys.executable, "-c", probe])
    assert proc.returncode == 0, proc.stderr
    assert "--port" in proc.stdout
    assert "--backup-dir" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"
