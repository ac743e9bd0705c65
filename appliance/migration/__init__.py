"""Key migration: the state machine, erasure before the WAL record, crash recovery."""

from appliance.migration.engine import BulkResult, MigrationEngine, plan_path
from appliance.migration.recovery import RecoveryReport, recover

__all__ = ["BulkResult", "MigrationEngine", "RecoveryReport", "plan_path", "recover"]
