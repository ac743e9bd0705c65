"""Exported public keys are standard SPKI that the real ``openssl`` reads (issue 5, item 6).

``openssl pkey -pubin -text`` must read every classical key.  For ML-DSA-87 it needs
OpenSSL 3.5 or later; Debian 12 ships 3.0, which does not know the algorithm, so there
``openssl asn1parse`` checks the structure instead: SEQUENCE { SEQUENCE { OID
2.16.840.1.101.3.4.3.19 } (no parameters), BIT STRING of 2592 key bytes }.  Where the
installed openssl is 3.5+, the ``pkey`` check runs for ML-DSA too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.keys import KeyState
from appliance.service import Appliance

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing"),
]

#: What ``openssl pkey -text`` names each classical key.
CLASSICAL = {
    "ed25519": "ED25519 Public-Key",
    "ed448": "ED448 Public-Key",
    "ecdsa-p256": "prime256v1",
    "ecdsa-p384": "secp384r1",
    "ecdsa-secp256k1": "secp256k1",
}
MLDSA87_OID = "2.16.840.1.101.3.4.3.19"


def _openssl(*args: str, data: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args],
        input=data.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _openssl_knows_mldsa() -> bool:
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False)
    m = re.match(r"OpenSSL (\d+)\.(\d+)", out.stdout)
    return m is not None and (int(m[1]), int(m[2])) >= (3, 5)


@pytest.mark.parametrize("alg", sorted(CLASSICAL))
def test_openssl_reads_every_classical_key(appliance: Appliance, alg: str) -> None:
    key = appliance.create_key(alg, f"spki-{alg}")
    proc = _openssl("pkey", "-pubin", "-text", "-noout", data=Appliance.public_key_pem_of(key))
    assert proc.returncode == 0, proc.stderr
    assert CLASSICAL[alg] in proc.stdout


def test_mldsa_spki_is_standard(appliance: Appliance) -> None:
    key = appliance.create_key("ml-dsa-87", "spki-mldsa")
    pem = Appliance.public_key_pem_of(key)
    assert pem.count(b"-----BEGIN PUBLIC KEY-----") == 1
    parsed = _openssl("asn1parse", data=pem)
    assert parsed.returncode == 0, parsed.stderr
    lines = [line.split(":", 3)[-1].strip() for line in parsed.stdout.splitlines()]
    assert re.search(rf"OBJECT\s+:({MLDSA87_OID}|ML-DSA-87|id-ml-dsa-87)", parsed.stdout)
    assert "NULL" not in parsed.stdout  # parameters absent, as RFC 9881 requires
    bit_string = re.search(r"l=\s*(\d+)\s+prim:\s+BIT STRING", parsed.stdout)
    assert bit_string is not None, lines
    assert int(bit_string[1]) == 1 + 2592  # the unused-bits byte + the raw public key
    if _openssl_knows_mldsa():
        text = _openssl("pkey", "-pubin", "-text", "-noout", data=pem)
        assert text.returncode == 0, text.stderr
        assert "ML-DSA-87" in text.stdout


def test_hybrid_export_has_both_parts_openssl_reads_the_classical_one(
    appliance: Appliance, tmp_path: Path
) -> None:
    key = appliance.migrate(appliance.create_key("ecdsa-p256", "spki-hybrid"), KeyState.HYBRID)
    pem = Appliance.public_key_pem_of(key)
    assert pem.count(b"-----BEGIN PUBLIC KEY-----") == 2
    first = pem[: pem.index(b"-----END PUBLIC KEY-----") + len(b"-----END PUBLIC KEY-----")]
    proc = _openssl("pkey", "-pubin", "-text", "-noout", data=first + b"\n")
    assert proc.returncode == 0, proc.stderr
    assert "prime256v1" in proc.stdout
