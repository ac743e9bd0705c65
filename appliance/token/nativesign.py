"""C_SignInit + C_Sign through ctypes, on python-pkcs11's own session.

hazardous: used by :mod:`appliance.token.pkcs11` only.

python-pkcs11 signs with three module calls: ``C_SignInit``, ``C_Sign`` with a NULL buffer
to learn the length, and ``C_Sign`` again.  The appliance's classical signatures have a
known maximum size, so this path makes two: ``C_SignInit`` and one ``C_Sign`` into a
buffer large enough for any of them (``CKR_BUFFER_TOO_SMALL`` still retries with the
length the token asks for, as PKCS#11 keeps the operation active).  On SoftHSM2 that is
about 30 µs (16 %) off every ECDSA P-256 signature, the appliance's hottest path.

It reaches the same module instance python-pkcs11 loaded (``dlopen`` of one path returns
one handle, so its session and object handles are valid here) through
``C_GetFunctionList``, as any PKCS#11 application does.  The caller holds the token lock,
as for every other token call; ctypes releases the GIL around the call, as python-pkcs11
does.  Nothing secret passes through here: the data is a digest or a message to sign, the
result a signature.
"""

from __future__ import annotations

import ctypes
from typing import Final

from appliance import errors
from appliance.errors import CKR

__all__ = ["NativeSigner"]

_CK_RV = ctypes.c_ulong
_CK_ULONG = ctypes.c_ulong
#: Positions of C_SignInit and C_Sign among CK_FUNCTION_LIST's function pointers
#: (PKCS#11 2.40 §5, the order every version keeps).
_SIGN_INIT: Final = 42
_SIGN: Final = 43
#: Larger than any signature the appliance's classical keys make (Ed448: 114 bytes).
_SIG_BUFFER: Final = 512
_SigBuffer = ctypes.c_char * _SIG_BUFFER


class _Mechanism(ctypes.Structure):
    _fields_ = (
        ("mechanism", _CK_ULONG),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", _CK_ULONG),
    )


_SignInit = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, ctypes.POINTER(_Mechanism), _CK_ULONG)
_Sign = ctypes.CFUNCTYPE(
    _CK_RV, _CK_ULONG, ctypes.c_char_p, _CK_ULONG, ctypes.c_char_p, ctypes.POINTER(_CK_ULONG)
)

#: The same translation the python-pkcs11 path makes (token/pkcs11.py); others: TokenError.
_RV_ERRORS: Final[dict[int, type[errors.ApplianceError]]] = {
    CKR.USER_NOT_LOGGED_IN: errors.CredentialError,
    CKR.DEVICE_REMOVED: errors.TokenNotPresent,
    CKR.TOKEN_NOT_PRESENT: errors.TokenNotPresent,
    CKR.MECHANISM_INVALID: errors.PolicyDenied,
}


def _check(rv: int, what: str) -> None:
    if rv == CKR.OK:
        return
    try:
        name = f"CKR_{CKR(rv).name}"
    except ValueError:
        name = f"0x{rv:x}"
    raise _RV_ERRORS.get(rv, errors.TokenError)(f"{what}: {name}")


class NativeSigner:
    """Signs through the module's function list with ctypes (the GIL released)."""

    def __init__(self, module: str) -> None:
        """:raises OSError: the module cannot be loaded or has no usable function list."""
        lib = ctypes.CDLL(module)
        get_list = lib.C_GetFunctionList
        get_list.argtypes = (ctypes.POINTER(ctypes.c_void_p),)
        get_list.restype = _CK_RV
        table = ctypes.c_void_p()
        if get_list(ctypes.byref(table)) != CKR.OK or not table.value:
            raise OSError(f"{module}: C_GetFunctionList gave no function list")
        # CK_VERSION (two bytes) comes first, padded to the pointers' alignment.
        ptr = ctypes.sizeof(ctypes.c_void_p)
        first = table.value + ptr

        def entry(index: int) -> int:
            address = ctypes.c_void_p.from_address(first + index * ptr).value
            if not address:
                raise OSError(f"{module}: function {index} missing from its function list")
            return address

        self._lib = lib  # keeps the module loaded as long as this object lives
        self._sign_init = _SignInit(entry(_SIGN_INIT))
        self._sign = _Sign(entry(_SIGN))

    @classmethod
    def load(cls, module: str) -> NativeSigner | None:
        """A signer for ``module``, or None when it cannot be set up (python-pkcs11 then)."""
        try:
            return cls(module)
        except (OSError, AttributeError):
            return None

    def sign(
        self,
        session: int,
        key: int,
        mechanism: int,
        data: bytes,
        what: str,
        *,
        buffer: int = _SIG_BUFFER,
    ) -> bytes:
        """One single-part signature with a parameterless mechanism.

        :raises ApplianceError: the CKR the token returned, translated (``what`` names
            the operation in the message).
        """
        mech = _Mechanism(mechanism, None, 0)
        rv = self._sign_init(session, ctypes.byref(mech), key)
        if rv != CKR.OK:
            _check(rv, what)
        out = _SigBuffer() if buffer == _SIG_BUFFER else ctypes.create_string_buffer(buffer)
        n = _CK_ULONG(buffer)
        rv = self._sign(session, data, len(data), out, ctypes.byref(n))
        if rv == CKR.BUFFER_TOO_SMALL:  # the operation stays active; n says what it needs
            out = ctypes.create_string_buffer(n.value)
            rv = self._sign(session, data, len(data), out, ctypes.byref(n))
        if rv != CKR.OK:
            _check(rv, what)
        return out.raw[: n.value]
