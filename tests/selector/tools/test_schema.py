"""``kernelsel schema``: the committed JSON Schema is current and describes kernels.yaml as written."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import yaml

from registry.errors import ManifestError
from registry.loader import load_manifest
from selector.tools.schema import DEFAULT_PATH, REGENERATE, SCHEMA_DIALECT, manifest_json_schema, render_schema

jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[test]' installs jsonschema")

ROOT = pathlib.Path(__file__).resolve().parents[3]
COMMITTED = ROOT / DEFAULT_PATH
BUNDLED = ROOT / "kernels.yaml"


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_is_up_to_date():
    assert COMMITTED.is_file(), f"{DEFAULT_PATH} is missing; run: {REGENERATE}"
    assert COMMITTED.read_text(encoding="utf-8") == render_schema(), f"{DEFAULT_PATH} is stale; run: {REGENERATE}"


def test_schema_is_draft_2020_12_with_a_title_and_description():
    schema = manifest_json_schema()
    assert schema["$schema"] == SCHEMA_DIALECT
    assert schema["title"] and schema["description"]
    assert schema["additionalProperties"] is False


def test_bundled_manifest_validates(validator):
    errors = sorted(validator.iter_errors(yaml.safe_load(BUNDLED.read_text())), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_cli_prints_writes_and_checks(cli, tmp_path):
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out) == manifest_json_schema()
    target = tmp_path / "schema.json"
    target.write_text("{}\n")
    code, _, err = cli("schema", "--check", "--out", target)
    assert code == 1 and REGENERATE in err
    assert cli("schema", "--out", target)[0] == 0
    assert cli("schema", "--check", "--out", target)[0] == 0


def _first(data: dict, key: str) -> dict:
    """The first kernel entry that declares ``key`` (shapes, exclude, ...)."""
    return next(k for k in data["kernels"] if k.get(key))


def _unknown_kernel_key(data):
    data["kernels"][0]["prioriti"] = data["kernels"][0]["priority"]


def _internal_shape_form(data):  # the model's form, not the YAML's
    shapes = _first(data, "shapes")["shapes"]
    field = next(iter(shapes))
    shapes[field] = {"values": shapes[field] if isinstance(shapes[field], list) else [1]}


def _dtype_outside_vocabulary(data):
    data["kernels"][0]["dtypes"]["q_dtype"] = ["bfloat17"]


def _arch_as_bare_text(data):
    data["kernels"][0]["arch"] = "sm_90"


def _empty_arch_list(data):
    data["kernels"][0]["arch"] = []


def _unknown_exclusion_field(data):
    when = _first(data, "exclude")["exclude"][0]["when"]
    when["head_dim"] = when.pop(next(iter(when)))


def _unknown_top_level_key(data):
    data["kernel"] = []


def _unknown_feature(data):
    data["kernels"][0].setdefault("features", {})["sink"] = True


def _equals_a_field_of_another_kind(data):
    data["kernels"][0]["dtypes"]["kv_dtype"] = {"equals": "head_dim_qk"}


def _equals_with_an_unknown_key(data):
    data["kernels"][0]["dtypes"]["kv_dtype"] = {"equals": "q_dtype", "orr": ["fp8_e4m3"]}


def _equals_or_outside_the_vocabulary(data):
    shapes = _first(data, "shapes")["shapes"]
    shapes[next(iter(shapes))] = {"equals": "q_len", "or": ["sixty-four"]}


@pytest.mark.parametrize("mutate", [
    _equals_a_field_of_another_kind, _equals_with_an_unknown_key, _equals_or_outside_the_vocabulary,
    _unknown_kernel_key, _internal_shape_form, _dtype_outside_vocabulary, _arch_as_bare_text, _empty_arch_list,
    _unknown_exclusion_field, _unknown_top_level_key, _unknown_feature,
])
def test_schema_and_loader_agree_on_broken_manifests(validator, mutate):
    data = yaml.safe_load(BUNDLED.read_text())
    mutate(data)
    assert not validator.is_valid(data), "the schema accepts it"
    with pytest.raises(ManifestError):
        load_manifest("mutated.yaml", text=yaml.safe_dump(data))


@pytest.mark.parametrize("relation", [
    ("dtypes", "kv_dtype", {"equals": "q_dtype"}),
    ("dtypes", "kv_dtype", {"equals": "q_dtype", "or": "fp8_e4m3"}),  # one value, no list
    ("dtypes", "out_dtype", {"equals": "q_dtype", "or": ["bf16"]}),
    ("shapes", "page_size", {"equals": "q_len", "or": [16, 32]}),
])
def test_schema_accepts_equals_constraints_the_loader_accepts(validator, relation):
    group, field, value = relation
    data = yaml.safe_load(BUNDLED.read_text())
    kernel = next(k for k in data["kernels"] if k["op"] == "mha_decode")
    kernel.setdefault(group, {})[field] = value
    assert validator.is_valid(data)
    load_manifest("related.yaml", text=yaml.safe_dump(data))


@pytest.mark.parametrize("spelling", [
    lambda k: k["arch"] if isinstance(k["arch"], list) else [k["arch"]["min"]],  # list form
    lambda k: {"max": "sm_121"},                                               # one-sided range
])
def test_schema_accepts_each_yaml_spelling_the_loader_accepts(validator, spelling):
    data = yaml.safe_load(BUNDLED.read_text())
    kernel = copy.deepcopy(data["kernels"][0])
    kernel["arch"] = spelling(kernel)
    kernel["dtypes"]["q_dtype"] = kernel["dtypes"]["q_dtype"][0]  # one dtype, no list
    data["kernels"][0] = kernel
    assert validator.is_valid(data)
    load_manifest("spelled.yaml", text=yaml.safe_dump(data))
