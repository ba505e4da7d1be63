"""Typed run configuration. Each field maps to a CLI flag of ``wsimil train`` and to a key in a YAML file; the
resolved config is saved beside every run's outputs.

Presets ship inside the package (``wsimil/configs/*.yaml``): ``--config classic_mil`` (or a ``configs/NAME.yaml``
path that does not exist where you run) reads the packaged preset.

``model_kwargs`` in a file belong to the file's ``model``. When another model is chosen (``--model transmil`` with
``configs/classic_mil.yaml``), options that the file's model accepts and the chosen one does not are dropped with a
warning naming them; the chosen model keeps the options it shares and its own defaults for the rest. Options no
model accepts, and any option given with ``--model-opt``, are passed on, and a bad one fails with the model's name.
Methods with their own network (HMIL, WENO) take ``model_kwargs`` as they are."""

from __future__ import annotations

import warnings
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
        """Fields left unset take the method's own defaults (``MethodSpec.config_defaults``)."""
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            from wsimil.methods.options import method_spec  # the table of method settings (imports no config)

            spec = method_spec(data["method"])
            data = {**(spec.config_defaults if spec is not None else {}), **data}
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
        path = preset_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WsimilError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise WsimilError(f"config file {path} must hold a mapping of option: value")
    return data


def list_presets() -> list[str]:
    """Names of the config presets shipped in the package."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("wsimil").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def preset_path(path: str | Path) -> Path:
    """The packaged preset a missing ``path`` names (``classic_mil``, ``classic_mil.yaml``, ``configs/NAME.yaml``),
    or a :class:`WsimilError` saying the file does not exist."""
    from importlib.resources import as_file, files

    path = Path(path)
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent.name in ("", "configs") and name in list_presets():
        with as_file(files("wsimil").joinpath("configs", f"{name}.yaml")) as p:
            return Path(p)
    raise WsimilError(f"config file {path} does not exist (presets: {', '.join(list_presets())})")


def _model_kwargs_for(kwargs: dict[str, Any], file_model: str, model: str, method: str, source: str) -> dict:
    """``kwargs`` written for ``file_model`` without the options that only it takes, when ``model`` is chosen."""
    from wsimil.methods.options import method_spec
    from wsimil.models import list_models
    from wsimil.models.base import model_options

    spec = method_spec(method)
    if (spec is not None and spec.owns_model_kwargs) or file_model not in list_models() or model not in list_models():
        return kwargs
    theirs, ours = model_options(file_model), model_options(model)
    if ours is None:
        return kwargs
    drop = sorted(k for k in kwargs if k not in ours and (theirs is None or k in theirs))
    if drop:
        warnings.warn(
            f"{source}: model option(s) {', '.join(drop)} belong to {file_model!r} and are not used by {model!r}",
            UserWarning,
            stacklevel=3,
        )
    return {k: v for k, v in kwargs.items() if k not in drop}


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
    file_model = data.get("model", TrainConfig.model_fields["model"].default)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if path and overrides.get("model_kwargs") is None and isinstance(data.get("model_kwargs"), dict):
        method = data.get("method", TrainConfig.model_fields["method"].default)
        model = data.get("model", file_model)
        if isinstance(model, str) and isinstance(method, str) and model != file_model:
            data["model_kwargs"] = _model_kwargs_for(data["model_kwargs"], file_model, model, method, str(path))
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
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise WsimilError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsimilError(f"--device {device} was requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise WsimilError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
