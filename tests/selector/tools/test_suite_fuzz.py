"""Fuzzing bench suites: any suite file gives its cases, or one KernelselError naming the file and the line.

Suites are the committed regret suite with the edits people make (sizes of the wrong type, request fields
misspelt or out of range, grids too large, groups with no op) plus random documents.  ``load_suite`` runs
before any GPU work, so it must never raise anything else nor build more than ``MAX_CASES`` cases.
"""

from __future__ import annotations

import copy
import os
import pathlib
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import KernelselError
from registry.vocab import Arch
from selector.tools import bench

ROOT = pathlib.Path(__file__).resolve().parents[3]
SUITE = yaml.safe_load((ROOT / "bench/regret_suite.yaml").read_text())
LOCATED = re.compile(r"^(\S*suite\.yaml:\d+:\d+: \S|\S*suite\.yaml: (cannot read suite|the suite has|not valid YAML|suite is))")


def examples(n: int) -> settings:
    return settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", n)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


SCALARS = (st.sampled_from([0, 1, -1, 8, 1024, 2**63, 2**70, "8", "", None, True, 1.5, "bf16", "fp8", "sm_90", [1], {}])
           | st.integers(-3, 5000) | st.text(max_size=6))
FIELDS = ["batch", "kv_len", "new_len", "q_len", "q_dtype", "kv_dtype", "head_dim_qk", "head_dim", "num_qo_heads",
          "num_kv_heads", "page_size", "batch_size", "sinks", "kernel", "op", "arch"]


@st.composite
def suites(draw):
    data = copy.deepcopy(SUITE)
    for _ in range(draw(st.integers(1, 4))):
        group = draw(st.sampled_from([g for g in data["groups"] if isinstance(g, dict)]))
        where = draw(st.sampled_from(["request", "grid", "cases", "op", "name", "group"]))
        if where == "request":
            group["request"] = dict(group.get("request") if isinstance(group.get("request"), dict) else {})
            group["request"][draw(st.sampled_from(FIELDS))] = draw(SCALARS)
        elif where == "grid":
            group["grid"] = dict(group.get("grid") if isinstance(group.get("grid"), dict) else {})
            group["grid"][draw(st.sampled_from(FIELDS))] = draw(
                st.lists(SCALARS, max_size=4) | SCALARS | st.just(list(range(1, 400))))
        elif where == "cases":
            group["cases"] = draw(st.lists(st.dictionaries(st.sampled_from(FIELDS), SCALARS, max_size=3), max_size=3) | SCALARS)
        elif where == "op":
            group["op"] = draw(st.sampled_from(["mha_decode", "mha_extend", "mha_prefill", "mla_decode", "sparse_mla_decode",
                                                "mla_decod", "", None]))
        elif where == "name":
            group["name"] = draw(SCALARS)
        else:
            data["groups"].append(draw(st.dictionaries(st.sampled_from(["name", "op", "request", "grid", "cases", "x"]),
                                                       SCALARS, max_size=4)))
    return data


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@examples(120)
@given(data=suites() | st.dictionaries(st.sampled_from(["schema_version", "groups", "description", "x"]), SCALARS, max_size=3),
       arch=st.sampled_from([Arch.SM_90, Arch.SM_100]))
def test_a_suite_loads_its_cases_or_fails_with_one_located_error(workdir, data, arch):
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    try:
        cases = bench.load_suite(path, arch)
    except KernelselError as exc:
        lines = str(exc).removeprefix("invalid suite:\n").splitlines()
        assert lines and all(LOCATED.match(line) for line in lines), str(exc)
        return
    assert 0 < len(cases) <= bench.MAX_CASES
    for case in cases:
        assert case.request.arch is arch and case.batch >= 1 and case.kv_len >= 1


def test_a_group_name_across_lines_is_quoted_so_each_problem_stays_one_located_line(workdir):
    """hypothesis found it: a group named "a\\nb" split the located error over two lines."""
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump({"schema_version": 1, "groups": [
        {"name": "two\nlines", "op": "mha_decode",
         "request": {"q_dtype": "bf16", "head_dim_qk": 128, "num_qo_heads": 32, "num_kv_heads": 8, "page_size": 16,
                     "q_len": 0},
         "grid": {"batch": [1], "kv_len": [512]}}]}))
    with pytest.raises(KernelselError) as err:
        bench.load_suite(path, Arch.SM_90)
    lines = str(err.value).removeprefix("invalid suite:\n").splitlines()
    assert len(lines) == 1 and LOCATED.match(lines[0]), str(err.value)
    assert "('two\\nlines')" in lines[0] and "q_len" in lines[0]
