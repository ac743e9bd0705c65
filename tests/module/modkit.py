"""What the module tests share: building libpqhsm-pkcs11.so and serving an appliance.

A helper module rather than a second ``conftest.py``: mypy runs with ``mypy_path=tests``,
where two modules named ``conftest`` would clash.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import pytest

from appliance.keystore import PBKDF2_SHA3, calibrate
from appliance.secret import SecretBytes
from appliance.service import Appliance
from conftest import CHEAP_PBKDF2, PASSPHRASE, PIN, make_config, new_token
from pkcs11_shim.model import Pkcs11Model
from pkcs11_shim.server import Server

SOURCE_DIR = Path(__file__).resolve().parents[2] / "pkcs11_shim" / "c"

T = TypeVar("T")


@dataclass(frozen=True)
class Build:
    """A build of the module and the environment its client process needs."""

    module: Path
    env: dict[str, str]

    def check(self, r: subprocess.CompletedProcess[bytes]) -> None:
        """No sanitizer report (ASan exits 98, UBSan 97 here; pkcs11-tool errors exit 1)."""
        tail = r.stderr.decode(errors="replace")[-3000:]
        assert r.returncode not in (97, 98), tail
        assert b"AddressSanitizer" not in r.stderr, tail
        assert b"runtime error" not in r.stderr, tail


def make_module(out: Path, *target: str) -> Path:
    """Build a Makefile target into ``out`` (default: libpqhsm-pkcs11.so); its folder.

    Skips the test when gcc or make is missing; fails on any compiler output (-Werror).
    """
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("gcc and make are needed to build libpqhsm-pkcs11.so")
    proc = subprocess.run(
        ["make", "-s", "-C", str(SOURCE_DIR), f"OUT={out}", "CC=gcc", *target],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode() + proc.stdout.decode()
    assert proc.stderr == b"", proc.stderr.decode()  # -Werror: no warnings either
    return out


def asan_build(out: Path) -> Build | None:
    """The ``asan`` target (ASan + UBSan) built into ``out``, with the runtime to preload
    into the client process; None when libasan is not installed."""
    runtime = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not runtime.startswith("/") or not Path(runtime).exists():
        return None
    make_module(out, "asan")
    env = {
        "LD_PRELOAD": runtime,
        "ASAN_OPTIONS": "detect_leaks=0:exitcode=98:abort_on_error=0",
        "UBSAN_OPTIONS": "halt_on_error=1:exitcode=97:print_stacktrace=1",
    }
    return Build(out / "libpqhsm-pkcs11-asan.so", env)


def module_env(address: str) -> dict[str, str]:
    """This process's environment for a client of libpqhsm-pkcs11.so at ``address``
    (``unix:path=…``), without p11-kit's own server variable."""
    env = {k: v for k, v in os.environ.items() if k != "P11_KIT_SERVER_ADDRESS"}
    env["PQHSM_SERVER_ADDRESS"] = address
    return env


def short_socket_dir(prefix: str = "p11m") -> Path:
    """A fresh folder under /tmp: AF_UNIX paths hold 107 bytes, pytest's folders can be longer."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def serving(
    home: Path, make_keys: Callable[[Appliance], T], prefix: str = "p11m"
) -> Iterator[tuple[Appliance, Server, T]]:
    """An appliance on a new SoftHSM2 token (cheap KDF) with the keys ``make_keys`` creates,
    served in this process on a short socket path; everything closed afterwards."""
    token = new_token()
    kdf = calibrate(PBKDF2_SHA3, pbkdf2_iterations=CHEAP_PBKDF2)
    app = Appliance.initialize(
        make_config(home, token),
        pin=token.pin_secret(),
        passphrase=SecretBytes(PASSPHRASE),
        kdf=kdf,
    )
    keys = make_keys(app)
    model = Pkcs11Model(app, client_pin=SecretBytes(PIN))
    sockdir = short_socket_dir(prefix)
    server = Server(model, sockdir / "p11.sock")
    server.start()
    try:
        yield app, server, keys
    finally:
        server.close()
        model.close()
        app.close()
        shutil.rmtree(sockdir, ignore_errors=True)


#: valgrind memcheck for the module's clients: errors fail the run, definite leaks are errors.
VALGRIND: Final = (
    "valgrind",
    "--error-exitcode=99",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite",
)


def definitely_lost(stderr: bytes) -> int:
    """Bytes memcheck reports as definitely lost (0 when it reports none)."""
    m = re.search(rb"definitely lost: ([\d,]+) bytes", stderr)
    return int(m.group(1).replace(b",", b"")) if m else 0
