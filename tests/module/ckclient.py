"""A minimal ctypes PKCS#11 client for libpqhsm-pkcs11.so, used in child processes.

python-pkcs11 accepts only its own ``Mechanism`` enum members, so vendor-defined
mechanisms, the PKCS#11 3.0 interface calls and exact call sequences (pkcs11-tool's)
are driven through ctypes.  ctypes releases the GIL in foreign calls, but tests still
run this in a child process, as every other client of the in-process server.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Final

CK_ULONG = ctypes.c_ulong
CKF_SERIAL_SESSION: Final = 0x4
CKF_OS_LOCKING_OK: Final = 0x2
CKU_USER: Final = 1
CKA_CLASS: Final = 0x000
CKA_VALUE: Final = 0x011
CKA_KEY_TYPE: Final = 0x100
CKA_ID: Final = 0x102
CKR_OK: Final = 0
CKR_BUFFER_TOO_SMALL: Final = 0x150


class Pkcs11Error(Exception):
    """A call returned ``rv`` (kept as a number: tests compare it)."""

    def __init__(self, call: str, rv: int) -> None:
        super().__init__(f"{call} -> 0x{rv:x}")
        self.call = call
        self.rv = rv


def rv_of(call: object, *args: object) -> int:
    """Run a :class:`Module` method; the CKR it failed with, or 0."""
    try:
        call(*args)  # type: ignore[operator]
    except Pkcs11Error as exc:
        return exc.rv
    return CKR_OK


class Attribute(ctypes.Structure):
    _fields_ = (("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG))


class MechanismStruct(ctypes.Structure):
    _fields_ = (
        ("mechanism", CK_ULONG),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", CK_ULONG),
    )


class SignContext(ctypes.Structure):
    """CK_SIGN_ADDITIONAL_CONTEXT."""

    _fields_ = (
        ("hedgeVariant", CK_ULONG),
        ("pContext", ctypes.c_void_p),
        ("ulContextLen", CK_ULONG),
    )


class InitArgs(ctypes.Structure):
    _fields_ = (
        ("create", ctypes.c_void_p),
        ("destroy", ctypes.c_void_p),
        ("lock", ctypes.c_void_p),
        ("unlock", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("reserved", ctypes.c_void_p),
    )


def _mechanism(
    mech: int, context: bytes | None, hedge: int
) -> tuple[MechanismStruct, list[object]]:
    """A CK_MECHANISM, with a CK_SIGN_ADDITIONAL_CONTEXT when ``context`` is given, and
    the buffers it points into (keep them alive until the call returns)."""
    keep: list[object] = []
    m = MechanismStruct(mech, None, 0)
    if context is not None:
        buf = ctypes.create_string_buffer(context, len(context) or 1)
        param = SignContext(hedge, ctypes.addressof(buf), len(context))
        keep += [buf, param]
        m.pParameter = ctypes.addressof(param)
        m.ulParameterLen = ctypes.sizeof(param)
    return m, keep


class Module:
    """The module's exported C_* functions, called with ctypes (one instance per process)."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)

    def call(self, name: str, *args: object) -> int:
        rv = int(getattr(self.lib, name)(*args))
        return rv

    def check(self, name: str, *args: object) -> None:
        rv = self.call(name, *args)
        if rv != CKR_OK:
            raise Pkcs11Error(name, rv)

    def initialize(self) -> None:
        self.check(
            "C_Initialize", ctypes.byref(InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None))
        )

    def finalize(self) -> None:
        self.check("C_Finalize", None)

    def open_session(self, slot: int = 1) -> int:
        h = CK_ULONG(0)
        self.check(
            "C_OpenSession",
            CK_ULONG(slot),
            CK_ULONG(CKF_SERIAL_SESSION),
            None,
            None,
            ctypes.byref(h),
        )
        return h.value

    def close_session(self, session: int) -> None:
        self.check("C_CloseSession", CK_ULONG(session))

    def login(self, session: int, pin: bytes) -> None:
        self.check("C_Login", CK_ULONG(session), CK_ULONG(CKU_USER), pin, CK_ULONG(len(pin)))

    def find(self, session: int, cls: int, key_type: int, cka_id: bytes) -> int:
        """The one object with this class, key type and CKA_ID."""
        keep = [CK_ULONG(cls), CK_ULONG(key_type), ctypes.create_string_buffer(cka_id, len(cka_id))]
        tpl = (Attribute * 3)(
            Attribute(CKA_CLASS, ctypes.addressof(keep[0]), 8),
            Attribute(CKA_KEY_TYPE, ctypes.addressof(keep[1]), 8),
            Attribute(CKA_ID, ctypes.addressof(keep[2]), len(cka_id)),
        )
        self.check("C_FindObjectsInit", CK_ULONG(session), tpl, CK_ULONG(3))
        found = (CK_ULONG * 4)()
        n = CK_ULONG(0)
        self.check("C_FindObjects", CK_ULONG(session), found, CK_ULONG(4), ctypes.byref(n))
        self.check("C_FindObjectsFinal", CK_ULONG(session))
        if n.value != 1:
            raise Pkcs11Error("C_FindObjects (count)", n.value)
        return int(found[0])

    def attribute(self, session: int, obj: int, atype: int) -> bytes:
        a = (Attribute * 1)(Attribute(atype, None, 0))
        self.check("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(obj), a, CK_ULONG(1))
        buf = ctypes.create_string_buffer(a[0].ulValueLen or 1)
        a[0].pValue = ctypes.addressof(buf)
        self.check("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(obj), a, CK_ULONG(1))
        return buf.raw[: a[0].ulValueLen]

    def sign_init(
        self, session: int, mech: int, key: int, context: bytes | None = None, hedge: int = 0
    ) -> None:
        m, keep = _mechanism(mech, context, hedge)
        self.check("C_SignInit", CK_ULONG(session), ctypes.byref(m), CK_ULONG(key))
        del keep

    def verify_init(
        self, session: int, mech: int, key: int, context: bytes | None = None, hedge: int = 0
    ) -> None:
        m, keep = _mechanism(mech, context, hedge)
        self.check("C_VerifyInit", CK_ULONG(session), ctypes.byref(m), CK_ULONG(key))
        del keep

    def _output(self, name: str, *args: object) -> bytes:
        """Call a size-query-then-fetch function (C_Sign, C_SignFinal): the PKCS#11 way."""
        n = CK_ULONG(0)
        self.check(name, *args, None, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value or 1)
        self.check(name, *args, buf, ctypes.byref(n))
        return buf.raw[: n.value]

    def sign(self, session: int, data: bytes) -> bytes:
        return self._output("C_Sign", CK_ULONG(session), data, CK_ULONG(len(data)))

    def sign_update(self, session: int, part: bytes) -> None:
        self.check("C_SignUpdate", CK_ULONG(session), part, CK_ULONG(len(part)))

    def sign_final(self, session: int) -> bytes:
        return self._output("C_SignFinal", CK_ULONG(session))

    def sign_multi(self, session: int, parts: Sequence[bytes]) -> bytes:
        for part in parts:
            self.sign_update(session, part)
        return self.sign_final(session)
