"""Token lab matrix: the same checks against every PKCS#11 target in ``lab.toml``.

``pqhsm lab run lab.toml --out DIR`` (also ``python -m hardware.matrix run``) writes
``DIR/report.json`` and a self-contained ``DIR/report.html`` (inline CSS, inline SVG),
prints one line per token and exits 0 when every applicable check passed, 2 when one
failed and 1 on a config error.

``lab.toml`` lists ``[[token]]`` tables with these keys:

``name`` (required), ``module`` (the PKCS#11 module's path; required except for
``pqhsm-module``), ``init`` (optional):

* ``"softhsm-temp"``: a throw-away SoftHSM2 token directory and token;
* ``"pqhsm-module"``: pqhsm's own module (``module`` defaults to
  ``pkcs11_shim/c/libpqhsm-pkcs11.so``, built by ``make -C pkcs11_shim/c``) in front of a
  temporary appliance (embedded SoftHSM2, one key per algorithm: ECDSA P-256/P-384,
  Ed25519, Ed448, ML-DSA-87) served, keystore unlocked, by ``python -m pkcs11_shim serve``;
* ``"pqhsm-server"``: the same server with a module that speaks plain p11-kit RPC
  (``p11-kit-client.so``) and two ECDSA keys;
* no ``init``: a real token (YubiHSM 2, Nitrokey HSM through OpenSC ...) named by
  ``label`` and ``pin_file`` (relative to the TOML file).

A top-level ``ops_seconds`` sets the signing-throughput window.  A target whose module file
is missing is *skipped* with that reason, not an error.

Each target is probed in a child process (``python -m hardware.matrix _probe``, spec on
stdin, JSON verdict on stdout): python-pkcs11 caches modules per path, SoftHSM2 reads
``SOFTHSM2_CONF`` once, and each token is timed as an application of its own would see
it.  The probe lists the mechanisms (``C_GetMechanismList`` + info flags), then per
algorithm (:data:`ALGORITHMS`: EC P-256, EC P-384, Ed25519, Ed448, ML-DSA-87): keygen where
the mechanism exists (otherwise "unsupported", and an existing key of that kind is used if
the token has one), sign and verify independently with ``cryptography`` from the public
key alone (``CKA_EC_POINT``, or ``CKA_VALUE`` for ML-DSA) with the main mechanism and with
each extra one the token lists (``CKM_ECDSA_SHA256``/``SHA384``), destroy what it
generated, and signing ops/s.  For the two ``pqhsm-*`` targets a migration scenario
follows: three more ECDSA keys made by the appliance, ``pqhsm migrate --all --to
PQC_ONLY``, then a check over PKCS#11 that their classical private objects are gone and,
where the module shows ML-DSA objects (pqhsm's own module), that each now has one.

Lab use only: this module talks to arbitrary modules directly, so (unlike the appliance,
where only :mod:`appliance.token.pkcs11` imports ``pkcs11``) the probe imports
python-pkcs11 itself, and only in the child.  PINs travel in files, never in argv.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from appliance.errors import ConfigError, DeviceError
from hardware.lab import child_env, make_home, run_pqhsm
from pkcs11_shim.launch import serve_argv

if TYPE_CHECKING:
    from pkcs11 import PrivateKey, PublicKey, Session

__all__ = [
    "ALGORITHMS",
    "Check",
    "LabConfig",
    "MatrixConfigError",
    "MatrixReport",
    "TokenResult",
    "TokenTarget",
    "main",
    "probe",
    "render_html",
    "run_command",
    "run_matrix",
    "run_target",
]

log = logging.getLogger(__name__)

INIT_SOFTHSM: Final = "softhsm-temp"
INIT_PQHSM: Final = "pqhsm-server"
INIT_MODULE: Final = "pqhsm-module"
INIT_MODES: Final = (INIT_SOFTHSM, INIT_PQHSM, INIT_MODULE)
#: pqhsm's own PKCS#11 module, where ``make -C pkcs11_shim/c`` (and bootstrap.sh) builds it.
OWN_MODULE: Final = Path(__file__).resolve().parents[1] / "pkcs11_shim" / "c" / "libpqhsm-pkcs11.so"
TOKEN_KEYS: Final = frozenset({"name", "module", "init", "label", "pin_file"})
TOP_KEYS: Final = frozenset({"token", "ops_seconds"})

PASS: Final = "pass"  # noqa: S105 - a check status, not a password
FAIL: Final = "fail"
UNSUPPORTED: Final = "unsupported"

P256: Final = bytes.fromhex("06082a8648ce3d030107")
P384: Final = bytes.fromhex("06052b81040022")


@dataclass(frozen=True)
class Algorithm:
    """One key kind the probe exercises.

    :param sign: the main signing mechanism (timed for ops/s), then any extra mechanisms
        checked once each (``sign-verify:NAME:MECH``).
    :param params: DER of the curve OID for ``CKA_EC_PARAMS``; ``None`` for ML-DSA, whose
        keys are matched by ``CKA_PARAMETER_SET``.
    """

    name: str
    key_type: str
    keygen: str
    sign: tuple[str, ...]
    params: bytes | None


ALGORITHMS: Final = (
    Algorithm("ec-p256", "EC", "EC_KEY_PAIR_GEN", ("ECDSA", "ECDSA_SHA256"), P256),
    Algorithm("ec-p384", "EC", "EC_KEY_PAIR_GEN", ("ECDSA", "ECDSA_SHA384"), P384),
    Algorithm(
        "ed25519", "EC_EDWARDS", "EC_EDWARDS_KEY_PAIR_GEN", ("EDDSA",), bytes.fromhex("06032b6570")
    ),
    Algorithm(
        "ed448", "EC_EDWARDS", "EC_EDWARDS_KEY_PAIR_GEN", ("EDDSA",), bytes.fromhex("06032b6571")
    ),
    Algorithm("ml-dsa-87", "ML_DSA", "ML_DSA_KEY_PAIR_GEN", ("ML_DSA",), None),
)
CKP_ML_DSA_87: Final = 3
# Mechanisms shown in the coverage table (the report keeps every mechanism in the JSON).
COVERAGE: Final = (
    "EC_KEY_PAIR_GEN",
    "ECDSA",
    "ECDSA_SHA256",
    "ECDSA_SHA384",
    "EC_EDWARDS_KEY_PAIR_GEN",
    "EDDSA",
    "ML_DSA_KEY_PAIR_GEN",
    "ML_DSA",
    "RSA_PKCS_KEY_PAIR_GEN",
    "SHA256_RSA_PKCS_PSS",
    "AES_KEY_GEN",
    "AES_GCM",
    "SHA256",
)
MIGRATION_KEYS: Final = (
    ("ecdsa-p256", "mig-1"),
    ("ecdsa-p256", "mig-2"),
    ("ecdsa-p384", "mig-3"),
)
SERVED_KEYS: Final = (("ecdsa-p256", "matrix-p256"), ("ecdsa-p384", "matrix-p384"))
#: What the pqhsm-module target serves: one key per algorithm the module's extension signs.
MODULE_KEYS: Final = (
    *SERVED_KEYS,
    ("ed25519", "matrix-ed25519"),
    ("ed448", "matrix-ed448"),
    ("ml-dsa-87", "matrix-ml-dsa"),
)
CLASSICAL_KINDS: Final = frozenset({"EC", "EC_EDWARDS"})


class MatrixConfigError(ConfigError):
    """``lab.toml`` names an unknown key, lacks a required one or has a wrong type."""


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTarget:
    """One ``[[token]]`` table of ``lab.toml``."""

    name: str
    module: str
    init: str | None = None
    label: str | None = None
    pin_file: Path | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path) -> TokenTarget:
        """Check and convert one table; ``pin_file`` is resolved against ``base``.

        :raises MatrixConfigError: unknown keys, missing ``name``/``module``, wrong types.
        """
        unknown = sorted(set(data) - TOKEN_KEYS)
        if unknown:
            raise MatrixConfigError(f"[[token]]: unknown key(s) {', '.join(unknown)}")
        if data.get("init") == INIT_MODULE and "module" not in data:
            data = {**data, "module": str(OWN_MODULE)}
        for key in ("name", "module"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise MatrixConfigError(f"[[token]]: {key!r} must be a non-empty string")
        for key in ("init", "label", "pin_file"):
            if key in data and not isinstance(data[key], str):
                raise MatrixConfigError(f"[[token]] {data['name']!r}: {key!r} must be a string")
        init = data.get("init")
        if init is not None and init not in INIT_MODES:
            raise MatrixConfigError(
                f"[[token]] {data['name']!r}: init must be one of {', '.join(INIT_MODES)}"
            )
        if init is None and "pin_file" not in data:
            raise MatrixConfigError(f"[[token]] {data['name']!r}: needs init or pin_file")
        pin_file = base / data["pin_file"] if "pin_file" in data else None
        return cls(
            name=data["name"],
            module=data["module"],
            init=init,
            label=data.get("label"),
            pin_file=pin_file,
        )


@dataclass(frozen=True)
class LabConfig:
    """The whole of ``lab.toml``."""

    tokens: tuple[TokenTarget, ...]
    ops_seconds: float = 1.5

    @classmethod
    def from_toml(cls, path: Path) -> LabConfig:
        """Load and check ``path``.

        :raises MatrixConfigError: unreadable file, bad TOML or a bad table.
        """
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise MatrixConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MatrixConfigError(f"{path}: {exc}") from None
        unknown = sorted(set(data) - TOP_KEYS)
        if unknown:
            raise MatrixConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
        tables = data.get("token")
        if not isinstance(tables, list) or not tables:
            raise MatrixConfigError(f"{path}: needs at least one [[token]] table")
        ops = data.get("ops_seconds", 1.5)
        if not isinstance(ops, int | float) or not 0 < ops <= 60:
            raise MatrixConfigError(f"{path}: ops_seconds must be a number in (0, 60]")
        tokens = tuple(TokenTarget.from_dict(t, path.parent) for t in tables)
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise MatrixConfigError(f"{path}: token names must be unique")
        return cls(tokens=tokens, ops_seconds=float(ops))


# -- results -----------------------------------------------------------------------------------


@dataclass
class Check:
    """One timed check: ``status`` is ``pass``, ``fail`` or ``unsupported``."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class TokenResult:
    """Everything the matrix learned about one target."""

    name: str
    module: str
    init: str | None
    status: str = "ran"  # ran | skipped | error
    reason: str = ""
    token: dict[str, str] = field(default_factory=dict)
    mechanisms: dict[str, list[str]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    ops: dict[str, float] = field(default_factory=dict)  # algorithm -> signatures/s

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self) -> bool:
        """True unless a check failed or the probe itself broke (skipped targets are ok)."""
        return self.status != "error" and not self.failed

    @property
    def verdict(self) -> str:
        """``pass``, ``fail``, ``skipped`` or ``error``."""
        if self.status != "ran":
            return self.status
        return PASS if self.ok else FAIL

    def summary(self) -> str:
        """One line for the terminal."""
        if self.status == "skipped":
            return f"{self.name}: skipped: {self.reason}"
        if self.status == "error":
            return f"{self.name}: ERROR: {self.reason}"
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in (PASS, FAIL)}
        unsup = len(self.checks) - counts[PASS] - counts[FAIL]
        ops = ", ".join(f"{alg} {v:.0f} ops/s" for alg, v in self.ops.items())
        verdict = "ok" if self.ok else "FAILED " + ",".join(c.name for c in self.failed)
        return (
            f"{self.name}: {verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, "
            f"{unsup} unsupported, {len(self.mechanisms)} mechanisms" + (f"; {ops}" if ops else "")
        )


