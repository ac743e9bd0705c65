"""The embedded SoftHSM2 default: a token directory inside ``$PQHSM_HOME``.

This is the only SoftHSM-specific module; everything else talks PKCS#11 to any module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from appliance.errors import ConfigError, TokenNotPresent
from appliance.fsio import atomic_write, ensure_private_dir
from appliance.secret import SecretBytes
from appliance.token.initdev import init_token

__all__ = ["SOFTHSM_MODULES", "find_softhsm_module", "init_embedded"]

SOFTHSM_MODULES: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_TEMPLATE: Final = Path(__file__).resolve().parents[2] / "softhsm-config" / "softhsm2.conf.in"


def find_softhsm_module() -> str:
    for cand in SOFTHSM_MODULES:
        if Path(cand).is_file():
            return cand
    raise TokenNotPresent("libsofthsm2.so not found (install the Debian package softhsm2)")


def init_embedded(
    home: Path, label: str, so_pin: SecretBytes, user_pin: SecretBytes
) -> tuple[str, Path]:
    """Create ``home/softhsm`` with its config and one initialized token; return (module, conf).

    Must run before python-pkcs11 loads SoftHSM2 in this process (SoftHSM2 reads
    ``SOFTHSM2_CONF`` once, at ``C_Initialize``).
    """
    import os

    module = find_softhsm_module()
    if not _TEMPLATE.is_file():
        raise ConfigError(f"SoftHSM2 config template missing: {_TEMPLATE}")
    root = home / "softhsm"
    tokens = root / "tokens"
    ensure_private_dir(tokens)
    conf = root / "softhsm2.conf"
    text = _TEMPLATE.read_text().replace("@TOKENDIR@", str(tokens))
    atomic_write(conf, text.encode(), point="softhsm.conf")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    init_token(module, label, so_pin, user_pin)
    return module, conf
