"""Wipeable secret buffers and constant-time comparison.

Python cannot promise that a secret leaves no copy in memory (``str`` and ``bytes`` are
immutable and may be interned or copied by the allocator).  The appliance therefore keeps
keys, seeds, PINs and passphrases in a ``bytearray`` owned by :class:`SecretBytes`, hands
them out as ``memoryview`` and overwrites them in place when done.  Where a library can
only return ``bytes``, the call site copies into a :class:`SecretBytes` at once and says so.
"""

from __future__ import annotations

import hmac
import os
from typing import NoReturn

__all__ = ["BytesLike", "SecretBytes", "ct_equal", "read_secret_fd"]

BytesLike = bytes | bytearray | memoryview


class SecretBytes:
    """Owns one mutable buffer of key material; :meth:`wipe` zeroes it in place.

    Security: never ``bytes()`` it without a comment saying why and for how long; the
    copy cannot be wiped.
    """

    __slots__ = ("_buf",)

    def __init__(self, size_or_data: int | BytesLike) -> None:
        if isinstance(size_or_data, int):
            self._buf = bytearray(size_or_data)
        else:
            self._buf = bytearray(size_or_data)

    @classmethod
    def random(cls, size: int) -> SecretBytes:
        """A fresh buffer of ``size`` bytes from the OS CSPRNG."""
        out = cls(size)
        # os.urandom returns bytes; it is copied in and dropped at once.
        out._buf[:] = os.urandom(size)
        return out

    def view(self) -> memoryview:
        """A view on the live buffer (no copy)."""
        return memoryview(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        """Overwrite the buffer with zeros, in place."""
        self._buf[:] = bytes(len(self._buf))

    def __enter__(self) -> SecretBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<SecretBytes len={len(self._buf)} redacted>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        raise TypeError("use ct_equal() to compare secrets")

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("secrets are not picklable")


def ct_equal(a: BytesLike | SecretBytes, b: BytesLike | SecretBytes) -> bool:
    """Constant-time equality for secrets, MACs and digests."""
    va = a.view() if isinstance(a, SecretBytes) else memoryview(a)
    vb = b.view() if isinstance(b, SecretBytes) else memoryview(b)
    # hmac.compare_digest accepts bytes-like objects; bytearray(view) keeps it mutable
    # so the temporary copies can be wiped below.
    ca, cb = bytearray(va), bytearray(vb)
    try:
        return hmac.compare_digest(ca, cb)
    finally:
        ca[:] = bytes(len(ca))
        cb[:] = bytes(len(cb))


def read_secret_fd(fd: int, *, max_len: int = 4096) -> SecretBytes:
    """Read a secret from ``fd`` into wipeable memory; one trailing newline is dropped.

    Reads until end of file or ``max_len`` bytes.  Never produces a ``str`` or ``bytes``.
    """
    scratch = SecretBytes(max_len + 1)
    try:
        total = 0
        view = scratch.view()
        while total <= max_len:
            n = os.readv(fd, [view[total:]])
            if n == 0:
                break
            total += n
        if total > max_len:
            raise ValueError(f"secret longer than {max_len} bytes")
        if total and view[total - 1] == 0x0A:
            total -= 1
            if total and view[total - 1] == 0x0D:
                total -= 1
        out = SecretBytes(total)
        out.view()[:] = view[:total]
        return out
    finally:
        scratch.wipe()
