"""Config loading: overrides, typos and wrong types fail at start with a useful message."""

import pytest

from jaxser import config as config_lib
from jaxser.configs import common
from jaxser.configs import demo as demo_config
from jaxser.models import ser_model

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


def test_packaged_demo_config_is_the_file_one():
    """`jaxser demo` (installed) and `--config configs/demo.py` train the same config."""
    for variant in ("", "smoke"):
        packaged = config_lib.make_config(demo_config.get_config, variant, ["--config.seed=3"])
        spec = DEMO + (f":{variant}" if variant else "")
        assert packaged.to_dict() == config_lib.load_config(spec, ["--config.seed=3"]).to_dict()


def test_every_encoder_family_has_a_smoke_variant():
    assert set(common.TINY_ENCODERS) == set(ser_model.ENCODER_FAMILIES)
    for family in ser_model.ENCODER_FAMILIES:
        c = config_lib.base_config()
        c.model.encoder = family
        c = common.smoke(c, "x")
        assert c.workdir == "runs/x/smoke" and not c.model.pretrained and not c.model.size
        assert c.model.encoder_overrides.to_dict() == common.TINY_ENCODERS[family]
    with pytest.raises(ValueError, match="no tiny encoder"):
        common.tiny_encoder("nope")
