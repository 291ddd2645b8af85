"""CaliNet: bulk calibration of facts with extra FFN slots beside one MLP block."""

from app.methods.calinet.config import CaliNetConfig
from app.methods.calinet.method import CaliNet, CalibrationRequest, CalibrationResult, calibrate

__all__ = ["CaliNet", "CaliNetConfig", "CalibrationRequest", "CalibrationResult", "calibrate"]
