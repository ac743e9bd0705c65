"""appliance/argon2id.py: Argon2id over caller-owned buffers gives exactly what argon2-cffi's
own API gives, reads hashes that API wrote (client PIN stores made before), and writes
hashes it reads."""

from __future__ import annotations

import os

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from argon2.low_level import Type, hash_secret_raw

from appliance import argon2id
from appliance.errors import DeviceError

T, M, P = argon2id.CHEAPEST


def test_derive_into_matches_argon2_cffi_and_writes_in_place() -> None:
    secret, salt = bytearray(b"correct horse battery"), os.urandom(16)
    out = bytearray(32)
    argon2id.derive_into(memoryview(secret), salt, T, M, P, memoryview(out))
    assert out == hash_secret_raw(bytes(secret), salt, T, M, P, 32, Type.ID)
    assert secret == b"correct horse battery"  # the secret is read, not consumed
    other = bytearray(32)
    argon2id.derive_into(memoryview(secret), os.urandom(16), T, M, P, memoryview(other))
    assert other != out  # the salt is used


def test_hashes_interoperate_with_password_hasher() -> None:
    pin = bytearray(b"1234-5678")
    old = PasswordHasher(time_cost=T, memory_cost=M, parallelism=P).hash(bytes(pin))
    assert argon2id.matches(old, memoryview(pin))  # a store written before reads
    assert not argon2id.matches(old, memoryview(b"1234-5679"))
    new = argon2id.hash_encoded(memoryview(pin), T, M, P)
    assert new.startswith(f"$argon2id$v=19$m={M},t={T},p={P}$")
    assert PasswordHasher().verify(new, bytes(pin))
    with pytest.raises(VerifyMismatchError):
        PasswordHasher().verify(new, b"nope")
    assert new != argon2id.hash_encoded(memoryview(pin), T, M, P)  # a fresh salt each time


@pytest.mark.parametrize(
    "encoded",
    ["", "plain text", "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA", "$argon2id$v=19$garbage"],
)
def test_unreadable_hashes_are_refused(encoded: str) -> None:
    with pytest.raises(ValueError, match="Argon2id hash"):
        argon2id.matches(encoded, memoryview(b"1234"))


def test_refused_parameters_name_the_problem() -> None:
    with pytest.raises(DeviceError, match=r"Argon2id failed: Salt is too short"):
        argon2id.derive_into(memoryview(b"pw"), b"short", T, M, P, memoryview(bytearray(32)))
