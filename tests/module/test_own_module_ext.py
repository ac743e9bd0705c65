"""The pqhsm extension (version byte 0x50): what libpqhsm-pkcs11.so carries beyond p11-kit.

The module is built into a temporary directory; ``pkcs11-tool`` and python-pkcs11 (in a
child process) load it and reach a :class:`pkcs11_shim.server.Server` over an appliance
with Ed25519, Ed448, ECDSA P-256, a HYBRID P-256 and a born ML-DSA-87 key.  A
``p11-kit-client.so`` connection to the same server still sees only slice-1 mechanisms.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from modkit import asan_build, make_module, module_env, serving

from appliance.keys import KeyInfo, KeyState
from appliance.service import Appliance
from conftest import PIN, PKCS11_TOOL_LOGIN, pin_env
from pkcs11_shim.model import cka_id_of
from pkcs11_shim.server import Server

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool missing"),
]


@pytest.fixture(scope="module")
def ext_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_module(tmp_path_factory.mktemp("extmodule")) / "libpqhsm-pkcs11.so"


@dataclass
class Ext:
    app: Appliance
    server: Server
    module: Path
    keys: dict[str, KeyInfo]

    @property
    def env(self) -> dict[str, str]:
        return module_env(self.server.address)

    def tool(self, *args: str, login: bool = False) -> subprocess.CompletedProcess[bytes]:
        cmd = ["pkcs11-tool", "--module", str(self.module)]
        if login:
            cmd += PKCS11_TOOL_LOGIN
        env = {**self.env, **pin_env(PIN)}
        return subprocess.run([*cmd, *args], env=env, capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def ext(
    ext_module: Path, softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ext]:
    def make_keys(app: Appliance) -> dict[str, KeyInfo]:
        return {
            "ed25519": app.create_key("ed25519", "x-ed25519"),
            "ed448": app.create_key("ed448", "x-ed448"),
            "p256": app.create_key("ecdsa-p256", "x-p256"),
            "hybrid": app.migrate(app.create_key("ecdsa-p256", "x-hybrid"), KeyState.HYBRID),
            "mldsa": app.create_key("ml-dsa-87", "x-mldsa"),
        }

    home = tmp_path_factory.mktemp("ext") / "pqhsm"
    with serving(home, make_keys, "p11x") as (app, server, keys):
        yield Ext(app, server, ext_module, keys)


def test_mechanism_list_has_extension_mechanisms(ext: Ext) -> None:
    r = ext.tool("-M")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "mechtype-0x1D" in out or "ML-DSA" in out, out
    for name in ("EDDSA", "ECDSA-SHA256", "ECDSA-SHA384", "ECDSA-SHA512", "ECDSA,"):
        assert name in out, out


def _objects(out: str) -> list[tuple[str, str]]:
    """(header line, ID) of every object pkcs11-tool -O printed."""
    found: list[tuple[str, str]] = []
    for line in out.splitlines():
        if line and not line.startswith(" "):
            found.append((line.split("  ")[0].strip(), ""))
        elif line.strip().startswith("ID:") and found:
            found[-1] = (found[-1][0], line.split()[-1])
    return found


def test_hybrid_key_has_ec_mldsa_and_dual_objects(ext: Ext) -> None:
    key = ext.keys["hybrid"]
    r = ext.tool("-O", login=True)
    assert r.returncode == 0, r.stderr
    mine = sorted(h for h, i in _objects(r.stdout.decode()) if i == cka_id_of(key).hex())
    assert mine == [  # EC, ML-DSA (CKK_ML_DSA 0x4a) and dual (CKK_PQHSM_DUAL 0x80000001)
        "Private Key Object; EC",
        "Private Key Object; unknown key algorithm 2147483649",
        "Private Key Object; unknown key algorithm 74",
        "Public Key Object; EC",
        "Public Key Object; unknown key algorithm 2147483649",
        "Public Key Object; unknown key algorithm 74",
    ], r.stdout.decode()


def _tool_sign(ext: Ext, key: KeyInfo, mech: str, msg: bytes, tmp: Path) -> bytes:
    (tmp / "msg").write_bytes(msg)
    r = ext.tool(
        "--sign",
        "-m",
        mech,
        "--id",
        cka_id_of(key).hex(),
        "--input-file",
        str(tmp / "msg"),
        "--output-file",
        str(tmp / "sig"),
        login=True,
    )
    assert r.returncode == 0, r.stderr.decode()
    return (tmp / "sig").read_bytes()


@pytest.mark.parametrize("name", ["ed25519", "ed448"])
def test_eddsa_sign(ext: Ext, tmp_path: Path, name: str) -> None:
    key = ext.keys[name]
    msg = b"a whole message for pure EdDSA " * 5
    sig = _tool_sign(ext, key, "EDDSA", msg, tmp_path)
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    assert len(sig) == (64 if name == "ed25519" else 114)
    pub.verify(sig, msg)


def test_ecdsa_sha256_over_full_message(ext: Ext, tmp_path: Path) -> None:
    key = ext.keys["p256"]
    msg = b"the server hashes this whole message" * 20  # < 1025: pkcs11-tool single-part
    sig = _tool_sign(ext, key, "ECDSA-SHA256", msg, tmp_path)
    assert len(sig) == 64
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
    pub.verify(der, msg, ec.ECDSA(hashes.SHA256()))


# Runs in a child process: python-pkcs11 loads libpqhsm-pkcs11.so and signs with
# CKM_ML_DSA, passing CK_SIGN_ADDITIONAL_CONTEXT as raw bytes (python-pkcs11's escape hatch).
_MLDSA_SCRIPT = r"""
import ctypes, json, os, struct, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error

