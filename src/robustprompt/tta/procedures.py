"""The registry of test-time procedures, populated by importing each procedure's module."""
from . import atpt, ctpt, mta, rtpt, tpt, ttc  # noqa: F401
from . import tapt  # noqa: F401
from .base import TTAParams, TTAProcedure, build_procedure, list_procedures, procedure_class

__all__ = ["TTAParams", "TTAProcedure", "build_procedure", "list_procedures", "procedure_class"]
