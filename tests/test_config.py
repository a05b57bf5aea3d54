import json

import pytest

from minimm.config import ConfigError, TrainConfig, load_config, save_config


def test_defaults_file_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nbatch_size = 4\nlearning_rate = 3e-4\n_private = 1\nn_layer = 2\n")
    cfg = load_config([str(cfg_file), "--batch_size=8", "--device=cuda", "--tasks=['text','code','math']"])
    assert cfg.batch_size == 8  # the command line wins over the file
    assert cfg.learning_rate == 3e-4 and cfg.n_layer == 2
    assert cfg.device == "cuda"  # a bare string is taken as a string
    assert cfg.tasks == ["text", "code", "math"]
    assert cfg.n_embd == TrainConfig().n_embd  # untouched keys keep their defaults


def test_space_separated_values_and_str_keys_stay_raw():
    cfg = load_config(["--out_dir", "123", "--max_iters", "7"])
    assert cfg.out_dir == "123" and cfg.max_iters == 7


def test_int_accepted_for_float_and_none_for_optional():
    cfg = load_config(["--learning_rate=1", "--lr_decay_iters=None"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.lr_decay_iters is None


def test_unknown_key_names_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'.*batch_size"):
        load_config(["--batchsize=3"])
    f = tmp_path / "typo.py"
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match=r"'learning_rat' \(from .*typo.py\).*learning_rate"):
        load_config([str(f)])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError, match=r"'batch_size'.*expects int, got str 'many'"):
        load_config(["--batch_size=many"])
    with pytest.raises(ConfigError, match=r"'compile'.*expects bool, got int"):
        load_config(["--compile=1"])


def test_missing_file_and_missing_value():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(["nope.py"])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(["--batch_size"])


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(["--n_layer=3"])
    save_config(cfg, tmp_path / "run" / "config.json")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_layer"] == 3
