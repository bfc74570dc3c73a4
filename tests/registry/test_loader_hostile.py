"""Hostile manifests, overlays and perf tables: each is one located ManifestError, fast, and never a crash.

A manifest may come from a pull request or a shared volume on a server that
runs for weeks: duplicate keys, Python-object tags, alias bombs, deep
nesting, huge or non-UTF-8 files, pipes and directories must all be refused
with ``file[:line:col]: path: message`` -- not last-wins, not a traceback,
not a hang, not a segfault.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from registry.errors import ManifestError
from registry.loader import load_manifest, load_perf_table
from registry.yaml_reader import MAX_BYTES, MAX_DEPTH, MAX_NODES, read_yaml

BROKEN = pathlib.Path(__file__).parent / "broken"
VALID = (BROKEN / "_valid.yaml").read_text()
ROOT = pathlib.Path(__file__).resolve().parents[2]


def problem(path: pathlib.Path, text: str | bytes, load=load_manifest) -> str:
    """The single problem loading ``text`` from ``path`` reports."""
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ManifestError) as info:
        load(path)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


# ------------------------------------------------------------------ duplicate keys


def test_a_duplicate_key_is_an_error_with_both_lines(tmp_path):
    text = VALID.replace("dtypes: {q_dtype: [bf16], kv_dtype: [bf16]}",
                         "dtypes:\n      q_dtype: [bf16]\n      kv_dtype: [bf16]\n      q_dtype: [fp16]")
    assert re.fullmatch(r"m\.yaml:16:7: kernels\[0\]\.dtypes: duplicate key 'q_dtype' \(first at line 14\)",
                        problem(tmp_path / "m.yaml", text).split("/")[-1])


@pytest.mark.parametrize("text, where", [
    ("schema_version: 1\nschema_version: 1\n", r":2:1: \(top level\): duplicate key 'schema_version' \(first at line 1\)"),
    ("a: {x: 1, x: 2}\n", r":1:11: a: duplicate key 'x' \(first at line 1\)"),
    ("a:\n  - {b: 1}\n  - {b: 1, c: 2, b: 3}\n", r":3:18: a\[1\]: duplicate key 'b' \(first at line 3\)"),
    ("true: 1\nyes: 2\n", r":2:1: \(top level\): duplicate key 'yes' \(first at line 1\)"),  # both mean True
    ("1: a\n0x1: b\n", r":2:1: \(top level\): duplicate key '0x1' \(first at line 1\)"),  # both the integer 1
])
def test_duplicates_anywhere_are_errors_not_last_wins(tmp_path, text, where):
    assert re.search(where + "$", problem(tmp_path / "d.yaml", text))


def test_merge_keys_may_be_overridden_but_not_repeated(tmp_path):
    """`<<: *base` then a key of its own is YAML's override, not a duplicate; the same own key twice is."""
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1}\nuse: {<<: *b, x: 2}\n")
    data, *_ = read_yaml(path)
    assert data["use"] == {"x": 2}
    assert "duplicate key 'x'" in problem(path, "base: &b {x: 1}\nuse: {<<: *b, x: 2, x: 3}\n")


def test_duplicates_in_overlays_and_perf_tables(tmp_path):
    overlay = f"base: {BROKEN / '_valid.yaml'}\ndisable: []\ndisable: [x]\n"
    assert re.search(r"o\.yaml:3:1: \(top level\): duplicate key 'disable' \(first at line 2\)$",
                     problem(tmp_path / "o.yaml", overlay))
    perf = "schema_version: 1\ngpu: g\narch: sm_90\nentries:\n- op: mha_decode\n  shape: {page_size: 16, page_size: 32}\n  median_us: {a: 1}\n"
    assert re.search(r"p\.yaml:6:26: entries\[0\]\.shape: duplicate key 'page_size' \(first at line 6\)$",
                     problem(tmp_path / "p.yaml", perf, load_perf_table))


# ------------------------------------------------------------------ tags


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['true']", "!!python/object:os.PathLike {}", "!!python/name:os.system",
    "!!python/module:os", "!!python/object/new:subprocess.Popen [[true]]", "!!python/tuple [1, 2]",
    "!custom value", "!<tag:example.com,2024:thing> x", "!!binary aGk=", "!!set {a, b}", "!!omap [{a: 1}]",
    "!!timestamp 2024-01-01",
])
def test_object_and_unknown_tags_are_refused_where_they_are(tmp_path, tag):
    msg = problem(tmp_path / "t.yaml", VALID.replace("priority: 5", f"priority: {tag}"))
    assert re.search(r"t\.yaml:15:15: kernels\[0\]\.priority: tag '[^']+' is not allowed: kernelsel files hold plain "
                     r"data only", msg), msg


