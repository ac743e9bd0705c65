"""Issue 7, the rest: multi-part signing, PKCS#11 3.0 interfaces, dual and composite
vendor mechanisms, OpenSSL and threads through libpqhsm-pkcs11.so.

The module is built into a temporary directory (plain and ASan + UBSan); clients run in
child processes (pkcs11-tool, openssl, or ctypes through ``ckclient.py``) against a
:class:`pkcs11_shim.server.Server` over an appliance holding Ed25519, Ed448, ECDSA P-256,
a HYBRID P-256 key, a born ML-DSA-87 key and the two composite keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, utils
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from modkit import (
    SOURCE_DIR,
    VALGRIND,
    Build,
    asan_build,
    definitely_lost,
    make_module,
    module_env,
    serving,
)

from appliance.errors import SignatureInvalid
from appliance.keys import KeyInfo, KeyState
from appliance.service import Appliance
from appliance.signing.policy import Policy, load_public_keys, verify
from conftest import PIN, PKCS11_TOOL_LOGIN, pin_env, pin_source
from pkcs11_shim import model
from pkcs11_shim.dispatch import dispatch
from pkcs11_shim.model import cka_id_of
from pkcs11_shim.server import Server

HERE = Path(__file__).resolve().parent
SPY = Path("/usr/lib/x86_64-linux-gnu/pkcs11-spy.so")
ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")

CC_PROBE = ("gcc", "-std=c99", "-Wall", "-Werror")
CKO_PUBLIC_KEY = 2
CKO_PRIVATE_KEY = 3
CKK_EC = 3
CKK_ML_DSA = 0x4A
CKK_PQHSM_DUAL = 0x80000001
CKK_PQHSM_COMPOSITE = 0x80000002
CKM_ECDSA = 0x1041
CKM_ECDSA_SHA256 = 0x1044
CKM_EDDSA = 0x1057
CKM_ML_DSA = 0x1D
CKM_PQHSM_DUAL = 0x80000001
CKM_PQHSM_COMPOSITE = 0x80000002
CKR_FUNCTION_NOT_SUPPORTED = 0x54
CKR_DATA_LEN_RANGE = 0x21
CKR_KEY_TYPE_INCONSISTENT = 0x63
CKR_MECHANISM_PARAM_INVALID = 0x71
CKR_OPERATION_ACTIVE = 0x90
CKR_KEY_HANDLE_INVALID = 0x60
CKR_OPERATION_NOT_INITIALIZED = 0x91
CKR_BUFFER_TOO_SMALL = 0x150
CKR_SESSION_HANDLE_INVALID = 0xB3
MLDSA87_SIG_LEN = 4627

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool missing"),
]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Build]:
    out = make_module(tmp_path_factory.mktemp("module7"))
    found = {"plain": Build(out / "libpqhsm-pkcs11.so", {})}
    asan = asan_build(out)
    if asan is not None:
        found["asan"] = asan
    return found


@pytest.fixture(params=["plain", "asan"])
def build(request: pytest.FixtureRequest, builds: dict[str, Build]) -> Build:
    if request.param not in builds:
        pytest.skip("libasan is not installed")
    return builds[request.param]


@dataclass
class Env:
    app: Appliance
    server: Server
    builds: dict[str, Build]
    keys: dict[str, KeyInfo]

    @property
    def module(self) -> Path:
        return self.builds["plain"].module

    def env(self, build: Build | None = None) -> dict[str, str]:
        return {**module_env(self.server.address), **(build.env if build else {})}

    def tool(
        self, *args: str, build: Build | None = None, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        module = build.module if build else self.module
        cmd = ["pkcs11-tool", "--module", str(module), *PKCS11_TOOL_LOGIN, *args]
        env = {**self.env(build), **pin_env(PIN), **(extra or {})}
        r = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        if build:
            build.check(r)
        return r

    def child(self, script: str, *args: str, build: Build | None = None) -> dict[str, object]:
        """Run a ckclient script in a child process; its JSON output."""
        b = build or self.builds["plain"]
        r = subprocess.run(
            [sys.executable, "-c", script, str(HERE), str(b.module), *args],
            env={**self.env(b), **pin_env(PIN)},
            capture_output=True,
            timeout=120,
            check=False,
        )
        b.check(r)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
        out: dict[str, object] = json.loads(r.stdout)
        return out


@pytest.fixture(scope="module")
def env(
    builds: dict[str, Build], softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    def make_keys(app: Appliance) -> dict[str, KeyInfo]:
        return {
            "ed25519": app.create_key("ed25519", "i7-ed25519"),
            "ed448": app.create_key("ed448", "i7-ed448"),
            "p256": app.create_key("ecdsa-p256", "i7-p256"),
            "hybrid": app.migrate(app.create_key("ecdsa-p256", "i7-hybrid"), KeyState.HYBRID),
            "mldsa": app.create_key("ml-dsa-87", "i7-mldsa"),
            "comp384": app.create_key("mldsa87-ecdsa-p384-sha512", "i7-comp384"),
            "comp448": app.create_key("mldsa87-ed448-shake256", "i7-comp448"),
        }

    home = tmp_path_factory.mktemp("issue7") / "pqhsm"
    with serving(home, make_keys, "p11i7") as (app, server, keys):
        yield Env(app, server, builds, keys)


def _id(key: KeyInfo) -> str:
    return cka_id_of(key).hex()


def _ecdsa_pub(key: KeyInfo) -> ec.EllipticCurvePublicKey:
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub


def _verify_raw_ecdsa(
    key: KeyInfo, sig: bytes, msg: bytes, algo: hashes.HashAlgorithm | utils.Prehashed
) -> None:
    half = len(sig) // 2
    der = encode_dss_signature(int.from_bytes(sig[:half]), int.from_bytes(sig[half:]))
    _ecdsa_pub(key).verify(der, msg, ec.ECDSA(algo))


def _eddsa_pub(key: KeyInfo) -> ed25519.Ed25519PublicKey | ed448.Ed448PublicKey:
    pub = serialization.load_der_public_key(key.classical_spki or b"")
    assert isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return pub


def _mldsa_pub(key: KeyInfo) -> mldsa.MLDSA87PublicKey:
    assert key.pqc_public is not None
    return mldsa.MLDSA87PublicKey.from_public_bytes(key.pqc_public)


# -- 1. pkcs11-tool and CKM_ML_DSA ----------------------------------------------------------


def _spy_calls(log: str) -> list[tuple[str, str]]:
    """(function, return code name) of every call in a pkcs11-spy log."""
    calls = re.findall(r"^\d+: (C_\w+)\n(?:.*\n)*?Returned:\s+\d+ (\w+)", log, re.MULTILINE)
    return [(f, rv) for f, rv in calls]


@pytest.mark.skipif(not SPY.is_file(), reason="pkcs11-spy.so (OpenSC) missing")
def test_pkcs11_tool_mldsa_sign(env: Env, tmp_path: Path) -> None:
    """pkcs11-tool 0.23 signs into a fixed 512-byte buffer; ML-DSA-87 needs 4627 bytes.

    Its sign_data() calls C_SignInit, C_Sign(buffer 512) and, on any error, C_SignInit
    again to retry multi-part.  The module answers as PKCS#11 requires: C_Sign with a
    short buffer returns CKR_BUFFER_TOO_SMALL with the length and keeps the operation,
    so the second C_SignInit is CKR_OPERATION_ACTIVE (and even a fresh operation could
    not return 4627 bytes into 512 through C_SignFinal).  If a future pkcs11-tool signs,
    the signature must verify.
    """
    key = env.keys["mldsa"]
    msg = b"ML-DSA-87 through pkcs11-tool"
    (tmp_path / "msg").write_bytes(msg)
    args = ["--sign", "-m", "0x1d", "--id", _id(key), "-i", str(tmp_path / "msg")]
    args += ["-o", str(tmp_path / "sig")]
    cmd = ["pkcs11-tool", "--module", str(SPY), *PKCS11_TOOL_LOGIN, *args]
    spy_env = {
        **env.env(),
        **pin_env(PIN),
        "PKCS11SPY": str(env.module),
        "PKCS11SPY_OUTPUT": str(tmp_path / "spy.log"),
    }
    r = subprocess.run(cmd, env=spy_env, capture_output=True, timeout=60, check=False)
    if r.returncode == 0:
        _mldsa_pub(key).verify((tmp_path / "sig").read_bytes(), msg)
        return
    calls = _spy_calls((tmp_path / "spy.log").read_text())
    signing = [c for c in calls if c[0].startswith("C_Sign")]
    assert signing == [
        ("C_SignInit", "CKR_OK"),
        ("C_Sign", "CKR_BUFFER_TOO_SMALL"),
        ("C_SignInit", "CKR_OPERATION_ACTIVE"),
    ], calls
    assert b"CKR_OPERATION_ACTIVE" in r.stderr


# Child: pkcs11-tool's exact call sequence, then with a large enough buffer.
_TOOL_SEQUENCE = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
from ckclient import CK_ULONG, Module, Pkcs11Error
m = Module(sys.argv[2]); m.initialize()
s = m.open_session(); m.login(s, os.environ["PQHSM_TEST_PIN"].encode())
key = m.find(s, 3, 0x4A, bytes.fromhex(sys.argv[3]))
msg = b"pkcs11-tool's sequence"
out = {}
m.sign_init(s, 0x1D, key)
small = ctypes.create_string_buffer(512); n = CK_ULONG(512)
out["short"] = [m.call("C_Sign", CK_ULONG(s), msg, CK_ULONG(len(msg)), small, ctypes.byref(n)), n.value]
try:
    m.sign_init(s, 0x1D, key)
except Pkcs11Error as exc:
    out["reinit"] = exc.rv
big = ctypes.create_string_buffer(n.value)
out["sign"] = [m.call("C_Sign", CK_ULONG(s), msg, CK_ULONG(len(msg)), big, ctypes.byref(n)), big.raw[: n.value].hex()]
m.sign_init(s, 0x1D, key, context=b"tool ctx")
m.sign_update(s, msg[:7]); m.sign_update(s, msg[7:])
n = CK_ULONG(512)
out["final_short"] = [m.call("C_SignFinal", CK_ULONG(s), small, ctypes.byref(n)), n.value]
out["final"] = m.sign_final(s).hex()
m.finalize()
print(json.dumps(out))
"""


