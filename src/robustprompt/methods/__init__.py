"""Training-time methods, one file each, found by name through the registry."""
from . import (adversarial_ce, advmaple, advvlp, advvp, apd, apt, cba_fapt, clean, coop, fap, ivlp,  # noqa: F401
               maple, vpt, zeroshot)
from .base import Method, StepResult, build_method, list_methods, method_class, register

__all__ = ["Method", "StepResult", "build_method", "list_methods", "method_class", "register"]