def test_a_tag_on_a_key_or_a_collection_is_refused_too(tmp_path):
    assert "tag '!!python/name:os.system' is not allowed" in problem(tmp_path / "k.yaml", "? !!python/name:os.system\n: 1\n")
    assert re.search(r":2:10: kernels: tag '!!python/object:x' is not allowed",
                     problem(tmp_path / "c.yaml", "schema_version: 1\nkernels: !!python/object:x {}\n"))


def test_malformed_core_scalars_are_located(tmp_path):
    assert re.search(r":15:15: kernels\[0\]\.priority: 'abc' is not a valid integer$",
                     problem(tmp_path / "i.yaml", VALID.replace("priority: 5", "priority: !!int abc")))
    assert re.search(r"'maybe' is not a valid boolean$",
                     problem(tmp_path / "b.yaml", VALID.replace("priority: 5", "priority: !!bool maybe")))
    digits = problem(tmp_path / "n.yaml", VALID.replace("priority: 5", "priority: 1" + "0" * 5000))
    assert "kernels[0].priority" in digits and "is not a valid integer" in digits and len(digits) < 400


def test_an_unquoted_date_stays_text(tmp_path):
    path = tmp_path / "perf.yaml"
    path.write_text("schema_version: 1\ngpu: g\narch: sm_90\nrecorded: 2026-11-21\n")
    assert load_perf_table(path).recorded == "2026-11-21"


# ------------------------------------------------------------------ size, depth, aliases: bounded work


def test_billion_laughs_is_refused_quickly(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    start = time.perf_counter()
    msg = problem(tmp_path / "lol.yaml", "\n".join(lines) + "\n")
    assert time.perf_counter() - start < 5
    assert re.search(rf"lol\.yaml:\d+:\d+: \w+(\[\d+\])?: more than {MAX_NODES:,} values, aliases expanded", msg), msg


def test_a_recursive_alias_is_refused(tmp_path):
    assert re.search(r"r\.yaml:1:8: a\[0\]: alias \*a is inside its own anchor",
                     problem(tmp_path / "r.yaml", "a: &a [*a]\n"))
    assert "inside its own anchor" in problem(tmp_path / "m.yaml", "a: &a {b: {c: *a}}\n")


def test_aliases_within_limits_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("x: &refs [a, b]\ny: *refs\n")
    assert read_yaml(path)[0] == {"x": ["a", "b"], "y": ["a", "b"]}


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}"), ("- ", "")])
def test_deep_nesting_is_a_located_error(tmp_path, opening, closing):
    depth = MAX_DEPTH + 5
    msg = problem(tmp_path / "deep.yaml", opening * depth + "1" + closing * depth + "\n")
    assert re.search(rf"deep\.yaml:1:\d+: [^:]*: nested deeper than {MAX_DEPTH} levels", msg), msg


def test_depth_through_aliases_counts(tmp_path):
    half = MAX_DEPTH // 2 + 2
    text = "a: &a " + "[" * half + "]" * half + "\nb: " + "[" * half + "*a" + "]" * half + "\n"
    assert f"nested deeper than {MAX_DEPTH} levels, aliases expanded" in problem(tmp_path / "d.yaml", text)