def test_mldsa_tool_sequence_then_big_buffer(env: Env, build: Build) -> None:
    """The module side of pkcs11-tool's sequence, and what works: a 4627-byte buffer."""
    key = env.keys["mldsa"]
    out = env.child(_TOOL_SEQUENCE, _id(key), build=build)
    assert out["short"] == [CKR_BUFFER_TOO_SMALL, MLDSA87_SIG_LEN]
    assert out["reinit"] == CKR_OPERATION_ACTIVE  # the operation survived the short buffer
    signed = out["sign"]
    assert isinstance(signed, list)
    assert signed[0] == 0
    _mldsa_pub(key).verify(bytes.fromhex(str(signed[1])), b"pkcs11-tool's sequence")
    assert out["final_short"] == [CKR_BUFFER_TOO_SMALL, MLDSA87_SIG_LEN]
    final = bytes.fromhex(str(out["final"]))
    _mldsa_pub(key).verify(final, b"pkcs11-tool's sequence", b"tool ctx")


# -- 2. multi-part signing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mech"),
    [("p256", "ECDSA-SHA256"), ("ed25519", "EDDSA"), ("ed448", "EDDSA")],
)
def test_pkcs11_tool_multipart_100k(
    env: Env, build: Build, tmp_path: Path, name: str, mech: str
) -> None:
    """pkcs11-tool signs inputs of 1025 bytes or more with C_SignUpdate/C_SignFinal."""
    key = env.keys[name]
    msg = os.urandom(100_000)
    (tmp_path / "msg").write_bytes(msg)
    r = env.tool(
        "--sign",
        "-m",
        mech,
        "--id",
        _id(key),
        "-i",
        str(tmp_path / "msg"),
        "-o",
        str(tmp_path / "sig"),
        build=build,
    )
    assert r.returncode == 0, r.stderr.decode()
    sig = (tmp_path / "sig").read_bytes()
    if mech == "EDDSA":
        _eddsa_pub(key).verify(sig, msg)
    else:
        assert len(sig) == 64
        _verify_raw_ecdsa(key, sig, msg, hashes.SHA256())