@dataclass
class MatrixReport:
    """The whole run."""

    created: str
    machine: dict[str, str]
    ops_seconds: float
    tokens: list[TokenResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every applicable check passed, else 2."""
        return 0 if all(t.ok for t in self.tokens) else 2

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "created": self.created,
            "machine": self.machine,
            "ops_seconds": self.ops_seconds,
            "passed": self.exit_code == 0,
            "tokens": [asdict(t) for t in self.tokens],
        }


def machine_info() -> dict[str, str]:
    """Platform, Python version and host name for the report header."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "node": platform.node(),
    }


# -- the probe (child process) -----------------------------------------------------------------


def _unwrap_point(data: bytes) -> bytes:
    """``CKA_EC_POINT`` is a DER OCTET STRING; some modules give the raw point."""
    if len(data) >= 2 and data[0] == 0x04:
        n = data[1]
        if n < 0x80 and len(data) == 2 + n:
            return data[2:]
        if n == 0x81 and len(data) >= 3 and len(data) == 3 + data[2]:
            return data[3:]
    return data


def _verify(alg: Algorithm, mech: str, public: bytes, message: bytes, signature: bytes) -> None:
    """Verify with ``cryptography`` from the public key alone; raise on a bad signature.

    ``public`` is ``CKA_EC_POINT`` for EC and EdDSA keys, ``CKA_VALUE`` for ML-DSA.
    ``CKM_ECDSA`` signed the SHA-256 digest; ``CKM_ECDSA_SHA*`` and the others the message.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa
    from cryptography.hazmat.primitives.asymmetric.utils import (
        Prehashed,
        encode_dss_signature,
    )

    if alg.key_type == "ML_DSA":
        mldsa.MLDSA87PublicKey.from_public_bytes(public).verify(signature, message)
        return
    raw = _unwrap_point(public)
    if alg.name == "ed25519":
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        return
    if alg.name == "ed448":
        ed448.Ed448PublicKey.from_public_bytes(raw).verify(signature, message)
        return
    curve: ec.EllipticCurve = ec.SECP256R1() if alg.params == P256 else ec.SECP384R1()
    pub = ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)
    half = len(signature) // 2
    der = encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )
    if mech == "ECDSA":
        digest = hashlib.sha256(message).digest()
        pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return
    hash_alg: hashes.HashAlgorithm = hashes.SHA384() if mech == "ECDSA_SHA384" else hashes.SHA256()
    pub.verify(der, message, ec.ECDSA(hash_alg))


def _sign(mech: str, priv: PrivateKey, message: bytes) -> bytes:
    """``CKM_ECDSA`` signs the SHA-256 digest; every other mechanism signs the message."""
    from pkcs11 import Mechanism
    from pkcs11.types import SignMixin

    data = hashlib.sha256(message).digest() if mech == "ECDSA" else message
    if not isinstance(priv, SignMixin):
        raise TypeError("not a signing key")
    return bytes(priv.sign(data, mechanism=Mechanism[mech]))


def _public_bytes(alg: Algorithm, pub: PublicKey) -> bytes:
    from pkcs11 import Attribute

    return bytes(pub[Attribute.VALUE if alg.params is None else Attribute.EC_POINT])


@contextmanager
def _timed(checks: list[Check], name: str) -> Iterator[Check]:
    """Append a check that passes unless the block raises or sets another status."""
    check = Check(name=name, status=PASS)
    start = time.perf_counter()
    try:
        yield check
    except Exception as exc:  # noqa: BLE001 - a failing token must not stop the matrix
        check.status = FAIL
        check.detail = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        check.seconds = round(time.perf_counter() - start, 6)
        checks.append(check)


def _ulong(value: Any) -> int:
    """A CK_ULONG attribute as python-pkcs11 hands it out (an int, or raw native bytes)."""
    if isinstance(value, int):
        return value
    return int.from_bytes(bytes(value), sys.byteorder)


def _matches(alg: Algorithm, obj: Any) -> bool:
    from pkcs11 import Attribute

    if alg.params is None:
        return _ulong(obj[Attribute.PARAMETER_SET]) == CKP_ML_DSA_87
    return bytes(obj[Attribute.EC_PARAMS]) == alg.params


def _find_existing(session: Session, alg: Algorithm) -> tuple[PublicKey, PrivateKey] | None:
    """A keypair of ``alg`` already on the token (the public half found by ``CKA_ID``)."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    # list(): a half-consumed search would make the next one raise OperationActive.
    candidates = list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType[alg.key_type]}
        )
    )
    for obj in candidates:
        try:
            if not _matches(alg, obj):
                continue
            cka_id = bytes(obj[Attribute.ID])
        except Exception:  # noqa: BLE001, S112 - an unreadable object is not a candidate
            continue
        pubs = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: KeyType[alg.key_type],
                    Attribute.ID: cka_id,
                }
            )
        )
        if pubs:
            return pubs[0], obj  # type: ignore[return-value]
    return None


