"""``python -m pkcs11_shim serve|set-pin``: the PKCS#11 front end and its client PIN.

``serve --home DIR --socket PATH``: secrets come exactly as for the ``pqhsm`` command:
``--pin-file``/``--pin-fd``, the config's PIN file, ``$PQHSM_TOKEN_PIN`` (CI only) or the
terminal.  The keystore passphrase is asked for only with ``--unlock`` (classical
signing does not need it).

``set-pin --home DIR``: set the clients' PIN (Argon2id, ``DIR/clients.cbor``) and clear
its lockout.  The PIN comes from ``--pin-fd``/``--pin-file``, ``$PQHSM_CLIENT_PIN`` (CI
only) or the terminal (asked twice), never from argv.  A running server uses the new
PIN at the next login.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance import clientpins
from appliance.cli import get_secret, read_passphrase, read_pin
from appliance.config import Config, load_config, resolve_home
from appliance.errors import ApplianceError, ConfigError
from appliance.secret import SecretBytes
from appliance.service import Appliance
from pkcs11_shim.model import Pkcs11Model
from pkcs11_shim.options import add_serve_arguments
from pkcs11_shim.processes import Followers, OwnerProxy, Watermark
from pkcs11_shim.rpc import MAX_MESSAGE
from pkcs11_shim.server import Server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pkcs11_shim")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the appliance over the p11-kit RPC protocol")
    p.add_argument("--home", help="state directory (default $PQHSM_HOME or ./var/pqhsm)")
    add_serve_arguments(p)
    q = sub.add_parser("set-pin", help="set the PKCS#11 client PIN and clear its lockout")
    q.add_argument("--home", help="state directory (default $PQHSM_HOME or ./var/pqhsm)")
    q.add_argument("--pin-file", help="file holding the new client PIN (mode 0600)")
    q.add_argument("--pin-fd", type=int, help="read the new client PIN from this fd")
    q.add_argument(
        "--kdf-profile",
        choices=("default", "test"),
        default="default",
        help="Argon2id cost: default (RFC 9106 low-memory) or test (cheapest; tests only)",
    )
    return parser


def set_pin(args: argparse.Namespace) -> int:
    """Hash the new client PIN into the store; the old hash and counter are replaced."""
    cfg = load_config(resolve_home(args.home))
    pin = get_secret(
        "client PIN",
        fd=args.pin_fd,
        file=args.pin_file,
        cfg_file=None,
        env="PQHSM_CLIENT_PIN",
        confirm=True,
    )
    profile = clientpins.TEST_PROFILE if args.kdf_profile == "test" else clientpins.DEFAULT_PROFILE
    with pin:
        clientpins.set_pin(cfg.home, pin, profile=profile)
    print(f"client PIN set in {cfg.home / clientpins.STORE_FILE}")  # noqa: T201
    return 0


def _start_console(args: argparse.Namespace, app: Appliance) -> Callable[[], None]:
    """Serve the admin console in a thread beside the PKCS#11 server; return its stopper.

    :raises ApplianceError: no officer PIN yet, a bad option, or a port that will not open
        (one line, before anything is served).
    """
    from appliance.cli import import_hardware  # pyserial is needed only here

    hw = import_hardware("hardware.console")
    home = app.cfg.home
    if args.console_baud <= 0 or args.console_idle_timeout <= 0:
        raise ConfigError("--console-baud and --console-idle-timeout must be positive")
    if args.console_backup_dir is not None and not args.console_backup_dir.is_dir():
        raise ConfigError(f"--console-backup-dir {args.console_backup_dir}: not a folder")
    if not hw.so_pin_exists(home):
        raise ConfigError("no security officer PIN yet: run `pqhsm console --set-so-pin` first")

    def reopen() -> Any:
        return hw.Transport(args.console_port, baud=args.console_baud, timeout=0.1)

    console = hw.AdminConsole(
        app,
        reopen(),
        check_pin=hw.so_pin_checker(home),
        idle_timeout=args.console_idle_timeout,
        backup_dir=args.console_backup_dir,
    )

    def run() -> None:
        # `exit` ends a session, not the server's console: the line waits for the next login
        while console.serve_forever(reopen) is hw.SessionEnd.EXIT:
            logging.getLogger(__name__).info("console session ended with `exit`")

    thread = threading.Thread(target=run, name="console", daemon=True)
    thread.start()
    logging.getLogger(__name__).info("admin console on %s", args.console_port)

    def stop() -> None:
        console.stop()
        thread.join(timeout=5)
        console.transport.close()

    return stop


def _server(
    args: argparse.Namespace,
    model: Pkcs11Model,
    *,
    followers: Sequence[socket.socket] = (),
    inbox: socket.socket | None = None,
) -> Server:
    return Server(
        model,
        Path(args.socket),
        idle_timeout=args.idle_timeout,
        max_message=MAX_MESSAGE if args.max_message is None else args.max_message,
        followers=followers,
        inbox=inbox,
    )


def _follower_argv(args: argparse.Namespace, cfg_home: Path) -> list[str]:
    """The command line of a follower of this ``serve`` (``--pin-fd`` and ``--follower``
    are added per process)."""
    argv = [sys.executable, "-m", "pkcs11_shim"]
    if logging.getLogger().isEnabledFor(logging.INFO):
        argv.append("-v")
    argv += ["serve", "--home", str(cfg_home), "--socket", str(Path(args.socket).absolute())]
    argv += ["--idle-timeout", repr(args.idle_timeout)]
    if args.max_message is not None:
        argv += ["--max-message", str(args.max_message)]
    return argv


def serve(args: argparse.Namespace) -> int:
    """Open the appliance, serve until SIGINT/SIGTERM, close everything."""
    cfg = load_config(resolve_home(args.home))
    if getattr(args, "follower", None):
        return _serve_follower(args, cfg)
    processes = getattr(args, "processes", 1)
    if not 1 <= processes <= 64:
        raise ConfigError("--processes must be 1 to 64")
    pin = read_pin(args, cfg)
    passphrase = read_passphrase(args, cfg) if args.unlock else None
    client_pin = SecretBytes(pin.view())  # interim fallback, only without a PIN store
    followers: Followers | None = None
    try:
        app = Appliance.open(cfg, pin=pin, passphrase=passphrase)
        if processes > 1:
            try:
                followers = Followers(app, processes - 1, _follower_argv(args, cfg.home), pin)
            except BaseException:
                app.close()
                raise
    except BaseException:
        client_pin.wipe()
        raise
    finally:
        pin.wipe()
        if passphrase is not None:
            passphrase.wipe()
    model = Pkcs11Model(app, client_pin=client_pin)
    server = _server(args, model, followers=followers.sockets if followers is not None else ())
    stop_console: Callable[[], None] | None = None
    try:
        if args.console_port:
            stop_console = _start_console(args, app)
        server.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.close())
        print(f"P11_KIT_SERVER_ADDRESS={server.address}", flush=True)  # noqa: T201
        server.wait()
    finally:
        server.close()
        if followers is not None:
            followers.close()
        if stop_console is not None:
            stop_console()
        model.close()
        app.close()
    return 0


def _serve_follower(args: argparse.Namespace, cfg: Config) -> int:
    """A follower of ``serve --processes`` (:mod:`pkcs11_shim.processes`): serve the
    connections the owner hands over until it goes away or SIGTERM."""
    try:
        inbox_fd, watermark_fd, *control_fds = (int(fd) for fd in args.follower.split(","))
        if not control_fds:
            raise ValueError("no control sockets")
        inbox = socket.socket(fileno=inbox_fd)
        watermark = Watermark(watermark_fd, writable=False)
        proxy = OwnerProxy([socket.socket(fileno=fd) for fd in control_fds])
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--follower: {exc}") from None
    pin = read_pin(args, cfg)
    client_pin = SecretBytes(pin.view())  # as in the owner: only without a PIN store
    try:
        app = Appliance.open_follower(cfg, pin=pin, committed_end=watermark.read, writer=proxy)
    except BaseException:
        client_pin.wipe()
        raise
    finally:
        pin.wipe()
    model = Pkcs11Model(app, client_pin=client_pin)
    server = _server(args, model, inbox=inbox)
    try:
        server.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.close())
        inbox.send(b"R")  # ready: the owner starts handing connections over
        server.wait()
    finally:
        server.close()
        model.close()
        app.close()
        proxy.close()
        watermark.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="pkcs11_shim: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return set_pin(args) if args.command == "set-pin" else serve(args)
    except ApplianceError as exc:
        print(f"error: {exc} [CKR_{exc.ckr.name}]", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
