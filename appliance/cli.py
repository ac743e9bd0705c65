"""The ``pqhsm`` command.

The one module that prints.  Every :class:`ApplianceError` ends as one line,
``error: <message> [CKR_NAME]``, and a non-zero exit code; never a traceback.

Secrets (token PIN, keystore passphrase) never come from argv.  In order of preference:
``--pin-fd``/``--passphrase-fd``, ``--pin-file``/``--passphrase-file`` (must be 0600), the
files named in ``config.toml``, the environment (``PQHSM_TOKEN_PIN``, ``PQHSM_PASSPHRASE``;
for CI pipelines only, removed from the environment once read), then a prompt with echo
off when standard input is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import termios
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.algorithms import ClassicalAlg
from appliance.config import Config, load_config, resolve_home, write_config
from appliance.errors import (
    ApplianceError,
    CallerError,
    ConfigError,
    KeyExists,
    NoSuchKey,
    NotInitialized,
)
from appliance.fsio import FILE_MODE, check_private_file, ensure_private_dir, read_file
from appliance.keys import KeyInfo, KeyState, parse_selector, replay
from appliance.keystore import KDF_NAMES, PBKDF2_SHA3, calibrate
from appliance.secret import SecretBytes, read_secret_fd
from appliance.service import Appliance, supported_key_types

__all__ = [
    "add_console_arguments",
    "get_secret",
    "import_hardware",
    "main",
    "read_passphrase",
    "read_pin",
]

MAX_INPUT = 64 << 20


# -- secrets -----------------------------------------------------------------------------------


def _prompt(text: str) -> SecretBytes:
    """Read a line from the terminal with echo off, straight into wipeable memory."""
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    new[3] &= ~termios.ECHO
    sys.stderr.write(text)
    sys.stderr.flush()
    try:
        termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        scratch = SecretBytes(4097)
        try:
            view = scratch.view()
            n = 0
            while n < 4096:
                got = os.readv(fd, [view[n : n + 1]])
                if got == 0 or view[n] == 0x0A:
                    break
                n += 1
            out = SecretBytes(n)
            out.view()[:] = view[:n]
            return out
        finally:
            scratch.wipe()
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        sys.stderr.write("\n")


def _from_file(path: Path) -> SecretBytes:
    check_private_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        return read_secret_fd(fd)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        os.close(fd)


def _from_fd(fd: int) -> SecretBytes:
    try:
        return read_secret_fd(fd)
    except OSError as exc:
        raise ConfigError(f"file descriptor {fd}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"file descriptor {fd}: {exc}") from None


def _from_env(name: str) -> SecretBytes | None:
    value = os.environ.pop(name, None)  # CI path only: read once, then gone from the env
    if value is None:
        return None
    return SecretBytes(value.encode())


def get_secret(
    what: str,
    *,
    fd: int | None,
    file: str | None,
    cfg_file: Path | None,
    env: str,
    confirm: bool = False,
) -> SecretBytes:
    """One secret from the first source that is given (see the module docstring)."""
    if fd is not None:
        s = _from_fd(fd)
    elif file is not None:
        s = _from_file(Path(file))
    elif (e := _from_env(env)) is not None:
        s = e
    elif cfg_file is not None:
        s = _from_file(cfg_file)
    elif sys.stdin.isatty():
        s = _prompt(f"{what}: ")
        if confirm:
            with _prompt(f"{what} (again): ") as again:
                from appliance.secret import ct_equal

                if not ct_equal(s, again):
                    s.wipe()
                    raise CallerError(f"the two {what} entries differ")
    else:
        raise ConfigError(
            f"no {what} given: use --{_flag(what)}-file, --{_flag(what)}-fd or ${env}"
        )
    if len(s) == 0:
        raise CallerError(f"{what} is empty")
    return s


def _flag(what: str) -> str:
    return "pin" if "PIN" in what else "passphrase"


def read_pin(args: argparse.Namespace, cfg: Config) -> SecretBytes:
    return get_secret(
        "token PIN",
        fd=args.pin_fd,
        file=args.pin_file,
        cfg_file=cfg.pin_file,
        env="PQHSM_TOKEN_PIN",
    )


def read_passphrase(args: argparse.Namespace, cfg: Config) -> SecretBytes:
    return get_secret(
        "keystore passphrase",
        fd=args.passphrase_fd,
        file=args.passphrase_file,
        cfg_file=cfg.passphrase_file,
        env="PQHSM_PASSPHRASE",
    )


# -- output ------------------------------------------------------------------------------------


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _read_input(path: str) -> bytes:
    if path != "-":
        return read_file(Path(path), limit=MAX_INPUT)
    data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise CallerError(f"standard input: larger than {MAX_INPUT} bytes")
    return data


def _write_output(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


# -- read-only access (no token, no secrets) ---------------------------------------------------


def _require_home(cfg: Config) -> None:
    if not (cfg.home / "keystore.cbor").exists():
        raise NotInitialized(f"{cfg.home}: no appliance here (run `pqhsm init`)")


def _offline_keys(cfg: Config) -> tuple[dict[str, KeyInfo], str | None]:
    """Keys and the token label, replayed from the WAL alone (no token, no secrets)."""
    from appliance.wal import Wal

    _require_home(cfg)
    wal = Wal.open(cfg.home / "wal", readonly=True)
    try:
        records = list(wal.records())
    finally:
        wal.close()
    token_label = records[0].fields.get("token_label") if records else None
    return replay(records), token_label if isinstance(token_label, str) else None


def _offline_find(cfg: Config, selector: str) -> KeyInfo:
    keys, token_label = _offline_keys(cfg)
    return parse_selector(selector).match(keys, token_label)


def _open(args: argparse.Namespace, cfg: Config, *, unlock: bool) -> Appliance:
    _require_home(cfg)
    pin = read_pin(args, cfg)
    passphrase = read_passphrase(args, cfg) if unlock else None
    try:
        return Appliance.open(cfg, pin=pin, passphrase=passphrase)
    finally:
        pin.wipe()
        if passphrase is not None:
            passphrase.wipe()


# -- commands ----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.token.softhsm import init_embedded

    home = cfg.home
    if (home / "keystore.cbor").exists():
        raise KeyExists(f"{home} already holds an appliance")
    if args.kdf not in KDF_NAMES:
        raise CallerError(f"unknown KDF {args.kdf!r} (choose {' or '.join(KDF_NAMES)})")
    ensure_private_dir(home)
    secrets_dir = Path(args.generate_secrets).absolute() if args.generate_secrets else None
    embedded = args.embedded_softhsm or args.module is None
    if args.embedded_softhsm and args.module is not None:
        raise CallerError("--embedded-softhsm and --module exclude each other")
    if secrets_dir is not None and not embedded:
        raise CallerError(
            "--generate-secrets makes new PINs, so it only works with the embedded "
            "SoftHSM2 token; for an existing token give --pin-file and a passphrase"
        )
    pin_file = passphrase_file = None
    if secrets_dir is not None:
        ensure_private_dir(secrets_dir)
        pin_file, passphrase_file = secrets_dir / "token-pin", secrets_dir / "passphrase"
        for p in (pin_file, passphrase_file, secrets_dir / "so-pin"):
            if p.exists():
                raise KeyExists(f"{p} already exists; refusing to overwrite a secret")
        pin = _generate_secret(pin_file, 16)
        passphrase = _generate_secret(passphrase_file, 32)
        so_pin = _generate_secret(secrets_dir / "so-pin", 16)
    else:
        pin = read_pin(args, cfg)
        passphrase = get_secret(
            "keystore passphrase",
            fd=args.passphrase_fd,
            file=args.passphrase_file,
            cfg_file=None,
            env="PQHSM_PASSPHRASE",
            confirm=True,
        )
        so_pin = (
            get_secret(
                "token SO PIN", fd=None, file=args.so_pin_file, cfg_file=None, env="PQHSM_SO_PIN"
            )
            if embedded
            else SecretBytes(0)
        )
    try:
        token_label = args.token_label or "pqhsm"
        if embedded:
            module, conf = init_embedded(home, token_label, so_pin, pin)
            cfg = Config(
                home=home,
                module=module,
                token_label=token_label,
                softhsm_conf=conf,
                pin_file=pin_file,
                passphrase_file=passphrase_file,
                kdf=args.kdf,
            )
        else:
            cfg = Config(
                home=home,
                module=args.module,
                token_label=args.token_label,
                token_serial=args.token_serial,
                pin_file=pin_file,
                passphrase_file=passphrase_file,
                kdf=args.kdf,
            )
        kdf = calibrate(
            args.kdf, target_seconds=args.kdf_seconds, pbkdf2_iterations=args.pbkdf2_iterations
        )
        app = Appliance.initialize(cfg, pin=pin, passphrase=passphrase, kdf=kdf)
    finally:
        pin.wipe()
        passphrase.wipe()
        so_pin.wipe()
    with app:
        st = app.status()
    write_config(cfg)
    if args.json:
        _emit_json(st.to_json())
        return 0
    print(f"initialized appliance {st.appliance_id} in {home}")
    print(f"  token: {st.token['label']} (serial {st.token['serial']}) via {st.token['module']}")
    kdf_desc = f"{kdf.alg}, {kdf.iterations} iterations" if kdf.alg == PBKDF2_SHA3 else kdf.alg
    print(f"  keystore: ML-KEM-1024 seed wrapped by the token, passphrase KDF {kdf_desc}")
    if secrets_dir is not None:
        print(f"  generated secrets (0600) in {secrets_dir}: token-pin, so-pin, passphrase")
        print("  keep them away from the state directory: with the token, they open every key")
    return 0


def _generate_secret(path: Path, nbytes: int) -> SecretBytes:
    """A random printable secret (hex), written 0600 and returned in wipeable memory."""
    raw = SecretBytes.random(nbytes)
    out = SecretBytes(2 * nbytes + 1)
    try:
        digits = b"0123456789abcdef"
        for i, b in enumerate(raw.view()):
            out.view()[2 * i] = digits[b >> 4]
            out.view()[2 * i + 1] = digits[b & 15]
        out.view()[2 * nbytes] = 0x0A
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, out.view())
            os.fsync(fd)
        finally:
            os.close(fd)
        secret = SecretBytes(2 * nbytes)
        secret.view()[:] = out.view()[: 2 * nbytes]
        return secret
    finally:
        raw.wipe()
        out.wipe()


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    with _open(args, cfg, unlock=False) as app:
        st = app.status()
    if args.json:
        _emit_json(st.to_json())
        return 0
    print(f"appliance   {st.appliance_id}  ({st.home})")
    print(
        f"token       {st.token['label']} serial {st.token['serial']} "
        f"[{st.token['manufacturer']} {st.token['model']}] via {st.token['module']}"
    )
    ks = st.keystore
    print(
        f"keystore    {ks['kem']}; KDF {ks['kdf']} (generation {ks['passphrase_generation']}); "
        f"{ks['blobs']} blob(s)"
    )
    pb = st.pqc_backend
    oqs = (
        f"liboqs found at {pb['liboqs_library']}"
        if pb["liboqs_available"]
        else "liboqs not installed"
    )
    if pb["liboqs_version"]:
        oqs = f"liboqs {pb['liboqs_version']} at {pb['liboqs_library']}"
    if pb["liboqs_problem"]:
        oqs = f"liboqs not usable: {pb['liboqs_problem']}"
    print(f"pqc backend {pb['active']} ({oqs})")
    print(
        f"wal         {st.wal['records']} record(s), head seq {st.wal['head_seq']} "
        f"{st.wal['head_hash'][:16]}…"
    )
    counts = ", ".join(f"{k} {v}" for k, v in st.keys_by_state.items())
    print(f"keys        {st.keys_total} total: {counts}")
    if st.needs_migration:
        shown = ", ".join(st.needs_migration[:10]) + (" …" if len(st.needs_migration) > 10 else "")
        print(f"to migrate  {len(st.needs_migration)}: {shown}")
    for label, why in st.damaged.items():
        print(f"DAMAGED     {label}: {why}")
    return 0


def _key_row(k: KeyInfo) -> list[str]:
    alg = k.classical_alg or ""
    if k.pqc_public is not None:
        alg = f"{alg}+ml-dsa-87" if alg else "ml-dsa-87"
    return [k.label, k.key_id, alg, k.state.value, k.origin]


def cmd_key_create(args: argparse.Namespace, cfg: Config) -> int:
    classical_only = args.type in {a.value for a in ClassicalAlg}
    with _open(args, cfg, unlock=not classical_only) as app:
        k = app.create_key(args.type, args.label)
    if args.json:
        _emit_json(k.to_json())
    else:
        print(f"created {args.type} key {k.label!r} id {k.key_id} ({k.state.value})")
    return 0


def cmd_key_adopt(args: argparse.Namespace, cfg: Config) -> int:
    cka_id = None
    if args.token_id is not None:
        try:
            cka_id = bytes.fromhex(args.token_id)
        except ValueError:
            raise CallerError(f"--token-id {args.token_id!r} is not hex") from None
    if args.token_object is None and cka_id is None:
        raise CallerError("key adopt needs --token-object LABEL or --token-id HEX")
    with _open(args, cfg, unlock=False) as app:
        k = app.adopt_key(label=args.token_object, cka_id=cka_id, new_label=args.label)
    if args.json:
        _emit_json(k.to_json())
    else:
        print(f"adopted {k.classical_alg} key {k.label!r} id {k.key_id} ({k.state.value})")
    return 0


def cmd_key_list(args: argparse.Namespace, cfg: Config) -> int:
    keys = sorted(_offline_keys(cfg)[0].values(), key=lambda k: (k.created, k.key_id))
    if args.json:
        _emit_json([k.to_json() for k in keys])
    elif not keys:
        print("no keys")
    else:
        _table([_key_row(k) for k in keys], ["LABEL", "KEY ID", "ALGORITHM", "STATE", "ORIGIN"])
    return 0


def cmd_key_show(args: argparse.Namespace, cfg: Config) -> int:
    k = _offline_find(cfg, args.key)
    if args.json:
        _emit_json(k.to_json())
        return 0
    for name, value in k.to_json().items():
        print(f"{name:14} {value}")
    return 0


def cmd_key_export(args: argparse.Namespace, cfg: Config) -> int:
    k = _offline_find(cfg, args.key)
    pem = Appliance.public_key_pem_of(k, part=args.part)
    _write_output(args.out, pem)
    return 0


def cmd_sign(args: argparse.Namespace, cfg: Config) -> int:
    message = _read_input(args.input)
    context = args.context.encode() if args.context else b""
    key = _offline_find(cfg, args.key)
    uses_pqc = key.pqc_public is not None and args.kind != "classical"
    with _open(args, cfg, unlock=uses_pqc) as app:
        sig = app.sign(
            app.find(args.key),
            message,
            kind=args.kind,
            raw=args.raw,
            context=context,
            deterministic=args.deterministic,
        )
    _write_output(args.out, sig)
    if args.out != "-":
        print(
            f"signed {len(message)} bytes with {key.label!r}: "
            f"{len(sig)}-byte signature in {args.out}",
            file=sys.stderr,
        )
    return 0


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.signing.policy import Policy, load_public_keys, verify

    if bool(args.pub) == (args.key is not None):
        raise CallerError("verify needs --pub PEM (one or more) or --key KEY, not both")
    policy = Policy.parse(args.policy)
    if args.pub:
        keys = load_public_keys(*(_read_input(p) for p in args.pub))
    else:
        keys = load_public_keys(Appliance.public_key_pem_of(_offline_find(cfg, args.key)))
    message = _read_input(args.input)
    sig = _read_input(args.sig)
    verify(
        keys, message, sig, policy=policy, context=args.context.encode() if args.context else b""
    )
    print(f"signature OK (policy {policy.value})")
    return 0


def cmd_backup(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.snapshot.recovery_key import load_recovery_public

    ek = load_recovery_public(Path(args.recovery_key)) if args.recovery_key else None
    with _open(args, cfg, unlock=True) as app:
        info = app.backup(Path(args.out).absolute() if args.out else None, recovery_ek=ek)
    if args.json:
        _emit_json(
            {
                "path": str(info.path),
                "wal_seq": info.wal_seq,
                "artifacts": info.artifacts,
                "bytes": info.size,
            }
        )
    else:
        print(
            f"backup of WAL seq {info.wal_seq}: {info.artifacts} artifact(s), {info.size} bytes, "
            f"signed by the audit key -> {info.path}"
        )
    return 0


def cmd_module_path(args: argparse.Namespace, cfg: Config) -> int:
    # a path, not an import: the appliance package never imports pkcs11_shim
    path = Path(__file__).resolve().parents[1] / "pkcs11_shim" / "c" / "libpqhsm-pkcs11.so"
    if not path.is_file():
        raise ConfigError(f"{path} is not built: run `make -C pkcs11_shim/c` (./bootstrap.sh does)")
    print(path)
    return 0


def cmd_recovery_key_create(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.pqc import active_backend
    from appliance.snapshot.recovery_key import create_recovery_key

    seed, pub = create_recovery_key(active_backend(), Path(args.out).absolute())
    print(f"recovery key: private seed {seed} (0600: move it offline), public key {pub}")
    print("give the public key to `pqhsm backup --recovery-key`")
    return 0


def cmd_restore(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.service import restore_backup
    from appliance.snapshot import read_fingerprints

    if not (cfg.home / "config.toml").exists():
        raise NotInitialized(
            f"{cfg.home}: no config.toml (a restore needs the token configuration)"
        )
    from appliance.snapshot.recovery_key import load_recovery_seed

    trusted = tuple(read_fingerprints(Path(args.trusted_keys))) if args.trusted_keys else ()
    recovery_seed = load_recovery_seed(Path(args.recovery_seed)) if args.recovery_seed else None
    pin = read_pin(args, cfg)
    passphrase = (
        read_passphrase(args, cfg)
        if (args.passphrase_file or args.passphrase_fd or cfg.passphrase_file)
        else None
    )
    try:
        out = restore_backup(
            cfg,
            Path(args.path),
            pin=pin,
            passphrase=passphrase,
            trusted_fingerprints=trusted,
            allow_rollback=args.allow_rollback,
            reason=args.reason,
            recovery_seed=recovery_seed,
        )
    finally:
        pin.wipe()
        if passphrase is not None:
            passphrase.wipe()
        if recovery_seed is not None:
            recovery_seed.wipe()
    if args.json:
        _emit_json(out)
    else:
        print(
            f"restored WAL seq {out['restored_seq']} (was {out['previous_seq']}), "
            f"{out['keys']} key(s); signer {out['signer'][:16]}…"
        )
        for label in out["unrecoverable_classical_keys"]:
            print(
                f"unrecoverable by design: {label!r} "
                "(its classical key lived only in the old token)"
            )
    return 0


def cmd_passphrase_change(args: argparse.Namespace, cfg: Config) -> int:
    _require_home(cfg)
    pin = read_pin(args, cfg)
    old = read_passphrase(args, cfg)
    new = get_secret(
        "new keystore passphrase",
        fd=args.new_passphrase_fd,
        file=args.new_passphrase_file,
        cfg_file=None,
        env="PQHSM_NEW_PASSPHRASE",
        confirm=True,
    )
    try:
        app = Appliance.open(cfg, pin=pin, passphrase=None)
        with app:
            n = app.change_passphrase(old, new)
    finally:
        pin.wipe()
        old.wipe()
        new.wipe()
    if cfg.passphrase_file is not None and args.new_passphrase_file is not None:
        print(
            f"note: config.toml still names {cfg.passphrase_file}; point it at the new passphrase",
            file=sys.stderr,
        )
    print(f"passphrase changed; {n} blob(s) re-encrypted")
    return 0


def _parse_state(text: str) -> KeyState:
    try:
        return KeyState(text.upper().replace("-", "_"))
    except ValueError:
        choices = ", ".join(st.value for st in KeyState)
        raise CallerError(f"unknown state {text!r} (choose one of: {choices})") from None


class _Bar:
    """A progress bar on a terminal; silent elsewhere (CI logs stay clean)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.tty or total == 0:
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_migrate(args: argparse.Namespace, cfg: Config) -> int:
    to = _parse_state(args.to)
    if args.all == (args.key is not None):
        raise CallerError("migrate needs exactly one of KEY or --all")
    needs_passphrase = True  # CLASSICAL -> HYBRID seals a new blob
    with _open(args, cfg, unlock=needs_passphrase) as app:
        if args.all:
            res = app.migrate_all(
                to,
                reason=args.reason,
                actor=args.actor,
                batch=args.batch,
                progress=_Bar(f"-> {to.value}"),
            )
            app.checkpoint()  # sign the new head and raise the token's anti-rollback counter
            out = {
                "target": to.value,
                "migrated": len(res.migrated),
                "skipped": res.skipped,
                "failed": res.failed,
                "wal_fsyncs": res.fsyncs,
            }
            if args.json:
                _emit_json(out)
            else:
                print(
                    f"{len(res.migrated)} key(s) -> {to.value} with {res.fsyncs} WAL fsync(s); "
                    f"{len(res.skipped)} skipped, {len(res.failed)} failed"
                )
                for key_id, why in res.failed.items():
                    print(f"  failed {key_id}: {why}")
            return 1 if res.failed else 0
        k = app.migrate(
            app.find(args.key),
            to,
            allow_backward=args.allow_backward,
            reason=args.reason,
            actor=args.actor,
        )
        app.checkpoint()
    if args.json:
        _emit_json(k.to_json())
    else:
        print(f"key {k.label!r} is now {k.state.value}")
    return 0


