"""Property tests: random and mutated manifests and perf tables load, or fail with a located ManifestError.

Whatever the bytes, ``load_manifest`` / ``load_perf_table`` either return a
validated value or raise ``ManifestError`` whose every problem starts with
``file:line:col:`` -- never a KeyError, TypeError, RecursionError or other
raw exception from inside the library, and never a hang.  Cases are derived
from the bundled manifest and the committed perf table (mutations of them)
and from random YAML built over the schema's own vocabulary.
"""

from __future__ import annotations

import os
import pathlib
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import ManifestError
from registry.loader import bundled_manifest_path, bundled_perf_dir, load_manifest, load_perf_table
from registry.ops import FEATURE_FIELDS_BY_OP
from registry.constraints import IntRange
from registry.schema import (
    REQUEST_FIELDS,
    AttentionPlanRule,
    DTypes,
    Exclusion,
    Features,
    KernelSpec,
    Manifest,
    Shapes,
    SolutionInfo,
)
from registry.vocab import Arch, Backend, DType, Op, Solution

MANIFEST_TEXT = bundled_manifest_path().read_text(encoding="utf-8")
MANIFEST_DATA = yaml.safe_load(MANIFEST_TEXT)
PERF_PATH = sorted(bundled_perf_dir().glob("*.yaml"))[0]
PERF_TEXT = PERF_PATH.read_text(encoding="utf-8")
PERF_DATA = yaml.safe_load(PERF_TEXT)

# every key and closed-vocabulary word the schema knows, so random documents get past the first check
KEYS = sorted(
    set(Manifest.model_fields) | set(KernelSpec.model_fields) | set(SolutionInfo.model_fields)
    | set(AttentionPlanRule.model_fields) | set(REQUEST_FIELDS) | {"min", "max", "only", "multiple_of", "power_of_two",
                                                                  "when", "reason", "ref", "base", "disable", "values"}
)
WORDS = Op.values() + Solution.values() + Backend.values() + DType.values() + Arch.values() + [
    "registry.adapters.triton:TritonMHADecode", "os:system", "bundled", "sm90", "9.0"]



def examples(n: int) -> settings:
    """``n`` examples per property (KERNELSEL_PROPERTY_EXAMPLES=N runs N each, for a longer hunt)."""
    return settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", n)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


LOCATED = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): \S")
FILE_LEVEL = re.compile(r"^(?P<file>[^:\n]+): (cannot read|manifest is|perf table is|not valid YAML|nested too deeply)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


def _write(directory: pathlib.Path, name: str, data: bytes | str) -> pathlib.Path:
    path = directory / name
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


def assert_loads_or_located(load, path: pathlib.Path, *, line_required: bool = True):
    """``load(path)`` returns, or raises ManifestError whose every problem names the file (and line)."""
    try:
        return load(path)
    except ManifestError as exc:
        assert exc.problems, "a ManifestError without problems"
        for problem in exc.problems:
            assert "\n" not in problem, problem
            assert "Traceback" not in problem
            m = LOCATED.match(problem) or (None if line_required else FILE_LEVEL.match(problem))
            assert m, f"not located: {problem!r}"
            assert m["file"].endswith(path.name), problem
            if m.groupdict().get("line"):
                assert int(m["line"]) >= 1 and int(m["col"]) >= 1, problem
        return None


# ------------------------------------------------------------------ random YAML documents

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(WORDS) | st.sampled_from(KEYS)
)
keys = st.sampled_from(KEYS) | st.text(max_size=8) | st.integers(-3, 3) | st.booleans()
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=40,
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.sampled_from([1, 2, "1", None]),
        "solutions": documents,
        "attention_plan": documents,
        "kernels": st.lists(st.dictionaries(st.sampled_from(KEYS), documents, max_size=10), max_size=3),
        "base": st.sampled_from(["bundled", "missing.yaml", "", None]),
        "disable": documents,
    },
)


@examples(150)
@given(data=documents | manifest_like)
def test_random_documents_load_or_fail_located(workdir, data):
    path = _write(workdir, "random.yaml", yaml.safe_dump(data, allow_unicode=True))
    assert_loads_or_located(load_manifest, path)


