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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from wsimil.config import TrainConfig
from wsimil.errors import WsimilError, problems_error
from wsimil.evaluation.tasks import Task, get_task
from wsimil.methods.options import MethodSpec, method_spec, register_spec
from wsimil.models import MILModel, MILOutput, create_model

if TYPE_CHECKING:
    from wsimil.data.batching import Standardizer
    from wsimil.data.manifest import Manifest
    from wsimil.data.splits import Split


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


class FoldContext(Protocol):
    """What a training method sees of one fold (the trainer's :class:`wsimil.methods.trainer.FoldContext`)."""

    split: Split
    train: np.ndarray  # positions in slide_ids
    val: np.ndarray
    test: np.ndarray
    standardizer: Standardizer | None
    seed: int

    @property
    def cfg(self) -> TrainConfig: ...

    @property
    def device(self) -> str: ...

    @property
    def slide_ids(self) -> list[str]: ...

    @property
    def in_dim(self) -> int: ...

    @property
    def classes(self) -> list[str]: ...

    def make_batch(self, idx: np.ndarray, gen: torch.Generator | None = None) -> Batch: ...

    def train_batches(self, epoch: int, gen: torch.Generator) -> Iterator[Batch]: ...

    def baseline(self, **overrides: Any) -> tuple[MILModel, Standardizer | None]: ...


class TrainingMethod:
    """Builds the model(s) for one fold and turns a batch into named loss terms.

    ``losses``/``train_step`` return a dict whose ``"loss"`` entry is optimised; every other entry is a term the
    trainer logs (as a float, averaged per epoch) to ``history.csv``.
    """

    name = "base"
    #: the method's typed options and run-level settings (:mod:`wsimil.methods.options`), set by ``register_method``
    spec: MethodSpec = MethodSpec("base")

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        spec = self.spec
        if cfg.task not in spec.tasks:
            raise WsimilError(f"method {self.name} supports task {' or '.join(spec.tasks)} only, not {cfg.task!r}")
        problems = spec.problems(cfg.method_kwargs)
        if len(problems) == 1:
            raise WsimilError(problems[0])
        if problems:
            raise problems_error(f"invalid options for method {self.name!r}", problems)
        #: the task (classification, survival): bag loss, validation and test metrics, label handling
        self.task: Task = get_task(cfg.task)
        self.opts: dict[str, Any] = {**spec.defaults, **spec.model_defaults.get(cfg.model, {}), **cfg.method_kwargs}

    @property
    def defaults(self) -> dict[str, Any]:
        """Default options of ``cfg.method_kwargs`` (from :attr:`spec`)."""
        return self.spec.defaults

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
        """The task's bag loss (:meth:`wsimil.evaluation.tasks.Task.loss`): cross-entropy, or the discrete-time
        survival NLL for ``task: survival``."""
        return self.task.loss(logits, batch.y, batch.event)

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


def register_method(name: str, spec: MethodSpec | None = None):
    """Class decorator: register a method under ``name``. Its typed options and run-level settings are ``spec``,
    or the built-in entry of :data:`wsimil.methods.options.METHOD_SPECS` (a method outside wsimil passes its own
    ``spec``, which is then added to that table so configs see it too)."""

    def deco(cls):
        nonlocal spec
        if spec is None:
            spec = method_spec(name)
        if spec is None:
            raise KeyError(f"method {name!r}: pass its MethodSpec (no built-in one in wsimil.methods.options)")
        register_spec(replace(spec, name=name))
        _METHODS[name] = cls
        cls.name, cls.spec = name, method_spec(name)
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of the registered methods (importing any ``wsimil.methods`` module registers the built-in ones)."""
    return sorted(_METHODS)


def method_class(name: str) -> type[TrainingMethod]:
    if name not in _METHODS:
        raise WsimilError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name]  # type: ignore[return-value]


def create_method(cfg: TrainConfig) -> TrainingMethod:
    return method_class(cfg.method)(cfg)