@pytest.mark.parametrize(
    ("name", "mech", "size"),
    [
        ("p256", "ECDSA-SHA256", 100_000),
        ("p256", "ECDSA-SHA256", 500),
        ("p256", "ECDSA", 32),
        ("ed25519", "EDDSA", 100_000),
        ("ed448", "EDDSA", 600),
    ],
)
def test_pkcs11_tool_verify(env: Env, tmp_path: Path, name: str, mech: str, size: int) -> None:
    """pkcs11-tool --verify: C_Verify below 1025 bytes, C_VerifyUpdate/C_VerifyFinal above;
    a damaged signature is CKR_SIGNATURE_INVALID ("Invalid signature")."""
    key = env.keys[name]
    (tmp_path / "msg").write_bytes(os.urandom(size))
    common = ["-m", mech, "--id", _id(key), "-i", str(tmp_path / "msg")]
    r = env.tool("--sign", *common, "-o", str(tmp_path / "sig"))
    assert r.returncode == 0, r.stderr.decode()
    r = env.tool("--verify", *common, "--signature-file", str(tmp_path / "sig"))
    assert r.returncode == 0, r.stderr.decode()
    assert b"Signature is valid" in r.stdout
    sig = bytearray((tmp_path / "sig").read_bytes())
    sig[len(sig) // 3] ^= 0x01
    (tmp_path / "bad").write_bytes(bytes(sig))
    r = env.tool("--verify", *common, "--signature-file", str(tmp_path / "bad"))
    assert b"Invalid signature" in r.stdout  # pkcs11-tool 0.23 then exits 0
    assert b"Signature is valid" not in r.stdout


_VERIFY = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from ckclient import CK_ULONG, Module, Pkcs11Error
m = Module(sys.argv[2]); m.initialize()
s = m.open_session()  # verification needs no login: public objects
ids = json.loads(sys.argv[3])
sigs = json.loads(sys.argv[4])
msg = b"verified through the module"
out = {}

def verify(kt, name, mech, sig, context=None, parts=None, data=msg):
    key = m.find(s, 2, kt, bytes.fromhex(ids[name]))
    keep = []
    ctx = None
    try:
        m.verify_init(s, mech, key, context=context)
        if parts is None:
            m.check("C_Verify", CK_ULONG(s), data, CK_ULONG(len(data)), sig, CK_ULONG(len(sig)))
        else:
            for p in parts:
                m.check("C_VerifyUpdate", CK_ULONG(s), p, CK_ULONG(len(p)))
            m.check("C_VerifyFinal", CK_ULONG(s), sig, CK_ULONG(len(sig)))
        return 0
    except Pkcs11Error as exc:
        return exc.rv

for field, (kt, name, mech, ctx) in {
    "mldsa": (0x4A, "mldsa", 0x1D, "ml ctx"),
    "dual": (0x80000001, "hybrid", 0x80000001, "dual ctx"),
    "comp384": (0x80000002, "comp384", 0x80000002, ""),
    "comp448": (0x80000002, "comp448", 0x80000002, "comp ctx"),
}.items():
    sig = bytes.fromhex(sigs[field])
    c = ctx.encode() if ctx else None
    bad = bytearray(sig); bad[len(bad) // 2] ^= 1
    out[field] = [
        verify(kt, name, mech, sig, c),
        verify(kt, name, mech, sig, c, parts=[msg[:3], msg[3:]]),
        verify(kt, name, mech, bytes(bad), c),
        verify(kt, name, mech, sig, c, data=msg + b"!"),
        verify(kt, name, mech, sig, (c or b"") + b"x"),
    ]
out["mldsa_short"] = verify(0x4A, "mldsa", 0x1D, b"\0" * 100)
out["mldsa_private"] = -1
try:
    m.verify_init(s, 0x1D, m.find(s, 3, 0x4A, bytes.fromhex(ids["mldsa"])))
except Pkcs11Error as exc:
    out["mldsa_private"] = exc.rv  # private objects are invisible before login
m.verify_init(s, 0x1041, m.find(s, 2, 3, bytes.fromhex(ids["p256"])))
out["ecdsa_update"] = m.call("C_VerifyUpdate", CK_ULONG(s), b"x" * 32, CK_ULONG(32))
out["after"] = m.call("C_Verify", CK_ULONG(s), b"x" * 32, CK_ULONG(32), b"y" * 64, CK_ULONG(64))
m.finalize()
print(json.dumps(out))
"""


def test_verify_extension_mechanisms(env: Env, build: Build) -> None:
    msg = b"verified through the module"
    app, keys = env.app, env.keys
    sigs = {
        "mldsa": app.sign(keys["mldsa"], msg, kind="ml-dsa", context=b"ml ctx"),
        "dual": app.sign(keys["hybrid"], msg, kind="dual", context=b"dual ctx"),
        "comp384": app.sign(keys["comp384"], msg),
        "comp448": app.sign(keys["comp448"], msg, context=b"comp ctx"),
    }
    ids = {n: _id(k) for n, k in keys.items()}
    out = env.child(
        _VERIFY, json.dumps(ids), json.dumps({k: v.hex() for k, v in sigs.items()}), build=build
    )
    invalid = 0xC0  # CKR_SIGNATURE_INVALID
    for field in sigs:  # good, good multi-part, damaged, other message, other context
        assert out[field] == [0, 0, invalid, invalid, invalid], field
    assert out["mldsa_short"] == 0xC1  # CKR_SIGNATURE_LEN_RANGE
    assert out["mldsa_private"] != -1
    assert out["ecdsa_update"] == CKR_FUNCTION_NOT_SUPPORTED
    assert out["after"] == CKR_OPERATION_NOT_INITIALIZED


_MULTIPART = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from ckclient import Module, rv_of as rv
m = Module(sys.argv[2]); m.initialize()
s = m.open_session(); m.login(s, os.environ["PQHSM_TEST_PIN"].encode())
ids = json.loads(sys.argv[3])
p256 = m.find(s, 3, 3, bytes.fromhex(ids["p256"]))
ed = m.find(s, 3, 0x40, bytes.fromhex(ids["ed25519"]))
ml = m.find(s, 3, 0x4A, bytes.fromhex(ids["mldsa"]))
out = {}

# mixing: C_Sign after C_SignUpdate is refused and ends the operation
m.sign_init(s, 0x1044, p256); m.sign_update(s, b"part")
out["mixed"] = rv(m.sign, s, b"data")
out["after_mixed"] = rv(m.sign_final, s)
# CKM_ECDSA is single-part only; the error ends the operation
m.sign_init(s, 0x1041, p256)
out["ecdsa_update"] = rv(m.sign_update, s, b"x" * 32)
out["after_ecdsa_update"] = rv(m.sign, s, b"x" * 32)
# no update at all: the signature over the empty message
m.sign_init(s, 0x1057, ed)
out["empty"] = m.sign_final(s).hex()
# one 600 KB part (the module sends it in 256 KiB requests), ML-DSA with a context
big = bytes(range(256)) * 2400
m.sign_init(s, 0x1D, ml, context=b"multi")
m.sign_update(s, big[:1000]); m.sign_update(s, big[1000:])
out["mldsa_big"] = m.sign_final(s).hex()
# the 64 MiB cap: one byte over ends the operation with CKR_DATA_LEN_RANGE
m.sign_init(s, 0x1057, ed)
chunk = b"\0" * (16 << 20)
for _ in range(4):
    m.sign_update(s, chunk)
# another session of this connection may not hold more: 64 MiB per connection
s2 = m.open_session()
m.sign_init(s2, 0x1057, ed)
out["connection_budget"] = rv(m.sign_update, s2, b"!")
out["over_cap"] = rv(m.sign_update, s, b"!")
out["after_cap"] = rv(m.sign_final, s)
m.sign_init(s2, 0x1057, ed)  # the budget is free again
m.sign_update(s2, b"!")
out["after_budget"] = m.sign_final(s2).hex()
# a size query on C_SignFinal keeps the operation; then it signs
m.sign_init(s, 0x1044, p256); m.sign_update(s, b"abc")
out["sized"] = m.sign_final(s).hex()
m.finalize()
print(json.dumps(out))
"""


def test_multipart_semantics(env: Env, build: Build) -> None:
    ids = {n: _id(env.keys[n]) for n in ("p256", "ed25519", "mldsa")}
    out = env.child(_MULTIPART, json.dumps(ids), build=build)
    assert out["mixed"] == CKR_OPERATION_ACTIVE
    assert out["after_mixed"] == CKR_OPERATION_NOT_INITIALIZED
    assert out["ecdsa_update"] == CKR_FUNCTION_NOT_SUPPORTED
    assert out["after_ecdsa_update"] == CKR_OPERATION_NOT_INITIALIZED
    _eddsa_pub(env.keys["ed25519"]).verify(bytes.fromhex(str(out["empty"])), b"")
    big = bytes(range(256)) * 2400
    _mldsa_pub(env.keys["mldsa"]).verify(bytes.fromhex(str(out["mldsa_big"])), big, b"multi")
    assert out["connection_budget"] == 0x31  # CKR_DEVICE_MEMORY
    _eddsa_pub(env.keys["ed25519"]).verify(bytes.fromhex(str(out["after_budget"])), b"!")
    assert out["over_cap"] == CKR_DATA_LEN_RANGE
    assert out["after_cap"] == CKR_OPERATION_NOT_INITIALIZED
    _verify_raw_ecdsa(env.keys["p256"], bytes.fromhex(str(out["sized"])), b"abc", hashes.SHA256())


# -- 3. PKCS#11 3.0 interfaces ----------------------------------------------------------------

_INTERFACES = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from ckclient import CK_ULONG, Module

class Interface(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char_p), ("functions", ctypes.c_void_p), ("flags", CK_ULONG))

class Info(ctypes.Structure):
    _fields_ = (("cv", ctypes.c_ubyte * 2), ("man", ctypes.c_ubyte * 32), ("flags", CK_ULONG),
                ("desc", ctypes.c_ubyte * 32), ("lv", ctypes.c_ubyte * 2))

m = Module(sys.argv[2]); lib = m.lib
out = {}
n = CK_ULONG(0)
out["count"] = [lib.C_GetInterfaceList(None, ctypes.byref(n)), n.value]
one = (Interface * 1)(); n = CK_ULONG(1)
out["short"] = [lib.C_GetInterfaceList(one, ctypes.byref(n)), n.value]
lst = (Interface * 4)(); n = CK_ULONG(4)
out["list_rv"] = lib.C_GetInterfaceList(lst, ctypes.byref(n))
ptr_size = ctypes.sizeof(ctypes.c_void_p)

def version(p):
    v = ctypes.cast(p, ctypes.POINTER(ctypes.c_ubyte * 2)).contents
    return [v[0], v[1]]

def fn(p, index, *argtypes):
    # entry i of a function list: after the 2-byte version, padded to a pointer
    addr = ctypes.cast(p + ptr_size * (1 + index), ctypes.POINTER(ctypes.c_void_p)).contents.value
    return ctypes.CFUNCTYPE(CK_ULONG, *argtypes)(addr), addr

out["list"] = [[lst[i].name.decode(), version(lst[i].functions), lst[i].flags] for i in range(n.value)]
got = ctypes.POINTER(Interface)()
out["default"] = [lib.C_GetInterface(None, None, ctypes.byref(got), CK_ULONG(0)), version(got.contents.functions)]
v240 = (ctypes.c_ubyte * 2)(2, 40)
out["by_version"] = [lib.C_GetInterface(b"PKCS 11", v240, ctypes.byref(got), CK_ULONG(0)), version(got.contents.functions)]
fl = ctypes.c_void_p(); lib.C_GetFunctionList(ctypes.byref(fl))
out["same_as_2_40"] = got.contents.functions == fl.value
out["fork_safe"] = lib.C_GetInterface(None, None, ctypes.byref(got), CK_ULONG(1))
out["unknown_name"] = lib.C_GetInterface(b"Vendor X", None, ctypes.byref(got), CK_ULONG(0))
v31 = (ctypes.c_ubyte * 2)(3, 1)
out["unknown_version"] = lib.C_GetInterface(None, v31, ctypes.byref(got), CK_ULONG(0))
# use the 3.0 list: C_Initialize (0), C_GetInfo (2), then 3.0 entries
lib.C_GetInterface(None, None, ctypes.byref(got), CK_ULONG(0))
p30 = got.contents.functions
init, _ = fn(p30, 0, ctypes.c_void_p)
get_info, _ = fn(p30, 2, ctypes.POINTER(Info))
_, list_addr = fn(p30, 68, ctypes.c_void_p, ctypes.c_void_p)
_, iface_addr = fn(p30, 69, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, CK_ULONG)
login_user, _ = fn(p30, 70, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p, CK_ULONG)
verify_final, _ = fn(p30, 91, CK_ULONG)
out["init"] = init(None)
info = Info()
out["info30"] = [get_info(ctypes.byref(info)), list(info.cv)]
lib.C_GetInfo(ctypes.byref(info))
out["info240"] = list(info.cv)
out["entries"] = [list_addr == ctypes.cast(lib.C_GetInterfaceList, ctypes.c_void_p).value,
                  iface_addr == ctypes.cast(lib.C_GetInterface, ctypes.c_void_p).value]
out["login_user"] = login_user(1, 1, b"x", 1, b"user", 4)
out["verify_final"] = verify_final(1)
print(json.dumps(out))
"""


def test_interface_list_and_get_interface(env: Env, build: Build) -> None:
    out = env.child(_INTERFACES, build=build)
    assert out["count"] == [0, 2]
    assert out["short"] == [CKR_BUFFER_TOO_SMALL, 2]
    assert out["list_rv"] == 0
    assert out["list"] == [["PKCS 11", [3, 0], 0], ["PKCS 11", [2, 40], 0]]
    assert out["default"] == [0, [3, 0]]
    assert out["by_version"] == [0, [2, 40]]
    assert out["same_as_2_40"] is True
    assert out["fork_safe"] == 7  # CKR_ARGUMENTS_BAD: neither interface is fork-safe
    assert out["unknown_name"] == 7
    assert out["unknown_version"] == 7
    assert out["init"] == 0
    assert out["info30"] == [0, [3, 0]]
    assert out["info240"] == [2, 40]
    assert out["entries"] == [True, True]
    assert out["login_user"] == CKR_FUNCTION_NOT_SUPPORTED
    assert out["verify_final"] == CKR_FUNCTION_NOT_SUPPORTED


NSS_HEADER_DIR = Path("/usr/include/nss")
NSPR_HEADER_DIR = Path("/usr/include/nspr")
_FUNCTIONS_3_0 = [
    "C_GetInterfaceList",
    "C_GetInterface",
    "C_LoginUser",
    "C_SessionCancel",
    "C_MessageEncryptInit",
    "C_EncryptMessage",
    "C_EncryptMessageBegin",
    "C_EncryptMessageNext",
    "C_MessageEncryptFinal",
    "C_MessageDecryptInit",
    "C_DecryptMessage",
    "C_DecryptMessageBegin",
    "C_DecryptMessageNext",
    "C_MessageDecryptFinal",
    "C_MessageSignInit",
    "C_SignMessage",
    "C_SignMessageBegin",
    "C_SignMessageNext",
    "C_MessageSignFinal",
    "C_MessageVerifyInit",
    "C_VerifyMessage",
    "C_VerifyMessageBegin",
    "C_VerifyMessageNext",
    "C_MessageVerifyFinal",
]


@pytest.mark.skipif(
    not (NSS_HEADER_DIR / "pkcs11t.h").is_file() or not (NSPR_HEADER_DIR / "prtypes.h").is_file(),
    reason="NSS and NSPR headers missing (libnss3-dev)",
)
def test_3_0_layout_matches_nss_header(tmp_path: Path) -> None:
    """Our CK_INTERFACE and CK_FUNCTION_LIST_3_0 against NSS's 3.0 headers (p11-kit 0.24's
    header predates 3.0): sizes, every 3.0 entry's offset, CKF_INTERFACE_FORK_SAFE."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include HEADER", "int main(void) {"]
    lines.append('printf("sizeof CK_INTERFACE %zu\\n", sizeof(CK_INTERFACE));')
    lines.append('printf("sizeof list %zu\\n", sizeof(CK_FUNCTION_LIST_3_0));')
    lines.append('printf("fork_safe %lx\\n", (unsigned long)CKF_INTERFACE_FORK_SAFE);')
    for f in ("pInterfaceName", "pFunctionList", "flags"):
        lines.append(f'printf("offset {f} %zu\\n", offsetof(CK_INTERFACE, {f}));')
    for f in ("C_Initialize", "C_WaitForSlotEvent", *_FUNCTIONS_3_0):
        lines.append(f'printf("offset {f} %zu\\n", offsetof(CK_FUNCTION_LIST_3_0, {f}));')
    lines += ["return 0;", "}"]
    (tmp_path / "probe.c").write_text("\n".join(lines) + "\n")
    results = []
    for header, flags in (
        ('"pkcs11.h"', ["-I", str(SOURCE_DIR)]),
        ("<pkcs11.h>", ["-I", str(NSS_HEADER_DIR), "-I", str(NSPR_HEADER_DIR)]),
    ):
        exe = tmp_path / "probe"
        cc = subprocess.run(
            [*CC_PROBE, f"-DHEADER={header}", *flags, str(tmp_path / "probe.c"), "-o", str(exe)],
            capture_output=True,
            check=False,
        )
        assert cc.returncode == 0, cc.stderr.decode()
        results.append(subprocess.run([str(exe)], capture_output=True, check=True).stdout)
    ours, nss = results
    assert ours == nss
    assert b"sizeof list 744\n" in ours  # version (8 with padding) + 92 pointers


