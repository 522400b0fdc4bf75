import pytest

from safetypatch.errors import ConfigError
from safetypatch.training.config import TrainConfig
from safetypatch.config import from_dict, load_yaml, parse_layers


@pytest.mark.parametrize("spec,n,expected", [
    ("all", 6, [0, 1, 2, 3, 4, 5]),
    ("early", 30, list(range(0, 10))),
    ("middle", 30, list(range(10, 20))),
    ("late", 30, list(range(20, 30))),
    ("middle", 2, [0, 1]),  # 2 layers: thirds are empty, the middle takes the remainder
    ("10-19", 30, list(range(10, 20))),
    ("3,5,7", 30, [3, 5, 7]),
    ([4, 2, 2], 30, [2, 4]),
])
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["5-2", "0-40", "abc", "31"])
def test_parse_layers_errors(spec):
    with pytest.raises(ConfigError, match="layers"):
        parse_layers(spec, 30)


def test_yaml_recipe_with_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("rank: 4\nlr: 0.0005\ntarget_modules: [up_proj, down_proj]\nlayers: 10-19\n")
    cfg = load_yaml(TrainConfig, f, {"rank": "2"})
    assert cfg.rank == 2 and cfg.lr == 5e-4 and cfg.target_modules == ["up_proj", "down_proj"]


def test_unknown_and_bad_fields_are_named(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("rnak: 4\n")
    with pytest.raises(ConfigError, match=r"r\.yaml.*unknown field.*rnak"):
        load_yaml(TrainConfig, f)
    with pytest.raises(ConfigError, match="field 'rank'"):
        from_dict(TrainConfig, {"rank": "four"})
    with pytest.raises(ConfigError, match="field 'method'"):
        from_dict(TrainConfig, {"method": "qlora"})
    with pytest.raises(ConfigError, match="mix"):
        from_dict(TrainConfig, {"mix_ratio": 0.3})


def test_comma_lists_and_bools():
    cfg = from_dict(TrainConfig, {"target_modules": "up_proj, gate_proj", "group_by_length": "false"})
    assert cfg.target_modules == ["up_proj", "gate_proj"] and cfg.group_by_length is False
