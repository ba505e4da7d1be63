"""Typed run configuration. Each field maps to a CLI flag of ``wsimil train`` and to a key in a YAML file; the
resolved config is saved beside every run's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsimil.errors import WsimilError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # what to train
    model: str = "abmil"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    method: str = "supervised"
    method_kwargs: dict[str, Any] = Field(default_factory=dict)
    task: Literal["classification", "survival"] = "classification"
    survival_bins: int = Field(4, ge=2, description="quantile time bins of the discrete-time survival model")
    classes: list[str] | None = None
    label_column: str = "label"
    # optimisation
    epochs: int = Field(50, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    scheduler: Literal["none", "cosine"] = "none"
    batch_size: int = Field(1, ge=1)
    grad_clip: float | None = None
    balanced_sampling: bool = True
    standardize: bool = True  # per-dimension, statistics from the training part of each fold only
    max_instances: int | None = Field(None, ge=1)
    # validation and early stopping
    early_stopping: bool = True
    monitor: Literal["val_loss", "val_auc"] = "val_loss"
    patience: int = Field(10, ge=1)
    min_epochs: int = Field(10, ge=0)  # epochs before a model may be kept (selected on validation) or stopped
    # splits
    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    splits: str | None = None
    # evaluation
    bootstrap: int = Field(1000, ge=0)
    # runtime
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = Field(8, ge=1)
    max_memory_gb: float = Field(16.0, ge=0, description="keep bags in RAM up to this size, else read from disk")
    threads: int | str = Field("auto", description="CPU threads: N, or auto (chosen per step: wsimil.threads)")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Fields left unset take the method's own defaults (``TrainingMethod.config_defaults``)."""
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            from wsimil.methods.base import method_config_defaults

            data = {**method_config_defaults(data["method"]), **data}
        return data

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> int | str:
        from wsimil.threads import parse_threads

        return parse_threads(v)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from wsimil.models import list_models

        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; available: {', '.join(list_models())}")
        return v


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The option mapping of a YAML config file (``{}`` without one), with a clear error for a missing file,
    invalid YAML or a file that is not a mapping."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise WsimilError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WsimilError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise WsimilError(f"config file {path} must hold a mapping of option: value")
    return data


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["a=1", "b=[2, 3]"]`` → ``{"a": 1, "b": [2, 3]}`` (values parsed as YAML); ``flag`` names the option in
    errors."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WsimilError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise WsimilError(f"{flag} {item!r}: value is not valid YAML: {e}") from None
    return out


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults ← YAML file ← overrides (CLI flags; ``None`` means "not given")."""
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise WsimilError(f"invalid configuration{where}:\n  - " + "\n  - ".join(msgs)) from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WsimilError(f"--device {device} was requested but CUDA is not available; use --device cpu")
    return device