def cmd_key_history(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.wal import Wal

    key = _offline_find(cfg, args.key)
    wal = Wal.open(cfg.home / "wal", readonly=True)
    try:
        recs = [wal.get(seq) for seq in key.history]
    finally:
        wal.close()
    rows = []
    for r in recs:
        f = r.fields
        what = f"{f.get('from')} -> {f.get('to')}" if r.type == "key.transition" else r.type
        rows.append(
            {
                "seq": r.seq,
                "ts_ms": r.ts,
                "event": what,
                "actor": f.get("actor", ""),
                "reason": f.get("reason", ""),
                "record_hash": r.hash.hex(),
            }
        )
    if args.json:
        _emit_json(rows)
    else:
        _table(
            [
                [
                    str(x["seq"]),
                    _ts(int(x["ts_ms"])),
                    str(x["event"]),
                    str(x["actor"]),
                    str(x["reason"]),
                ]
                for x in rows
            ],
            ["SEQ", "TIME (UTC)", "EVENT", "ACTOR", "REASON"],
        )
    return 0


def _ts(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_recover(args: argparse.Namespace, cfg: Config) -> int:
    with _open(args, cfg, unlock=False) as app:
        first = app.last_recovery
        report = app.recover()  # the second pass shows it is idempotent
    assert first is not None  # noqa: S101 - Appliance.open always recovers
    if args.json:
        _emit_json({"recovered": first.to_json(), "second_pass_appended": report.appended})
    else:
        if first.clean:
            print("nothing to recover: every key matches the log")
        for key_id in first.finished:
            print(f"finished finalization of {key_id} (classical key erased, PQC_ONLY recorded)")
        for key_id in first.erased_again:
            print(f"erased a classical key that reappeared for PQC_ONLY key {key_id}")
        for key_id, why in first.damaged.items():
            print(f"DAMAGED {key_id}: {why}")
        for blob_id in first.removed_orphans:
            print(f"removed orphan blob {blob_id}")
    return 2 if first.damaged else 0


def cmd_wal_show(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.wal import Wal

    _require_home(cfg)
    wal = Wal.open(cfg.home / "wal", readonly=True)
    try:
        recs = list(wal.records(max(0, len(wal) - args.last) if args.last else 0))
    finally:
        wal.close()
    if args.json:
        _emit_json(
            [
                {
                    "seq": r.seq,
                    "ts_ms": r.ts,
                    "type": r.type,
                    "hash": r.hash.hex(),
                    "prev": r.prev.hex(),
                    "fields": _jsonable(dict(r.fields)),
                }
                for r in recs
            ]
        )
        return 0
    _table(
        [[str(r.seq), _ts(r.ts), r.type, _summary(r.fields), r.hash.hex()[:16]] for r in recs],
        ["SEQ", "TIME (UTC)", "TYPE", "SUMMARY", "HASH"],
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.audit import verify_audit

    _require_home(cfg)
    report = verify_audit(cfg.home / "wal", anchor=args.anchor)
    if args.json:
        _emit_json(report.to_json())
        return 0
    print(
        f"WAL OK: {report.records} record(s), hash chain intact, head seq {report.head_seq} "
        f"{report.head_hash[:16]}…"
    )
    first = report.audit_keys[0][:16] if report.audit_keys else "-"
    print(f"audit keys: {len(report.audit_keys)} (first {first}…)")
    print(
        f"checkpoints: {report.checkpoints} verified (Ed25519 + ML-DSA-87), last at seq "
        f"{report.last_checkpoint_seq}; {report.unsigned_tail} record(s) after it"
    )
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace, cfg: Config) -> int:
    with _open(args, cfg, unlock=True) as app:
        rec = app.checkpoint()
    print(
        f"checkpoint at seq {rec.seq} signs head seq {rec.fields['head_seq']}; "
        "token anti-rollback counter raised"
    )
    return 0


def cmd_audit_rotate(args: argparse.Namespace, cfg: Config) -> int:
    with _open(args, cfg, unlock=True) as app:
        n = app.rotate_audit_key()
        app.checkpoint()
    print(f"audit key {n} is now current (signed by key {n - 1}); checkpoint written")
    return 0


def import_hardware(module: str) -> Any:
    """Import a ``hardware`` module only when its command runs (appliance never needs it).

    :raises ConfigError: the hardware lab or its dependency (pyserial) is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == "serial":
            raise ConfigError(
                "this command needs pyserial, which is not installed (pip install pyserial)"
            ) from None
        if exc.name is not None and exc.name.split(".")[0] == "hardware":
            raise ConfigError("the hardware lab (package `hardware`) is not installed") from None
        raise


def cmd_console(args: argparse.Namespace, cfg: Config) -> int:
    rc: int = import_hardware("hardware.console").run_command(args, cfg.home)
    return rc


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    from pkcs11_shim.__main__ import serve  # the front end loads only for this command

    rc: int = serve(args)
    return rc


def cmd_lab_run(args: argparse.Namespace, cfg: Config) -> int:
    rc: int = import_hardware("hardware.matrix").run_command(args)
    return rc


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items() if k not in ("seq", "prev", "ts", "type")}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _summary(f: Any) -> str:
    if "key_id" in f:
        move = f" {f.get('from')}->{f.get('to')}" if "from" in f else f" {f.get('state', '')}"
        return f"{str(f['key_id'])[:12]}{move}"
    if "gen" in f:
        return f"passphrase generation {f['gen']}"
    if "head_seq" in f:
        return f"signs head seq {f['head_seq']} (audit key {f.get('key')})"
    if "ed25519_spki" in f:
        return f"audit key {f.get('n')}"
    return ""


# -- parser ------------------------------------------------------------------------------------


def _secret_args(p: argparse.ArgumentParser, *, passphrase: bool = True) -> None:
    g = p.add_argument_group("secrets (never on the command line)")
    g.add_argument("--pin-file", help="file holding the token PIN (mode 0600)")
    g.add_argument("--pin-fd", type=int, help="read the token PIN from this file descriptor")
    if passphrase:
        g.add_argument("--passphrase-file", help="file holding the keystore passphrase (mode 0600)")
        g.add_argument(
            "--passphrase-fd", type=int, help="read the passphrase from this file descriptor"
        )
    else:
        p.set_defaults(passphrase_file=None, passphrase_fd=None)


def add_console_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pqhsm console`` (and the older ``pqhsm-console serve``).

    Declared here, not in ``hardware/``, so that ``pqhsm --help`` works without pyserial.
    """
    p.add_argument(
        "--port", help="device path or pyserial URL (/dev/ttyUSB0, socket://host:port, rfc2217://)"
    )
    p.add_argument("--baud", type=int, default=115200, help="line speed, 8N1 (default 115200)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="idle logout in seconds")
    p.add_argument("--backup-dir", type=Path, help="folder the `backup` command writes into")
    p.add_argument(
        "--reconnect-interval", type=float, default=1.0, help="seconds between reopen attempts"
    )
    p.add_argument("--set-so-pin", action="store_true", help="set the security officer's PIN")
    p.add_argument("--so-pin-file", help="with --set-so-pin: file holding the new PIN (0600)")
    p.add_argument("--so-pin-fd", type=int, help="with --set-so-pin: read the new PIN from fd")
    _secret_args(p, passphrase=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pqhsm", description="post-quantum keystore appliance")
    parser.add_argument("--home", help="state directory (default $PQHSM_HOME or ./var/pqhsm)")
    parser.add_argument("--version", action="version", version=f"pqhsm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(
        name: str,
        fn: Callable[[argparse.Namespace, Config], int],
        help_: str,
        parent: Any = sub,
        json_: bool = False,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        if json_:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.set_defaults(json=False)
        return p

    p = cmd("init", cmd_init, "create an appliance (keystore, WAL) on a token", json_=True)
    p.add_argument(
        "--embedded-softhsm",
        action="store_true",
        help="create and use a SoftHSM2 token inside the state directory (the default)",
    )
    p.add_argument("--module", help="PKCS#11 module of an existing, initialized token")
    p.add_argument("--token-label", help="token label (default pqhsm)")
    p.add_argument("--token-serial", help="token serial number")
    p.add_argument(
        "--generate-secrets",
        metavar="DIR",
        help="generate the PINs and passphrase into DIR (0600 files) and record them in config",
    )
    p.add_argument("--so-pin-file", help="SO PIN for initializing the embedded token (mode 0600)")
    p.add_argument("--kdf", default=PBKDF2_SHA3, help=f"passphrase KDF: {' or '.join(KDF_NAMES)}")
    p.add_argument(
        "--kdf-seconds", type=float, default=1.0, help="target unlock time (default 1 s)"
    )
    p.add_argument(
        "--pbkdf2-iterations", type=int, help="fix the PBKDF2 count instead of calibrating"
    )
    _secret_args(p)

    p = cmd("status", cmd_status, "token, keystore, backend and key counts", json_=True)
    _secret_args(p, passphrase=False)

    key = sub.add_parser("key", help="manage keys").add_subparsers(
        dest="key_command", required=True, metavar="ACTION"
    )
    p = cmd("create", cmd_key_create, "create a key", key, json_=True)
    p.add_argument("--type", required=True, choices=supported_key_types())
    p.add_argument("--label", required=True)
    _secret_args(p)
    p = cmd("adopt", cmd_key_adopt, "manage an existing token keypair", key, json_=True)
    p.add_argument("--token-object", help="CKA_LABEL of the keypair in the token")
    p.add_argument("--token-id", help="CKA_ID of the keypair in the token (hex)")
    p.add_argument("--label", help="label to manage it under (default: its token label)")
    _secret_args(p, passphrase=False)
    cmd("list", cmd_key_list, "list keys", key, json_=True)
    p = cmd("show", cmd_key_show, "show one key", key, json_=True)
    p.add_argument("key", help="label, id:HEX, or pkcs11: URI")
    p = cmd("export-public", cmd_key_export, "write a public key as SPKI PEM", key)
    p.add_argument("key", help="label, id:HEX, or pkcs11: URI")
    p.add_argument(
        "--part",
        choices=["classical", "ml-dsa", "all"],
        help="default all live parts, classical first",
    )
    p.add_argument("--out", default="-", help="output file (default stdout)")

    p = cmd("sign", cmd_sign, "sign a file with a key")
    p.add_argument("key", help="label, id:HEX, or pkcs11: URI")
    p.add_argument("--in", dest="input", required=True, help="message file (- for stdin)")
    p.add_argument("--out", required=True, help="signature file (- for stdout)")
    p.add_argument(
        "--kind",
        choices=["classical", "ml-dsa", "dual", "composite"],
        help="default: what the key's state signs with (dual in HYBRID/PQC_PREFERRED)",
    )
    p.add_argument("--raw", action="store_true", help="ECDSA: raw r||s instead of DER")
    p.add_argument("--context", help="ML-DSA context string (at most 255 bytes)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="ask for deterministic ML-DSA (refused: the backend signs hedged only)",
    )
    _secret_args(p)

    p = cmd("verify", cmd_verify, "verify a signature from public keys alone (no token)")
    p.add_argument(
        "--pub",
        action="append",
        default=[],
        help="public key file (PEM or DER SPKI); repeat for the parts of a dual key",
    )
    p.add_argument("--policy", default="strict", help="legacy, pqc or strict (default strict)")
    p.add_argument("--key", help="a key of this appliance, by label, id:HEX or pkcs11: URI")
    p.add_argument("--in", dest="input", required=True, help="message file")
    p.add_argument("--sig", required=True, help="signature file")
    p.add_argument("--context", help="ML-DSA context string")

    p = cmd(
        "migrate", cmd_migrate, "move a key (or all keys) along the migration states", json_=True
    )
    p.add_argument("key", nargs="?", help="label, id:HEX, or pkcs11: URI")
    p.add_argument("--all", action="store_true", help="every key behind --to (forward only)")
    p.add_argument(
        "--to", required=True, help="CLASSICAL, HYBRID, PQC_PREFERRED, FINALIZING, PQC_ONLY"
    )
    p.add_argument("--reason", help="why (required for backward moves; kept in the log)")
    p.add_argument("--allow-backward", action="store_true", help="permit HYBRID->CLASSICAL etc.")
    p.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who (logged)")
    p.add_argument("--batch", type=int, default=256, help="keys per group commit with --all")
    _secret_args(p)

    p = cmd("history", cmd_key_history, "every log record of one key", key, json_=True)
    p.add_argument("key", help="label, id:HEX, or pkcs11: URI")

    p = cmd("recover", cmd_recover, "finish interrupted work and check every key", json_=True)
    _secret_args(p, passphrase=False)

    wal = sub.add_parser("wal", help="the write-ahead log").add_subparsers(
        dest="wal_command", required=True, metavar="ACTION"
    )
    p = cmd("show", cmd_wal_show, "list log records", wal, json_=True)
    p.add_argument("--last", type=int, default=0, help="only the last N records")

    audit = sub.add_parser("audit", help="tamper-evident audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    p = cmd(
        "verify",
        cmd_audit_verify,
        "verify the hash chain and every signed checkpoint",
        audit,
        json_=True,
    )
    p.add_argument("--anchor", help="pinned fingerprint of the first audit key (hex)")
    p = cmd("checkpoint", cmd_audit_checkpoint, "sign the WAL head now", audit)
    _secret_args(p)
    p = cmd("rotate", cmd_audit_rotate, "make a new audit key signed by the current one", audit)
    _secret_args(p)

    p = cmd("backup", cmd_backup, "write a signed snapshot backup (.tar.gz)", json_=True)
    p.add_argument(
        "--out", help="directory (content-addressed name) or file; default: next to the home"
    )
    p.add_argument("--recovery-key", help="recovery-key.pub: also seal the keystore seed to it")
    _secret_args(p)
    p = cmd("restore", cmd_restore, "verify a backup completely, then restore it", json_=True)
    p.add_argument("path", help="the backup .tar.gz")
    p.add_argument("--trusted-keys", help="file of trusted audit-key fingerprints (one per line)")
    p.add_argument(
        "--allow-rollback",
        action="store_true",
        help="permit a snapshot older than the live log (never un-finalizes a key)",
    )
    p.add_argument("--reason", help="why (required with --allow-rollback; kept in the log)")
    p.add_argument("--recovery-seed", help="recovery officer's seed file: restore onto a new token")
    cmd("module-path", cmd_module_path, "print the path of pqhsm's own PKCS#11 module")
    rk = sub.add_parser("recovery-key", help="offline recovery-officer key").add_subparsers(
        dest="rk_command", required=True, metavar="ACTION"
    )
    p = cmd("create", cmd_recovery_key_create, "make an ML-KEM-1024 recovery keypair", rk)
    p.add_argument("--out", required=True, help="folder for recovery-key.seed and recovery-key.pub")
    _secret_args(p)

    # The PKCS#11 server (also `pqhsm-serve serve` / `python -m pkcs11_shim serve`).
    from pkcs11_shim.options import add_serve_arguments  # light: no server imports

    p = cmd(
        "serve",
        cmd_serve,
        "serve the appliance to PKCS#11 clients on a Unix socket (foreground; SIGTERM stops)",
    )
    add_serve_arguments(p)

    # The hardware lab's commands: their options are declared here so that `pqhsm --help`
    # works without pyserial; the code runs from hardware/ only when the command does.
    p = cmd("console", cmd_console, "serve the serial admin console on a port (or set its PIN)")
    add_console_arguments(p)
    lab = sub.add_parser("lab", help="token lab").add_subparsers(
        dest="lab_command", required=True, metavar="ACTION"
    )
    p = cmd("run", cmd_lab_run, "run the token matrix of a lab.toml; write JSON and HTML", lab)
    p.add_argument("config", type=Path, help="lab.toml")
    p.add_argument("--out", type=Path, default=Path("matrix-report"), help="report directory")
    p.add_argument("--ops-seconds", type=float, help="override the signing window (seconds)")
    p.add_argument("--work", type=Path, help="keep each run's token directories under here")

    pp = sub.add_parser("passphrase", help="keystore passphrase").add_subparsers(
        dest="pp_command", required=True, metavar="ACTION"
    )
    p = cmd("change", cmd_passphrase_change, "re-encrypt every blob under a new passphrase", pp)
    _secret_args(p)
    p.add_argument("--new-passphrase-file", help="file holding the new passphrase (mode 0600)")
    p.add_argument("--new-passphrase-fd", type=int, help="read the new passphrase from this fd")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="pqhsm: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        home = resolve_home(args.home)
        cfg = load_config(home) if args.command != "init" else Config(home=home)
        rc: int = args.func(args, cfg)
        return rc
    except ApplianceError as exc:
        print(f"error: {exc} [CKR_{exc.ckr.name}]", file=sys.stderr)
        return 3 if isinstance(exc, NoSuchKey) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:
        logging.getLogger("pqhsm").debug("internal error", exc_info=True)
        print(
            f"error: internal error ({type(exc).__name__}); run with -v for details "
            "[CKR_FUNCTION_FAILED]",
            file=sys.stderr,
        )
        return 70
