"""Repair (Tanno et al., 2022): find the trained data that caused failures, and erase them."""

from app.methods.repair.config import RepairConfig
from app.methods.repair.method import Failure, Repair, RepairOutcome, ScopedCalibration, ScopedEdit, build_questions, repair

__all__ = ["Failure", "Repair", "RepairConfig", "RepairOutcome", "ScopedCalibration", "ScopedEdit", "build_questions", "repair"]
