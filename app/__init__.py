"""factpatch: edit, check, calibrate and revert the factual knowledge of a served language model."""

__version__ = "0.1.0"
