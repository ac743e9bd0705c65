"""Starting the appliance's PKCS#11 server as a child process (tests, bench, lab, plugin).

Every place that runs ``python -m pkcs11_shim serve`` on a throw-away home builds the same
command line and the same environment; they come from here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["child_env", "serve_argv", "throwaway_init_args"]


def child_env() -> dict[str, str]:
    """This process's environment for a child appliance process, less what would point it
    elsewhere: every ``PQHSM_*`` override and ``SOFTHSM2_CONF`` (the child's config sets
    the token)."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("PQHSM_") and k != "SOFTHSM2_CONF"
    }


def throwaway_init_args(secrets: Path) -> list[str]:
    """``pqhsm init`` arguments for a throw-away appliance: an embedded SoftHSM2 token,
    generated secrets written to ``secrets``, and a KDF cut to 1000 PBKDF2 iterations
    (tests, benchmarks and lab runs only: never for keys that matter)."""
    return [
        "init",
        "--embedded-softhsm",
        "--generate-secrets",
        str(secrets),
        "--pbkdf2-iterations",
        "1000",
    ]


def serve_argv(
    home: Path,
    socket: Path,
    secrets: Path,
    *,
    unlock: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m pkcs11_shim serve`` on ``home``, with the token PIN (and, ``unlock``,
    the passphrase) from the files ``pqhsm init --generate-secrets`` wrote to ``secrets``."""
    argv = [
        sys.executable,
        "-m",
        "pkcs11_shim",
        "serve",
        "--home",
        str(home),
        "--socket",
        str(socket),
        "--pin-file",
        str(secrets / "token-pin"),
    ]
    if unlock:
        argv += ["--unlock", "--passphrase-file", str(secrets / "passphrase")]
    return [*argv, *extra]
