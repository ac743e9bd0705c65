"""The throw-away token and appliance every in-process benchmark starts from."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.keystore import KdfParams
    from appliance.service import Appliance

PIN = b"pin-bench"
SO_PIN = b"so-pin-bench"
LABEL = "bench"


def softhsm_sandbox(prefix: str) -> Path:
    """A temporary folder with its own SoftHSM2 token directory; ``SOFTHSM2_CONF`` points
    there (call it before anything loads the module: SoftHSM2 reads it once)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return tmp


def bench_appliance(
    tmp: Path, *, passphrase: bytes = b"bench", kdf: KdfParams | None = None
) -> tuple[Appliance, str]:
    """A fresh token labelled ``bench`` and an appliance on it (cheap KDF unless ``kdf``);
    returns the appliance and the module path."""
    from appliance.config import Config
    from appliance.keystore import PBKDF2_SHA3, calibrate
    from appliance.secret import SecretBytes
    from appliance.service import Appliance
    from appliance.token.initdev import init_token
    from appliance.token.softhsm import find_softhsm_module

    module = find_softhsm_module()
    init_token(module, LABEL, SecretBytes(SO_PIN), SecretBytes(PIN))
    cfg = Config(home=tmp / "home", module=module, token_label=LABEL)
    if kdf is None:
        kdf = calibrate(PBKDF2_SHA3, pbkdf2_iterations=1000)
    app = Appliance.initialize(
        cfg, pin=SecretBytes(PIN), passphrase=SecretBytes(passphrase), kdf=kdf
    )
    return app, module
