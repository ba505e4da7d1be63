"""The strategy interface a training method implements; the trainer owns data, folds, early stopping and I/O."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from wsimil.config import TrainConfig
from wsimil.errors import WsimilError
from wsimil.models import MILModel, MILOutput, create_model


class TrainingMethod:
    """Builds the model(s) for one fold and turns a batch into named loss terms.

    ``losses`` returns a dict whose ``"loss"`` entry is optimised; every other entry is a detached-or-not term
    that the trainer logs per epoch to ``history.csv``.
    """

    name = "base"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def build(self, in_dim: int, n_classes: int) -> MILModel:
        return create_model(self.cfg.model, in_dim, n_classes, **self.cfg.model_kwargs)

    def losses(self, model: MILModel, out: MILOutput, y: Tensor, mask: Tensor, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def on_step_end(self, model: MILModel) -> None:
        """Hook after each optimiser step (e.g. EMA teacher updates)."""


_METHODS: dict[str, Callable[[TrainConfig], TrainingMethod]] = {}


def register_method(name: str):
    def deco(cls):
        _METHODS[name] = cls
        cls.name = name
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(cfg: TrainConfig) -> TrainingMethod:
    if cfg.method not in _METHODS:
        raise WsimilError(f"unknown method {cfg.method!r}; available: {', '.join(list_methods())}")
    return _METHODS[cfg.method](cfg)
