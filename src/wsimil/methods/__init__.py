"""Training methods (strategies) run by one trainer: supervised, MHIM, WENO, HMIL and LRMIL stage 2.

Each method's typed options live in :mod:`wsimil.methods.options`; importing this package registers every
built-in method (``create_method(cfg)``, ``list_methods()``)."""

from wsimil.methods import hmil, lrmil, mhim, supervised, weno  # noqa: F401  (fill the registry)
from wsimil.methods.base import TrainingMethod, create_method, list_methods, register_method

__all__ = ["TrainingMethod", "create_method", "list_methods", "register_method"]
