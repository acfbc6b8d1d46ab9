"""Config loading: overrides, typos and wrong types fail at start with a useful message."""

import pytest

from jaxser import config as config_lib

DEMO = "configs/demo.py"


def test_demo_config_loads_with_overrides():
    cfg = config_lib.load_config(DEMO, ["--config.optim.lr=3e-4", "--config.train.epochs", "7",
                                        "--config.data.buckets_seconds=(2.0, 4.0)"])
    assert cfg.optim.lr == 3e-4 and cfg.train.epochs == 7
    assert cfg.data.buckets_seconds == (2.0, 4.0)


def test_smoke_variant():
    assert config_lib.load_config(DEMO + ":smoke").train.epochs == 2


def test_typo_names_closest_field():
    with pytest.raises(config_lib.ConfigError, match=r"optim\.lrr.*optim\.lr"):
        config_lib.load_config(DEMO, ["--config.optim.lrr=1"])


def test_wrong_type_fails():
    with pytest.raises(config_lib.ConfigError, match="train.epochs.*int"):
        config_lib.load_config(DEMO, ["--config.train.epochs=many"])


def test_int_for_float_field_is_accepted():
    assert config_lib.load_config(DEMO, ["--config.optim.lr=1"]).optim.lr == 1.0


def test_config_file_with_unknown_field(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from jaxser.config import base_config\n"
                   "def get_config():\n    c = base_config()\n    c.optim.lrate = 1.0\n"
                   "    return c\n")
    with pytest.raises(config_lib.ConfigError, match="optim.lrate"):
        config_lib.load_config(str(bad))


def test_json_round_trip():
    cfg = config_lib.load_config(DEMO)
    again = config_lib.config_from_json(config_lib.config_to_json(cfg))
    assert again.to_dict() == cfg.to_dict()
