"""pqhsm-console end to end: set the SO PIN, serve on a real pty in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest
from crashkit import make_base

pytestmark = pytest.mark.softhsm


def _read_until(fd: int, marker: bytes, timeout: float = 20.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while marker not in buf:
        if time.monotonic() > end:
            raise AssertionError(f"no {marker!r} in {buf[-300:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        buf += chunk
    return buf


def test_console_entry_point(tmp_path: Path) -> None:
    root = make_base(tmp_path / "base")
    home, secrets = root / "pqhsm", root / "secrets"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PQHSM_") and k != "SOFTHSM2_CONF"
    }
    base = [sys.executable, "-m", "hardware.console", "--home", str(home)]
    no_pin = subprocess.run(
        [*base, "serve", "--port", "loop://", "--pin-file", str(secrets / "token-pin")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert no_pin.returncode == 1
    assert no_pin.stderr.startswith("error: no security officer PIN yet")
    setp = subprocess.run(
        [*base, "set-so-pin", "--so-pin-fd", "0"],
        input=b"officer-2468\n",
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert setp.returncode == 0, setp.stderr
    assert (home / "clients.cbor").stat().st_mode & 0o777 == 0o600
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    proc = subprocess.Popen(
        [
            *base,
            "serve",
            "--port",
            os.ttyname(slave),
            "--pin-file",
            str(secrets / "token-pin"),
            "--idle-timeout",
            "30",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        os.write(master, b"\r")
        _read_until(master, b":")
        os.write(master, b"wrong-pin\r")
        _read_until(master, b":")
        os.write(master, b"officer-2468\r")
        _read_until(master, b"pqhsm# ")
        os.write(master, b"status\r")
        out = _read_until(master, b"keys_total")
        assert b"appliance_id" in out
        os.write(master, b"exit\r")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            err = proc.stderr.read().decode()
            proc.stderr.close()
            assert "Traceback" not in err
            assert "officer-2468" not in err
        os.close(master)
        os.close(slave)
