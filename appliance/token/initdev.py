"""Initialize a PKCS#11 token (C_InitToken + C_InitPIN) through ctypes.

hazardous: used by ``pqhsm init --embedded-softhsm`` and by test fixtures only.

python-pkcs11 does not wrap ``C_InitToken``, and ``softhsm2-util`` would need both PINs on
its command line, where any local user can read them.  This module calls the module's
exported C functions directly.  When the module is already initialized in this process
(python-pkcs11 loaded it), the call shares that instance, so the new token is visible to
python-pkcs11 at once without re-initializing it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from appliance.errors import CKR, KeyExists, TokenError, TokenNotPresent
from appliance.secret import SecretBytes

__all__ = ["init_token"]

_CK_ULONG = ctypes.c_ulong
_CKF_TOKEN_INITIALIZED = 0x400
_CKF_RW_SESSION = 0x2
_CKF_SERIAL_SESSION = 0x4
_CKU_SO = 0
_TOKEN_INFO_SIZE = 512  # larger than CK_TOKEN_INFO on every ABI
_FLAGS_OFFSET = 96  # label[32] manufacturerID[32] model[16] serialNumber[16], then flags


def _check(rv: int, what: str) -> None:
    if rv != 0:
        try:
            name = CKR(rv).name
        except ValueError:
            name = f"0x{rv:x}"
        raise TokenError(f"{what} failed: CKR_{name}")


def _slots(lib: ctypes.CDLL) -> list[int]:
    count = _CK_ULONG(0)
    _check(lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
    arr = (_CK_ULONG * max(count.value, 1))()
    _check(lib.C_GetSlotList(ctypes.c_ubyte(1), arr, ctypes.byref(count)), "C_GetSlotList")
    return [int(arr[i]) for i in range(count.value)]


def _token_info(lib: ctypes.CDLL, slot: int) -> tuple[str, int]:
    buf = ctypes.create_string_buffer(_TOKEN_INFO_SIZE)
    _check(lib.C_GetTokenInfo(_CK_ULONG(slot), buf), "C_GetTokenInfo")
    label = buf.raw[:32].decode("utf-8", "replace").rstrip(" \x00")
    flags = int.from_bytes(
        buf.raw[_FLAGS_OFFSET : _FLAGS_OFFSET + ctypes.sizeof(_CK_ULONG)], "little"
    )
    return label, flags


def _pin_arg(pin: SecretBytes) -> ctypes.Array[ctypes.c_char]:
    # ctypes needs its own buffer; it is a mutable C array, wiped by the caller.  The PIN is
    # copied straight from the wipeable bytearray, with no immutable bytes in between.
    buf = ctypes.create_string_buffer(len(pin))
    src = (ctypes.c_char * len(pin)).from_buffer(pin.view())
    ctypes.memmove(buf, src, len(pin))
    del src  # release the export so the SecretBytes can be wiped (resized) later
    return buf


def init_token(module: str | Path, label: str, so_pin: SecretBytes, user_pin: SecretBytes) -> None:
    """Initialize the first uninitialized token of ``module`` as ``label`` with both PINs.

    :raises TokenNotPresent: the module cannot be loaded or has no free token slot.
    :raises KeyExists: a token with that label already exists.
    """
    if not 1 <= len(label.encode()) <= 32:
        raise TokenError("token label must be 1 to 32 bytes")
    try:
        lib = ctypes.CDLL(str(module))
    except OSError:
        raise TokenNotPresent(f"cannot load PKCS#11 module {module}") from None
    for name in (
        "C_Initialize",
        "C_Finalize",
        "C_GetSlotList",
        "C_GetTokenInfo",
        "C_InitToken",
        "C_OpenSession",
        "C_Login",
        "C_InitPIN",
        "C_Logout",
        "C_CloseSession",
    ):
        getattr(lib, name).restype = _CK_ULONG
    rv = lib.C_Initialize(None)
    owned = rv == 0
    if rv not in (0, CKR.CRYPTOKI_ALREADY_INITIALIZED):
        _check(rv, "C_Initialize")
    so_buf = _pin_arg(so_pin)
    user_buf = _pin_arg(user_pin)
    try:
        free = None
        for slot in _slots(lib):
            tok_label, flags = _token_info(lib, slot)
            if flags & _CKF_TOKEN_INITIALIZED and tok_label == label:
                raise KeyExists(f"a token labelled {label!r} already exists")
            if not flags & _CKF_TOKEN_INITIALIZED and free is None:
                free = slot
        if free is None:
            raise TokenNotPresent(f"{module} has no uninitialized token slot")
        padded = label.encode().ljust(32, b" ")
        _check(
            lib.C_InitToken(_CK_ULONG(free), so_buf, _CK_ULONG(len(so_pin)), padded), "C_InitToken"
        )
        # Some modules (SoftHSM2) move the token to a new slot id after initialization.
        target = next(s for s in _slots(lib) if _token_info(lib, s)[0] == label)
        session = _CK_ULONG(0)
        _check(
            lib.C_OpenSession(
                _CK_ULONG(target),
                _CK_ULONG(_CKF_SERIAL_SESSION | _CKF_RW_SESSION),
                None,
                None,
                ctypes.byref(session),
            ),
            "C_OpenSession",
        )
        try:
            _check(
                lib.C_Login(session, _CK_ULONG(_CKU_SO), so_buf, _CK_ULONG(len(so_pin))),
                "C_Login(SO)",
            )
            _check(lib.C_InitPIN(session, user_buf, _CK_ULONG(len(user_pin))), "C_InitPIN")
            lib.C_Logout(session)
        finally:
            lib.C_CloseSession(session)
    finally:
        ctypes.memset(so_buf, 0, len(so_pin))
        ctypes.memset(user_buf, 0, len(user_pin))
        if owned:
            lib.C_Finalize(None)
