"""Editing methods: one folder each (``config.py`` + ``method.py``), registered by name."""

from app.methods.base import EditRequest, FitResult, Method, MethodConfig, get, names, register

__all__ = ["EditRequest", "FitResult", "Method", "MethodConfig", "get", "names", "register"]
