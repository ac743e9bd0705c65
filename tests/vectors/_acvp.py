"""Typed loader for the NIST ACVP vector subsets in this directory.

Each JSON file is read as bytes, its SHA-256 is compared with :data:`PINNED_SHA256` (the
same values are recorded in ``PROVENANCE.md``; ``test_*_acvp.py`` checks that the two
agree), and only then parsed.  A file that was edited by hand, re-generated or truncated
therefore fails at collection time instead of quietly testing something else.

The ``TypedDict`` classes mirror the field names of the files (see
``/work/shared/vectors/README.md`` and ``PROVENANCE.md``); fields that only some groups
carry are ``NotRequired``.  Byte values are uppercase hex strings: decode with :func:`h`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal, NotRequired, TypedDict, cast

__all__ = [
    "PINNED_SHA256",
    "VECTOR_DIR",
    "KemEncapDecapCase",
    "KemEncapDecapFile",
    "KemEncapDecapGroup",
    "KemKeyGenCase",
    "KemKeyGenFile",
    "MlDsaKeyGenCase",
    "MlDsaKeyGenFile",
    "MlDsaSigGenCase",
    "MlDsaSigGenFile",
    "MlDsaSigGenGroup",
    "MlDsaSigVerCase",
    "MlDsaSigVerFile",
    "MlDsaSigVerGroup",
    "h",
    "load_mldsa87_keygen",
    "load_mldsa87_siggen",
    "load_mldsa87_sigver",
    "load_mlkem1024_encapdecap",
    "load_mlkem1024_keygen",
    "read_pinned",
]

VECTOR_DIR: Final = Path(__file__).resolve().parent

#: SHA-256 of each copied file, as shipped in this directory (not of the upstream files,
#: which are larger; those hashes are in PROVENANCE.md and in each file's ``source``).
PINNED_SHA256: Final[Mapping[str, str]] = {
    "ml-dsa-87-keygen.json": "0b6cb1c71b19864141d6784e5fbdda1facce810acaee45f7c2cef550f849f8b6",
    "ml-dsa-87-siggen.json": "0aaef6dae4af74ba4e5885d2ff6b411b5903dcb701a149751461d209ff86eeec",
    "ml-dsa-87-sigver.json": "858021609ebe2e8f40a2892ceb9e09dbadfb12fc185d7d830fd187f9ff8281a7",
    "ml-kem-1024-encapdecap.json": (
        "1022f641b5cf3b9c02fc8af390b66de3b40b22c0efd2ca135c9464a414299166"
    ),
    "ml-kem-1024-keygen.json": "be5723dd2a98d6b2ba7fb958eead9226375f6d147e26df38785c5b7e2bb658f9",
}


# -- common ------------------------------------------------------------------------------


class SourceFile(TypedDict):
    path: str
    bytes: int
    sha256: str
    gitBlob: str


class Source(TypedDict):
    repository: str
    tag: str
    commit: str
    files: list[SourceFile]


# -- ML-DSA-87 ---------------------------------------------------------------------------


class MlDsaKeyGenCase(TypedDict):
    tcId: int
    seed: str
    pk: str
    sk: str


class MlDsaKeyGenGroup(TypedDict):
    tgId: int
    testType: str
    parameterSet: str
    tests: list[MlDsaKeyGenCase]


class MlDsaKeyGenFile(TypedDict):
    source: Source
    algorithm: str
    mode: str
    revision: str
    testGroups: list[MlDsaKeyGenGroup]


class MlDsaSigGenCase(TypedDict):
    tcId: int
    signature: str
    seed: NotRequired[str]  # keyFormat "seed"
    sk: NotRequired[str]  # keyFormat "expanded"
    message: NotRequired[str]  # every group except externalMu
    mu: NotRequired[str]  # internal interface, externalMu groups
    context: NotRequired[str]  # external interface
    hashAlg: NotRequired[str]  # preHash groups
    rnd: NotRequired[str]  # deterministic == False


class MlDsaSigGenGroup(TypedDict):
    tgId: int
    testType: str
    parameterSet: str
    keyFormat: Literal["seed", "expanded"]
    deterministic: bool
    signatureInterface: Literal["external", "internal"]
    preHash: NotRequired[Literal["pure", "preHash"]]  # external groups only
    externalMu: NotRequired[bool]  # internal groups only
    tests: list[MlDsaSigGenCase]


class MlDsaSigGenFile(TypedDict):
    source: Source
    algorithm: str
    mode: str
    revision: str
    testGroups: list[MlDsaSigGenGroup]


class MlDsaSigVerCase(TypedDict):
    tcId: int
    pk: str
    signature: str
    hashAlg: str  # "none" unless preHash
    testPassed: bool
    reason: str
    message: NotRequired[str]
    mu: NotRequired[str]
    context: NotRequired[str]


class MlDsaSigVerGroup(TypedDict):
    tgId: int
    testType: str
    parameterSet: str
    signatureInterface: Literal["external", "internal"]
    preHash: Literal["pure", "preHash", "none"]
    externalMu: bool
    tests: list[MlDsaSigVerCase]


class MlDsaSigVerFile(TypedDict):
    source: Source
    algorithm: str
    mode: str
    revision: str
    testGroups: list[MlDsaSigVerGroup]


# -- ML-KEM-1024 -------------------------------------------------------------------------


class KemKeyGenCase(TypedDict):
    tcId: int
    d: str
    z: str
    ek: str
    dk: str


class KemKeyGenGroup(TypedDict):
    tgId: int
    testType: str
    parameterSet: str
    tests: list[KemKeyGenCase]


class KemKeyGenFile(TypedDict):
    source: Source
    algorithm: str
    mode: str
    revision: str
    testGroups: list[KemKeyGenGroup]


class KemEncapDecapCase(TypedDict):
    tcId: int
    ek: str
    dk: str
    m: NotRequired[str]  # encapsulation
    c: NotRequired[str]  # encapsulation, decapsulation
    k: NotRequired[str]  # encapsulation, decapsulation
    d: NotRequired[str]  # decapsulation
    z: NotRequired[str]  # decapsulation
    testPassed: NotRequired[bool]  # key checks
    reason: NotRequired[str]  # decapsulation, key checks


class KemEncapDecapGroup(TypedDict):
    tgId: int
    testType: str
    parameterSet: str
    function: Literal[
        "encapsulation", "decapsulation", "encapsulationKeyCheck", "decapsulationKeyCheck"
    ]
    keyFormat: Literal["none", "seed", "expanded"]
    tests: list[KemEncapDecapCase]


class KemEncapDecapFile(TypedDict):
    source: Source
    algorithm: str
    mode: str
    revision: str
    testGroups: list[KemEncapDecapGroup]


# -- loading -----------------------------------------------------------------------------


def h(value: str) -> bytes:
    """Decode one hex field (an empty string is empty bytes)."""
    return bytes.fromhex(value)


def read_pinned(name: str) -> bytes:
    """The raw bytes of vector file ``name``, after checking its pinned SHA-256."""
    try:
        want = PINNED_SHA256[name]
    except KeyError:
        raise LookupError(f"{name} is not a pinned vector file (see PROVENANCE.md)") from None
    data = (VECTOR_DIR / name).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise ValueError(
            f"{name}: SHA-256 is {got}, pinned {want}; vector files must stay byte-identical "
            "to the copies described in PROVENANCE.md"
        )
    return data


def _load(name: str, algorithm: str, mode: str, parameter_set: str) -> dict[str, object]:
    doc = json.loads(read_pinned(name))
    if not isinstance(doc, dict):
        raise TypeError(f"{name}: top level is not an object")
    if (doc.get("algorithm"), doc.get("mode")) != (algorithm, mode):
        raise ValueError(f"{name}: not an {algorithm} {mode} file")
    groups = doc.get("testGroups")
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{name}: no testGroups")
    for group in groups:
        if group.get("parameterSet") != parameter_set or not group.get("tests"):
            raise ValueError(f"{name}: group {group.get('tgId')} is not {parameter_set}")
    return cast("dict[str, object]", doc)


def load_mldsa87_keygen() -> MlDsaKeyGenFile:
    return cast("MlDsaKeyGenFile", _load("ml-dsa-87-keygen.json", "ML-DSA", "keyGen", "ML-DSA-87"))


def load_mldsa87_siggen() -> MlDsaSigGenFile:
    return cast("MlDsaSigGenFile", _load("ml-dsa-87-siggen.json", "ML-DSA", "sigGen", "ML-DSA-87"))


def load_mldsa87_sigver() -> MlDsaSigVerFile:
    return cast("MlDsaSigVerFile", _load("ml-dsa-87-sigver.json", "ML-DSA", "sigVer", "ML-DSA-87"))


def load_mlkem1024_keygen() -> KemKeyGenFile:
    return cast(
        "KemKeyGenFile", _load("ml-kem-1024-keygen.json", "ML-KEM", "keyGen", "ML-KEM-1024")
    )


def load_mlkem1024_encapdecap() -> KemEncapDecapFile:
    return cast(
        "KemEncapDecapFile",
        _load("ml-kem-1024-encapdecap.json", "ML-KEM", "encapDecap", "ML-KEM-1024"),
    )