def _private_objects(session: Session) -> list[list[str]]:
    """``[label, key type]`` of every private-key object visible in ``session``, sorted."""
    from pkcs11 import Attribute, ObjectClass

    found = []
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        try:
            label = str(obj[Attribute.LABEL])
        except Exception:  # noqa: BLE001 - keep counting objects without a label
            label = ""
        try:
            kt = obj[Attribute.KEY_TYPE]
            kind = str(getattr(kt, "name", None) or f"0x{int(kt):x}")
        except Exception:  # noqa: BLE001 - an unreadable key type is still an object
            kind = "?"
        found.append([label, kind])
    return sorted(found)


def _generate(session: Session, alg: Algorithm) -> tuple[PublicKey, PrivateKey]:
    from pkcs11 import Attribute, KeyType, Mechanism

    label = f"pqhsm-matrix-{alg.name}"
    if alg.params is None:
        pair = session.generate_keypair(
            KeyType[alg.key_type],
            store=True,
            label=label,
            mechanism=Mechanism[alg.keygen],
            public_template={Attribute.PARAMETER_SET: CKP_ML_DSA_87},
        )
    else:
        dom = session.create_domain_parameters(
            KeyType[alg.key_type], {Attribute.EC_PARAMS: alg.params}, local=True
        )
        pair = dom.generate_keypair(store=True, label=label, mechanism=Mechanism[alg.keygen])
    return pair