def test_vendor_values_agree_with_the_server(tmp_path: Path) -> None:
    """pkcs11.h's vendor-defined values are the ones pkcs11_shim/model.py serves."""
    names = [
        "CKM_PQHSM_DUAL",
        "CKM_PQHSM_COMPOSITE",
        "CKK_PQHSM_DUAL",
        "CKK_PQHSM_COMPOSITE",
        "CKP_PQHSM_MLDSA87_ECDSA_P384_SHA512",
        "CKP_PQHSM_MLDSA87_ED448_SHAKE256",
        "CKA_PUBLIC_KEY_INFO",
    ]
    body = "".join(f'printf("{n} %lu\\n", (unsigned long)({n}));' for n in names)
    (tmp_path / "v.c").write_text(
        f'#include <stdio.h>\n#include "pkcs11.h"\nint main(void){{{body}return 0;}}\n'
    )
    exe = tmp_path / "v"
    cc = subprocess.run(
        [*CC_PROBE, "-I", str(SOURCE_DIR), str(tmp_path / "v.c"), "-o", str(exe)],
        capture_output=True,
        check=False,
    )
    assert cc.returncode == 0, cc.stderr.decode()
    out = subprocess.run([str(exe)], capture_output=True, check=True, text=True).stdout
    header = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert header == {n: getattr(model, n) for n in names}
    assert header["CKM_PQHSM_DUAL"] & 0x80000000  # in the vendor-defined range


