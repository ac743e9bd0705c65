"""The options of the PKCS#11 server's command line, light enough for ``pqhsm --help``.

``pqhsm serve``, ``pqhsm-serve serve`` and ``python -m pkcs11_shim serve`` share them;
``pqhsm`` builds its parser on every run, so this module imports nothing of the server.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_IDLE_TIMEOUT", "add_serve_arguments"]

#: Seconds without a byte from a client before its connection is closed.
DEFAULT_IDLE_TIMEOUT: Final = 300.0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``serve`` (also ``pqhsm serve``; the caller adds ``--home``)."""
    p.add_argument("--socket", required=True, help="Unix socket path (its directory: 0700)")
    p.add_argument("--pin-file", help="file holding the token PIN (mode 0600)")
    p.add_argument("--pin-fd", type=int, help="read the token PIN from this file descriptor")
    p.add_argument("--unlock", action="store_true", help="also unlock the keystore")
    p.add_argument("--passphrase-file", help="file holding the keystore passphrase (0600)")
    p.add_argument("--passphrase-fd", type=int, help="read the passphrase from this fd")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes (default 1): this one, which owns the appliance, and N-1 "
        "followers that serve a share of the clients on other cores",
    )
    p.add_argument("--follower", help=argparse.SUPPRESS)  # internal: see processes.py
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="close a connection idle this many seconds (default %(default)s)",
    )
    p.add_argument(
        "--max-message",
        type=int,
        help="largest accepted message part in bytes (default and ceiling: 1 MiB); larger "
        "closes the connection",
    )
    c = p.add_argument_group(
        "serial admin console",
        "serve hardware/'s admin console for this same appliance (the WAL has one writer, "
        "so a console for a running server runs inside it); set its PIN first with "
        "`pqhsm console --set-so-pin`",
    )
    c.add_argument("--console-port", help="device path or pyserial URL for the console")
    c.add_argument("--console-baud", type=int, default=115200, help="line speed, 8N1")
    c.add_argument(
        "--console-idle-timeout", type=float, default=300.0, help="idle logout in seconds"
    )
    c.add_argument("--console-backup-dir", type=Path, help="folder `backup` writes into")
