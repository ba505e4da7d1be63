"""The command line against the typed options: train flags vs TrainConfig fields and method options, renamed
flags kept as hidden aliases, `wsimil methods` listing every typed option."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsimil.cli import app
from wsimil.cli import train as train_commands
from wsimil.cli.common import METHOD_FLAGS, RENAMED_FLAGS
from wsimil.config import TrainConfig
from wsimil.methods import list_methods
from wsimil.methods.options import METHOD_SPECS, Option

#: train parameters that are no TrainConfig field: data, glue, and flags whose config key differs
NOT_CONFIG = {"features", "manifest", "out", "config", "method_opt", "model_opt", "bag_batch_size", "batch_size"}


class _Param:
    def __init__(self, annotation):
        self.annotation = annotation


def _params(fn) -> dict[str, _Param]:
    """The command's parameters with their resolved ``Annotated[type, typer.Option(...)]`` annotations."""
    hints = typing.get_type_hints(inspect.unwrap(fn), include_extras=True)
    return {k: _Param(v) for k, v in hints.items() if k != "return"}


def _option(param: _Param):
    return next(a for a in typing.get_args(param.annotation) if hasattr(a, "param_decls"))


def _decls(param: _Param) -> set[str]:
    """The flag spellings a parameter declares (inside ``Annotated``, typer takes a first "--x" as one)."""
    o = _option(param)
    first = o.default if isinstance(o.default, str) and o.default.startswith("-") else None
    return {*(o.param_decls or ()), *([first] if first else [])}


def test_every_method_has_a_spec_and_every_spec_a_method():
    assert set(list_methods()) >= set(METHOD_SPECS)
    for name in list_methods():
        spec = METHOD_SPECS[name]
        assert all(isinstance(o, Option) and o.help for o in spec.options), name


def test_train_flags_are_config_fields_or_method_options():
    params = _params(train_commands.train)
    for name, p in params.items():
        if name in METHOD_FLAGS:
            for method in METHOD_FLAGS[name]:
                opt = METHOD_SPECS[method].option(name)  # StopIteration: the flag names no option of that method
                types = set(typing.get_args(typing.get_args(p.annotation)[0])) - {type(None)}
                assert types == {opt.type}, (name, method, types, opt.type)
                assert _option(p).help.endswith(opt.help), (name, method)
                assert _option(p).help.startswith(", ".join(METHOD_FLAGS[name]) + ":")
        elif name not in NOT_CONFIG and name != "threads":
            assert name in TrainConfig.model_fields, f"--{name.replace('_', '-')} is no config field"
    assert "threads" in TrainConfig.model_fields


def test_renamed_flags_are_hidden_aliases():
    for cmd in (train_commands.train, train_commands.evaluate):
        decls = {d for p in _params(cmd).values() for d in _decls(p)}
        assert cmd is not train_commands.train or "--batch-size" in decls  # the alias is still accepted
        for old in RENAMED_FLAGS:
            if old in decls:
                p = next(p for p in _params(cmd).values() if old in _decls(p))
                assert _option(p).hidden
    assert "--batch-size" not in CliRunner().invoke(app, ["train", "--help"]).output
    assert "--bag-batch-size" in CliRunner().invoke(app, ["evaluate", "--help"]).output


def test_deprecated_batch_size_still_sets_the_bag_batch(monkeypatch, tmp_path):
    import wsimil.methods.trainer
    import wsimil.predict.write

    seen = {}

    def fake_run(cfg, features, manifest, out):
        seen["cfg"] = cfg
        return {"metrics": {}}

    monkeypatch.setattr(wsimil.methods.trainer, "run_training", fake_run)
    monkeypatch.setattr(wsimil.predict.write, "bundle_from_run", lambda run: Path(run) / "bundle")
    base = ["train", "--features", str(tmp_path), "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path)]
    with pytest.warns(FutureWarning, match="--batch-size is deprecated .*; use --bag-batch-size"):
        res = CliRunner().invoke(app, [*base, "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].batch_size == 3
    res = CliRunner().invoke(app, [*base, "--bag-batch-size", "5", "--teacher-init", "x", "--method", "mhim"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].batch_size == 5 and seen["cfg"].method_kwargs == {"teacher_init": "x"}


def test_methods_command_lists_typed_options():
    out = CliRunner().invoke(app, ["methods"]).output
    for name in list_methods():
        assert name in out
    opt = METHOD_SPECS["weno"].option("keep_k")
    assert f"keep_k ({opt.type_name}) = None" in out and opt.help in out


def test_method_options_are_type_checked():
    from wsimil.errors import WsimilError
    from wsimil.methods import create_method

    with pytest.raises(WsimilError, match="option warmup must be an int, not 'ten'"):
        create_method(TrainConfig(method="weno", method_kwargs={"warmup": "ten"}))
    with pytest.raises(WsimilError, match="has no option.*nope.*known options: .*warmup"):
        create_method(TrainConfig(method="weno", method_kwargs={"nope": 1}))
    assert create_method(TrainConfig(method="weno", method_kwargs={"threshold": 1})).opts["threshold"] == 1
    with pytest.raises(WsimilError, match="method hmil supports task classification only, not 'survival'"):
        create_method(TrainConfig(method="hmil", task="survival"))


def test_train_command_writes_the_bundle(tmp_path):
    """The trainer writes no bundle; `wsimil train` does, after training (RUN/bundle/, as before)."""
    from wsimil.data.synthetic import make_digit_bags, write_bags
    from wsimil.run import RunDir

    manifest = write_bags(make_digit_bags(16, seed=1), tmp_path / "c")
    args = ["train", "--features", str(tmp_path / "c" / "features"), "--manifest", str(manifest), "--out",
            str(tmp_path / "run"), "--model", "mean", "--folds", "2", "--epochs", "1"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = RunDir(tmp_path / "run")
    assert run.finished and (run.bundle_dir / "bundle.json").is_file()