def test_only_entry_points_exported(builds: dict[str, Build]) -> None:
    if shutil.which("nm") is None:
        pytest.skip("nm missing")
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(builds["plain"].module)], capture_output=True, check=True
    ).stdout.decode()
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert {"C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"} <= names
    assert "C_LoginUser" not in names  # 3.0 entries are reached through the list only
    assert len(names) == 70


# -- 4. vendor-defined dual and composite mechanisms --------------------------------------------

_VENDOR = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from ckclient import Module, Pkcs11Error
m = Module(sys.argv[2]); m.initialize()
s = m.open_session(); m.login(s, os.environ["PQHSM_TEST_PIN"].encode())
ids = json.loads(sys.argv[3])
msg = b"dual and composite through the module"
out = {}

def attempt(f, *a, **kw):
    try:
        return f(*a, **kw).hex()
    except Pkcs11Error as exc:
        return exc.rv

def count(cls, kt, cka_id):
    try:
        m.find(s, cls, kt, bytes.fromhex(cka_id))
        return 1
    except Pkcs11Error as exc:
        return 0 if exc.call == "C_FindObjects (count)" else -exc.rv

def sign(priv, mech, data=msg, context=None, parts=None):
    m.sign_init(s, mech, priv, context=context)
    return m.sign_multi(s, parts) if parts else m.sign(s, data)

hid = ids["hybrid"]
pub = m.find(s, 2, 0x80000001, bytes.fromhex(hid))
priv = m.find(s, 3, 0x80000001, bytes.fromhex(hid))
out["dual_value"] = m.attribute(s, pub, 0x011).hex()
out["dual_spki"] = m.attribute(s, pub, 0x129).hex()
out["dual_plain"] = sign(priv, 0x80000001).hex()
out["dual_ctx"] = sign(priv, 0x80000001, context=b"dual ctx").hex()
out["dual_multi"] = sign(priv, 0x80000001, parts=[msg[:5], msg[5:]]).hex()
out["dual_long_ctx"] = attempt(sign, priv, 0x80000001, context=b"c" * 179)
out["dual_on_mldsa"] = attempt(sign, m.find(s, 3, 0x4A, bytes.fromhex(hid)), 0x80000001)
out["mldsa_on_dual"] = attempt(sign, priv, 0x1D)
for name in ("comp384", "comp448"):
    cid = bytes.fromhex(ids[name])
    cpub = m.find(s, 2, 0x80000002, cid)
    cpriv = m.find(s, 3, 0x80000002, cid)
    out[name + "_spki"] = m.attribute(s, cpub, 0x129).hex()
    out[name + "_set"] = m.attribute(s, cpub, 0x61D).hex()
    out[name + "_plain"] = sign(cpriv, 0x80000002).hex()
    out[name + "_ctx"] = sign(cpriv, 0x80000002, context=b"comp ctx").hex()
    out[name + "_multi"] = sign(cpriv, 0x80000002, parts=[msg[:9], msg[9:]]).hex()
    out[name + "_dual"] = attempt(sign, cpriv, 0x80000001)
    out[name + "_value_sensitive"] = attempt(m.attribute, s, cpriv, 0x011)
out["no_dual_for_classical"] = count(3, 0x80000001, ids["p256"])
out["no_dual_for_mldsa"] = count(3, 0x80000001, ids["mldsa"])
out["no_ml_dsa_for_composite"] = count(3, 0x4A, ids["comp384"])
m.finalize()
print(json.dumps(out))
"""


def _strict(keys_pem: list[bytes], msg: bytes, sig: bytes, context: bytes = b"") -> None:
    verify(load_public_keys(*keys_pem), msg, sig, policy=Policy.STRICT, context=context)


def test_dual_and_composite_mechanisms(env: Env, build: Build) -> None:
    ids = {n: _id(k) for n, k in env.keys.items()}
    out = env.child(_VENDOR, json.dumps(ids), build=build)
    msg = b"dual and composite through the module"
    hybrid = env.keys["hybrid"]
    assert bytes.fromhex(str(out["dual_value"])) == hybrid.pqc_public
    assert bytes.fromhex(str(out["dual_spki"])) == hybrid.classical_spki
    mldsa_spki = _mldsa_pub(hybrid).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dual_keys = [bytes.fromhex(str(out["dual_spki"])), mldsa_spki]  # from the objects alone
    for field, ctx in (("dual_plain", b""), ("dual_ctx", b"dual ctx"), ("dual_multi", b"")):
        sig = bytes.fromhex(str(out[field]))
        assert sig[:4] == b"PQDS"
        _strict(dual_keys, msg, sig, ctx)
        with pytest.raises(SignatureInvalid):
            _strict(dual_keys, msg + b"!", sig, ctx)
    with pytest.raises(SignatureInvalid):  # the context is bound
        _strict(dual_keys, msg, bytes.fromhex(str(out["dual_ctx"])), b"other")
    assert out["dual_long_ctx"] == CKR_MECHANISM_PARAM_INVALID
    assert out["dual_on_mldsa"] == CKR_KEY_TYPE_INCONSISTENT
    assert out["mldsa_on_dual"] == CKR_KEY_TYPE_INCONSISTENT
    sets = {"comp384": 0x80000001, "comp448": 0x80000002}
    for name in ("comp384", "comp448"):
        spki = bytes.fromhex(str(out[name + "_spki"]))
        assert int.from_bytes(bytes.fromhex(str(out[name + "_set"])), "little") == sets[name]
        for field, ctx in (("_plain", b""), ("_ctx", b"comp ctx"), ("_multi", b"")):
            sig = bytes.fromhex(str(out[name + field]))
            assert len(sig) > MLDSA87_SIG_LEN
            _strict([spki], msg, sig, ctx)
            with pytest.raises(SignatureInvalid):
                _strict([spki], msg, sig, ctx + b"x")
        assert out[name + "_dual"] == CKR_KEY_TYPE_INCONSISTENT
        assert out[name + "_value_sensitive"] == 0x11  # CKR_ATTRIBUTE_SENSITIVE
    assert out["no_dual_for_classical"] == 0
    assert out["no_dual_for_mldsa"] == 0
    assert out["no_ml_dsa_for_composite"] == 0


_VISIBLE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from ckclient import Module, Pkcs11Error
m = Module(sys.argv[2]); m.initialize()
s = m.open_session(); m.login(s, os.environ["PQHSM_TEST_PIN"].encode())
out = {}
for kt in (3, 0x4A, 0x80000001):
    try:
        m.find(s, 3, kt, bytes.fromhex(sys.argv[3]))
        out[str(kt)] = 1
    except Pkcs11Error:
        out[str(kt)] = 0
m.finalize()
print(json.dumps(out))
"""


def test_dual_objects_follow_the_key_state(env: Env) -> None:
    """Dual objects exist only while both halves sign (HYBRID, PQC_PREFERRED)."""
    key = env.app.create_key("ecdsa-p256", "i7-moving")
    seen = {}
    for state in (None, KeyState.HYBRID, KeyState.PQC_PREFERRED, KeyState.FINALIZING):
        if state is not None:
            key = env.app.migrate(key, state)
        seen[key.state.value] = env.child(_VISIBLE, _id(key))
    ec_, ml, dual = str(CKK_EC), str(CKK_ML_DSA), str(CKK_PQHSM_DUAL)
    assert seen["CLASSICAL"] == {ec_: 1, ml: 0, dual: 0}
    assert seen["HYBRID"] == {ec_: 1, ml: 1, dual: 1}
    assert seen["PQC_PREFERRED"] == {ec_: 1, ml: 1, dual: 1}
    assert seen["FINALIZING"] == {ec_: 0, ml: 1, dual: 0}


