"""The run folder (RunDir) and the checkpoint → (config, method, model) round trip."""

from __future__ import annotations

import pytest
import torch

from wsimil.checkpoint import LEGACY_SUFFIX, SUFFIX
from wsimil.config import TrainConfig
from wsimil.errors import WsimilError
from wsimil.methods import create_method
from wsimil.run import RunDir, checkpoint_config, load_fold, load_model


def _checkpoint(cfg: TrainConfig, model, in_dim: int, classes: list[str], method) -> dict:
    return {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "method": cfg.method,
        "method_kwargs": cfg.method_kwargs,
        "method_state": method.state(),
        "task": cfg.task,
        "in_dim": in_dim,
        "n_classes": len(classes),
        "classes": classes,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "standardizer": None,
        "repeat": 1,
        "fold": 2,
    }


@pytest.mark.parametrize(
    ("model", "method", "model_kwargs"),
    [("abmil", "supervised", {"hidden_dims": [8]}), ("transmil", "supervised", {}), ("abmil", "lrmil", {})],
)
def test_saved_fold_loads_to_the_same_model(tmp_path, model, method, model_kwargs):
    torch.manual_seed(0)
    cfg = TrainConfig(model=model, method=method, model_kwargs=model_kwargs)
    m = create_method(cfg)
    net = m.build(6, 3).eval()
    run = RunDir(tmp_path / "run")
    path = run.save_fold(1, 2, _checkpoint(cfg, net, 6, ["a", "b", "c"], m))
    assert path == run.checkpoints_dir / f"repeat1_fold2{SUFFIX}" == run.checkpoint(1, 2)
    x = torch.randn(2, 5, 6)
    fold = load_fold(path)
    assert not fold.model.training and fold.method.name == method
    assert checkpoint_config(fold.checkpoint).model_kwargs == model_kwargs
    got, ck = load_model(path)
    torch.testing.assert_close(got(x).logits, net(x).logits)
    assert ck["classes"] == ["a", "b", "c"] and run.load_fold_checkpoint(1, 2)["fold"] == 2
    assert run.load_fold_checkpoint(0, 0) is None


def test_legacy_checkpoint_is_found_and_replaced_on_save(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints_dir.mkdir()
    legacy = run.checkpoints_dir / f"repeat0_fold0{LEGACY_SUFFIX}"
    legacy.write_bytes(b"old")
    assert run.checkpoint(0, 0) == legacy and run.checkpoints() == [legacy]
    cfg = TrainConfig(model="mean")
    m = create_method(cfg)
    ck = _checkpoint(cfg, m.build(4, 2), 4, ["0", "1"], m)
    new = run.save_fold(0, 0, ck)
    assert not legacy.exists() and run.checkpoint(0, 0) == new and run.checkpoints() == [new]


def test_run_folder_is_read_through_rundir(digit_abmil_run, tmp_path):
    run = RunDir(digit_abmil_run[0])
    assert run.finished and run.read_config()["model"] == "abmil"
    assert [p.name for p in run.result_checkpoints()] == [f"repeat0_fold{k}{SUFFIX}" for k in (0, 1)]
    assert {"slide_id", "label", "prob_0"} <= set(run.read_predictions().columns)
    assert run.bundle_dir == run.path / "bundle" and run.baseline.path == run.path / "baseline"
    empty = RunDir(tmp_path / "nothing")
    with pytest.raises(WsimilError, match="is not a wsimil run: .*config.yaml is missing"):
        empty.read_config()
    with pytest.raises(WsimilError, match="not a finished wsimil run"):
        empty.read_results()
