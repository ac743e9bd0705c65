"""pytest plugin: a running pqhsm appliance on a throw-away SoftHSM2 token, for your tests.

Installed with pqhsm (entry point ``pytest11: pqhsm``).  In a test suite::

    def test_signs_through_pkcs11(pqhsm_server):
        env = {**os.environ, **pqhsm_server.env()}
        subprocess.run(["pkcs11-tool", "--module", pqhsm_server.module, "-L"], env=env, check=True)

The fixture is session-scoped: one appliance (embedded SoftHSM2 token, cheap KDF — for
tests only), one ECDSA P-256 key labelled ``pqhsm-test-key``, and the PKCS#11 server on
a Unix socket in a private temporary folder.  Clients load Debian's ``p11-kit-client.so``
(``pqhsm_server.module``) with ``P11_KIT_SERVER_ADDRESS`` from ``pqhsm_server.env()`` and
log in with ``pqhsm_server.pin``.  The server stops when the session ends.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from pkcs11_shim.launch import child_env, serve_argv, throwaway_init_args

__all__ = ["CLIENT_MODULE", "PqhsmServer", "pqhsm_server"]

CLIENT_MODULE: Final = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
TEST_KEY_LABEL: Final = "pqhsm-test-key"


@dataclass(frozen=True)
class PqhsmServer:
    """Where the test appliance is and how a PKCS#11 client reaches it."""

    home: Path
    socket: Path
    module: str
    pin: str
    token_label: str
    key_label: str

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def env(self) -> dict[str, str]:
        """Environment for a client process that loads :attr:`module`."""
        return {"P11_KIT_SERVER_ADDRESS": self.address}


def _run(*args: str, home: Path) -> None:
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        [sys.executable, "-m", "appliance", "--home", str(home), *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pqhsm {args[0]} failed: {proc.stderr.strip()}")


@pytest.fixture(scope="session")
def pqhsm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PqhsmServer]:
    """A running pqhsm appliance and PKCS#11 server on a throw-away SoftHSM2 token."""
    if not Path(CLIENT_MODULE).is_file():
        pytest.skip(
            f"p11-kit-client.so not found at {CLIENT_MODULE} (Debian package p11-kit-modules)"
        )
    if shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (Debian package softhsm2)")
    root = tmp_path_factory.mktemp("pqhsm-server")
    root.chmod(0o700)
    home, secrets = root / "home", root / "secrets"
    # Unix socket paths are limited to 108 bytes; pytest's temp folders can be longer
    run = Path(tempfile.mkdtemp(prefix="pqhsm-"))
    _run(*throwaway_init_args(secrets), home=home)
    _run("key", "create", "--type", "ecdsa-p256", "--label", TEST_KEY_LABEL, home=home)
    sock = run / "p11.sock"
    server = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
        serve_argv(home, sock, secrets),
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if server.poll() is not None:
                err = server.stderr.read().decode() if server.stderr else ""
                raise RuntimeError(f"pqhsm PKCS#11 server exited: {err.strip()[-400:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("pqhsm PKCS#11 server did not open its socket within 30 s")
            time.sleep(0.05)
        yield PqhsmServer(
            home=home,
            socket=sock,
            module=CLIENT_MODULE,
            pin=(secrets / "token-pin").read_text().strip(),
            token_label="pqhsm",  # noqa: S106 - a token label, not a password
            key_label=TEST_KEY_LABEL,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()
        shutil.rmtree(run, ignore_errors=True)
