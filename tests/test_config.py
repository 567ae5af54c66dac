"""Config: defaults, YAML, dotted overrides, validation with messages that name keys."""

import pytest

from fmri2text.config import Config, dump_config, load_config, valid_keys
from fmri2text.errors import UserError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["data.window=3", "simulate.resolution=6", "split.heldout=[03,04]",
                             "evaluation.bertscore_idf=true"])
    assert cfg.data.window == 3 and isinstance(cfg.data.window, int)
    assert cfg.simulate.resolution == 6.0 and isinstance(cfg.simulate.resolution, float)
    assert cfg.split.heldout == ["03", "04"]
    assert cfg.evaluation.bertscore_idf is True


def test_yaml_then_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  window: 4\n  hrf_delay: 5\nsimulate:\n  subjects: 3\n")
    cfg = load_config(f, ["data.window=5"])
    assert cfg.data.window == 5 and cfg.data.hrf_delay == 5.0 and cfg.simulate.subjects == 3


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(None, ["data.windw=3"])
    msg = str(e.value)
    assert "data.windw" in msg and "data.window" in msg and "simulate.subjects" in msg
    f = tmp_path / "c.yaml"
    f.write_text("nope:\n  x: 1\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "'nope'" in str(e.value)


@pytest.mark.parametrize("override, key", [("data.window=abc", "data.window"),
                                           ("data.window=2.5", "data.window"),
                                           ("data.standardize=maybe", "data.standardize"),
                                           ("simulate.subjects=-1", "simulate.subjects"),
                                           ("data.space=mni", "data.space")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_unsafe_yaml_is_refused(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert str(f) in str(e.value)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["baseline.alphas=[1,10]"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg
    assert isinstance(Config(), Config) and "baseline.alphas" in valid_keys()


def test_exponent_floats_from_yaml_and_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mbm:\n  lr: 1e-3\n")
    assert load_config(f).mbm.lr == 1e-3
    assert load_config(None, ["mbm.lr=2.5e-4"]).mbm.lr == 2.5e-4
