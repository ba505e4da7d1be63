import warnings

import pytest

from wsimil.config import list_presets, load_config, read_config_file
from wsimil.errors import WsimilError
from wsimil.models import create_model


def test_presets_resolve_by_name_and_by_readme_path_anywhere(tmp_path, monkeypatch):
    assert {"classic_mil", "hmil", "lrmil", "mhim_v1", "mhim_v2", "weno"} <= set(list_presets())
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the packaged presets answer
    assert read_config_file("classic_mil")["folds"] == 10
    assert read_config_file("configs/classic_mil.yaml") == read_config_file("classic_mil.yaml")
    with pytest.raises(WsimilError, match=r"config file nope.yaml does not exist \(presets: classic_mil"):
        read_config_file("nope.yaml")
    with pytest.raises(WsimilError, match="does not exist"):
        read_config_file("elsewhere/classic_mil.yaml")  # an explicit other folder is not a preset name


def test_model_options_belong_to_the_files_model():
    with pytest.warns(UserWarning, match=r"attn_dim belong to 'abmil' and are not used by 'transmil'"):
        cfg = load_config("classic_mil", model="transmil")
    assert cfg.model_kwargs == {"hidden_dims": [256, 128, 64], "dropout": 0.5}
    create_model(cfg.model, 8, 2, **cfg.model_kwargs)  # was: unexpected keyword argument 'attn_dim'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config("classic_mil", model="gated_abmil").model_kwargs["attn_dim"] == 64  # shared options stay
        assert load_config("classic_mil").model_kwargs["attn_dim"] == 64
        # a method with its own network takes its options as they are (WENO's teacher is --model)
        assert load_config("weno", model="dsmil").model_kwargs["attn_dim"] == 512
    # options given for the chosen model are not filtered: a typo still fails, naming the model
    cfg = load_config("classic_mil", model="transmil", model_kwargs={"atn_dim": 3})
    with pytest.raises(WsimilError, match="bad options for model 'transmil'"):
        create_model(cfg.model, 8, 2, **cfg.model_kwargs)
