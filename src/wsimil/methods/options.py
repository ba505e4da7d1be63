"""Every training method's typed options and run-level settings, as plain data.

One :class:`MethodSpec` per registered method: its options (name, type, default, help), the ``TrainConfig``
defaults it changes, the manifest label column it reads, the tasks it supports. The method classes
(:mod:`wsimil.methods`) read their defaults from here, :mod:`wsimil.config` its method-dependent defaults, and
``wsimil train`` / ``wsimil methods`` their flags and help; this module imports nothing of wsimil, so each of
them can use it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option of a method (``cfg.method_kwargs[name]``; ``--method-opt name=VALUE`` on the command line).

    ``type`` is the value's type (``float`` also takes an integer); ``None`` is accepted where the default is
    ``None``. Value ranges and choices are checked by the method itself (with its own message)."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return "path" if self.type is Path else self.type.__name__

    def check(self, value: Any, method: str) -> str | None:
        """Why ``value`` does not fit this option (``None`` if it does)."""
        if value is None and self.default is None:
            return None
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
            Path: lambda v: isinstance(v, str | Path),
        }[self.type](value)
        article = "an" if self.type_name[0] in "aeiou" else "a"
        return None if ok else f"method {method!r} option {self.name} must be {article} {self.type_name}, not {value!r}"


@dataclass(frozen=True)
class MethodSpec:
    """What a method declares besides its code: options and the run-level settings the trainer and config read."""

    name: str
    options: tuple[Option, ...] = ()
    #: TrainConfig fields whose default this method changes (e.g. WENO: SGD, lr 1e-3); a value the user sets wins
    config_defaults: dict[str, Any] = field(default_factory=dict)
    #: manifest column holding the label when the user leaves ``label_column`` at its default (HMIL: fine_label)
    label_column: str | None = None
    #: True when ``cfg.model_kwargs`` configure the method's own network (HMIL, WENO), not the registry model
    owns_model_kwargs: bool = False
    #: tasks the method trains (``TrainConfig.task``)
    tasks: tuple[str, ...] = ("classification", "survival")
    #: option defaults that depend on the backbone (``cfg.model``); options the user sets win
    model_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def with_defaults(self, name: str, **defaults: Any) -> MethodSpec:
        """A preset of this method: the same options under ``name`` with some defaults changed."""
        unknown = set(defaults) - {o.name for o in self.options}
        assert not unknown, unknown
        opts = tuple(replace(o, default=defaults.get(o.name, o.default)) for o in self.options)
        return replace(self, name=name, options=opts)

    def problems(self, kwargs: dict[str, Any]) -> list[str]:
        """Unknown options and values of the wrong type in ``kwargs``."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            return [f"method {self.name!r} has no option(s) {', '.join(unknown)}; known options: {names}"]
        return [p for k, v in kwargs.items() if (p := known[k].check(v, self.name))]


_CLASSIFICATION = ("classification",)

SUPERVISED = MethodSpec("supervised")

MHIM = MethodSpec(
    "mhim",
    options=(
        Option(
            "teacher_init",
            Path,
            None,
            "Run folder of a trained baseline (same splits) to initialise the teacher from; default: train one first.",
        ),  # fmt: skip
        Option("baseline_epochs", int, None, "Epochs of the automatically trained baseline (default: the run's)."),
        Option("init_student_projection", bool, False, "Copy the teacher's projection into the student (v1)."),
        Option("score", str, "class_aware", "Instance score: attention (v1) or class_aware (v2)."),
        Option("alpha", float, 0.5, "Weight of the consistency loss."),
        Option("temperature", float, 0.1, "Teacher temperature of the consistency loss."),
        Option("momentum", float, 0.9997, "EMA momentum of the teacher."),
        Option("cosine_momentum", bool, False, "Cosine schedule of the momentum to 1 over the planned steps."),
        Option("high_ratio", float, 0.01, "β_h: fraction of top-scoring instances masked."),
        Option("high_random_fraction", float, 1.0, "f < 1: mask a random f of the top ⌈β_h N / f⌉ (0.5: randomised)."),
        Option("high_decay", bool, False, "Cosine decay of β_h to 0 over the planned steps."),
        Option("low_ratio", float, 0.0, "β_l: fraction of lowest-scoring instances masked."),
        Option("random_ratio", float, 0.0, "β_r: fraction of instances masked at random."),
        Option("recycle_ratio", float, 0.8, "Fraction of remaining instances recycled into tokens (0: no recycling)."),
        Option("recycle_tokens", int, 1, "k global queries (appended tokens)."),
        Option("recycle_heads", int, 8, "Heads of the recycle cross-attention."),
        Option("recycle_momentum", float, 0.9999, "EMA momentum of the global queries."),
    ),
    # the official training uses a cosine learning-rate schedule (Adam, lr 2e-4, wd 1e-5 are the global defaults)
    config_defaults={"scheduler": "cosine"},
)

