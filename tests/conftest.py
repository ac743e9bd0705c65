"""Shared fixtures: a real SoftHSM2 token directory per test session, a fresh token per test.

SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is first initialized, and
python-pkcs11 caches the module per path; so one token directory serves the whole session
and every test that needs a clean token gets a new one in it (``C_InitToken`` in-process,
which the loaded module sees at once).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from appliance.config import Config
from appliance.keystore import PBKDF2_SHA3, calibrate
from appliance.secret import SecretBytes
from appliance.token.initdev import init_token
from appliance.token.softhsm import SOFTHSM_MODULES
from pkcs11_shim.launch import child_env

#: pytester tests the shipped pqhsm pytest plugin; labline (tests/labline.py) adds the
#: hardware lab's options (--serial-port, --relay-port, ...) and their fixtures.
pytest_plugins = ["pytester", "labline"]

PIN = b"1234-test-pin"
SO_PIN = b"5678-test-so-pin"
PASSPHRASE = b"correct horse battery staple"
CHEAP_PBKDF2 = 1_000  # tests only: production calibrates to about one second
#: pkcs11-tool reads its PIN from this environment variable (``--pin env:NAME``, OpenSC
#: 0.23+), never from its command line, which every user of the machine can read (ps).
PIN_VAR = "PQHSM_TEST_PIN"
PKCS11_TOOL_LOGIN = ("--login", "--pin", f"env:{PIN_VAR}")


def pin_env(pin: str | bytes) -> dict[str, str]:
    """The environment entry :data:`PKCS11_TOOL_LOGIN` reads the PIN from."""
    return {PIN_VAR: pin.decode() if isinstance(pin, bytes) else pin}


def pin_source(directory: Path, pin: bytes) -> str:
    """A ``pkcs11:`` URI's ``pin-source`` attribute (RFC 7512) naming a 0600 file that
    holds ``pin``: OpenSSL's engine logs in without the PIN on its command line."""
    path = directory / "user-pin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pin)
    return f"pin-source=file:{path}"


if TYPE_CHECKING:
    from appliance.service import Appliance
    from pkcs11_shim.server import Server

_counter = itertools.count(1)


def wal_scan_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the file offset every WAL scan starts at (0: the whole log)."""
    from appliance.wal import log as wal_log

    starts: list[int] = []
    real_scan = wal_log._scan

    def spying(fd: int, path: Path, size: int, after: Any = None) -> Any:
        starts.append(0 if after is None else after.end)
        return real_scan(fd, path, size, after)

    monkeypatch.setattr(wal_log, "_scan", spying)
    return starts


def softhsm_module() -> str | None:
    env = os.environ.get("PKCS11_MODULE")
    if env:
        return env
    return next((m for m in SOFTHSM_MODULES if Path(m).is_file()), None)


@dataclass(frozen=True)
class TokenSpec:
    module: str
    label: str
    pin: bytes
    so_pin: bytes

    def pin_secret(self) -> SecretBytes:
        return SecretBytes(self.pin)


@pytest.fixture(scope="session")
def softhsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (Debian package softhsm2)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return root


def new_token() -> TokenSpec:
    """Initialize one more token in the session's SoftHSM2 directory."""
    module = softhsm_module()
    assert module is not None
    label = f"test-{os.getpid()}-{next(_counter)}"
    init_token(module, label, SecretBytes(SO_PIN), SecretBytes(PIN))
    return TokenSpec(module=module, label=label, pin=PIN, so_pin=SO_PIN)


@pytest.fixture
def fresh_token(softhsm_dir: Path) -> TokenSpec:
    return new_token()


def make_config(home: Path, token: TokenSpec) -> Config:
    return Config(home=home, module=token.module, token_label=token.label)


@pytest.fixture
def app_home(tmp_path: Path) -> Path:
    home = tmp_path / "pqhsm"
    return home


@pytest.fixture
def appliance(fresh_token: TokenSpec, app_home: Path) -> Iterator[Appliance]:
    from appliance.service import Appliance

    cfg = make_config(app_home, fresh_token)
    kdf = calibrate(PBKDF2_SHA3, pbkdf2_iterations=CHEAP_PBKDF2)
    app = Appliance.initialize(
        cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE), kdf=kdf
    )
    try:
        yield app
    finally:
        app.close()


def read_until(fd: int, marker: bytes, timeout: float = 20.0) -> bytes:
    """Read a non-blocking fd (a pty master) until ``marker`` arrives; fail after ``timeout``."""
    buf = b""
    end = time.monotonic() + timeout
    while marker not in buf:
        if time.monotonic() > end:
            raise AssertionError(f"no {marker!r} in {buf[-300:]!r}")
        try:
            buf += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
    return buf


def run_cli(
    *args: str,
    home: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``pqhsm`` command in a child process."""
    full_env = child_env()
    if env:
        full_env.update(env)
    cmd = [sys.executable, "-m", "appliance"]
    if home is not None:
        cmd += ["--home", str(home)]
    proc = subprocess.run(
        [*cmd, *args], env=full_env, input=stdin, capture_output=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pqhsm {' '.join(args)} failed: {proc.stderr.decode()}")
    return proc


@contextmanager
def pkcs11_server(
    app: Appliance,
    sockdir: Path,
    *,
    client_pin: bytes | None = PIN,
    idle_timeout: float = 300.0,
    max_message: int | None = None,
) -> Iterator[Server]:
    """A started PKCS#11 :class:`Server` over ``app`` at ``sockdir/p11.sock`` (keep the
    directory short: AF_UNIX paths hold at most 107 bytes); closed with its model."""
    from pkcs11_shim.model import Pkcs11Model
    from pkcs11_shim.rpc import MAX_MESSAGE
    from pkcs11_shim.server import Server

    model = Pkcs11Model(app, client_pin=SecretBytes(client_pin) if client_pin is not None else None)
    limit = MAX_MESSAGE if max_message is None else max_message
    server = Server(model, sockdir / "p11.sock", idle_timeout=idle_timeout, max_message=limit)
    server.start()
    try:
        yield server
    finally:
        server.close()
        model.close()