def _run_algorithm(
    session: Session,
    alg: Algorithm,
    mechs: set[str],
    ops_seconds: float,
    result: dict[str, Any],
    *,
    keygen_optional: bool,
) -> None:
    """Keygen, sign/verify (every mechanism), ops/s and destroy for one algorithm.

    :param keygen_optional: a token error from ``C_GenerateKeyPair`` means "unsupported"
        (a module in front of an appliance, where keys are made by the operator).
    """
    from pkcs11.exceptions import FunctionNotSupported, MechanismInvalid, PKCS11Error

    name = alg.name
    checks: list[Check] = result["checks"]
    keypair: tuple[PublicKey, PrivateKey] | None = None
    generated = False
    keygen = Check(f"keygen:{name}", UNSUPPORTED, detail=f"no {alg.keygen}")
    if alg.keygen in mechs:
        with _timed(checks, f"keygen:{name}") as keygen:
            try:
                keypair = _generate(session, alg)
                generated = True
                keygen.detail = alg.keygen
            except PKCS11Error as exc:
                # Advertised but not usable: not a failure where keygen is optional, nor
                # anywhere the module says it has no such function.
                if not keygen_optional and not isinstance(
                    exc, FunctionNotSupported | MechanismInvalid
                ):
                    raise
                keygen.status = UNSUPPORTED
                keygen.detail = f"{alg.keygen} advertised; C_GenerateKeyPair: {type(exc).__name__}"
    else:
        checks.append(keygen)
    if keypair is None and keygen.status == UNSUPPORTED:
        keypair = _find_existing(session, alg)
        if keypair is not None:
            keygen.detail += "; using an existing key"
    try:
        main_mech = alg.sign[0]
        if keypair is None or main_mech not in mechs:
            why = f"no {main_mech}" if main_mech not in mechs else "no key"
            checks.append(Check(f"sign-verify:{name}", UNSUPPORTED, detail=why))
            return
        pub, priv = keypair
        public = _public_bytes(alg, pub)
        message = f"pqhsm token matrix {name} {secrets.token_hex(8)}".encode()
        with _timed(checks, f"sign-verify:{name}") as check:
            signature = _sign(main_mech, priv, message)
            _verify(alg, main_mech, public, message, signature)
            check.detail = f"{main_mech}, {len(signature)}-byte signature verified"
        if check.status != PASS:
            return
        for mech in alg.sign[1:]:
            if mech not in mechs:
                checks.append(Check(f"sign-verify:{name}:{mech}", UNSUPPORTED, detail=f"no {mech}"))
                continue
            with _timed(checks, f"sign-verify:{name}:{mech}") as check:
                signature = _sign(mech, priv, message)
                _verify(alg, mech, public, message, signature)
                check.detail = f"{mech}, {len(signature)}-byte signature verified"
        with _timed(checks, f"ops:{name}") as check:
            count, last = 0, b""
            start = time.perf_counter()
            deadline = start + ops_seconds
            while time.perf_counter() < deadline:
                last = _sign(main_mech, priv, message)
                count += 1
            elapsed = time.perf_counter() - start
            _verify(alg, main_mech, public, message, last)
            result["ops"][name] = round(count / elapsed, 1)
            check.detail = f"{count} signatures in {elapsed:.2f} s; last one verified"
    finally:
        if keypair is not None and generated:
            _destroy(checks, name, keypair)
        elif keypair is not None:
            checks.append(Check(f"destroy:{name}", UNSUPPORTED, detail="existing key kept"))


