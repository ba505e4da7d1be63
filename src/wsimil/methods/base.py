"""The strategy interface a training method implements; the trainer owns data, folds, early stopping and I/O.

A method's life in one run::

    method = create_method(cfg)            # from cfg.method and cfg.method_kwargs
    method.prepare(manifest)               # once: validate method-specific manifest columns, build label maps
    per fold:
        model = method.build(in_dim, n_classes)
        method.setup(model, ctx)           # e.g. initialise an EMA teacher from a baseline fold
        per epoch: method.fit_epoch(model, opt, ctx, epoch, gen)   # default: loop over train_step
        model is evaluated through model(x, mask) -> MILOutput (logits + optional extra_logits heads)

Everything a method needs beyond ``build``/``losses`` has a default, so a plain loss variant is ~10 lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsimil.config import TrainConfig
from wsimil.errors import WsimilError
from wsimil.models import MILModel, MILOutput, create_model

if TYPE_CHECKING:
    from wsimil.data.manifest import Manifest
    from wsimil.methods.trainer import FoldContext


@dataclass
class Batch:
    """One training mini-batch of padded bags.

    Attributes:
        x: ``(B, N, D)`` features (standardised when the run standardises), zero on padding.
        mask: ``(B, N)`` True for real instances.
        y: ``(B,)`` class indices (survival: the discrete time bin).
        index: ``(B,)`` positions of the bags in the trainer's slide list (``ctx.slide_ids[index[b]]``), so a
            method can look up per-slide side data.
        rows: per bag, the original instance rows kept when ``max_instances`` subsampled the bag, else None.
        event: ``(B,)`` float 1 = event observed, 0 = censored (survival only).
        time: ``(B,)`` follow-up time (survival only).
    """

    x: Tensor
    mask: Tensor
    y: Tensor
    index: np.ndarray
    rows: list[Tensor | None]
    event: Tensor | None = None
    time: Tensor | None = None


class TrainingMethod:
    """Builds the model(s) for one fold and turns a batch into named loss terms.

    ``losses``/``train_step`` return a dict whose ``"loss"`` entry is optimised; every other entry is a term the
    trainer logs (as a float, averaged per epoch) to ``history.csv``.
    """

    name = "base"
    #: default options of ``cfg.method_kwargs``; unknown keys are rejected with the list of known ones
    defaults: dict[str, Any] = {}
    #: manifest column holding the label when the user leaves ``label_column`` at its default (HMIL: fine_label)
    label_column: str | None = None
    #: TrainConfig fields whose default this method changes (e.g. WENO: SGD, lr 1e-3); a value the user sets wins
    config_defaults: dict[str, Any] = {}
    #: True when ``cfg.model_kwargs`` configure the method's own network (HMIL, WENO), not the registry model
    owns_model_kwargs: bool = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        unknown = sorted(set(cfg.method_kwargs) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise WsimilError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; known options: {known}")
        self.opts: dict[str, Any] = {**self.defaults, **cfg.method_kwargs}

    # -------------------------------------------------------------- run-level
    def prepare(self, manifest: Manifest) -> None:
        """Called once per run with the validated manifest, before any fold (check extra columns here)."""

    def state(self) -> dict:
        """What :meth:`restore` needs to rebuild the model later (saved in every checkpoint)."""
        return {}

    def restore(self, state: dict) -> None:
        """Inverse of :meth:`state`, called by ``load_model`` before ``build``."""

    # -------------------------------------------------------------- fold-level
    def build(self, in_dim: int, n_classes: int) -> MILModel:
        return create_model(self.cfg.model, in_dim, n_classes, **self.cfg.model_kwargs)

    def setup(self, model: MILModel, ctx: FoldContext) -> None:
        """Called once per fold after ``build`` and before the first epoch (teachers, side data)."""

    def parameters(self, model: MILModel) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (default: every trainable parameter of ``model``)."""
        return [p for p in model.parameters() if p.requires_grad]

    def bag_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """The task's bag loss: cross-entropy, or the discrete-time survival NLL for ``task: survival``."""
        if self.cfg.task == "survival":
            from wsimil.evaluation.survival import nll_survival_loss

            return nll_survival_loss(logits, batch.y, batch.event)
        return F.cross_entropy(logits, batch.y)

    def losses(self, model: MILModel, out: MILOutput, batch: Batch, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def train_step(self, model: MILModel, batch: Batch, epoch: int) -> dict[str, Tensor]:
        """Forward one batch and return the loss terms (override when the method controls the forward)."""
        return self.losses(model, model(batch.x, batch.mask), batch, epoch)

    def on_step_end(self, model: MILModel) -> None:
        """Hook after each optimiser step (e.g. EMA teacher updates)."""

    def on_epoch_end(self, model: MILModel, epoch: int) -> None:
        """Hook after each training epoch, before validation."""

    def fit_epoch(
        self, model: MILModel, opt: torch.optim.Optimizer, ctx: FoldContext, epoch: int, gen: torch.Generator
    ) -> dict[str, float]:
        """One epoch over the fold's training bags; returns the mean of each loss term. Override for methods
        with their own loop (e.g. alternating bag and instance phases)."""
        sums: dict[str, float] = {}
        n = 0
        for batch in ctx.train_batches(epoch, gen):
            terms = self.train_step(model, batch, epoch)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.parameters(model), self.cfg.grad_clip)
            opt.step()
            self.on_step_end(model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
        self.on_epoch_end(model, epoch)
        return {k: v / max(n, 1) for k, v in sums.items()}

    # -------------------------------------------------------------- evaluation
    def head_labels(
        self, head: str, slide_ids: list[str], labels: np.ndarray, classes: list[str]
    ) -> tuple[np.ndarray, list[str]]:
        """Labels and class names to score the extra output head ``head`` (a key of ``MILOutput.extra_logits``,
        reported in ``results.json`` as ``metrics_<head>``) against; default: the bag labels
        (e.g. WENO's teacher head). HMIL maps fine labels to coarse ones here."""
        return labels, classes


_METHODS: dict[str, Callable[[TrainConfig], TrainingMethod]] = {}


def register_method(name: str):
    def deco(cls):
        _METHODS[name] = cls
        cls.name = name
        return cls

    return deco


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def create_method(cfg: TrainConfig) -> TrainingMethod:
    _load_builtin()
    if cfg.method not in _METHODS:
        raise WsimilError(f"unknown method {cfg.method!r}; available: {', '.join(list_methods())}")
    return _METHODS[cfg.method](cfg)


def method_config_defaults(name: str) -> dict[str, Any]:
    """The ``config_defaults`` of method ``name`` (empty for an unknown name, which ``create_method`` reports)."""
    _load_builtin()
    cls = _METHODS.get(name)
    return dict(cls.config_defaults) if cls is not None else {}


def method_owns_model_kwargs(name: str) -> bool:
    """Whether method ``name`` passes ``model_kwargs`` to its own network rather than to ``create_model``."""
    _load_builtin()
    cls = _METHODS.get(name)
    return bool(cls is not None and cls.owns_model_kwargs)


def _load_builtin() -> None:
    import wsimil.methods  # noqa: F401 - registers the built-in methods
