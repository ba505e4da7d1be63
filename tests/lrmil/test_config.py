"""LRMIL's config is composed from the shared typed settings (TrainConfig fields), with old and new key spellings."""

import pytest
import yaml
from typer.testing import CliRunner

from wsimil.cli import app
from wsimil.config import TrainConfig
from wsimil.lrmil.config import MIL_FIELDS, LRMILConfig, MILSettings, load_lrmil_config
from wsimil.lrmil.pipeline import train_config
from wsimil.lrmil.stage1 import Stage1Settings


def test_mil_settings_are_trainconfig_fields_with_lrmils_learning_rate(tmp_path):
    ms = MILSettings()
    assert tuple(ms.model_dump()) == MIL_FIELDS and ms.lr == 1e-4
    for name in MIL_FIELDS:
        if name != "lr":
            assert getattr(ms, name) == TrainConfig.model_fields[name].get_default(call_default_factory=True)
    with pytest.raises(ValueError, match="greater than 0"):
        MILSettings(lr=0)
    cfg = LRMILConfig(teacher={"epochs": 3, "patience": 2})
    tc = train_config(cfg.teacher, cfg, ["0", "1"], tmp_path / "s.tsv")
    assert isinstance(tc, TrainConfig) and tc.epochs == 3 and tc.patience == 2 and tc.lr == 1e-4
    assert tc.folds == cfg.folds and tc.seed == cfg.seed and tc.splits == str(tmp_path / "s.tsv")


def test_yaml_keys_old_and_new_spellings_load_alike(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"weights": "w.pt", "workers": 2, "hr_mag": 20, "stage1": {"workers": 1}}))
    new = tmp_path / "new.yaml"
    new.write_text(
        yaml.safe_dump(
            {"encoder_weights": "w.pt", "loader_workers": 2, "hr_mag": "20x", "stage1": {"loader_workers": 1}}
        )
    )
    a, b = load_lrmil_config(old), load_lrmil_config(new)
    assert a == b and a.weights == "w.pt" and a.workers == 2 and a.stage1.workers == 1 and a.hr_mag == 20.0
    assert "weights" in a.model_dump()  # saved (and hashed) under the keys earlier runs used
    with pytest.raises(Exception, match="hr_mag/lr_mag 'abc' is not a magnification"):
        LRMILConfig(lr_mag="abc")


def test_stage1_settings_extend_the_configured_stage1():
    cfg = LRMILConfig(stage1={"steps": 7, "lr": 1e-3})
    st = Stage1Settings(**cfg.stage1.model_dump(exclude={"input_size"}), input_size=64, seed=3, device="cpu")
    assert st.steps == 7 and st.lr == 1e-3 and st.input_size == 64 and st.seed == 3 and st.norm_stats == "reestimate"


def test_lrmil_cli_old_flag_spellings(tmp_path):
    base = ["lrmil", "--job", str(tmp_path / "nojob"), "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path)]
    res = CliRunner().invoke(app, [*base, "--encoder-weights", "a.pt", "--weights", "b.pt"])
    assert res.exit_code == 2 and "--encoder-weights a.pt and the deprecated --weights b.pt disagree" in res.output
    with pytest.warns(FutureWarning, match="--workers is deprecated .* use --loader-workers"):
        res = CliRunner().invoke(app, [*base, "--workers", "1"])
    assert res.exit_code == 2  # then refused for the missing manifest/job, as before


def test_stage2_settings_match_the_lrmil_method_options():
    """LRMIL's stage-2 YAML block and the ``lrmil`` method's typed options are one vocabulary: the same names,
    types and defaults (the YAML block adds ranges; the method spec is what ``wsimil methods`` prints)."""
    from wsimil.lrmil.config import Stage2Config
    from wsimil.methods.options import METHOD_SPECS

    options = {o.name: o for o in METHOD_SPECS["lrmil"].options}
    for name, field in Stage2Config.model_fields.items():
        assert name in options, f"stage2.{name} is no option of method lrmil"
        assert field.default == options[name].default, name
        assert isinstance(field.default, options[name].type), name
    # what the method reads beyond the YAML block is wiring the recipe fills in, not a user setting
    assert set(options) - set(Stage2Config.model_fields) == {"teacher_dump", "links_dir", "links_dataset"}
