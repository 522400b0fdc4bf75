"""Named models (`--model gemma3-270m`): parts found in installed packages without importing them, concatenated in
order into one GGUF, checked against the recorded sha256; a clear message when the wheels are missing or damaged."""

import hashlib
import sys

import pytest

from safetypatch.errors import ModelError
from safetypatch.modeling import named
from safetypatch.modeling.loading import resolve_model


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A named model split over two fake installed packages (never imported: their __init__ raises)."""
    parts = [b"GGUF part one|", b"part two"]
    for i, data in enumerate(parts):
        pkg = tmp_path / "site" / f"fake_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (pkg / "data" / f"m.gguf.part0{i}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = named.NamedModel(name="fake", description="a fake model", gguf_name="m.gguf",
                             packages=("fake_part1", "fake_part2"), install="pip install fake",
                             sha256=hashlib.sha256(b"".join(parts)).hexdigest())
    monkeypatch.setitem(named.NAMED_MODELS, "fake", model)
    return model, b"".join(parts)


def test_parts_are_concatenated_in_order_and_checked(fake_model):
    model, whole = fake_model
    path = named.named_gguf("fake")
    assert path.read_bytes() == whole and path.name == "m.gguf"
    assert "fake_part1" not in sys.modules
    assert resolve_model("fake") == ("gguf", str(path))
    assert named.named_gguf("fake") == path  # reused, not written again


def test_damaged_parts_are_refused_and_nothing_is_left(fake_model, monkeypatch):
    model, _ = fake_model
    monkeypatch.setitem(named.NAMED_MODELS, "fake", named.NamedModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="concatenate to sha256 .* expected 0+: the wheels are damaged"):
        named.named_gguf("fake")
    home = named.safetypatch_home() / "models"
    assert not list(home.glob("*m.gguf*"))  # no half-written or wrong file


def test_missing_wheels_name_the_install_command(monkeypatch):
    model = named.NAMED_MODELS["gemma3-270m"]
    monkeypatch.setitem(named.NAMED_MODELS, "gemma3-270m", named.NamedModel(
        **{**model.__dict__, "packages": ("no_such_package_part1", "no_such_package_part2")}))
    with pytest.raises(ModelError) as e:
        resolve_model("gemma3-270m")
    assert "--model gemma3-270m" in str(e.value) and "make install-gemma" in str(e.value)
    assert "no_such_package_part1" in str(e.value)
