from app.store.db import Database
from app.store.repos import ROLE_RANK, ROLES, ApiKeyRepo, AuditRepo, CalibrationRepo, EditRepo, JobRepo, RepairRepo

__all__ = ["Database", "ROLES", "ROLE_RANK", "ApiKeyRepo", "AuditRepo", "CalibrationRepo", "EditRepo", "JobRepo", "RepairRepo"]