# -- 5. OpenSSL through the module (libp11's engine) ---------------------------------------------


@pytest.mark.skipif(not ENGINE.is_file(), reason=f"libp11 engine missing: {ENGINE}")
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_openssl_engine_signs_through_module(env: Env, tmp_path: Path) -> None:
    """libp11 0.4.12 stops enumerating keys at a key type it does not know (EdDSA, ML-DSA,
    vendor types), so the engine uses the module with PQHSM_EXTENSION=off (version 0,
    exactly what p11-kit-client.so shows)."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nengines = engine_section\n"
        "[engine_section]\npkcs11 = pkcs11_section\n"
        f"[pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {ENGINE}\n"
        f"MODULE_PATH = {env.module}\ninit = 0\n"
    )
    run_env = {**env.env(), "OPENSSL_CONF": str(conf), "PQHSM_EXTENSION": "off"}
    key = env.keys["hybrid"]  # a HYBRID key: its EC half signs classically
    uri = f"pkcs11:object={key.label};type=private;{pin_source(tmp_path, PIN)}"
    message = b"signed by openssl through libpqhsm-pkcs11.so"
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "pub.pem").write_bytes(
        _ecdsa_pub(key).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    dgst = ["openssl", "dgst", "-engine", "pkcs11", "-keyform", "engine", "-sha256"]
    r = subprocess.run(
        [*dgst, "-sign", uri, "-out", str(tmp_path / "sig"), str(tmp_path / "msg")],
        env=run_env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    sig = (tmp_path / "sig").read_bytes()
    _ecdsa_pub(key).verify(sig, message, ec.ECDSA(hashes.SHA256()))
    verify_cmd = ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem")]
    r = subprocess.run(  # and openssl itself agrees, against the exported public key
        [*verify_cmd, "-signature", str(tmp_path / "sig"), str(tmp_path / "msg")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert b"Verified OK" in r.stdout


# -- 6. threads ------------------------------------------------------------------------------------

_THREADS = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
from ckclient import Module, Pkcs11Error
m = Module(sys.argv[2]); m.initialize()
ids = json.loads(sys.argv[3])
threads, rounds = int(sys.argv[4]), int(sys.argv[5])
kinds = json.loads(sys.argv[6])  # thread i signs with kinds[i % len(kinds)]
first = m.open_session(); m.login(first, os.environ["PQHSM_TEST_PIN"].encode())  # login is per application
sigs, errors = [], []
lock = threading.Lock()

def worker(i):
    try:
        s = m.open_session()
        name, mech, kt = kinds[i % len(kinds)]
        key = m.find(s, 3, kt, bytes.fromhex(ids[name]))
        for j in range(rounds):
            msg = b"thread %d round %d" % (i, j)
            m.sign_init(s, mech, key)
            if j % 2:
                sig = m.sign_multi(s, [msg[:4], msg[4:]])
            else:
                sig = m.sign(s, msg)
            with lock:
                sigs.append([name, msg.hex(), sig.hex()])
        m.close_session(s)
    except Pkcs11Error as exc:
        with lock:
            errors.append(str(exc))

ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
m.finalize()
print(json.dumps({"sigs": sigs, "errors": errors}))
"""


def test_threads_sign_concurrently(env: Env, build: Build) -> None:
    """Eight threads, each with its own session, sign 40 times (single and multi-part)."""
    threads, rounds = 8, 40
    ids = {n: _id(env.keys[n]) for n in ("p256", "ed25519")}
    kinds = json.dumps([("p256", 0x1044, 3), ("ed25519", 0x1057, 0x40)])
    out = env.child(_THREADS, json.dumps(ids), str(threads), str(rounds), kinds, build=build)
    assert out["errors"] == []
    sigs = out["sigs"]
    assert isinstance(sigs, list)
    assert len(sigs) == threads * rounds
    for name, msg_hex, sig_hex in sigs:
        msg, sig = bytes.fromhex(msg_hex), bytes.fromhex(sig_hex)
        if name == "p256":
            _verify_raw_ecdsa(env.keys["p256"], sig, msg, hashes.SHA256())
        else:
            _eddsa_pub(env.keys["ed25519"]).verify(sig, msg)
    assert len({s[1] for s in sigs}) == threads * rounds  # every round signed once