@examples(150)
@given(data=documents | st.fixed_dictionaries({}, optional={k: documents for k in ("gpu", "arch", "entries", "software")}))
def test_random_perf_tables_load_or_fail_located(workdir, data):
    path = _write(workdir, "perf.yaml", yaml.safe_dump(data, allow_unicode=True))
    assert_loads_or_located(load_perf_table, path)


# ------------------------------------------------------------------ mutations of the real files


def _paths(data, prefix=()):
    """Every path into a YAML data tree (mapping keys and list indices)."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


def _get(data, path):
    for part in path:
        data = data[part]
    return data


MANIFEST_PATHS = list(_paths(MANIFEST_DATA))[1:]
PERF_PATHS = list(_paths(PERF_DATA))[1:]
replacements = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3)


@st.composite
def mutated(draw, original, paths):
    """The data with 1-3 edits: delete a key or item, replace a value, swap two values, add a garbage key."""
    import copy

    data = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        valid = [p for p in paths if _has(data, p)]
        path = draw(st.sampled_from(valid))
        parent, last = _get(data, path[:-1]), path[-1]
        op = draw(st.sampled_from(["delete", "replace", "swap", "insert", "retype"]))
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(replacements)
        elif op == "swap":
            other = draw(st.sampled_from(valid))
            if _has(data, other) and not _is_prefix(path, other) and not _is_prefix(other, path):
                a, b = parent[last], _get(data, other)
                _get(data, other[:-1])[other[-1]] = a
                parent[last] = b
        elif op == "insert" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS) | st.text(max_size=6))] = draw(replacements)
        elif op == "retype":
            value = parent[last]
            parent[last] = draw(st.sampled_from([[value], {"values": value}, str(value), None, -1]))
    return data


def _has(data, path):
    """``path`` leads to a value through dicts and lists only (a retyped value -- text -- is not a container)."""
    node = data
    for part in path:
        if not isinstance(node, (dict, list)):
            return False
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def _is_prefix(a, b):
    return b[: len(a)] == a


@examples(100)
@given(data=mutated(MANIFEST_DATA, MANIFEST_PATHS))
def test_mutated_manifest_loads_or_fails_located(workdir, data):
    path = _write(workdir, "mutated.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    assert_loads_or_located(load_manifest, path)


@examples(120)
@given(data=mutated(PERF_DATA, PERF_PATHS))
def test_mutated_perf_table_loads_or_fails_located(workdir, data):
    path = _write(workdir, "mutated-perf.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    assert_loads_or_located(load_perf_table, path)


FIELD_PATHS = (
    [("name",), ("op",), ("solution",), ("backend",), ("adapter",), ("arch",), ("arch", "min"), ("arch", "max"),
     ("arch", "only"), ("dtypes",), ("shapes",), ("features",), ("exclude",), ("settings",), ("priority",), ("refs",)]
    + [("dtypes", f) for f in DTypes.model_fields] + [("shapes", f) for f in Shapes.model_fields]
    + [("shapes", f, k) for f in Shapes.model_fields for k in IntRange.model_fields]
    + [("features", f) for f in Features.model_fields]
    + [("exclude", 0, "when", f) for f in REQUEST_FIELDS] + [("exclude", 0, k) for k in Exclusion.model_fields]
)


@examples(100)
@given(kernel=st.integers(0, len(MANIFEST_DATA["kernels"]) - 1), path=st.sampled_from(FIELD_PATHS),
       value=documents | st.lists(scalars, max_size=3) | st.dictionaries(keys, scalars, max_size=3))
def test_any_value_in_any_kernel_field_loads_or_fails_located(workdir, kernel, path, value):
    """Every field a kernel can declare, given a random value of a random shape (the schema names the fields)."""
    import copy

    data = copy.deepcopy(MANIFEST_DATA)
    node = data["kernels"][kernel]
    for part in path[:-1]:  # make the containers on the way exist, then set the value
        if isinstance(part, int):
            if not node:
                node.append({"when": {}, "reason": "r", "ref": "r"})
            node = node[0]
            continue
        kind = list if part == "exclude" else dict
        if not isinstance(node.get(part), kind):
            node[part] = kind()
        node = node[part]
    node[path[-1]] = value
    path_ = _write(workdir, "field.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    manifest = assert_loads_or_located(load_manifest, path_)
    if manifest is not None:  # loaded: every constraint still checks a request field of the right type
        for k in manifest.kernels:
            for field, constraint in k.constraints:
                assert field in REQUEST_FIELDS


# ------------------------------------------------------------------ text and byte mutations

MANIFEST_LINES = MANIFEST_TEXT.splitlines(keepends=True)
GARBAGE_LINES = [
    "    priority: !!python/object/apply:os.system ['true']\n", "x: !!python/name:os.system\n",
    "  - &a [*a]\n", "    foo: !custom tag\n", "    <<: *nothing\n", "    ? [a, b]\n    : c\n",
    "    op: !!int abc\n", "\t\ttabs: 1\n", "    notes: \"unterminated\n", "---\n", "... \n", "%YAML 1.1\n",
    "    shapes: {head_dim_qk: [" + "[" * 80 + "]" * 80 + "]}\n", "    when: {q_dtype: !!binary aGk=}\n",
    "    settings: {a: 2024-01-01}\n", "    arch: {only: 5}\n", "    shapes: {page_size: {1: 2}}\n",
]


@st.composite
def text_mutations(draw):
    lines = list(MANIFEST_LINES)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["duplicate", "delete", "garbage", "indent", "dedent", "swap", "char"]))
        if op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "delete":
            del lines[i]
        elif op == "garbage":
            lines.insert(i, draw(st.sampled_from(GARBAGE_LINES) | st.text(max_size=30).map(lambda t: t + "\n")))
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "char" and lines[i]:
            k = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + draw(st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\t ") + ["\x00", "\ufeff", "é"])) + lines[i][k + 1:]
    return "".join(lines)


@examples(150)
@given(text=text_mutations())
def test_text_mutations_of_the_manifest_load_or_fail_located(workdir, text):
    assert_loads_or_located(load_manifest, _write(workdir, "edited.yaml", text))


@examples(150)
@given(raw=st.binary(max_size=200), cut=st.integers(0, len(MANIFEST_TEXT)), splice=st.booleans())
def test_random_bytes_load_or_fail_located(workdir, raw, cut, splice):
    data = (MANIFEST_TEXT.encode()[:cut] + raw + MANIFEST_TEXT.encode()[cut:]) if splice else raw
    assert_loads_or_located(load_manifest, _write(workdir, "bytes.yaml", data))


@examples(60)
@given(i=st.sampled_from([i for i, line in enumerate(MANIFEST_LINES)
                          if re.match(r"^ +[a-z_]+:", line) and not line.lstrip().startswith("-")]))
def test_every_repeated_key_is_an_error_not_last_wins(workdir, i):
    lines = list(MANIFEST_LINES)
    lines.insert(i + 1, lines[i])
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(workdir, "dup.yaml", "".join(lines)))
    key = lines[i].strip().split(":")[0]
    assert any(re.match(rf"^(.*/)?dup\.yaml:{i + 2}:\d+: .*duplicate key '{key}' \(first at line {i + 1}\)$", p)
               for p in info.value.problems), info.value.problems


# ------------------------------------------------------------------ requests built from field names

FEATURES = sorted({f for fs in FEATURE_FIELDS_BY_OP.values() for f in fs})


def test_strategies_cover_the_schema():
    """The random documents above draw keys from the schema itself: a new field is fuzzed without edits."""
    assert set(KernelSpec.model_fields) <= set(KEYS) and set(FEATURES) <= set(KEYS)
    assert all(c in string.printable for c in "".join(KEYS))


@examples(60)
@given(data=mutated(PERF_DATA, PERF_PATHS))
def test_a_perf_table_that_loads_never_breaks_selection(workdir, data):
    """Whatever a loadable table says, selecting with it returns an eligible kernel or a kernelsel error."""
    from registry.errors import KernelselError
    from selector import KernelRequest, Platform, Selector
    from selector.solver import reasons

    table = assert_loads_or_located(load_perf_table, _write(workdir, "ranked.yaml", yaml.safe_dump(data, sort_keys=False)))
    if table is None:
        return
    manifest = load_manifest()
    platform = Platform.hypothetical(table.arch)
    for entry in table.entries[:8]:
        try:
            request = KernelRequest(op=entry.op, arch=table.arch, **{k: v for k, v in entry.shape.items() if v is not None})
            selection = Selector(manifest, platform, perf=table).solve(request)
        except KernelselError:
            continue
        if selection.kernel is not None:
            assert reasons(selection.kernel, request, manifest, platform) == ()
