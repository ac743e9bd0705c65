"""The write-ahead log: hash-chained, checksummed, fsync'd, append-only (DESIGN §5).

Key state is a pure function of this log.  :class:`Wal` is the only writer;
:func:`verify_chain` re-checks a log without locking or changing it.  The frame format
is described in :mod:`appliance.wal.frame`, recovery rules in :mod:`appliance.wal.log`.
"""

from __future__ import annotations

from appliance.wal.frame import FRAME, MAX_BODY, RESERVED, ZERO_HASH, WalRecord
from appliance.wal.log import LOCK_NAME, LOG_NAME, TORN_NAME, Wal, verify_chain

__all__ = [
    "FRAME",
    "LOCK_NAME",
    "LOG_NAME",
    "MAX_BODY",
    "RESERVED",
    "TORN_NAME",
    "ZERO_HASH",
    "Wal",
    "WalRecord",
    "verify_chain",
]