def _destroy(checks: list[Check], name: str, keypair: tuple[PublicKey, PrivateKey]) -> None:
    """Destroy a generated keypair where the token allows it (``CKA_DESTROYABLE``)."""
    from pkcs11 import Attribute
    from pkcs11.exceptions import PKCS11Error

    try:
        allowed = bool(keypair[1][Attribute.DESTROYABLE])
    except PKCS11Error:
        allowed = True  # a v2.20 module without the attribute: try it
    if not allowed:
        checks.append(Check(f"destroy:{name}", UNSUPPORTED, detail="CKA_DESTROYABLE is false"))
        return
    with _timed(checks, f"destroy:{name}") as check:
        for obj in keypair:
            obj.destroy()
        check.detail = "public and private object destroyed"


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a child process: load ``spec["module"]`` and run every check.

    ``spec``: ``module``, ``label`` (or null: the first token), ``pin_file``,
    ``ops_seconds``, ``mode`` (``"checks"`` or ``"objects"``: only list private keys),
    ``keygen_optional``, and for a fresh SoftHSM2 token ``init_label`` and ``so_pin_file``.
    """
    import pkcs11
    from pkcs11 import Mechanism, MechanismFlag

    result: dict[str, Any] = {"token": {}, "mechanisms": {}, "checks": [], "ops": {}}
    pin = Path(spec["pin_file"]).read_bytes().strip()
    if spec.get("init_label"):
        from appliance.secret import SecretBytes
        from appliance.token.initdev import init_token

        so_pin = Path(spec["so_pin_file"]).read_bytes().strip()
        init_token(spec["module"], spec["init_label"], SecretBytes(so_pin), SecretBytes(pin))
    lib = pkcs11.lib(spec["module"])
    label = spec.get("label")
    tokens = list(lib.get_tokens(token_label=label) if label else lib.get_tokens())
    if not tokens:
        # A lab token that is not plugged in: reported as skipped, not as a failure.
        result["skipped"] = f"no token labelled {label!r}" if label else "no token present"
        return result
    token = tokens[0]
    result["token"] = {
        "label": token.label,
        "manufacturer": token.manufacturer_id,
        "model": token.model,
        "serial": token.serial.decode("ascii", "replace"),
        "slot": token.slot.slot_description,
        "library": f"{lib.manufacturer_id} {lib.library_description} {lib.library_version}",
    }
    mechs: set[str] = set()
    for mech in sorted(token.slot.get_mechanisms(), key=int):
        # get_mechanisms() gives plain ints for vendor mechanisms despite its annotation.
        try:
            mname = Mechanism(int(mech)).name
        except ValueError:
            mname = f"0x{int(mech):08x}"
        mechs.add(mname)
        try:
            flags = token.slot.get_mechanism_info(mech).flags
            result["mechanisms"][mname] = [f.name for f in MechanismFlag if f in flags and f.name]
        except Exception as exc:  # noqa: BLE001 - record it and go on
            result["mechanisms"][mname] = [f"info failed: {type(exc).__name__}"]
    try:
        session = token.open(rw=True, user_pin=pin.decode())
    except pkcs11.exceptions.PKCS11Error:
        session = token.open(user_pin=pin.decode())
    with session:
        result["private_objects"] = _private_objects(session)
        result["private_labels"] = sorted(label for label, _ in result["private_objects"])
        if spec.get("mode") == "objects":
            return result
        for alg in ALGORITHMS:
            _run_algorithm(
                session,
                alg,
                mechs,
                float(spec["ops_seconds"]),
                result,
                keygen_optional=bool(spec.get("keygen_optional")),
            )
    result["checks"] = [asdict(c) for c in result["checks"]]
    return result


def _probe_main() -> int:
    """``python -m hardware.matrix _probe``: spec JSON on stdin, verdict JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(probe(spec)) + "\n")
    return 0


# -- the parent --------------------------------------------------------------------------------


