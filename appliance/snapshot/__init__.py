"""Signed snapshot backup and verified restore with anti-rollback (DESIGN §5, issue 8)."""

from appliance.snapshot.backup import BackupInfo, create_backup
from appliance.snapshot.restore import (
    BackupInvalid,
    finish_restore,
    read_fingerprints,
    restore_into,
    verify_backup,
)

__all__ = [
    "BackupInfo",
    "BackupInvalid",
    "create_backup",
    "finish_restore",
    "read_fingerprints",
    "restore_into",
    "verify_backup",
]
