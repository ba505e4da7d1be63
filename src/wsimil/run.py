"""A training run's folder (:class:`RunDir`) and the checkpoint → (config, method, model) round trip.

Layout of ``RUN/`` (written by :func:`wsimil.methods.trainer.run_training`, read by ``wsimil evaluate``,
``wsimil report``, heatmaps and the bundle writer)::

    config.yaml                           resolved configuration (+ data paths, classes, feature width, version)
    checkpoints/repeat{r}_fold{k}.safetensors   per-fold weights and metadata (wsimil 0.1: ``.pt``, read safely)
    history.csv                           per fold and epoch: loss terms, validation loss and AUC
    predictions.csv                       out-of-fold predictions of every test slide
    results.json                          metrics per fold and summarised; its presence marks a finished run
    baseline/                             a nested run (MHIM's teacher initialisation), same layout
    bundle/                               written by ``wsimil train`` after training (:mod:`wsimil.predict`)

Every path of that layout is named here and nowhere else; a fold checkpoint is turned back into its model only by
:func:`load_fold` (the config a checkpoint records → the method → ``method.build`` → the weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from wsimil.checkpoint import LEGACY_SUFFIX, SUFFIX, fold_checkpoint, fold_checkpoints, load_checkpoint, save_checkpoint
from wsimil.config import TrainConfig
from wsimil.errors import WsimilError
from wsimil.io import write_csv, write_json, write_yaml
from wsimil.methods.base import TrainingMethod, create_method

if TYPE_CHECKING:
    from wsimil.models import MILModel


class RunDir:
    """The folder of one training run: where each file of the layout above lives, and how it is written and read.

    ``RunDir(path)`` touches nothing on disk; writers create the folder as they go."""

    CONFIG = "config.yaml"
    RESULTS = "results.json"
    PREDICTIONS = "predictions.csv"
    HISTORY = "history.csv"
    CHECKPOINTS = "checkpoints"
    BUNDLE = "bundle"
    BASELINE = "baseline"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / self.RESULTS

    @property
    def predictions_path(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def history_path(self) -> Path:
        return self.path / self.HISTORY

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def bundle_dir(self) -> Path:
        return self.path / self.BUNDLE

    @property
    def baseline(self) -> RunDir:
        """The nested run of a method's supervised baseline (MHIM's teacher initialisation)."""
        return RunDir(self.path / self.BASELINE)

    @property
    def finished(self) -> bool:
        """True once training wrote ``results.json`` (the last file of a run)."""
        return self.config_path.is_file() and self.results_path.is_file()

    def checkpoint(self, repeat: int, fold: int) -> Path:
        """The checkpoint of one fold (the wsimil 0.1 ``.pt`` when only that exists)."""
        return fold_checkpoint(self.checkpoints_dir, repeat, fold)

    def checkpoints(self) -> list[Path]:
        """Every fold checkpoint on disk, in name order."""
        return fold_checkpoints(self.checkpoints_dir)

    def result_checkpoints(self) -> list[Path]:
        """The checkpoints of the folds a finished run reports in ``results.json``, or a :class:`WsimilError`
        naming the missing ones."""
        res = self.read_results()
        ckpts = [self.checkpoint(f["repeat"], f["fold"]) for f in res.get("folds", [])]
        missing = [str(c) for c in ckpts if not c.is_file()]
        if missing or not ckpts:
            raise WsimilError(
                f"run {self.path}: missing checkpoints {', '.join(missing) or '(no folds in results.json)'}"
            )
        return ckpts

    # ------------------------------------------------------------------ writers
    def write_config(self, resolved: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_yaml(self.config_path, resolved)

    def write_results(self, payload: dict[str, Any]) -> None:
        write_json(self.results_path, payload)

    def write_predictions(self, table: pd.DataFrame) -> None:
        write_csv(self.predictions_path, table)

    def write_history(self, table: pd.DataFrame) -> None:
        write_csv(self.history_path, table)

    def save_fold(self, repeat: int, fold: int, checkpoint: dict[str, Any]) -> Path:
        """Write one fold's checkpoint (safetensors + JSON); a wsimil 0.1 ``.pt`` of the same fold is removed, so
        each fold keeps one file."""
        path = self.checkpoints_dir / f"repeat{int(repeat)}_fold{int(fold)}{SUFFIX}"
        save_checkpoint(path, checkpoint)
        path.with_suffix(LEGACY_SUFFIX).unlink(missing_ok=True)
        return path

    def load_fold_checkpoint(self, repeat: int, fold: int) -> dict[str, Any] | None:
        """The stored checkpoint dict of one fold, or ``None`` when there is none."""
        path = self.checkpoint(repeat, fold)
        return load_checkpoint(path) if path.is_file() else None

    # ------------------------------------------------------------------ readers
    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise WsimilError(f"{self.path} is not a wsimil run: {self.config_path} is missing")
        return yaml.safe_load(self.config_path.read_text()) or {}

    def read_results(self) -> dict[str, Any]:
        if not self.finished:
            raise WsimilError(f"{self.path} is not a finished wsimil run (config.yaml and results.json are needed)")
        return json.loads(self.results_path.read_text())

    def read_predictions(self) -> pd.DataFrame:
        if not self.predictions_path.is_file():
            raise WsimilError(f"run {self.path} has no {self.PREDICTIONS}")
        return pd.read_csv(self.predictions_path, dtype={"slide_id": str})


# ---------------------------------------------------------------------- checkpoint → model
def checkpoint_config(ck: dict[str, Any]) -> TrainConfig:
    """The part of the training config a fold checkpoint records (what rebuilding its model needs)."""
    return TrainConfig(
        model=ck["model"],
        model_kwargs=ck.get("model_kwargs") or {},
        method=ck.get("method", "supervised"),
        method_kwargs=ck.get("method_kwargs") or {},
        task=ck.get("task", "classification"),
    )


def checkpoint_method(ck: dict[str, Any]) -> TrainingMethod:
    """The training method of a checkpoint, restored to the state it had when the fold was saved."""
    method = create_method(checkpoint_config(ck))
    method.restore(ck.get("method_state") or {})
    return method


@dataclass
class LoadedFold:
    """A fold checkpoint rebuilt: the model (eval mode), the checkpoint dict and the restored method."""

    model: MILModel
    checkpoint: dict[str, Any]
    method: TrainingMethod


def load_fold(ckpt_path: str | Path, device: str = "cpu") -> LoadedFold:
    """Rebuild a fold's model from its checkpoint, read without unpickling
    (:func:`wsimil.checkpoint.load_checkpoint`)."""
    ck = load_checkpoint(ckpt_path)
    method = checkpoint_method(ck)
    model = method.build(int(ck["in_dim"]), int(ck["n_classes"]))
    model.load_state_dict(ck["state_dict"])
    return LoadedFold(model.to(device).eval(), ck, method)


def load_model(ckpt_path: str | Path, device: str = "cpu") -> tuple[MILModel, dict[str, Any]]:
    """``(model in eval mode on device, checkpoint dict)`` of a fold checkpoint (see :func:`load_fold`)."""
    fold = load_fold(ckpt_path, device)
    return fold.model, fold.checkpoint
