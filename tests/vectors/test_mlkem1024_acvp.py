"""ML-KEM-1024 (FIPS 203) against NIST ACVP vectors, and against kyber-py.

What each vector file is, where it came from, and which cases are checked by whom is in
PROVENANCE.md next to this file.  In short:

* keyGen: seed d||z through the backend (ek); kyber-py for the expanded dk.
* encapsulation (tgId 3): the backend cannot take the randomness m and the group has no
  seed, so (k, c) from (ek, m) is reproduced with kyber-py, and the backend's own
  encapsulation to the vector ek is opened with the vector dk by kyber-py.
* decapsulation (tgId 8 seed, tgId 9 expanded; both carry d and z): the backend's key
  from d||z decapsulates every c to k, implicit-rejection cases included.
* encapsulationKeyCheck (tgId 15): the backend raises CallerError exactly for the
  invalid keys.
* decapsulationKeyCheck (tgId 14): expanded dk only, which the backend cannot load;
  checked with kyber-py's decapsulation-key hash check.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Final

import pytest
from _acvp import (
    PINNED_SHA256,
    VECTOR_DIR,
    KemEncapDecapCase,
    KemEncapDecapGroup,
    KemKeyGenCase,
    h,
    load_mlkem1024_encapdecap,
    load_mlkem1024_keygen,
)
from kyber_py.ml_kem import ML_KEM_1024

from appliance.errors import CallerError
from appliance.pqc import MLKEM1024_CT_LEN, active_backend

BACKEND: Final = active_backend()

KEYGEN: Final = load_mlkem1024_keygen()
ENCAPDECAP: Final = load_mlkem1024_encapdecap()

MLKEM_FILES: Final = ("ml-kem-1024-keygen.json", "ml-kem-1024-encapdecap.json")

# a fixed FIPS 203 "m" for the kyber-py encapsulations made in these tests
FIXED_M: Final = hashlib.sha256(b"pqhsm ML-KEM-1024 test m").digest()


# -- kyber-py, typed ---------------------------------------------------------------------
# kyber-py is untyped (ignore_missing_imports).  _encaps_internal is FIPS 203 Alg. 17
# (randomness m given); decaps is Alg. 21, which runs the §7.3 decapsulation-key checks.


def _as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"kyber-py returned {type(value).__name__}, expected bytes")
    return value


def _kpy_key_derive(seed: bytes) -> tuple[bytes, bytes]:
    ek, dk = ML_KEM_1024.key_derive(seed)
    return _as_bytes(ek), _as_bytes(dk)


def _kpy_encaps_internal(ek: bytes, m: bytes) -> tuple[bytes, bytes]:
    k, c = ML_KEM_1024._encaps_internal(ek, m)
    return _as_bytes(k), _as_bytes(c)


def _kpy_encaps(ek: bytes) -> tuple[bytes, bytes]:
    k, c = ML_KEM_1024.encaps(ek)
    return _as_bytes(k), _as_bytes(c)


def _kpy_decaps(dk: bytes, c: bytes) -> bytes:
    return _as_bytes(ML_KEM_1024.decaps(dk, c))


def _backend_decaps(seed: bytes, c: bytes) -> bytes:
    secret = BACKEND.mlkem1024_from_seed(seed).decapsulate(c)
    # test-only copy of a shared secret, compared once and dropped
    return bytes(secret.view())


def _backend_encaps(ek: bytes) -> tuple[bytes, bytes]:
    secret, ct = BACKEND.mlkem1024_encapsulate(ek)
    # test-only copy of a shared secret, compared once and dropped
    return bytes(secret.view()), ct


# -- file integrity -----------------------------------------------------------------------


def _provenance_sha256(name: str) -> str:
    text = (VECTOR_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    rows = re.findall(rf"^\| `{re.escape(name)}` \| `([0-9a-f]{{64}})` \|", text, re.MULTILINE)
    assert len(rows) == 1, f"PROVENANCE.md must list {name} exactly once in the copies table"
    return str(rows[0])


@pytest.mark.parametrize("name", MLKEM_FILES)
def test_vector_file_is_pinned(name: str) -> None:
    digest = hashlib.sha256((VECTOR_DIR / name).read_bytes()).hexdigest()
    assert digest == PINNED_SHA256[name]
    assert _provenance_sha256(name) == PINNED_SHA256[name]


# -- keyGen ------------------------------------------------------------------------------

KEYGEN_CASES: Final = [
    pytest.param(case, id=f"tc{case['tcId']}")
    for group in KEYGEN["testGroups"]
    for case in group["tests"]
]


def test_keygen_case_count() -> None:
    assert len(KEYGEN_CASES) == 25


@pytest.mark.parametrize("case", KEYGEN_CASES)
def test_keygen_encapsulation_key_from_seed(case: KemKeyGenCase) -> None:
    # FIPS 203 §7.1 / README: the 64-byte seed is d || z, in that order
    decapsulator = BACKEND.mlkem1024_from_seed(h(case["d"]) + h(case["z"]))
    assert decapsulator.encapsulation_key() == h(case["ek"])


@pytest.mark.parametrize("case", KEYGEN_CASES)
def test_keygen_expanded_key_matches_kyber_py(case: KemKeyGenCase) -> None:
    # the backend never exposes the expanded dk; kyber-py shows the vector's dk belongs to
    # the same seed, which the encapsulation tests below rely on
    assert _kpy_key_derive(h(case["d"]) + h(case["z"])) == (h(case["ek"]), h(case["dk"]))


# -- encapDecap: routing -------------------------------------------------------------------


def _cases(function: str, *key_formats: str) -> list[tuple[KemEncapDecapGroup, KemEncapDecapCase]]:
    return [
        (group, case)
        for group in ENCAPDECAP["testGroups"]
        if group["function"] == function and group["keyFormat"] in key_formats
        for case in group["tests"]
    ]


def _id(group: KemEncapDecapGroup, case: KemEncapDecapCase) -> str:
    tail = ""
    if "testPassed" in case:
        tail = "-valid" if case["testPassed"] else "-invalid"
    elif "reason" in case:
        tail = "-" + re.sub(r"\W+", "-", case["reason"])
    return f"tg{group['tgId']}-tc{case['tcId']}-{group['keyFormat']}{tail}"


def _params(
    pairs: list[tuple[KemEncapDecapGroup, KemEncapDecapCase]],
) -> list[object]:
    return [pytest.param(case, id=_id(group, case)) for group, case in pairs]


ENCAPSULATION: Final = _cases("encapsulation", "none")
DECAPSULATION: Final = _cases("decapsulation", "seed", "expanded")
EK_CHECK: Final = _cases("encapsulationKeyCheck", "none")
DK_CHECK: Final = _cases("decapsulationKeyCheck", "expanded")


def test_encapdecap_routing() -> None:
    groups = {
        (g["tgId"], g["function"], g["keyFormat"]): len(g["tests"])
        for g in ENCAPDECAP["testGroups"]
    }
    assert groups == {
        (3, "encapsulation", "none"): 25,
        (8, "decapsulation", "seed"): 10,
        (9, "decapsulation", "expanded"): 10,
        (14, "decapsulationKeyCheck", "expanded"): 10,
        (15, "encapsulationKeyCheck", "none"): 10,
    }
    routed = len(ENCAPSULATION) + len(DECAPSULATION) + len(EK_CHECK) + len(DK_CHECK)
    assert routed == sum(groups.values()) == 65
    # cases whose private-key side the backend cannot express (no seed, or expanded dk
    # only): kyber-py covers them; PROVENANCE.md says why
    assert len(ENCAPSULATION) + len(DK_CHECK) == 35
    # both outcomes present where the vectors have a verdict
    for pairs in (EK_CHECK, DK_CHECK):
        assert Counter(case["testPassed"] for _, case in pairs) == {True: 5, False: 5}
    assert Counter(case["reason"] for _, case in DECAPSULATION) == {
        "valid decapsulation": 10,
        "modified ciphertext": 10,
    }


# -- encapsulation (tgId 3) -------------------------------------------------------------


@pytest.mark.parametrize("case", _params(ENCAPSULATION))
def test_encapsulation_reproduced_by_kyber_py(case: KemEncapDecapCase) -> None:
    k, c = _kpy_encaps_internal(h(case["ek"]), h(case["m"]))
    assert (k.hex(), c.hex()) == (case["k"].lower(), case["c"].lower())
    assert _kpy_decaps(h(case["dk"]), h(case["c"])) == h(case["k"])


@pytest.mark.parametrize("case", _params(ENCAPSULATION))
def test_encapsulation_backend_to_vector_key(case: KemEncapDecapCase) -> None:
    # no seed in this group, so the backend cannot decapsulate; instead its own
    # encapsulation to the vector ek must open under the vector dk
    secret, ct = _backend_encaps(h(case["ek"]))
    assert len(ct) == MLKEM1024_CT_LEN
    assert _kpy_decaps(h(case["dk"]), ct) == secret
    assert ct != h(case["c"])  # the backend draws its own m


# -- decapsulation (tgId 8 seed, tgId 9 expanded) -------------------------------------------


@pytest.mark.parametrize("case", _params(DECAPSULATION))
def test_decapsulation_from_seed(case: KemEncapDecapCase) -> None:
    # both groups carry d and z; tgId 9 is "expanded" because ACVP hands out dk, and
    # kyber-py confirms that dk is the expansion of d||z
    seed = h(case["d"]) + h(case["z"])
    assert _kpy_key_derive(seed) == (h(case["ek"]), h(case["dk"]))
    assert BACKEND.mlkem1024_from_seed(seed).encapsulation_key() == h(case["ek"])
    # modified-ciphertext cases return the implicit-rejection key J(z||c), not an error
    assert _backend_decaps(seed, h(case["c"])) == h(case["k"])


# -- encapsulationKeyCheck (tgId 15) ----------------------------------------------------------


@pytest.mark.parametrize("case", _params(EK_CHECK))
def test_encapsulation_key_check(case: KemEncapDecapCase) -> None:
    ek = h(case["ek"])
    if case["testPassed"]:
        secret, ct = _backend_encaps(ek)
        assert _kpy_decaps(h(case["dk"]), ct) == secret
    else:
        # FIPS 203 §7.2 modulus check: a coefficient >= q
        with pytest.raises(CallerError):
            BACKEND.mlkem1024_encapsulate(ek)
        with pytest.raises(ValueError, match="Modulus check failed"):
            _kpy_encaps(ek)


# -- decapsulationKeyCheck (tgId 14) ----------------------------------------------------------


@pytest.mark.parametrize("case", _params(DK_CHECK))
def test_decapsulation_key_check_with_kyber_py(case: KemEncapDecapCase) -> None:
    # The backend only loads seeds, so an expanded dk with a bad H(ek) cannot even be
    # presented to it.  kyber-py runs the FIPS 203 §7.3 hash check instead.
    ek, dk = h(case["ek"]), h(case["dk"])
    k, c = _kpy_encaps_internal(ek, FIXED_M)
    if case["testPassed"]:
        assert _kpy_decaps(dk, c) == k
        secret, ct = _backend_encaps(ek)
        assert _kpy_decaps(dk, ct) == secret
    else:
        with pytest.raises(ValueError, match="hash check failed"):
            _kpy_decaps(dk, c)


# -- cross-check with kyber-py --------------------------------------------------------------

XCHECK: Final = [
    pytest.param(hashlib.sha512(b"pqhsm ML-KEM-1024 cross-check %d" % i).digest(), id=f"seed{i}")
    for i in range(3)
]


@pytest.mark.parametrize("seed", XCHECK)
def test_cross_check_same_seed_same_key(seed: bytes) -> None:
    ek, _ = _kpy_key_derive(seed)
    assert BACKEND.mlkem1024_from_seed(seed).encapsulation_key() == ek


@pytest.mark.parametrize("seed", XCHECK)
def test_cross_check_backend_encaps_kyber_py_decaps(seed: bytes) -> None:
    ek, dk = _kpy_key_derive(seed)
    secret, ct = _backend_encaps(ek)
    assert len(secret) == 32
    assert _kpy_decaps(dk, ct) == secret


@pytest.mark.parametrize("seed", XCHECK)
def test_cross_check_kyber_py_encaps_backend_decaps(seed: bytes) -> None:
    ek, dk = _kpy_key_derive(seed)
    k, c = _kpy_encaps(ek)
    assert _backend_decaps(seed, c) == k
    # a tampered ciphertext: both implementations agree on the implicit-rejection key
    tampered = bytes([c[0] ^ 0x01]) + c[1:]
    rejected = _backend_decaps(seed, tampered)
    assert rejected == _kpy_decaps(dk, tampered)
    assert rejected != k