module, cka_id, msg = sys.argv[1], bytes.fromhex(sys.argv[2]), b"ml-dsa msg"
pin = os.environ["PQHSM_TEST_PIN"]
lib = pkcs11.lib(module)
token = lib.get_token()
out = {}
with token.open(user_pin=pin) as s:
    pub = s.get_key(ObjectClass.PUBLIC_KEY, KeyType.ML_DSA, id=cka_id)
    out["value"] = bytes(pub[Attribute.VALUE]).hex()
    out["parameter_set"] = pub[Attribute.PARAMETER_SET]
    priv = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.ML_DSA, id=cka_id)
    keep = []

    def param(hedge, ctx):
        buf = ctypes.create_string_buffer(ctx, len(ctx) or 1)
        keep.append(buf)
        return struct.pack("=QQQ", hedge, ctypes.addressof(buf), len(ctx))

    def sign(p):
        try:
            return priv.sign(msg, mechanism=Mechanism.ML_DSA, mechanism_param=p).hex()
        except PKCS11Error as exc:
            return type(exc).__name__

    out["plain"] = priv.sign(msg, mechanism=Mechanism.ML_DSA).hex()
    out["ctx"] = sign(param(0, b"my context"))
    out["hedged"] = sign(param(1, b""))
    out["deterministic"] = sign(param(2, b""))
    out["long_ctx"] = sign(param(0, b"x" * 256))
print(json.dumps(out))
"""


@pytest.fixture(params=["plain", "asan"])
def build(request: pytest.FixtureRequest, ext: Ext) -> tuple[Path, dict[str, str]]:
    """The plain module, or the ASan + UBSan build with its runtime preloaded."""
    if request.param == "plain":
        return ext.module, {}
    asan = asan_build(ext.module.parent)
    if asan is None:
        pytest.skip("libasan is not installed")
    return asan.module, asan.env


def _run_script(
    ext: Ext, build: tuple[Path, dict[str, str]], script: str, *args: str
) -> subprocess.CompletedProcess[bytes]:
    module, extra = build
    r = subprocess.run(
        [sys.executable, "-c", script, str(module), *args],
        env={**ext.env, **pin_env(PIN), **extra},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert r.returncode not in (97, 98), r.stderr.decode()[-3000:]
    assert b"AddressSanitizer" not in r.stderr, r.stderr.decode()[-3000:]
    assert b"runtime error" not in r.stderr, r.stderr.decode()[-3000:]
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return r


def test_mldsa_sign_through_module(ext: Ext, build: tuple[Path, dict[str, str]]) -> None:
    key = ext.keys["mldsa"]
    assert key.pqc_public is not None
    r = _run_script(ext, build, _MLDSA_SCRIPT, cka_id_of(key).hex())
    out = json.loads(r.stdout)
    assert bytes.fromhex(out["value"]) == key.pqc_public
    assert out["parameter_set"] == 3
    pub = mldsa.MLDSA87PublicKey.from_public_bytes(key.pqc_public)
    pub.verify(bytes.fromhex(out["plain"]), b"ml-dsa msg")
    pub.verify(bytes.fromhex(out["ctx"]), b"ml-dsa msg", b"my context")
    pub.verify(bytes.fromhex(out["hedged"]), b"ml-dsa msg")
    assert out["deterministic"] == "MechanismParamInvalid"
    assert out["long_ctx"] == "MechanismParamInvalid"


def test_hybrid_key_signs_mldsa_with_same_id(ext: Ext) -> None:
    key = ext.keys["hybrid"]
    assert key.pqc_public is not None
    r = subprocess.run(
        [sys.executable, "-c", _MLDSA_SCRIPT, str(ext.module), cka_id_of(key).hex()],
        env={**ext.env, **pin_env(PIN)},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout)
    pub = mldsa.MLDSA87PublicKey.from_public_bytes(key.pqc_public)
    pub.verify(bytes.fromhex(out["ctx"]), b"ml-dsa msg", b"my context")


@pytest.mark.skipif(not Path(CLIENT_MODULE).is_file(), reason="p11-kit-client.so missing")
def test_p11kit_client_sees_no_extension(ext: Ext) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PQHSM_SERVER_ADDRESS"}
    env["P11_KIT_SERVER_ADDRESS"] = ext.server.address
    r = subprocess.run(
        ["pkcs11-tool", "--module", CLIENT_MODULE, "-M"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = [ln.split(",")[0].strip() for ln in r.stdout.decode().splitlines()[1:]]
    assert sorted(ln for ln in lines if ln) == [
        "ECDSA",
        "ECDSA-KEY-PAIR-GEN",
        "SHA256",
        "SHA384",
        "SHA512",
    ], r.stdout.decode()
    r = subprocess.run(
        ["pkcs11-tool", "--module", CLIENT_MODULE, "-O", *PKCS11_TOOL_LOGIN],
        env={**env, **pin_env(PIN)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "EC_EDWARDS" not in out, out
    assert "unknown key algorithm" not in out, out
    assert out.count("Private Key Object; EC") == 2, out  # p256 and the HYBRID key


@pytest.mark.parametrize("version", [1, 0x54, 0xFF])
def test_unknown_version_byte_closes(ext: Ext, version: int) -> None:
    path = ext.server.address.removeprefix("unix:path=")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(bytes((version,)))
        assert s.recv(1) == b""


@pytest.mark.parametrize("version", [0, 0x50, 0x51, 0x52, 0x53])
def test_known_version_byte_echoed(ext: Ext, version: int) -> None:
    path = ext.server.address.removeprefix("unix:path=")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(bytes((version,)))
        assert s.recv(1) == bytes((version,))


# Child process: mechanism parameters for CKM_EDDSA (CK_EDDSA_PARAMS) and CKM_ECDSA_SHA*.
_PARAM_SCRIPT = r"""
import ctypes, json, os, struct, sys
import pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error

