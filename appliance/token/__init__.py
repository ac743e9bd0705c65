"""The token backend: what the appliance asks of a PKCS#11 token.

The only implementation is :mod:`appliance.token.pkcs11` (python-pkcs11 over any module:
SoftHSM2 by default, a real HSM by configuration).  Nothing here is SoftHSM-specific.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from appliance.algorithms import Algorithm
from appliance.secret import BytesLike, SecretBytes

__all__ = ["FoundKey", "TokenBackend", "TokenConfig", "TokenInfo"]


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """Where the token is: a module path and a label and/or serial."""

    module: str
    label: str | None = None
    serial: str | None = None

    def describe(self) -> str:
        who = f"label {self.label!r}" if self.label else f"serial {self.serial!r}"
        return f"{who} in {self.module}"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """Identity of the token the appliance is bound to (no secrets)."""

    module: str
    label: str
    serial: str
    manufacturer: str
    model: str


@dataclass(frozen=True, slots=True)
class FoundKey:
    """A signing keypair found in the token (for adopt)."""

    cka_id: bytes
    label: str
    alg: Algorithm
    spki: bytes
    sensitive: bool
    extractable: bool


class TokenBackend(Protocol):
    """Operations on one logged-in token.  Every method raises ApplianceError subclasses."""

    def info(self) -> TokenInfo: ...

    def close(self) -> None: ...

    def generate_keypair(self, alg: Algorithm, cka_id: bytes, label: str) -> bytes:
        """Generate a sensitive, non-extractable keypair in the token; return the SPKI."""
        ...

    def find_keypair(
        self, *, label: str | None = None, cka_id: bytes | None = None
    ) -> FoundKey: ...

    def has_private_key(self, cka_id: bytes) -> bool:
        """Search a fresh session for a private key with this ``CKA_ID``."""
        ...

    def sign(
        self,
        alg: Algorithm,
        cka_id: bytes,
        message: BytesLike,
        *,
        raw: bool = False,
        prehashed: bool = False,
    ) -> bytes: ...

    def private_key_ids(self) -> set[bytes]:
        """``CKA_ID`` of every private key, from one search in a fresh session."""
        ...

    def exposed_private_keys(self) -> list[str]:
        """Labels of private keys that are not sensitive or are extractable (I2: none)."""
        ...

    def destroy_private_keys(self, cka_ids: list[bytes]) -> dict[bytes, int]:
        """Destroy many keys, then confirm their absence with one fresh listing."""
        ...

    def destroy_private_key(self, cka_id: bytes) -> int:
        """Destroy every private key with ``cka_id``, confirm absence; return how many."""
        ...

    def ensure_wrap_key(self, label: str) -> None: ...

    def has_wrap_key(self, label: str) -> bool: ...

    def wrap_encrypt(self, label: str, plaintext: SecretBytes, aad: bytes) -> bytes: ...

    def wrap_decrypt(self, label: str, sealed: bytes, aad: bytes) -> SecretBytes: ...

    def read_data(self, label: str) -> list[bytes]: ...

    def write_data(self, label: str, value: bytes) -> None: ...
