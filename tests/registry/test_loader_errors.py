"""Broken manifests: one defect per fixture file, its expected error pinned by the file's first line.

Each ``broken/*.yaml`` starts with ``# expect: REGEX``; loading must fail
with exactly one problem matching it (``file:line:col: path: message``).
"""

from __future__ import annotations

import pathlib
import re

import pytest

from registry.errors import ManifestError
from registry.loader import load_manifest

BROKEN = pathlib.Path(__file__).parent / "broken"
FIXTURES = sorted(p for p in BROKEN.glob("*.yaml") if not p.name.startswith("_"))


def test_the_base_fixture_is_valid():
    assert [k.name for k in load_manifest(BROKEN / "_valid.yaml").kernels] == ["triton-mha-decode"]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_broken_manifest_reports_one_located_problem(path):
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path.name}:") or f"/{path.name}:" in problems[0] or problems[0].startswith(str(path))
    assert re.search(expect, problems[0]), problems[0]


def test_all_problems_are_reported_together(tmp_path):
    text = (BROKEN / "_valid.yaml").read_text()
    text = text.replace("{min: sm_80,", "{min: sm_9,").replace("op: mha_decode", "op: mha_decod")
    path = tmp_path / "two.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert len(info.value.problems) == 2
    assert str(info.value).startswith("2 problems in manifest:")


def test_unreadable_and_non_mapping_manifests(tmp_path):
    with pytest.raises(ManifestError, match=r"cannot read manifest"):
        load_manifest(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match=r"list\.yaml:1:1: \(top level\): expected a mapping"):
        load_manifest(path)


def _overlay(tmp_path, body: str) -> pathlib.Path:
    path = tmp_path / "overlay.yaml"
    path.write_text(f"base: {BROKEN / '_valid.yaml'}\n" + body)
    return path


def test_overlay_replaces_adds_and_disables_by_name(tmp_path):
    valid = (BROKEN / "_valid.yaml").read_text().split("kernels:\n")[1]
    replaced = valid.replace("priority: 5", "priority: 7")
    added = valid.replace("name: triton-mha-decode", "name: my-decode")
    m = load_manifest(_overlay(tmp_path, "kernels:\n" + replaced + added))
    assert [(k.name, k.priority) for k in m.kernels] == [("triton-mha-decode", 7), ("my-decode", 5)]
    assert m.by_name["my-decode"].origin.startswith("overlay.yaml:") or "overlay.yaml:" in m.by_name["my-decode"].origin
    m2 = load_manifest(_overlay(tmp_path, "kernels:\n" + added + "disable: [triton-mha-decode]\n"))
    assert [k.name for k in m2.kernels] == ["my-decode"]


def test_overlay_errors_are_located(tmp_path):
    with pytest.raises(ManifestError, match=r"overlay\.yaml:3:5: disable\[0\]: no kernel named 'triton-mha-decod' \(did you mean 'triton-mha-decode'\?\)"):
        load_manifest(_overlay(tmp_path, "disable:\n  - triton-mha-decod\n"))
    with pytest.raises(ManifestError, match=r"overlay\.yaml:2:1: kernelz: unknown key in an overlay \(did you mean 'kernels'\?\)"):
        load_manifest(_overlay(tmp_path, "kernelz: []\n"))


def test_cross_kernel_problems_come_with_every_entry_problem_in_one_run(tmp_path, monkeypatch):
    """A duplicate name (checked across entries) is reported with a bad priority and a blank dtype, each located."""
    monkeypatch.chdir(tmp_path)
    valid = (BROKEN / "_valid.yaml").read_text()
    entry = valid.split("kernels:\n")[1]
    text = valid + entry.replace("priority: 5", "priority: 99") + entry.replace("q_dtype: [bf16]", "q_dtype: null")
    path = tmp_path / "many.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    problems = info.value.problems
    assert [re.sub(r"^many\.yaml:\d+:\d+: ", "", p).split(":")[0] for p in problems] == [
        "kernels[1].name", "kernels[1].priority", "kernels[2].name", "kernels[2].dtypes.q_dtype"], problems
    assert all(re.match(r"many\.yaml:(1[7-9]|[2-9]\d):\d+: ", p) for p in problems), problems
    assert "duplicate kernel name 'triton-mha-decode' (first at kernels[0])" in problems[0]


def test_a_name_used_twice_in_one_overlay_is_an_error_at_the_second_entry(tmp_path, monkeypatch):
    """Never "the last one wins" inside one overlay; located at the entry, not at 1:1."""
    monkeypatch.chdir(tmp_path)
    entry = (BROKEN / "_valid.yaml").read_text().split("kernels:\n")[1]
    path = _overlay(tmp_path, "kernels:\n" + entry.replace("priority: 5", "priority: 6") + entry)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems == ["overlay.yaml:13:5: kernels[1].name: duplicate kernel name 'triton-mha-decode' "
                                   "in this overlay (first at kernels[0])"]


def test_an_overlay_cannot_add_a_look_alike_that_escapes_disable(tmp_path):
    """A name ending in a newline would be a second 'triton-mha-decode' that KERNELSEL_DISABLE cannot name."""
    entry = (BROKEN / "_valid.yaml").read_text().split("kernels:\n")[1]
    path = _overlay(tmp_path, "kernels:\n" + entry.replace("name: triton-mha-decode", 'name: "triton-mha-decode\\n"'))
    with pytest.raises(ManifestError, match=r"overlay\.yaml:3:11: kernels\[0\]\.name: 'triton-mha-decode\\n' is not a kernel name"):
        load_manifest(path)


def test_overlay_disable_twice_or_of_its_own_kernel_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = (BROKEN / "_valid.yaml").read_text().split("kernels:\n")[1].replace("name: triton-mha-decode", "name: mine")
    with pytest.raises(ManifestError, match=r"overlay\.yaml:13:30: disable\[1\]: 'triton-mha-decode' is already disabled at disable\[0\]"):
        load_manifest(_overlay(tmp_path, "kernels:\n" + entry + "disable: [triton-mha-decode, triton-mha-decode]\n"))
    with pytest.raises(ManifestError, match=r"disable\[0\]: 'mine' is added by this overlay \(kernels\[0\]\)"):
        load_manifest(_overlay(tmp_path, "kernels:\n" + entry + "disable: [mine]\n"))


def test_an_exclusion_beside_an_equals_constraint_loads(tmp_path):
    """The covers-everything check reads a kernel's admitted values; an equals constraint has none of its own."""
    text = (BROKEN / "_valid.yaml").read_text().replace("kv_dtype: [bf16]", "kv_dtype: {equals: q_dtype}").replace(
        "    priority: 5", "    exclude:\n      - when: {kv_dtype: bf16, head_dim_qk: 128}\n        reason: r\n        ref: x\n    priority: 5")
    path = tmp_path / "equals.yaml"
    path.write_text(text)
    assert load_manifest(path).kernels[0].exclude
