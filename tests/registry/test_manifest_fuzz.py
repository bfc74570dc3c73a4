"""Fuzzing what a manifest or an overlay may say: whatever loads must be usable, whatever does not is located.

Stronger than "loads or fails located" (``test_loader_properties.py``): a manifest that loads never makes
selection, explain or JSON raise anything but a kernelsel error; every constraint it declares admits a
value some request can give (no silently dead kernel); names are unique and plain.  Overlays are drawn
from the bundled manifest's own entries (edited, duplicated, renamed to look-alikes) and disable lists
(real names, near misses, repeats): each loads into a manifest whose names are unique and where nothing
disabled is left, or fails with every problem at a line of the overlay.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.constraints import IntRange, OneOf
from registry.errors import KernelselError, ManifestError
from registry.loader import bundled_manifest_path, load_manifest
from registry.ops import SHAPE_MAXIMUM, shape_minimum
from registry.vocab import Arch, DType, Op, Solution
from selector import KernelRequest, Platform, solve

MANIFEST_DATA = yaml.safe_load(bundled_manifest_path().read_text(encoding="utf-8"))
ENTRIES = MANIFEST_DATA["kernels"]
NAMES = [k["name"] for k in ENTRIES]
LOCATED = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): \S")


def examples(n: int) -> settings:
    """``n`` examples per property (KERNELSEL_PROPERTY_EXAMPLES=N runs N each, for a longer hunt)."""
    return settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", n)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files show by their relative names
    return tmp_path


# values a person could plausibly write in each place, right and wrong
INTS = st.sampled_from([0, 1, 2, 3, 8, 16, 64, 128, 512, 2**63 - 1, 2**63, -1]) | st.integers(-5, 1100)
SCALARS = (INTS | st.sampled_from(["16", "128", 16.0, 1.5, True, False, None, "", " ", "yes", "bf16", "sm_90", "x\n"])
           | st.sampled_from(DType.values() + Arch.values()))
RANGES = st.fixed_dictionaries({}, optional={"min": SCALARS, "max": SCALARS, "multiple_of": SCALARS, "power_of_two": SCALARS})
SHAPE_VALUES = st.lists(SCALARS, max_size=3) | RANGES | SCALARS
NAME_EDITS = st.sampled_from(["", "\n", " ", "-", "X", "\u00e9", "\t", "."])


@st.composite
def edited_entry(draw, base_index=None):
    """One bundled entry with 1-3 edits of the kinds people make."""
    entry = copy.deepcopy(ENTRIES[draw(st.integers(0, len(ENTRIES) - 1)) if base_index is None else base_index])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["shape", "dtype", "feature", "exclude", "name", "priority", "arch", "refs", "requires"]))
        if kind == "shape":
            entry.setdefault("shapes", {})[draw(st.sampled_from(["head_dim_qk", "page_size", "num_qo_heads", "q_len",
                                                                 "kv_lora_rank", "qk_rope_head_dim", "topk"]))] = draw(SHAPE_VALUES)
        elif kind == "dtype":
            entry["dtypes"][draw(st.sampled_from(["q_dtype", "kv_dtype", "out_dtype"]))] = draw(
                st.lists(SCALARS, max_size=2) | SCALARS)
        elif kind == "feature":
            entry.setdefault("features", {})[draw(st.sampled_from(["sinks", "return_lse", "non_causal", "cuda_graph"]))] = draw(SCALARS)
        elif kind == "exclude":
            field = draw(st.sampled_from(["q_dtype", "kv_dtype", "arch", "head_dim_qk", "page_size", "kv_lora_rank",
                                          "sinks", "non_causal", "q_len"]))
            entry.setdefault("exclude", []).append({"when": {field: draw(SHAPE_VALUES)},
                                                    "reason": draw(st.sampled_from(["r", "", " "])), "ref": "x"})
        elif kind == "name":
            entry["name"] = entry["name"] + draw(NAME_EDITS)
        elif kind == "priority":
            entry["priority"] = draw(SCALARS)
        elif kind == "arch":
            entry["arch"] = draw(st.sampled_from([{"min": "sm_90", "max": "sm_80"}, ["sm_90"], [], {"min": "sm90"},
                                                  {"min": "sm_100"}, "sm_90"]))
        elif kind == "refs":
            entry["refs"] = draw(st.lists(st.sampled_from(["", " ", "x", "a#1"]), max_size=2))
    return entry


@st.composite
def manifests(draw):
    data = copy.deepcopy(MANIFEST_DATA)
    picks = draw(st.lists(st.integers(0, len(ENTRIES) - 1), min_size=1, max_size=6))
    data["kernels"] = [draw(edited_entry(i)) for i in picks]
    if draw(st.integers(0, 4)) == 0:
        solution = draw(st.sampled_from(Solution.values()))
        data["solutions"][solution]["requires"] = draw(st.lists(st.sampled_from(["", "torch", "a b", "x\n", "-x"]), max_size=2))
    return data


REQUESTS = st.fixed_dictionaries(
    {"op": st.sampled_from(Op.values()), "arch": st.sampled_from(Arch.values())},
    optional={"q_dtype": st.sampled_from(DType.values()), "kv_dtype": st.sampled_from(DType.values()),
              "head_dim_qk": st.sampled_from([64, 128, 256]), "page_size": st.sampled_from([1, 16, 64]),
              "sinks": st.booleans(), "return_lse": st.booleans(), "solution": st.sampled_from(Solution.values())},
)


def assert_located(exc: ManifestError, name: str) -> None:
    for problem in exc.problems:
        m = LOCATED.match(problem)
        assert m and m["file"].endswith(name) and int(m["line"]) >= 1, problem
        assert "\n" not in problem and "Traceback" not in problem


@examples(120)
@given(data=manifests(), requests=st.lists(REQUESTS, min_size=1, max_size=4))
def test_a_manifest_that_loads_is_usable_and_one_that_does_not_is_located(workdir, data, requests):
    path = workdir / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        assert_located(exc, "fuzzed.yaml")
        return
    assert len(set(manifest.by_name)) == len(manifest.kernels)
    for k in manifest.kernels:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", k.name), k.name
        for field, c in k.constraints:  # every declared constraint admits some value a request can give
            if isinstance(c, OneOf) and field not in ("q_dtype", "kv_dtype", "out_dtype"):
                assert any(shape_minimum(field) <= v <= SHAPE_MAXIMUM for v in c.values), (k.name, field, c)
            if isinstance(c, IntRange):
                first = c.first_allowed(shape_minimum(field))
                assert first is not None and first <= SHAPE_MAXIMUM and c.allows(first), (k.name, field, c)
    for fields in requests:
        try:
            request = KernelRequest(**fields)
            selection = solve(manifest, Platform.hypothetical(request.arch), request)
            selection.explain(), selection.to_dict()
        except KernelselError:
            continue
        if selection.kernel is not None:
            assert selection.kernel in selection.eligible


@st.composite
def overlays(draw):
    kernels = []
    for _ in range(draw(st.integers(0, 4))):
        entry = draw(edited_entry())
        if draw(st.integers(0, 3)) == 0:
            entry["name"] = draw(st.sampled_from(NAMES + [k["name"] for k in kernels] + ["mine", "mine"]))
        kernels.append(entry)
    doc: dict = {"base": draw(st.sampled_from(["bundled", "bundled", "", "missing.yaml", None, 1]))}
    if kernels or draw(st.booleans()):
        doc["kernels"] = kernels
    if draw(st.booleans()):
        doc["disable"] = draw(st.lists(st.sampled_from(NAMES) | st.sampled_from(NAMES).map(lambda n: n + draw(NAME_EDITS))
                                       | st.sampled_from([k["name"] for k in kernels] or ["x"]) | SCALARS, max_size=4))
    return doc


@examples(100)
@given(doc=overlays())
def test_an_overlay_loads_to_unique_names_without_what_it_disables_or_fails_at_its_own_lines(workdir, doc):
    path = workdir / "overlay.yaml"
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    path.write_text(text)
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        assert_located(exc, "overlay.yaml")
        lines = text.count("\n") + 1
        for problem in exc.problems:
            assert int(LOCATED.match(problem)["line"]) <= lines, problem  # never the base's 1:1 or another file's line
        return
    names = [k.name for k in manifest.kernels]
    assert len(names) == len(set(names))
    for name in doc.get("disable") or []:
        assert name not in names
    for entry in doc.get("kernels") or []:
        assert manifest.by_name[entry["name"]].origin.startswith("overlay.yaml:")
