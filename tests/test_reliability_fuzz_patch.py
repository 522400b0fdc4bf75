"""Fuzzing the patch loaders (issue 16): random patch.json / adapter_config.json contents (random JSON of any shape,
a good file with one field replaced by random JSON or removed, random bytes) loaded through the public loaders
(`read_meta`, `verify_files`, `load_patch` on the tiny model, `patch_info`, `read_adapter`, `lora_deltas`, and
`safetypatch patch info`) either load or raise the project's own error class, never anything else."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import build_tiny_model

from safetypatch.cli import main
from safetypatch.errors import SafetypatchError
from safetypatch.patches import load_patch, lora_deltas, patch_info, read_adapter, read_meta, verify_files

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=12) | st.sampled_from(["LORA", "none", "gaussian", "pissa", "up_proj", "0" * 64]))
JSON = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                                                       max_size=4), max_leaves=12)


def _paths(obj, prefix=()):
    """Every key path in a JSON object (to replace or remove one field)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _mutated(good, data) -> bytes:
    """A good JSON file with one field replaced by random JSON, or removed, or a random key added; or random JSON;
    or random bytes."""
    how = data.draw(st.sampled_from(["replace", "replace", "replace", "remove", "add", "json", "bytes"]))
    if how == "bytes":
        return data.draw(st.binary(max_size=300))
    if how == "json":
        return json.dumps(data.draw(JSON)).encode()
    obj = json.loads(json.dumps(good))
    path = data.draw(st.sampled_from(sorted(_paths(obj), key=repr)))
    parent = obj
    for part in path[:-1]:
        parent = parent[part]
    if how == "replace":
        parent[path[-1]] = data.draw(JSON)
    elif how == "remove":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=10))] = data.draw(JSON)
    return json.dumps(obj).encode()


@pytest.fixture()
def good_patch(tiny_patch, tiny_tok):
    from safetypatch.patches import record_evaluation

    record_evaluation(tiny_patch, {"suite": "s", "n": 3, "refusal": {"patched": {"kw": 0.5}}})
    backup = tiny_patch.parent / "good-copy"
    shutil.copytree(tiny_patch, backup)
    return tiny_patch, backup


def _restore(patch, backup) -> None:
    shutil.rmtree(patch)
    shutil.copytree(backup, patch)


def _must_load_or_refuse(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SafetypatchError:
        return None


def _cli_info(patch) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["patch", "info", str(patch)]) in (0, 2)
        assert main(["patch", "info", "--no-verify", "--json", str(patch)]) in (0, 2)


def _try_load(tok, patch) -> None:
    model = build_tiny_model(tok)
    loaded = _must_load_or_refuse(load_patch, model, patch)
    if loaded is not None:
        loaded.unload()


@SETTINGS
@given(data=st.data())
def test_random_patch_json_loads_or_is_refused(good_patch, tiny_tok, data):
    patch, backup = good_patch
    good = json.loads((backup / "patch.json").read_text())
    try:
        (patch / "patch.json").write_bytes(_mutated(good, data))
        for fn in (read_meta, verify_files, patch_info):
            _must_load_or_refuse(fn, patch)
        _must_load_or_refuse(patch_info, patch, verify=False)
        _cli_info(patch)
        _try_load(tiny_tok, patch)
    finally:
        _restore(patch, backup)


@SETTINGS
@given(data=st.data())
def test_random_adapter_config_loads_or_is_refused(good_patch, tiny_tok, data):
    patch, backup = good_patch
    good = json.loads((backup / "adapter_config.json").read_text())
    try:
        (patch / "adapter_config.json").write_bytes(_mutated(good, data))
        _must_load_or_refuse(read_adapter, patch)
        _must_load_or_refuse(lora_deltas, patch)
        _try_load(tiny_tok, patch)
    finally:
        _restore(patch, backup)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=400), cut=st.integers(0, 10_000))
def test_random_weights_bytes_are_refused(good_patch, tiny_tok, data, cut):
    patch, backup = good_patch
    weights = patch / "adapter_model.safetensors"
    try:
        weights.write_bytes(weights.read_bytes()[:cut] + data)
        for fn in (verify_files, read_adapter, lora_deltas):
            _must_load_or_refuse(fn, patch)
        model = build_tiny_model(tiny_tok)
        _must_load_or_refuse(load_patch, model, patch, verify=False)
    finally:
        _restore(patch, backup)
