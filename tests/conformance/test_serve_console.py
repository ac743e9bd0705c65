"""The serial admin console inside the running PKCS#11 server (``serve --console-port``).

The WAL has one writer, so a console for a running appliance must live in the process
that serves it.  Here one ``python -m pkcs11_shim serve`` child serves PKCS#11 on its
socket and the console on a real kernel pty; the officer migrates a key from the console
while a p11-kit client lists objects, and the client sees the classical private key go.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import tty
from pathlib import Path

import pytest
from crashkit import make_base

from appliance import clientpins
from appliance.secret import SecretBytes
from conftest import PKCS11_TOOL_LOGIN, pin_env, read_until, run_cli
from hardware.console import set_so_pin
from pkcs11_shim.launch import child_env, serve_argv

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
SO = b"officer-1357"

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(not Path(CLIENT_MODULE).is_file(), reason="p11-kit-client.so missing"),
    pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool missing"),
]


def _serve(home: Path, secrets: Path, sockdir: Path, console: str) -> list[str]:
    return serve_argv(home, sockdir / "p11.sock", secrets, extra=("--console-port", console))


def _private_labels(env: dict[str, str], pin: str) -> list[str]:
    proc = subprocess.run(
        ["pkcs11-tool", "--module", CLIENT_MODULE, *PKCS11_TOOL_LOGIN, "-O"],
        env={**env, **pin_env(pin)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    labels, private = [], False
    for line in proc.stdout.splitlines():
        if line.startswith("Private Key Object"):
            private = True
        elif line and not line.startswith(" "):
            private = False
        elif private and line.strip().startswith("label:"):
            labels.append(line.split(":", 1)[1].strip())
    return labels


def test_console_migrates_while_pkcs11_clients_watch(tmp_path: Path) -> None:
    root = make_base(tmp_path / "base")
    home, secrets = root / "pqhsm", root / "secrets"
    pin = (secrets / "token-pin").read_text().strip()
    passphrase = (secrets / "passphrase").read_bytes().strip()
    for label in ("watched", "bystander"):
        proc = run_cli("key", "create", "--type", "ecdsa-p256", "--label", label, home=home)
        assert proc.returncode == 0, proc.stderr
    set_so_pin(home, SecretBytes(SO), profile=clientpins.TEST_PROFILE)
    sockdir = Path(tempfile.mkdtemp(prefix="p11c"))  # AF_UNIX paths max 107 bytes
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    server = subprocess.Popen(
        _serve(home, secrets, sockdir, os.ttyname(slave)),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        assert line.startswith("P11_KIT_SERVER_ADDRESS="), line
        env = {**child_env(), "P11_KIT_SERVER_ADDRESS": line.split("=", 1)[1].strip()}
        assert sorted(_private_labels(env, pin)) == ["bystander", "watched"]

        os.write(master, b"\r")
        read_until(master, b"PIN: ")
        os.write(master, SO + b"\r")
        read_until(master, b"pqhsm# ")
        os.write(master, b"unlock\r")
        read_until(master, b"passphrase: ")
        os.write(master, passphrase + b"\r")
        assert b"keystore unlocked" in read_until(master, b"pqhsm# ")
        for target in ("HYBRID", "PQC_PREFERRED"):
            os.write(master, f"migrate watched {target}\r".encode())
            out = read_until(master, b"pqhsm# ")
            assert target.encode() in out, out
        # still classical-capable: both private objects are there
        assert sorted(_private_labels(env, pin)) == ["bystander", "watched"]
        os.write(master, b"migrate watched PQC_ONLY\r")
        out = read_until(master, b": ")  # erasing the classical key asks for the label
        os.write(master, b"watched\r")
        out = read_until(master, b"pqhsm# ")
        assert b"PQC_ONLY" in out, out
        assert _private_labels(env, pin) == ["bystander"]
        # `exit` ends the session, not the server's console: the line serves the next login
        os.write(master, b"exit\r")
        os.write(master, b"\r")
        read_until(master, b"PIN: ")
        assert server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        finally:
            if server.poll() is None:
                server.kill()
        err = server.stderr.read() if server.stderr is not None else b""
        os.close(master)
        os.close(slave)
        shutil.rmtree(sockdir, ignore_errors=True)
    assert server.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert SO not in err
    assert passphrase not in err


def test_console_needs_an_officer_pin_first(tmp_path: Path) -> None:
    root = make_base(tmp_path / "base")
    home, secrets = root / "pqhsm", root / "secrets"
    sockdir = Path(tempfile.mkdtemp(prefix="p11c"))
    try:
        proc = subprocess.run(
            _serve(home, secrets, sockdir, "loop://"),
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no security officer PIN yet"), proc.stderr
    assert proc.stderr.count("\n") == 1