module, pin = sys.argv[1], os.environ["PQHSM_TEST_PIN"]
ids = json.loads(sys.argv[2])
lib = pkcs11.lib(module)
out = {}
keep = []


def eddsa(ph, ctx):
    buf = ctypes.create_string_buffer(ctx, len(ctx) or 1)
    keep.append(buf)
    return struct.pack("=B7xQQ", ph, len(ctx), ctypes.addressof(buf))


with lib.get_token().open(user_pin=pin) as s:
    def key(name, kt):
        return s.get_key(ObjectClass.PRIVATE_KEY, kt, id=bytes.fromhex(ids[name]))

    def sign(name, kt, mech, p=None):
        try:
            return key(name, kt).sign(b"msg", mechanism=mech, mechanism_param=p).hex()
        except PKCS11Error as exc:
            return type(exc).__name__

    E, EC = KeyType.EC_EDWARDS, KeyType.EC
    out["ed25519_param"] = sign("ed25519", E, Mechanism.EDDSA, eddsa(0, b""))
    out["ed448_empty"] = sign("ed448", E, Mechanism.EDDSA, eddsa(0, b""))
    out["ed448_ctx"] = sign("ed448", E, Mechanism.EDDSA, eddsa(0, b"ctx"))
    out["ed448_ph"] = sign("ed448", E, Mechanism.EDDSA, eddsa(1, b""))
    out["sha384"] = sign("p256", EC, Mechanism.ECDSA_SHA384)
    out["sha256_param"] = sign("p256", EC, Mechanism.ECDSA_SHA256, b"\0" * 8)
    out["mldsa_on_ec"] = sign("p256", EC, Mechanism.ML_DSA)
    out["eddsa_on_ec"] = sign("p256", EC, Mechanism.EDDSA)
print(json.dumps(out))
"""


def test_eddsa_and_ecdsa_sha_parameters(ext: Ext, build: tuple[Path, dict[str, str]]) -> None:
    ids = {n: cka_id_of(ext.keys[n]).hex() for n in ("ed25519", "ed448", "p256")}
    r = _run_script(ext, build, _PARAM_SCRIPT, json.dumps(ids))
    out = json.loads(r.stdout)
    assert out["ed25519_param"] == "MechanismParamInvalid"
    assert out["ed448_ctx"] == "MechanismParamInvalid"
    assert out["ed448_ph"] == "MechanismParamInvalid"
    pub448 = serialization.load_der_public_key(ext.keys["ed448"].classical_spki or b"")
    assert isinstance(pub448, ed448.Ed448PublicKey)
    pub448.verify(bytes.fromhex(out["ed448_empty"]), b"msg")
    pub = serialization.load_der_public_key(ext.keys["p256"].classical_spki or b"")
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    sig = bytes.fromhex(out["sha384"])
    der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
    pub.verify(der, b"msg", ec.ECDSA(hashes.SHA384()))
    assert out["sha256_param"] == "MechanismParamInvalid"
    assert out["mldsa_on_ec"] == "KeyTypeInconsistent"
    assert out["eddsa_on_ec"] == "KeyTypeInconsistent"