def _write_secret(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def _run_probe(spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run :func:`probe` in a child; return its verdict.

    :raises DeviceError: the child failed or timed out.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hardware.matrix", "_probe"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise DeviceError(f"probe timed out after {timeout:g} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DeviceError(f"probe failed (rc={proc.returncode}): {tail[0][:300]}")
    verdict: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return verdict


def _fill(result: TokenResult, verdict: dict[str, Any]) -> None:
    """Copy a probe's verdict; no token is a skip for a real token, an error otherwise."""
    if verdict.get("skipped"):
        result.status = "error" if result.init else "skipped"
        result.reason = str(verdict["skipped"])
        return
    result.token = {k: str(v) for k, v in verdict["token"].items()}
    result.mechanisms = verdict["mechanisms"]
    result.checks.extend(Check(**c) for c in verdict["checks"])
    result.ops = {k: float(v) for k, v in verdict["ops"].items()}


@contextmanager
def _served(home: Path, secrets_dir: Path, *, unlock: bool = False) -> Iterator[str]:
    """Run ``python -m pkcs11_shim serve`` on ``home``; yield its socket address.

    :param unlock: also unlock the keystore (ML-DSA signing opens blobs).
    """
    sockdir = Path(tempfile.mkdtemp(prefix="p11mx"))  # short: AF_UNIX paths max 107 bytes
    argv = serve_argv(home, sockdir / "p11.sock", secrets_dir, unlock=unlock)
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None  # noqa: S101 - PIPE above
        line = proc.stdout.readline().strip()
        if not line.startswith("P11_KIT_SERVER_ADDRESS="):
            proc.kill()
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise DeviceError(f"pkcs11_shim did not start: {err.strip()[-300:]}")
        yield line.split("=", 1)[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def _client_env(address: str) -> dict[str, str]:
    """What a module in front of the server needs: p11-kit-client and pqhsm's own module."""
    return {**child_env(), "P11_KIT_SERVER_ADDRESS": address, "PQHSM_SERVER_ADDRESS": address}


def _kinds(objects: list[list[str]], labels: set[str]) -> dict[str, set[str]]:
    """``label -> key types`` of the private objects whose label is in ``labels``."""
    out: dict[str, set[str]] = {label: set() for label in labels}
    for label, kind in objects:
        if label in out:
            out[label].add(kind)
    return out


def _migration_check(
    target: TokenTarget,
    home: Path,
    secrets_dir: Path,
    before: list[list[str]],
    timeout: float,
) -> Check:
    """Migrate every key to PQC_ONLY with ``pqhsm``; check over PKCS#11 what is served.

    Every classical private object (EC, EdDSA) of the migrated keys must be gone.  Where
    the module shows ML-DSA objects (pqhsm's own module), each migrated key must now have
    one, so the check also proves the post-quantum half arrived.
    """
    check = Check(name="migration:pqc-only", status=FAIL)
    start = time.perf_counter()
    try:
        labels = {label for _, label in MIGRATION_KEYS}
        was = _kinds(before, labels)
        missing = sorted(label for label, kinds in was.items() if not kinds & CLASSICAL_KINDS)
        if missing:
            check.detail = f"before migration, no classical private object for {missing}"
            return check
        run_pqhsm(home, "migrate", "--all", "--to", "PQC_ONLY", "--json")
        with _served(home, secrets_dir) as address:
            spec = {
                "module": target.module,
                "pin_file": str(secrets_dir / "token-pin"),
                "mode": "objects",
            }
            after = _run_probe(spec, _client_env(address), timeout)["private_objects"]
        now = _kinds(after, labels)
        left = sorted(label for label, kinds in now.items() if kinds & CLASSICAL_KINDS)
        shows_mldsa = any(kind == "ML_DSA" for _, kind in [*before, *after])
        no_pqc = sorted(label for label, kinds in now.items() if "ML_DSA" not in kinds)
        n_before = sum(1 for _, kind in before if kind in CLASSICAL_KINDS)
        n_after = sum(1 for _, kind in after if kind in CLASSICAL_KINDS)
        if left:
            check.detail = f"classical private objects still served after PQC_ONLY: {left}"
        elif shows_mldsa and no_pqc:
            check.detail = f"no ML-DSA private object served after PQC_ONLY for {no_pqc}"
        else:
            check.status = PASS
            check.detail = (
                f"{len(labels)} keys migrated; classical private objects "
                f"{n_before} -> {n_after}"
                + (f"; ML-DSA objects for all {len(labels)}" if shows_mldsa else "")
            )
    except DeviceError as exc:
        check.detail = str(exc)[:300]
    finally:
        check.seconds = round(time.perf_counter() - start, 6)
    return check


def _served_target(
    result: TokenResult, target: TokenTarget, work: Path, ops_seconds: float, timeout: float
) -> None:
    """A module in front of a temporary appliance: probe it, then the migration scenario."""
    own = target.init == INIT_MODULE
    home, secrets_dir = make_home(work, (*(MODULE_KEYS if own else SERVED_KEYS), *MIGRATION_KEYS))
    spec = {
        "module": target.module,
        "label": target.label,
        "pin_file": str(secrets_dir / "token-pin"),
        "ops_seconds": ops_seconds,
        "keygen_optional": True,  # keys are the operator's to make, not a client's
    }
    with _served(home, secrets_dir, unlock=own) as address:
        verdict = _run_probe(spec, _client_env(address), timeout)
    _fill(result, verdict)
    if result.status == "ran":
        before = verdict["private_objects"]
        result.checks.append(_migration_check(target, home, secrets_dir, before, timeout))


def run_target(target: TokenTarget, work: Path, ops_seconds: float) -> TokenResult:
    """Probe one target (in child processes); never raises for a token's failure."""
    result = TokenResult(name=target.name, module=target.module, init=target.init)
    if not Path(target.module).is_file():
        result.status = "skipped"
        result.reason = f"module not found at {target.module}"
        if target.init == INIT_MODULE:
            result.reason += " (build it with `make -C pkcs11_shim/c`)"
        return result
    timeout = 60 + 8 * ops_seconds
    work.mkdir(parents=True, exist_ok=True)
    try:
        if target.init == INIT_SOFTHSM:
            tokens = work / "tokens"
            tokens.mkdir(mode=0o700)
            conf = work / "softhsm2.conf"
            conf.write_text(
                f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
            )
            spec = {
                "module": target.module,
                "label": target.label or "matrix",
                "init_label": target.label or "matrix",
                "pin_file": str(_write_secret(work / "pin", secrets.token_hex(8))),
                "so_pin_file": str(_write_secret(work / "so-pin", secrets.token_hex(8))),
                "ops_seconds": ops_seconds,
            }
            _fill(result, _run_probe(spec, {**child_env(), "SOFTHSM2_CONF": str(conf)}, timeout))
        elif target.init in (INIT_PQHSM, INIT_MODULE):
            _served_target(result, target, work, ops_seconds, timeout)
        else:
            if target.pin_file is None or not target.pin_file.is_file():
                result.status = "skipped"
                result.reason = f"pin file not found at {target.pin_file}"
                return result
            spec = {
                "module": target.module,
                "label": target.label,
                "pin_file": str(target.pin_file),
                "ops_seconds": ops_seconds,
            }
            _fill(result, _run_probe(spec, dict(os.environ), timeout))
    except DeviceError as exc:
        result.status = "error"
        result.reason = str(exc)
    return result


def run_matrix(config: LabConfig, work: Path) -> MatrixReport:
    """Run every target of ``config``; ``work`` receives one directory per target."""
    report = MatrixReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_info(),
        ops_seconds=config.ops_seconds,
    )
    for i, target in enumerate(config.tokens):
        log.info("probing %s (%s)", target.name, target.module)
        result = run_target(target, work / f"token-{i}", config.ops_seconds)
        log.info("%s", result.summary())
        report.tokens.append(result)
    return report


# -- HTML --------------------------------------------------------------------------------------

_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;font-size:.92em;vertical-align:top} th{background:#f3f3f3}
.pass{color:#11772d;font-weight:600} .fail{color:#b00020;font-weight:700}
.unsupported,.skipped{color:#777} .error{color:#b00020;font-weight:700}
.yes{color:#11772d;text-align:center} .no{color:#b00020;text-align:center}
code{font-size:.9em} .meta td:first-child{font-weight:600} details{margin:.4em 0}
"""
_PALETTE: Final = ("#3b6fb6", "#d9822b", "#4f9a55", "#9b59b6", "#c0392b", "#16a085")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _bar_chart(report: MatrixReport) -> str:
    """Horizontal bars: signatures per second for each (token, algorithm)."""
    bars = [(t.name, alg, v) for t in report.tokens for alg, v in t.ops.items()]
    if not bars:
        return "<p>No signing throughput was measured.</p>"
    row, label_w, chart_w = 26, 330, 420
    top = max(v for _, _, v in bars) or 1.0
    height = row * len(bars) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + chart_w + 90}" '
        f'height="{height}" role="img" aria-label="signatures per second">'
    ]
    algs = sorted({alg for _, alg, _ in bars})
    for i, (token, alg, value) in enumerate(bars):
        y = 10 + i * row
        w = max(1.0, chart_w * value / top)
        color = _PALETTE[algs.index(alg) % len(_PALETTE)]
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" font-size="12">'
            f"{_e(token)} · {_e(alg)}</text>"
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 8}" '
            f'fill="{color}"><title>{_e(token)} {_e(alg)}: {value:.1f} ops/s</title></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12">{value:.0f}</text>'
        )
    axis_y = 10 + len(bars) * row
    parts.append(
        f'<line x1="{label_w}" y1="8" x2="{label_w}" y2="{axis_y}" stroke="#444"/>'
        f'<text x="{label_w}" y="{axis_y + 14}" font-size="11">0</text>'
        f'<text x="{label_w + chart_w}" y="{axis_y + 14}" font-size="11" '
        f'text-anchor="end">{top:.0f} signatures/s</text></svg>'
    )
    return "".join(parts)


def _coverage(report: MatrixReport) -> str:
    ran = [t for t in report.tokens if t.status == "ran"]
    if not ran:
        return "<p>No token was probed.</p>"
    head = "".join(f"<th>{_e(t.name)}</th>" for t in ran)
    rows = []
    for mech in COVERAGE:
        cells = "".join(
            '<td class="yes">✓</td>' if mech in t.mechanisms else '<td class="no">✗</td>'
            for t in ran
        )
        rows.append(f"<tr><td><code>CKM_{_e(mech)}</code></td>{cells}</tr>")
    total = "".join(f"<td>{len(t.mechanisms)}</td>" for t in ran)
    rows.append(f"<tr><th>mechanisms advertised</th>{total}</tr>")
    return f"<table><tr><th>mechanism</th>{head}</tr>{''.join(rows)}</table>"


def _token_section(t: TokenResult) -> str:
    meta = [("module", t.module), ("init", t.init or "real token"), ("status", t.status)]
    if t.reason:
        meta.append(("reason", t.reason))
    meta.extend((k, v) for k, v in t.token.items())
    out = [f"<h3>{_e(t.name)}</h3><table class='meta'>"]
    out.extend(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta)
    out.append("</table>")
    if t.checks:
        out.append("<table><tr><th>check</th><th>result</th><th>time (ms)</th><th>detail</th></tr>")
        out.extend(
            f"<tr><td>{_e(c.name)}</td><td class='{_e(c.status)}'>{_e(c.status)}</td>"
            f"<td>{c.seconds * 1000:.1f}</td><td>{_e(c.detail)}</td></tr>"
            for c in t.checks
        )
        out.append("</table>")
    if t.mechanisms:
        items = "".join(
            f"<tr><td><code>{_e(m)}</code></td><td>{_e(' '.join(f))}</td></tr>"
            for m, f in t.mechanisms.items()
        )
        out.append(
            f"<details><summary>all {len(t.mechanisms)} mechanisms with flags</summary>"
            f"<table><tr><th>mechanism</th><th>flags</th></tr>{items}</table></details>"
        )
    return "".join(out)


def render_html(report: MatrixReport) -> str:
    """A self-contained page: inline CSS and SVG, every token-supplied string escaped."""
    machine = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in report.machine.items()
    )
    summary = "".join(
        f"<tr><td>{_e(t.name)}</td><td class='{_e(t.verdict)}'>{_e(t.verdict)}</td>"
        f"<td>{_e(t.summary())}</td></tr>"
        for t in report.tokens
    )
    verdict = "all applicable checks passed" if report.exit_code == 0 else "FAILURES"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>pqhsm token lab matrix {_e(report.created)}</title><style>{_CSS}</style>"
        "</head><body>"
        f"<h1>pqhsm token lab matrix</h1><p>{_e(report.created)}: <strong>{verdict}</strong>"
        f" (signing window {report.ops_seconds:g} s)</p>"
        f"<h2>Machine</h2><table class='meta'>{machine}</table>"
        f"<h2>Summary</h2><table><tr><th>token</th><th>verdict</th><th>details</th></tr>"
        f"{summary}</table>"
        f"<h2>Signing throughput</h2>{_bar_chart(report)}"
        f"<h2>Mechanism coverage</h2>{_coverage(report)}"
        f"<h2>Checks per token</h2>{''.join(_token_section(t) for t in report.tokens)}"
        "</body></html>\n"
    )


def write_reports(report: MatrixReport, out: Path) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


# -- entry point -------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    """Run a lab: ``args`` has ``config``, ``out``, ``ops_seconds`` and ``work`` (paths).

    Shared by ``pqhsm lab run`` and ``python -m hardware.matrix run``.  A config error is
    one line on standard error and exit status 1; otherwise one summary line per token,
    then 0 when every applicable check passed, 2 when one failed.
    """
    try:
        config = LabConfig.from_toml(args.config)
        if args.ops_seconds is not None:
            if not 0 < args.ops_seconds <= 60:
                raise MatrixConfigError("--ops-seconds must be in (0, 60]")
            config = LabConfig(tokens=config.tokens, ops_seconds=args.ops_seconds)
    except MatrixConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    try:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="pqhsm-matrix-", dir=args.work))  # fresh per run
    except OSError as exc:
        sys.stderr.write(f"error: cannot make a work folder under {args.work}: {exc.strerror}\n")
        return 1
    try:
        report = run_matrix(config, work)
    finally:
        if args.work is None:
            with suppress(OSError):
                shutil.rmtree(work)
    try:
        json_path, html_path = write_reports(report, args.out)
    except OSError as exc:
        sys.stderr.write(f"error: cannot write the reports to {args.out}: {exc.strerror}\n")
        return 1
    for t in report.tokens:
        sys.stdout.write(t.summary() + "\n")
    sys.stdout.flush()
    log.info("reports: %s %s", json_path, html_path)
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hardware.matrix run LAB.toml [--out DIR] [--ops-seconds S]``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["_probe"]:
        return _probe_main()
    parser = argparse.ArgumentParser(prog="python -m hardware.matrix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="probe every token of a lab.toml")
    p.add_argument("config", type=Path, help="lab.toml")
    p.add_argument("--out", type=Path, default=Path("matrix-report"), help="report directory")
    p.add_argument("--ops-seconds", type=float, help="override the signing window (seconds)")
    p.add_argument("--work", type=Path, help="keep each run's token directories under here")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
