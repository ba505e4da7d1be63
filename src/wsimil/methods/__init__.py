"""Training methods (strategies) run by one trainer: ``supervised`` now; MHIM, WENO, HMIL and LRMIL plug in here."""

from wsimil.lrmil import method as _lrmil_method  # noqa: F401  (LRMIL stage 2: method "lrmil")
from wsimil.methods import hmil, mhim, supervised, weno  # noqa: F401  (fill the registry)
from wsimil.methods.base import TrainingMethod, create_method, list_methods, register_method

__all__ = ["TrainingMethod", "create_method", "list_methods", "register_method"]
