"""Appliance configuration: ``$PQHSM_HOME/config.toml`` plus environment overrides.

Only paths and names live here, never a secret.  The token is any PKCS#11 module named by
path with a token label and/or serial; ``softhsm_conf`` is set only for the embedded
SoftHSM2 default and becomes ``SOFTHSM2_CONF`` before the module is loaded.

``[pqc] backend`` (environment ``PQHSM_PQC_BACKEND``) chooses the post-quantum backend:
``cryptography`` (the default), ``liboqs`` (an installed liboqs; refuse to start without
it) or ``auto`` (liboqs when installed and usable, else cryptography).  See
docs/signatures.md, "Post-quantum backends".
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from appliance.errors import ConfigError
from appliance.fsio import atomic_write
from appliance.pqc import PQC_BACKEND_CHOICES, select_backend
from appliance.token import TokenConfig

__all__ = ["CONFIG_FILE", "DEFAULT_HOME", "Config", "load_config", "resolve_home", "write_config"]

CONFIG_FILE: Final = "config.toml"
DEFAULT_HOME: Final = Path("var/pqhsm")
DEFAULT_SOFTHSM_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_PQC_BACKEND: Final = "cryptography"


@dataclass(frozen=True, slots=True)
class Config:
    home: Path
    module: str = DEFAULT_SOFTHSM_MODULE
    token_label: str | None = "pqhsm"  # noqa: S105 - a token label, not a password
    token_serial: str | None = None
    softhsm_conf: Path | None = None  # embedded SoftHSM2 default only
    pin_file: Path | None = None
    passphrase_file: Path | None = None
    kdf: str = "pbkdf2-hmac-sha3-256"
    pqc_backend: str = DEFAULT_PQC_BACKEND  # cryptography | liboqs | auto

    @property
    def token(self) -> TokenConfig:
        return TokenConfig(module=self.module, label=self.token_label, serial=self.token_serial)

    def apply_environment(self) -> None:
        """Point SoftHSM2 at the embedded token directory before the module loads, and
        select the post-quantum backend.

        :raises ConfigError: ``pqc_backend`` is ``liboqs`` and liboqs is not usable here.
        """
        if self.softhsm_conf is not None:
            os.environ["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        select_backend(self.pqc_backend)


def resolve_home(arg: str | None) -> Path:
    return Path(arg or os.environ.get("PQHSM_HOME") or DEFAULT_HOME).absolute()


def _path(home: Path, value: Any, key: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{CONFIG_FILE}: {key} must be a non-empty string")
    p = Path(value)
    return p if p.is_absolute() else home / p


def _str(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{CONFIG_FILE}: {key} must be a non-empty string")
    return value


def load_config(home: Path) -> Config:
    """Read ``config.toml`` (defaults where absent), then environment overrides."""
    path = home / CONFIG_FILE
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    token = data.get("token", {})
    keystore = data.get("keystore", {})
    pqc = data.get("pqc", {})
    if not isinstance(token, dict) or not isinstance(keystore, dict) or not isinstance(pqc, dict):
        raise ConfigError(f"{path}: [token], [keystore] and [pqc] must be tables")
    cfg = Config(
        home=home,
        module=_str(token.get("module"), "token.module") or DEFAULT_SOFTHSM_MODULE,
        token_label=_str(token.get("label"), "token.label"),
        token_serial=_str(token.get("serial"), "token.serial"),
        softhsm_conf=_path(home, token.get("softhsm_conf"), "token.softhsm_conf"),
        pin_file=_path(home, token.get("pin_file"), "token.pin_file"),
        passphrase_file=_path(home, keystore.get("passphrase_file"), "keystore.passphrase_file"),
        kdf=_str(keystore.get("kdf"), "keystore.kdf") or "pbkdf2-hmac-sha3-256",
        pqc_backend=_str(pqc.get("backend"), "pqc.backend") or DEFAULT_PQC_BACKEND,
    )
    env = os.environ
    if env.get("PQHSM_PKCS11_MODULE"):
        cfg = replace(cfg, module=env["PQHSM_PKCS11_MODULE"], softhsm_conf=None)
    if env.get("PQHSM_TOKEN_LABEL"):
        cfg = replace(cfg, token_label=env["PQHSM_TOKEN_LABEL"])
    if env.get("PQHSM_TOKEN_SERIAL"):
        cfg = replace(cfg, token_serial=env["PQHSM_TOKEN_SERIAL"])
    if env.get("PQHSM_PQC_BACKEND"):
        cfg = replace(cfg, pqc_backend=env["PQHSM_PQC_BACKEND"])
    if not cfg.token_label and not cfg.token_serial:
        cfg = replace(cfg, token_label="pqhsm")  # noqa: S106 - a label
    if cfg.pqc_backend not in PQC_BACKEND_CHOICES:
        raise ConfigError(
            f"{CONFIG_FILE}: pqc.backend is {cfg.pqc_backend!r}; "
            f"choose {', '.join(PQC_BACKEND_CHOICES)}"
        )
    return cfg


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rel(home: Path, p: Path) -> str:
    """Paths inside the home are stored relative to it, so a home can be moved or restored."""
    try:
        return str(p.relative_to(home))
    except ValueError:
        return str(p)


def write_config(cfg: Config) -> None:
    """Write ``config.toml`` atomically (0600)."""
    lines = [
        "# pqhsm appliance configuration (no secrets here)",
        "[token]",
        f"module = {_q(cfg.module)}",
    ]
    if cfg.token_label:
        lines.append(f"label = {_q(cfg.token_label)}")
    if cfg.token_serial:
        lines.append(f"serial = {_q(cfg.token_serial)}")
    if cfg.softhsm_conf:
        lines.append(f"softhsm_conf = {_q(_rel(cfg.home, cfg.softhsm_conf))}")
    if cfg.pin_file:
        lines.append(f"pin_file = {_q(_rel(cfg.home, cfg.pin_file))}")
    lines += ["", "[keystore]", f"kdf = {_q(cfg.kdf)}"]
    if cfg.passphrase_file:
        lines.append(f"passphrase_file = {_q(_rel(cfg.home, cfg.passphrase_file))}")
    lines += ["", "[pqc]", f"backend = {_q(cfg.pqc_backend)}  # cryptography | liboqs | auto"]
    atomic_write(cfg.home / CONFIG_FILE, ("\n".join(lines) + "\n").encode(), point="config")