def test_very_deep_nesting_does_not_crash_the_process(tmp_path):
    """libyaml's C composer recurses: 300,000 '[' used to crash Python (a segfault); in a subprocess to prove it.

    The behaviour is asserted, not the wording: which layer refuses first (our depth limit, or libyaml >= 0.2.6's
    own nesting limit, bundled with PyYAML 6.0.4) depends on the installed PyYAML."""
    path = tmp_path / "bomb.yaml"
    path.write_text("a: " + "[" * 300_000 + "]" * 300_000 + "\n")
    probe = ("import sys\nfrom registry.loader import load_manifest\nfrom registry.errors import ManifestError\n"
             "try:\n    load_manifest(sys.argv[1])\nexcept ManifestError as e:\n"
             "    print(len(e.problems))\n    print(e.problems[0])\nelse:\n    print('loaded')\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    count, message = out.stdout.splitlines()
    assert count == "1", out.stdout
    assert re.match(r".*bomb\.yaml:1:\d+: \S", message), message


def test_too_many_values_is_refused(tmp_path):
    start = time.perf_counter()
    msg = problem(tmp_path / "wide.yaml", "a: [" + "1," * (MAX_NODES + 10) + "1]\n")
    assert f"more than {MAX_NODES:,} values" in msg and time.perf_counter() - start < 10


def test_the_size_limit_is_named_and_checked_before_reading(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:  # sparse: the check must not read it
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(ManifestError, match=rf"huge\.yaml: manifest is {MAX_BYTES + 1:,} bytes, over the 16 MiB limit$"):
        load_manifest(path)
    with pytest.raises(ManifestError, match=r"x\.yaml: manifest is [\d,]+ bytes, over the 16 MiB limit$"):
        load_manifest("x.yaml", text="a" * (MAX_BYTES + 1))
    with pytest.raises(ManifestError, match=r"perf table is [\d,]+ bytes, over the 16 MiB limit$"):
        load_perf_table(path)


# ------------------------------------------------------------------ bytes and files


def test_non_utf8_bytes_are_located(tmp_path):
    msg = problem(tmp_path / "latin1.yaml", VALID.replace("notes", "x").encode() + b"    notes: caf\xe9\n")
    assert re.search(r"latin1\.yaml:17:15: not UTF-8: byte 0xe9 cannot be decoded .*; save the file as UTF-8$", msg), msg
    assert re.search(r"u16\.yaml:1:1: not UTF-8: byte 0xff", problem(tmp_path / "u16.yaml", "a: 1\n".encode("utf-16")))


def test_control_characters_are_located(tmp_path):
    assert re.search(r"nul\.yaml:2:5: not valid YAML: character #x0000 is not allowed",
                     problem(tmp_path / "nul.yaml", "a: 1\nb: x\x00y\n"))
    assert re.search(r"esc\.yaml:1:8: not valid YAML: character #x001b is not allowed",
                     problem(tmp_path / "esc.yaml", "a: é b\x1b\n"))


def test_a_utf8_bom_and_crlf_line_ends_are_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + VALID.replace("\n", "\r\n").encode())
    assert [k.name for k in load_manifest(path).kernels] == ["triton-mha-decode"]


@pytest.mark.parametrize("text, got", [("", "an empty document"), ("# only a comment\n", "an empty document"),
                                       ("- a\n", "a list"), ("just text\n", "text"), ("42\n", "a number")])
def test_empty_and_non_mapping_documents(tmp_path, text, got):
    assert re.search(rf"e\.yaml:1:1: \(top level\): expected a mapping with schema_version and kernels, got {got}$",
                     problem(tmp_path / "e.yaml", text))


def test_more_than_one_document_is_refused(tmp_path):
    assert re.search(r"two\.yaml:2:1: not valid YAML: expected a single document in the stream but found another",
                     problem(tmp_path / "two.yaml", "a: 1\n---\nb: 2\n"))


def test_missing_directory_pipe_and_unreadable_files(tmp_path):
    with pytest.raises(ManifestError, match=r"nope\.yaml: cannot read manifest: No such file or directory$"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match=r"dir\.yaml: cannot read manifest: is a directory, not a file$"):
        (tmp_path / "dir.yaml").mkdir()
        load_manifest(tmp_path / "dir.yaml")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening a pipe for reading would block forever: refused without waiting for a writer
    with pytest.raises(ManifestError, match=r"fifo\.yaml: cannot read manifest: not a regular file \(a pipe or device\)$"):
        load_manifest(fifo)
    with pytest.raises(ManifestError, match=r"cannot read perf table: not a regular file"):
        load_perf_table("/dev/zero")
    locked = tmp_path / "locked.yaml"
    locked.write_text(VALID)
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(ManifestError, match=r"locked\.yaml: cannot read manifest: Permission denied$"):
        load_manifest(locked)


# ------------------------------------------------------------------ overlays


def test_overlay_loops_and_bad_overlay_values_are_located(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ManifestError, match=r"a\.yaml:1:1: base: 'b\.yaml': .*b\.yaml:1:1: base: 'a\.yaml' leads back"):
        load_manifest(a)
    assert re.search(r"s\.yaml:1:1: base: 's\.yaml' leads back to this overlay", problem(tmp_path / "s.yaml", "base: s.yaml\n"))
    assert re.search(r"n\.yaml:1:1: base: expected 'bundled' or a manifest path, got None$", problem(tmp_path / "n.yaml", "base:\n"))
    assert re.search(r"k\.yaml:2:1: kernels: expected a list of kernels, got a number$",
                     problem(tmp_path / "k.yaml", "base: bundled\nkernels: 5\n"))
    assert re.search(r"d\.yaml:2:11: disable\[0\]: no kernel named \['x'\]$",
                     problem(tmp_path / "d.yaml", "base: bundled\ndisable: [[x]]\n"))
    assert re.search(r"m\.yaml:1:1: base: 'gone\.yaml': .*gone\.yaml: cannot read manifest: No such file",
                     problem(tmp_path / "m.yaml", "base: gone.yaml\n"))


def test_an_overlay_kernel_of_an_unlisted_solution_is_located(tmp_path):
    kernel = VALID.split("kernels:\n")[1].replace("name: triton-mha-decode", "name: mine").replace("solution: triton", "solution: xqa")
    msg = problem(tmp_path / "o.yaml", f"base: {BROKEN / '_valid.yaml'}\nkernels:\n{kernel}")
    assert re.search(r"o\.yaml:\d+:5: kernels\[0\]\.solution: 'xqa' is not listed under the base manifest's solutions", msg), msg