def test_threads_sign_side_by_side_on_one_connection(
    env: Env, build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extension v3: four threads' ML-DSA signatures travel on the process's one
    connection and run on the server at the same time (a slowed server makes the overlap
    certain); each thread gets its own signatures back, all valid."""
    running, peak, clients = [0], [0], set()
    lock = threading.Lock()

    def slow(client: model.Client, body: bytes) -> bytes:
        signing = int.from_bytes(body[:4], "big") == 43
        with lock:
            clients.add(id(client))
            if signing:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
        if signing:
            time.sleep(0.15)
        try:
            return dispatch(client, body)
        finally:
            if signing:
                with lock:
                    running[0] -= 1

    monkeypatch.setattr("pkcs11_shim.server.dispatch", slow)
    threads, rounds = 4, 3
    key = env.keys["mldsa"]
    ids, kinds = json.dumps({"mldsa": _id(key)}), json.dumps([("mldsa", 0x1D, 0x4A)])
    out = env.child(_THREADS, ids, str(threads), str(rounds), kinds, build=build)
    assert out["errors"] == []
    sigs = out["sigs"]
    assert isinstance(sigs, list)
    assert len(sigs) == threads * rounds  # single-part and multi-part signatures
    for _, msg_hex, sig_hex in sigs:
        _mldsa_pub(key).verify(bytes.fromhex(sig_hex), bytes.fromhex(msg_hex))
    assert len(clients) == 1  # one connection (one server-side client) for every thread
    assert peak[0] >= 2


# -- valgrind over the new C paths --------------------------------------------------------------


@pytest.fixture(scope="module")
def driver(builds: dict[str, Build]) -> Path:
    """tests/module/driver.c linked against the plain build (rpath to its directory)."""
    module = builds["plain"].module
    exe = module.parent / "driver"
    flags = ["gcc", "-std=c11", "-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wshadow"]
    rpath = f"-Wl,-rpath,{module.parent}"
    cc = subprocess.run(
        [*flags, "-I", str(SOURCE_DIR), str(HERE / "driver.c"), "-o", str(exe), str(module), rpath],
        capture_output=True,
        check=False,
    )
    assert cc.returncode == 0, cc.stderr.decode()
    return exe


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind missing")
def test_valgrind_multipart_vendor_interfaces(env: Env, driver: Path, tmp_path: Path) -> None:
    """memcheck over C_SignUpdate/C_SignFinal and C_VerifyUpdate/C_VerifyFinal
    (pkcs11-tool, 300 KB), and over C_GetInterface, the 3.0 list and the vendor
    parameters (the C driver)."""
    msg = os.urandom(300_000)
    (tmp_path / "msg").write_bytes(msg)
    cmd = [*VALGRIND, "pkcs11-tool", "--module", str(env.module), *PKCS11_TOOL_LOGIN]
    cmd += ["--sign", "-m", "EDDSA", "--id", _id(env.keys["ed448"])]
    cmd += ["-i", str(tmp_path / "msg"), "-o", str(tmp_path / "sig")]
    tool_env = {**env.env(), **pin_env(PIN)}
    r = subprocess.run(cmd, env=tool_env, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    _eddsa_pub(env.keys["ed448"]).verify((tmp_path / "sig").read_bytes(), msg)
    cmd[cmd.index("--sign")] = "--verify"  # C_VerifyUpdate/C_VerifyFinal under memcheck
    cmd[cmd.index("-o")] = "--signature-file"
    r = subprocess.run(cmd, env=tool_env, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert b"Signature is valid" in r.stdout
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    hybrid, comp = env.keys["hybrid"], env.keys["comp448"]
    cmd = [*VALGRIND, str(driver), "check", _id(hybrid), _id(comp)]
    r = subprocess.run(cmd, env=tool_env, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    out = dict(line.split(" ", 1) for line in r.stdout.decode().splitlines())
    assert out["bad_param"] == "71"  # CKR_MECHANISM_PARAM_INVALID, refused locally
    mldsa_spki = _mldsa_pub(hybrid).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dual_keys = [hybrid.classical_spki or b"", mldsa_spki]
    big = bytes(i % 251 for i in range(600_000))
    _strict(dual_keys, b"driver message", bytes.fromhex(out["dual_ctx"]), b"driver ctx")
    _strict(dual_keys, big, bytes.fromhex(out["dual_big"]))
    comp_pem = env.app.public_key_pem_of(comp)
    _strict([comp_pem], b"driver message", bytes.fromhex(out["comp_ctx"]), b"driver ctx")
    # three threads sharing the multiplexed connection (replies handed between them)
    label = env.keys["mldsa"].label
    cmd = [*VALGRIND, str(driver), "mldsa", label, "1", "3"]
    r = subprocess.run(cmd, env=tool_env, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert b"ERROR SUMMARY: 0 errors" in r.stderr
    assert definitely_lost(r.stderr) == 0
    assert int(r.stdout.split()[0]) >= 3


def test_module_frees_no_block_holding_the_pin(env: Env, driver: Path, tmp_path: Path) -> None:
    """The C driver logs in and signs through the module with an LD_PRELOAD probe that
    checks every heap block freed or reallocated for the PIN: none is (the module wipes
    its C_Login request before freeing it).  The probe's self-test frees one such block
    first, so a probe that saw nothing cannot pass."""
    probe = tmp_path / "freecheck.so"
    flags = ["-std=c11", "-O1", "-fno-builtin", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    cc = subprocess.run(
        ["gcc", *flags, str(HERE / "freecheck.c"), "-o", str(probe), "-ldl"],
        capture_output=True,
        check=False,
    )
    assert cc.returncode == 0, cc.stderr.decode()
    report = tmp_path / "report"
    probe_env = {"LD_PRELOAD": str(probe), "FREECHECK_PIN": PIN.decode(), **pin_env(PIN)}
    probe_env["FREECHECK_OUT"] = str(report)
    cmd = [str(driver), "mldsa", env.keys["mldsa"].label, "0.2"]
    for selftest in (True, False):
        report.unlink(missing_ok=True)
        extra = {"FREECHECK_SELFTEST": "1"} if selftest else {}
        r = subprocess.run(
            cmd, env={**env.env(), **probe_env, **extra}, capture_output=True, timeout=60
        )
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert int(r.stdout.split()[0]) >= 1  # logged in and signed
        lines = report.read_text().splitlines() if report.exists() else []
        assert len(lines) == (1 if selftest else 0), lines


# -- size queries the module answers itself ---------------------------------------------------

# Child: each step ends with C_GetSessionInfo, which marks it in the server's call log.
_SIZE_QUERIES = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
from ckclient import CK_ULONG, Module, Pkcs11Error
m = Module(sys.argv[2]); m.initialize()
pin = os.environ["PQHSM_TEST_PIN"].encode()
s = m.open_session(); m.login(s, pin)
mech = int(sys.argv[4], 16)
cls_type = (3, int(sys.argv[5], 16))
key = m.find(s, *cls_type, bytes.fromhex(sys.argv[3]))
msg = bytes.fromhex(sys.argv[6])
out = {}
info = (CK_ULONG * 4)()
def step(name, value):
    out[name] = value
    m.check("C_GetSessionInfo", CK_ULONG(s), info)
def sign(buf, n):
    n = CK_ULONG(n)
    rv = m.call("C_Sign", CK_ULONG(s), msg, CK_ULONG(len(msg)), buf, ctypes.byref(n))
    return [rv, n.value]
def final(buf, n):
    n = CK_ULONG(n)
    rv = m.call("C_SignFinal", CK_ULONG(s), buf, ctypes.byref(n))
    return [rv, n.value]
step("no_operation", sign(None, 0))
m.sign_init(s, mech, key)
query, short = sign(None, 0), sign(ctypes.create_string_buffer(10), 10)
big = ctypes.create_string_buffer(query[1])
done = sign(big, query[1])
step("single", [query, short, done, big.raw[: done[1]].hex()])
step("after_end", sign(None, 0))
if sys.argv[7] == "single":
    m.finalize(); print(json.dumps(out)); sys.exit(0)
m.sign_init(s, mech, key)
m.sign_update(s, msg[:4]); m.sign_update(s, msg[4:])
query = final(None, 0)
big = ctypes.create_string_buffer(query[1])
done = final(big, query[1])
step("multi", [query, done, big.raw[: done[1]].hex()])
m.sign_init(s, mech, key)
m.check("C_Logout", CK_ULONG(s))
step("after_logout", sign(None, 0))
m.login(s, pin)
m.sign_init(s, mech, key)
m.check("C_CloseSession", CK_ULONG(s))
closed = s
s = m.open_session()
n = CK_ULONG(0)
rv = m.call("C_Sign", CK_ULONG(closed), msg, CK_ULONG(len(msg)), None, ctypes.byref(n))
step("after_close", rv)
m.finalize()
print(json.dumps(out))
"""

_SESSION_INFO = 13


def _steps(calls: list[int]) -> list[list[int]]:
    """The server's call ids between C_GetSessionInfo markers."""
    steps: list[list[int]] = [[]]
    for call in calls:
        if call == _SESSION_INFO:
            steps.append([])
        else:
            steps[-1].append(call)
    return steps


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The call id of every request the in-process server dispatches from now on."""
    seen: list[int] = []

    def spy(client: model.Client, body: bytes) -> bytes:
        seen.append(int.from_bytes(body[:4], "big"))
        return dispatch(client, body)

    monkeypatch.setattr("pkcs11_shim.server.dispatch", spy)
    return seen


def test_module_answers_signature_size_queries_itself(
    env: Env, build: Build, calls: list[int]
) -> None:
    """The extended C_SignInit reply carries the signature length, so a size query or a
    short buffer costs no round trip; the module forgets the operation whenever the server
    ends it, so later queries still get the server's own answer."""
    key = env.keys["mldsa"]
    msg = b"size queries"
    out = env.child(_SIZE_QUERIES, _id(key), "1d", "4a", msg.hex(), "all", build=build)
    steps = _steps(calls)
    assert out["no_operation"] == [CKR_OPERATION_NOT_INITIALIZED, 0]
    assert steps[0][-1] == 43  # no operation known: the server answers
    single, multi = _results(out["single"]), _results(out["multi"])
    assert single[:3] == [[0, SIG], [CKR_BUFFER_TOO_SMALL, SIG], [0, SIG]]
    _mldsa_pub(key).verify(bytes.fromhex(str(single[3])), msg)
    assert steps[1] == [42, 43]  # one C_Sign crossed the wire, not three
    assert out["after_end"] == [CKR_OPERATION_NOT_INITIALIZED, 0]
    assert steps[2] == [43]
    assert multi[:2] == [[0, SIG], [0, SIG]]
    _mldsa_pub(key).verify(bytes.fromhex(str(multi[2])), msg)
    assert steps[3] == [42, 44, 44, 45]
    assert out["after_logout"] == [CKR_OPERATION_NOT_INITIALIZED, 0]
    # (extension v4: that C_SignInit repeated the session's last one, so it waited for
    # its C_Sign; the logout dropped it unsent)
    assert steps[4] == [19, 43]  # logout ended it on both sides
    assert out["after_close"] == CKR_SESSION_HANDLE_INVALID
    assert steps[5][-1] == 43


SIG = MLDSA87_SIG_LEN

# Child process for extension v4: ML-DSA and ECDSA signatures with a repeated C_SignInit,
# what ends or sends a deferred one, and (after "go" on stdin) a key migrated past its
# classical part by another application while a C_SignInit on it is deferred.
_SIGN_ONCE = r"""
import ctypes, hashlib, json, os, sys
sys.path.insert(0, sys.argv[1])
from ckclient import CK_ULONG, Module, rv_of as rv
m = Module(sys.argv[2]); m.initialize()
pin = os.environ["PQHSM_TEST_PIN"].encode()
s = m.open_session(); m.login(s, pin)
ml = m.find(s, 3, 0x4a, bytes.fromhex(sys.argv[3]))
ec = m.find(s, 3, 3, bytes.fromhex(sys.argv[4]))
stale = m.find(s, 3, 3, bytes.fromhex(sys.argv[5]))
msg, digest = b"one round trip", hashlib.sha256(b"one round trip").digest()
out = {}
info = (CK_ULONG * 4)()
def step(name, value):
    out[name] = value
    m.check("C_GetSessionInfo", CK_ULONG(s), info)
def signs(key, mech, data, n, context=None):
    got = []
    for _ in range(n):
        m.sign_init(s, mech, key, context)
        got.append(m.sign(s, data).hex())
    return got
step("mldsa", signs(ml, 0x1d, msg, 3))
step("context", signs(ml, 0x1d, msg, 2, b"ctx"))
step("ecdsa", signs(ec, 0x1041, digest, 2))
m.sign_init(s, 0x1041, ec)
step("twice", rv(m.sign_init, s, 0x1041, ec))
step("after_twice", m.sign(s, digest).hex())
step("ml_again", signs(ml, 0x1d, msg, 1))
m.sign_init(s, 0x1d, ml)
m.sign_update(s, msg[:3]); m.sign_update(s, msg[3:])
step("multi", m.sign_final(s).hex())
signs(stale, 0x1041, digest, 1)
m.sign_init(s, 0x1041, stale)
step("deferred", 0)
print("ready", flush=True)
sys.stdin.readline()
n = CK_ULONG(64)
buf = ctypes.create_string_buffer(64)
step("stale", m.call("C_Sign", CK_ULONG(s), digest, CK_ULONG(32), buf, ctypes.byref(n)))
step("stale_again", rv(m.sign_init, s, 0x1041, stale))
step("after_stale", signs(ec, 0x1041, digest, 1))
m.finalize()
print(json.dumps(out))
"""


def test_repeated_sign_init_travels_with_its_sign(env: Env, calls: list[int]) -> None:
    """Extension v4: a C_SignInit that repeats the session's last accepted one goes to the
    server with the C_Sign after it, one request (0x8001) per signature; a different
    parameter, a second C_SignInit, multi-part signing and a key that another application
    migrated meanwhile all keep PKCS#11's answers."""
    stale = env.app.create_key("ecdsa-p256", "i7-v4-stale")
    b = env.builds["plain"]
    argv = [sys.executable, "-c", _SIGN_ONCE, str(HERE), str(b.module)]
    argv += [_id(env.keys["mldsa"]), _id(env.keys["p256"]), _id(stale)]
    child_env = {**env.env(b), **pin_env(PIN)}
    with subprocess.Popen(
        argv, env=child_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        env.app.migrate(env.app.key(stale.key_id), KeyState.PQC_ONLY)  # "another app"
        child.stdin.write("go\n")
        child.stdin.flush()
        out = json.loads(child.stdout.read())
        assert child.wait(timeout=60) == 0
    steps = _steps(calls)
    once = 0x8001
    assert steps[0][-4:] == [42, 43, once, once]  # the first C_SignInit is asked, then not
    pub = _mldsa_pub(env.keys["mldsa"])
    for sig in _results(out["mldsa"]):
        pub.verify(bytes.fromhex(str(sig)), b"one round trip")
    assert steps[1] == [42, 43, once]  # another parameter (a context) is asked again
    for sig in _results(out["context"]):
        pub.verify(bytes.fromhex(str(sig)), b"one round trip", b"ctx")
    assert steps[2] == [42, 43, once]
    digest = hashlib.sha256(b"one round trip").digest()
    prehashed = utils.Prehashed(hashes.SHA256())
    for sig in [*_results(out["ecdsa"]), out["after_twice"]]:
        _verify_raw_ecdsa(env.keys["p256"], bytes.fromhex(str(sig)), digest, prehashed)
    assert out["twice"] == CKR_OPERATION_ACTIVE
    assert steps[3] == []
    assert steps[4] == [once]
    assert steps[5] == [42, 43]  # one C_SignInit is remembered per session: the ECDSA one
    pub.verify(bytes.fromhex(str(out["multi"])), b"one round trip")
    assert steps[6] == [42, 44, 44, 45]  # C_SignUpdate sends the deferred C_SignInit first
    assert steps[7] == [42, 43]  # and the last C_SignInit here is deferred: nothing sent
    assert out["stale"] == CKR_KEY_HANDLE_INVALID
    assert steps[8] == [once]
    assert out["stale_again"] == CKR_KEY_HANDLE_INVALID
    assert steps[9] == [42]
    after = bytes.fromhex(str(_results(out["after_stale"])[0]))
    _verify_raw_ecdsa(env.keys["p256"], after, digest, prehashed)
    assert steps[10] == [42, 43]  # a failed C_SignInit is not remembered


def _results(value: object) -> list[object]:
    assert isinstance(value, list)
    return value


def test_plain_protocol_keeps_size_queries_on_the_server(
    env: Env, calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the extension off (p11-kit's protocol) C_SignInit replies nothing and every
    size query goes to the server, as with p11-kit-client.so."""
    monkeypatch.setenv("PQHSM_EXTENSION", "off")
    key = env.keys["p256"]
    digest = hashlib.sha256(b"size queries").digest()
    out = env.child(_SIZE_QUERIES, _id(key), "1041", "3", digest.hex(), "single")
    single = _results(out["single"])
    assert single[:3] == [[0, 64], [CKR_BUFFER_TOO_SMALL, 64], [0, 64]]
    algo = utils.Prehashed(hashes.SHA256())
    _verify_raw_ecdsa(key, bytes.fromhex(str(single[3])), digest, algo)
    steps = _steps(calls)
    assert steps[1] == [42, 43, 43, 43]  # every query crossed the wire
    assert out["after_end"] == [CKR_OPERATION_NOT_INITIALIZED, 0]


@pytest.mark.parametrize(
    ("server", "steps"),
    [("v3", [42, 43]), ("v2", [42, 43]), ("v1", [42, 43, 43, 43])],
    ids=["v3-only server", "v2-only server", "v1-only server"],
)
def test_module_falls_back_to_older_extensions(
    env: Env, calls: list[int], monkeypatch: pytest.MonkeyPatch, server: str, steps: list[int]
) -> None:
    """An older server closes on the bytes it does not know: the module reconnects
    offering v3, then v2, then v1, and keeps every mechanism (ML-DSA signs); size queries stay in
    the module on v2 and go back to the server on v1."""
    monkeypatch.setattr("pkcs11_shim.server.EXTENSION_VERSION_4", 0x7D)
    if server != "v3":
        monkeypatch.setattr("pkcs11_shim.server.EXTENSION_VERSION_3", 0x7E)
    if server == "v1":
        monkeypatch.setattr("pkcs11_shim.server.EXTENSION_VERSION_2", 0x7F)
    key = env.keys["mldsa"]
    msg = f"{server} server".encode()
    out = env.child(_SIZE_QUERIES, _id(key), "1d", "4a", msg.hex(), "single")
    single = _results(out["single"])
    assert single[:3] == [[0, SIG], [CKR_BUFFER_TOO_SMALL, SIG], [0, SIG]]
    _mldsa_pub(key).verify(bytes.fromhex(str(single[3])), msg)
    assert _steps(calls)[1] == steps