MHIM_V1 = replace(
    MHIM.with_defaults(
        "mhim_v1",
        init_student_projection=True,
        score="attention",
        alpha=0.1,
        momentum=0.9999,
        high_ratio=0.01,
        high_random_fraction=0.5,
        high_decay=True,
        random_ratio=0.5,
        recycle_ratio=0.0,
    ),
    model_defaults={"transmil": {"high_ratio": 0.03, "random_ratio": 0.0, "low_ratio": 0.8, "cosine_momentum": True}},
)

MHIM_V2 = MHIM.with_defaults("mhim_v2")

WENO = MethodSpec(
    "weno",
    options=(
        Option("warmup", int, 10, "Epochs before the student mines positive bags for the teacher."),
        Option("mining", str, "threshold", "threshold, lowest or none."),
        Option("threshold", float, 0.5, "mining=threshold: hide instances with student p > threshold."),
        Option("keep_k", int, None, "mining=lowest: keep the keep_k lowest-scored instances."),
        Option("neg_weight", float, 0.1, "Weight w of the student loss."),
        Option("instance_batch", int, 512, "Student mini-batch size (instances)."),
        Option("pool_instances", int, 500_000, "Most instances shuffled together in the student phase."),
    ),
    # the official optimiser; model selection on validation AUC, because the student's max-pooled bag probability
    # is biased upwards by the asymmetric student loss (its validation cross-entropy says little)
    config_defaults={"optimizer": "sgd", "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "monitor": "val_auc"},
    owns_model_kwargs=True,
    tasks=_CLASSIFICATION,
)

HMIL = MethodSpec(
    "hmil",
    options=(
        Option("hierarchy", Path, None, "YAML fine→coarse mapping; default: the manifest's coarse_label column."),
        Option("lambda_ia", float, 1.0, "Attention matching weight."),
        Option("lambda_ba", float, 1.0, "Bag alignment weight."),
        Option("beta_schedule", str, "quadratic", "quadratic: 1-(e/E)^2, or linear: 1-e/E."),
        Option("temperature", float, 0.1, "SupCon temperature (the low end of the cosine schedule)."),
        Option("temperature_schedule", str, "constant", "constant, or cosine (official)."),
        Option("temperature_max", float, 1.0, "Cosine schedule: temperature at the first and last epoch."),
        Option("plateau_patience", int, 5, "ReduceLROnPlateau on the training loss (0: off)."),
        Option("plateau_factor", float, 0.1, "ReduceLROnPlateau factor."),
    ),
    config_defaults={"lr": 1e-4, "batch_size": 16, "weight_decay": 0.0},
    label_column="fine_label",
    owns_model_kwargs=True,
    tasks=_CLASSIFICATION,
)

LRMIL = MethodSpec(
    "lrmil",
    options=(
        Option("teacher_dump", Path, None, "HDF5 of the fold teacher's outputs (wsimil.methods.teacher_dump)."),
        Option("links_dir", Path, None, "JOB/links of the nested tiling."),
        Option("links_dataset", str, "links_5x_20x", "Dataset of the links files to read."),
        Option("lambda_ce", float, 1.0, "Weight of the bag cross-entropy."),
        Option("lambda_bag", float, 1.0, "Weight of the bag-logit distillation."),
        Option("lambda_soft", float, 1.0, "Weight of the attention distillation."),
        Option("lambda_hard", float, 1.0, "Weight of the instance loss."),
        Option("t_bag", float, 1.0, "Temperature of the bag-logit distillation."),
        Option("t_attn", float, 1.0, "Temperature of the attention distillation."),
        Option("instance_targets", str, "mass", "mass, fraction, fixed or paper (wsimil.methods.lrmil_losses)."),
        Option("topk", int, 4, "k of instance_targets fixed / paper."),
        Option("instance_mass", float, 0.5, "instance_targets=mass: teacher attention mass labelled positive."),
        Option("instance_frac", float, 0.02, "instance_targets=fraction: share of the bag labelled positive."),
        Option("instance_max_frac", float, 0.1, "Most of a bag labelled positive."),
        Option("teacher_agg", str, "mean", "Guidance of an LR patch from its HR children: mean or max."),
    ),
    config_defaults={"lr": 1e-4},
    tasks=_CLASSIFICATION,
)

#: every built-in method's spec by name (the registry of :mod:`wsimil.methods` holds one class per entry)
METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (SUPERVISED, MHIM, MHIM_V1, MHIM_V2, WENO, HMIL, LRMIL)}


def register_spec(spec: MethodSpec) -> None:
    """Add (or replace) the spec of a method registered outside wsimil (:func:`wsimil.methods.register_method`)."""
    METHOD_SPECS[spec.name] = spec


def method_spec(name: str) -> MethodSpec | None:
    """The spec of method ``name`` (``None`` for an unknown name, which ``create_method`` reports)."""
    return METHOD_SPECS.get(name)
