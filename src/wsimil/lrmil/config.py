"""Typed configuration of an LRMIL run (``wsimil lrmil``; YAML: ``configs/lrmil.yaml``). Defaults follow SPEC §1;
the resolved config is saved as ``RUN/config.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from wsimil.config import TrainConfig
from wsimil.errors import WsimilError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


#: the trainer options one LRMIL training (teacher, LR baseline, student) sets: TrainConfig's own fields, with their
#: types, bounds and defaults, except LRMIL's learning rate (SPEC §1); the rest (splits, seed, device, …) come from
#: the LRMIL config itself (:func:`wsimil.lrmil.pipeline.train_config`)
MIL_FIELDS = ("model", "model_kwargs", "epochs", "lr", "weight_decay", "patience", "min_epochs", "monitor",
              "batch_size", "standardize")  # fmt: skip
MIL_DEFAULTS = {"lr": 1e-4}
MIL_TYPES = {"model": Literal["abmil", "gated_abmil"]}  # the teacher dump and the student read ABMIL attention


def _mil_settings() -> type[BaseModel]:
    from pydantic.fields import FieldInfo

    fields: dict[str, Any] = {}
    for name in MIL_FIELDS:
        f = TrainConfig.model_fields[name]
        if name in MIL_DEFAULTS:
            f = FieldInfo.merge_field_infos(f, default=MIL_DEFAULTS[name])
        fields[name] = (MIL_TYPES.get(name, f.annotation), f)
    doc = "An ABMIL training of LRMIL (teacher, LR baseline, student): the :class:`TrainConfig` fields it sets."
    return create_model("MILSettings", __base__=_Strict, __doc__=doc, __module__=__name__, **fields)


MILSettings = _mil_settings()
# [decision] SPEC §1 selects on validation AUC; on small validation parts the AUC reaches 1.0 within an epoch or two
# and, ties never improving, freezes the choice at an undertrained model (40-slide synthetic cohort, 4 validation
# slides per fold: HR teacher test AUC 0.875 selected on val_auc vs 1.000 on val_loss), so the default monitor is
# TrainConfig's validation loss; ``monitor: val_auc`` gives SPEC's rule.


class Stage1Config(_Strict):
    """Patch-level cross-resolution distillation (SPEC §1 stage 1)."""

    enabled: bool = True  # False = ablation "no stage 1": the student MIL reads the undistilled encoder's LR features
    # [decision] a budget of optimiser steps with warm-up and cosine decay from 1e-4 (SPEC: Adam 1e-5 for a few
    # epochs, about 150 steps on 40 slides, which hardly moves the weights); epochs, when set, replaces steps
    steps: int = Field(500, ge=1)
    epochs: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup: float = Field(0.05, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    augment: bool = True  # flips/rotations with the children permuted alike, mild brightness/contrast
    eval_every: int = Field(50, ge=1)  # steps between evaluations on held-out pairs (the fold's validation slides)
    lambda_layer: float = Field(1.0, ge=0)
    lambda_attn: float = Field(1.0, ge=0)
    layers: list[int] | None = None  # teacher/student blocks K; default first, second, last-but-one
    input_size: int | None = None  # student input in px; default the LR patch size (ViT: whole token blocks per child)
    # batch norm (CNN students): statistics re-estimated on LR patches, then fixed | the teacher's | train mode
    norm_stats: Literal["reestimate", "teacher", "train"] = "reestimate"
    # DataLoader workers (CLI --loader-workers; YAML key workers or loader_workers)
    workers: int = Field(0, ge=0, validation_alias=AliasChoices("workers", "loader_workers"))


class Stage2Config(_Strict):
    """Student losses (SPEC §1 stage 2); a zero weight is the ablation of that term."""

    lambda_ce: float = Field(1.0, ge=0)
    lambda_bag: float = Field(1.0, ge=0)
    lambda_soft: float = Field(1.0, ge=0)
    lambda_hard: float = Field(1.0, ge=0)
    t_bag: float = Field(1.0, gt=0)
    t_attn: float = Field(1.0, gt=0)
    # pseudo-labelled instances per bag: mass (default) / fraction fit the bag; paper = top 4 → 1, bottom 4 → 0
    # in every bag (SPEC §1), fixed = top/bottom topk in positive bags only (see wsimil.methods.lrmil_losses)
    instance_targets: Literal["mass", "fraction", "fixed", "paper"] = "mass"
    topk: int = Field(4, ge=1)
    instance_mass: float = Field(0.5, gt=0, le=1)
    instance_frac: float = Field(0.02, gt=0, le=1)
    instance_max_frac: float = Field(0.1, gt=0, le=1)
    teacher_agg: Literal["mean", "max"] = "mean"


class LRMILConfig(_Strict):
    encoder: str = "resnet18"
    # a file, "hub", or None (seeded random init); CLI --encoder-weights, YAML weights or encoder_weights
    weights: str | None = Field(None, validation_alias=AliasChoices("weights", "encoder_weights"))
    hr_mag: float = 20.0
    lr_mag: float = 5.0
    patch_size: int | None = None  # default: the job's patch size (tiling.yaml)
    folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    classes: list[str] | None = None
    label_column: str = "label"
    # feature extraction
    batch_size: int = Field(64, ge=1)
    # DataLoader workers reading patches (CLI --loader-workers; YAML key workers or loader_workers)
    workers: int = Field(0, ge=0, validation_alias=AliasChoices("workers", "loader_workers"))
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    reader: str | None = None  # default: the job's reader
    threads: int | str = "auto"  # CPU threads: N, or auto (chosen per step: wsimil.threads)
    # trainings
    teacher: MILSettings = Field(default_factory=MILSettings)
    student: MILSettings = Field(default_factory=MILSettings)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    # stage 1 needs no labels: more slides to distil on (a slide folder, a CSV with 'slide_id' or 'path'), tiled in
    # the job at both magnifications; a fold never distils on its own test (or validation) slides unless
    # stage1_test_slides is set (transductive use of unlabelled test slides)
    stage1_slides: str | None = None
    stage1_test_slides: bool = False
    shared: str | None = None  # run folder holding features, teacher, baseline and stage 1 (default: the run's own)
    # evaluation
    bootstrap: int = Field(1000, ge=0)
    timing_slides: int = Field(4, ge=0)  # slides timed end to end on both inference paths (0 = skip)

    @field_validator("hr_mag", "lr_mag", mode="before")
    @classmethod
    def _mag(cls, v: Any) -> float:
        from wsimil.slide.mag import parse_mag

        return parse_mag(v, "hr_mag/lr_mag")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> int | str:
        from wsimil.threads import parse_threads

        return parse_threads(v)


def load_lrmil_config(path: str | Path | None = None, **overrides: Any) -> LRMILConfig:
    """Defaults ← YAML ← overrides. Nested keys are dotted (``{"stage1.epochs": 3}``); ``None`` = not given."""
    from wsimil.config import read_config_file

    data = read_config_file(path)
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return LRMILConfig(**data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise WsimilError(f"invalid LRMIL configuration{where}:\n  - " + "\n  - ".join(msgs)) from None
