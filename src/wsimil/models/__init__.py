"""MIL aggregators behind one registry: ``create_model(name, in_dim, n_classes, **kw)``, ``list_models()``."""

from wsimil.models import abmil, clam, dsmil, lrmil_student, pooling, transmil  # noqa: F401  (fill the registry)
from wsimil.models.base import MILModel, MILOutput, create_model, list_models, register_model

__all__ = ["MILModel", "MILOutput", "create_model", "list_models", "register_model"]
