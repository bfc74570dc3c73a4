"""A perf table the user names must fit the manifest: known kernels of the entry's op, buckets a request can meet.

Cases are mutations of the committed table; each mistake used to be silent (the table simply ranked nothing).
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from registry.errors import ManifestError
from registry.loader import bundled_perf_dir, load_manifest, load_perf_table
from registry.vocab import Op
from selector.perf_check import perf_table_problems

TABLE = sorted(bundled_perf_dir().glob("*.yaml"))[0]
DATA = yaml.safe_load(TABLE.read_text())
MANIFEST = load_manifest()


def problems_of(tmp_path, edit) -> list[str]:
    data = copy.deepcopy(DATA)
    edit(data["entries"][0])
    path = tmp_path / "perf.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return perf_table_problems(load_perf_table(path), MANIFEST)


def test_the_committed_tables_fit_the_bundled_manifest():
    for path in bundled_perf_dir().glob("*.yaml"):
        assert perf_table_problems(load_perf_table(path), MANIFEST) == [], path


def test_an_unknown_kernel_is_named_with_a_did_you_mean(tmp_path):
    def edit(entry):
        name = next(iter(entry["median_us"]))
        entry["median_us"][name[:-1]] = entry["median_us"].pop(name)
    (problem,) = problems_of(tmp_path, edit)
    assert re.fullmatch(r"\S*perf\.yaml:\d+:\d+: entries\[0\]\.median_us\.\S+: no kernel named '\S+' in \S+ "
                        r"\(did you mean '\S+'\?\)", problem), problem


def test_a_kernel_of_another_op_is_refused(tmp_path):
    def edit(entry):
        other = next(k for k in MANIFEST.kernels if k.op.value != entry["op"])
        entry["median_us"][other.name] = 1.0
    (problem,) = problems_of(tmp_path, edit)
    assert re.search(r"entries\[0\]\.median_us\.\S+: kernel '\S+' implements \w+, not \w+$", problem), problem


@pytest.mark.parametrize("field", ["kv_dtype", "q_dtype", "q_len"])
def test_a_bucket_without_a_field_every_request_has_is_unreachable(tmp_path, field):
    (problem,) = problems_of(tmp_path, lambda entry: entry["shape"].pop(field))
    assert re.search(rf"entries\[0\]\.shape: no request has this bucket: every request with these fields has "
                     rf"{field}: \w+; add it in the shape$", problem), problem


def test_a_bucket_the_request_model_refuses_is_unreachable(tmp_path):
    def edit(entry):
        shape = entry["shape"]
        if entry["op"] == Op.MHA_DECODE.value:
            shape["num_qo_heads"], shape["num_kv_heads"] = 30, 8
        else:
            shape["kv_lora_rank"] = 0
    (problem,) = problems_of(tmp_path, edit)
    assert "entries[0].shape." in problem and ": no request has this bucket: " in problem, problem


@pytest.mark.parametrize("edit, message", [
    (lambda e: e["shape"].update(kv_dtype=None), r"entries\[0\]\.shape\.kv_dtype: no value; leave the key out"),
    (lambda e: e["median_us"].update({next(iter(e["median_us"])): "12"}), r"entries\[0\]\.median_us\.\S+: expected a number, got '12'"),
    (lambda e: e["median_us"].update({next(iter(e["median_us"])): True}), r"entries\[0\]\.median_us\.\S+: expected a number, got True"),
])
def test_a_table_with_a_null_bucket_field_or_a_quoted_time_does_not_load(tmp_path, edit, message):
    with pytest.raises(ManifestError, match=message):
        problems_of(tmp_path, edit)


def test_the_default_selector_refuses_a_kernelsel_perf_table_that_does_not_fit(tmp_path, monkeypatch):
    """KERNELSEL_PERF naming a misspelt kernel ranked nothing, silently; now the first selection says where."""
    import selector

    def edit(entry):
        name = next(iter(entry["median_us"]))
        entry["median_us"][name + "x"] = entry["median_us"].pop(name)

    data = copy.deepcopy(DATA)
    edit(data["entries"][0])
    path = tmp_path / "perf.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("KERNELSEL_MANIFEST", "KERNELSEL_DISABLE", "KERNELSEL_ADAPTER_ALLOWLIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KERNELSEL_PERF", str(path))
    selector.reset()
    try:
        with pytest.raises(ManifestError, match=r"perf\.yaml:\d+:\d+: entries\[0\]\.median_us\.\S+x: no kernel named"):
            selector.select_kernel(op="mha_decode", arch="sm_90")
    finally:
        monkeypatch.delenv("KERNELSEL_PERF")
        selector.reset()
