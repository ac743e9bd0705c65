"""One exception tree for the whole appliance, each class naming its PKCS#11 return value.

Sorted by who can fix the problem (STYLE §4): the caller (:class:`CallerError`), the
person holding the credentials (:class:`CredentialError`), policy (:class:`PolicyDenied`)
or the device and its storage (:class:`DeviceError`).  Messages name keys, files and
offsets, never secret values.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import ClassVar

__all__ = [
    "CKR",
    "ApplianceError",
    "BlobInvalid",
    "CallerError",
    "ConfigError",
    "CredentialError",
    "DeviceError",
    "KeyExists",
    "MultipleObjectsReturned",
    "NoSuchKey",
    "NoSuchObject",
    "NotInitialized",
    "PinIncorrect",
    "PinLocked",
    "PolicyDenied",
    "SignatureInvalid",
    "StateError",
    "TokenError",
    "TokenNotPresent",
    "WalCorrupted",
    "WalLocked",
    "to_ckr",
]


class CKR(IntEnum):
    """PKCS#11 return values; numbers as in the specification's ``pkcs11t.h``."""

    OK = 0x000
    HOST_MEMORY = 0x002
    SLOT_ID_INVALID = 0x003
    GENERAL_ERROR = 0x005
    FUNCTION_FAILED = 0x006
    ARGUMENTS_BAD = 0x007
    ATTRIBUTE_READ_ONLY = 0x010
    ATTRIBUTE_SENSITIVE = 0x011
    ATTRIBUTE_TYPE_INVALID = 0x012
    ATTRIBUTE_VALUE_INVALID = 0x013
    ACTION_PROHIBITED = 0x01B
    DATA_INVALID = 0x020
    DATA_LEN_RANGE = 0x021
    DEVICE_ERROR = 0x030
    DEVICE_MEMORY = 0x031
    DEVICE_REMOVED = 0x032
    FUNCTION_NOT_SUPPORTED = 0x054
    KEY_HANDLE_INVALID = 0x060
    KEY_TYPE_INCONSISTENT = 0x063
    KEY_FUNCTION_NOT_PERMITTED = 0x068
    MECHANISM_INVALID = 0x070
    MECHANISM_PARAM_INVALID = 0x071
    OBJECT_HANDLE_INVALID = 0x082
    OPERATION_ACTIVE = 0x090
    OPERATION_NOT_INITIALIZED = 0x091
    PIN_INCORRECT = 0x0A0
    PIN_INVALID = 0x0A1
    PIN_LEN_RANGE = 0x0A2
    PIN_LOCKED = 0x0A4
    SESSION_HANDLE_INVALID = 0x0B3
    SIGNATURE_INVALID = 0x0C0
    SIGNATURE_LEN_RANGE = 0x0C1
    TEMPLATE_INCOMPLETE = 0x0D0
    TEMPLATE_INCONSISTENT = 0x0D1
    TOKEN_NOT_PRESENT = 0x0E0
    TOKEN_NOT_RECOGNIZED = 0x0E1
    USER_ALREADY_LOGGED_IN = 0x100
    USER_NOT_LOGGED_IN = 0x101
    USER_PIN_NOT_INITIALIZED = 0x102
    USER_TYPE_INVALID = 0x103
    BUFFER_TOO_SMALL = 0x150
    CRYPTOKI_NOT_INITIALIZED = 0x190
    CRYPTOKI_ALREADY_INITIALIZED = 0x191


class ApplianceError(Exception):
    """Root of every error raised on purpose.  Each subclass names its CKR."""

    ckr: ClassVar[CKR] = CKR.FUNCTION_FAILED


# -- the caller can fix it -------------------------------------------------------------


class CallerError(ApplianceError):
    """A bad request: wrong argument, unknown key, malformed input.  Nothing changed."""

    ckr = CKR.ARGUMENTS_BAD


class ConfigError(CallerError):
    """The configuration or the command line names something that does not work."""

    ckr = CKR.ARGUMENTS_BAD


class NoSuchKey(CallerError):
    """No key matches the selector (label, id or ``pkcs11:`` URI)."""

    ckr = CKR.KEY_HANDLE_INVALID


class NoSuchObject(CallerError):
    """No token object matches a search that must find exactly one."""

    ckr = CKR.OBJECT_HANDLE_INVALID


class MultipleObjectsReturned(CallerError):
    """A search that must find exactly one object found several."""

    ckr = CKR.ARGUMENTS_BAD


class KeyExists(CallerError):
    """A key with that label or id already exists."""

    ckr = CKR.TEMPLATE_INCONSISTENT


class NotInitialized(CallerError):
    """The state directory holds no appliance (run ``pqhsm init``)."""

    ckr = CKR.CRYPTOKI_NOT_INITIALIZED


class StateError(CallerError):
    """The key is not in a state that allows this operation."""

    ckr = CKR.KEY_FUNCTION_NOT_PERMITTED


# -- the credential holder can fix it ----------------------------------------------------


class CredentialError(ApplianceError):
    """PIN, passphrase or login state."""

    ckr = CKR.USER_NOT_LOGGED_IN


class PinIncorrect(CredentialError):
    """The token PIN or client PIN is wrong."""

    ckr = CKR.PIN_INCORRECT


class PinLocked(CredentialError):
    """Too many failed logins."""

    ckr = CKR.PIN_LOCKED


# -- policy -------------------------------------------------------------------------------


class PolicyDenied(ApplianceError):
    """Allowed by the protocol, refused by policy."""

    ckr = CKR.KEY_FUNCTION_NOT_PERMITTED


class SignatureInvalid(ApplianceError):
    """A signature did not verify.  Says nothing about which check failed."""

    ckr = CKR.SIGNATURE_INVALID


# -- the device and its storage ------------------------------------------------------------


class DeviceError(ApplianceError):
    """Storage, WAL, token or serial failure."""

    ckr = CKR.DEVICE_ERROR


class TokenError(DeviceError):
    """The PKCS#11 module or token failed an operation."""

    ckr = CKR.DEVICE_ERROR


class TokenNotPresent(TokenError):
    """The configured module cannot be loaded or the configured token is not there."""

    ckr = CKR.TOKEN_NOT_PRESENT


class BlobInvalid(DeviceError):
    """A blob or sealed value does not open.

    Wrong passphrase, wrong token and corruption look the same on purpose (DESIGN §4).
    """

    ckr = CKR.DEVICE_ERROR


class WalLocked(DeviceError):
    """Another process holds the write-ahead log."""

    ckr = CKR.DEVICE_ERROR


class WalCorrupted(DeviceError):
    """The write-ahead log is damaged before its last frame.  Carries the byte offset."""

    ckr = CKR.DEVICE_ERROR

    def __init__(self, path: Path, offset: int, why: str = "bad frame") -> None:
        super().__init__(f"{path.name}: {why} at offset {offset}")
        self.path = path
        self.offset = offset


def to_ckr(exc: BaseException) -> CKR:
    """Map any exception to the CKR a PKCS#11 caller sees (used by the shim only)."""
    return exc.ckr if isinstance(exc, ApplianceError) else CKR.FUNCTION_FAILED
