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
