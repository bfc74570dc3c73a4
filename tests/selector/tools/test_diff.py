"""``kernelsel diff``: the consequences of a manifest edit, request by request.

Cases are edits applied to copies of the bundled manifest (or to small
manifests built from its own solutions and adapters), never restated facts.
"""

from __future__ import annotations

import copy
import os
import itertools
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from registry.loader import load_manifest
from registry.vocab import Arch, DType, Op, Solution
from selector import KernelRequest, Platform, solve
from selector.tools.diff import diff_manifests, read_manifest
from selector.tools.request_space import request_space

ROOT = pathlib.Path(__file__).resolve().parents[3]
BUNDLED = ROOT / "kernels.yaml"
GATE_FROM, GATE_TO = Arch.SM_90, Arch.SM_100


def bundled_data() -> dict:
    return yaml.safe_load(BUNDLED.read_text())


def write(tmp_path: pathlib.Path, name: str, data: dict) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------- the FlashInfer gate regression of lightseekorg/tokenspeed#445


def move_flashinfer_mha_gate(data: dict) -> list[str]:
    """The edit lightseekorg/tokenspeed#445 describes: every FlashInfer MHA decode/extend entry admitting sm_90 is gated at sm_100."""
    manifest = load_manifest(BUNDLED)
    moved = []
    for raw in data["kernels"]:
        spec = manifest.by_name[raw["name"]]
        if spec.solution is not Solution.FLASHINFER or spec.op not in (Op.MHA_DECODE, Op.MHA_EXTEND):
            continue
        if not spec.arch.allows(GATE_FROM):
            continue
        if isinstance(raw["arch"], list):
            kept = [a for a in raw["arch"] if Arch(a) >= GATE_TO]
            raw["arch"] = kept or [GATE_TO.value]
        else:
            raw["arch"]["min"] = GATE_TO.value
        moved.append(raw["name"])
    return moved


@pytest.fixture
def gate_edit(tmp_path):
    data = bundled_data()
    moved = move_flashinfer_mha_gate(data)
    ops = {load_manifest(BUNDLED).by_name[n].op for n in moved}
    assert ops == {Op.MHA_DECODE, Op.MHA_EXTEND}, "the bundled manifest has FlashInfer MHA decode and extend on sm_90"
    return write(tmp_path, "kernels.yaml", data), moved


def test_gate_regression_is_reported_as_a_loss_with_arch_ops_and_solution(cli, gate_edit):
    head, _ = gate_edit
    code, out, err = cli("diff", BUNDLED, head)
    assert code == 1, err
    assert re.search(
        r"^  (sm_\d+, )*sm_90(, sm_\d+)* mha_decode/mha_extend with solution=flashinfer: loses all candidates",
        out, re.MULTILINE,
    ), out
    assert "Traceback" not in out + err


def test_gate_regression_json_names_the_lost_kernels_and_why(cli, gate_edit):
    head, moved = gate_edit
    code, out, _ = cli("diff", BUNDLED, head, "--json")
    data = json.loads(out)
    assert code == 1 and data["exit_status"] == 1
    loss = next(f for f in data["lost"] if f["request"] == {"solution": ["flashinfer"]} and GATE_FROM.value in f["archs"])
    assert {"mha_decode", "mha_extend"} <= set(loss["ops"])
    # every line says which kernel was lost and the solver's reason it no longer fits
    assert all(re.match(r"was [a-z0-9-]+ \((mha_decode|mha_extend)\): ", line) for line in loss["because"])
    assert any(f"arch {GATE_FROM.value}" in line for line in loss["because"])
    assert {c["name"] for c in data["kernels"]["changed"]} == set(moved)
    assert all([f["field"] for f in c["fields"]] == ["arch"] for c in data["kernels"]["changed"])


def test_gate_regression_markdown_is_a_pr_comment(cli, gate_edit):
    head, _ = gate_edit
    code, out, _ = cli("diff", "--markdown", BUNDLED, head)
    assert code == 1
    assert out.startswith("### kernelsel diff:")
    assert "lose every candidate kernel" in out
    row = next(line for line in out.splitlines() if line.startswith("| ") and "`solution=flashinfer`" in line
               and "mha_decode, mha_extend" in line)
    assert GATE_FROM.value in row.split("|")[1]


def test_gate_regression_also_shows_who_now_serves_hopper(gate_edit):
    head, moved = gate_edit
    report = diff_manifests(load_manifest(BUNDLED), load_manifest(head))
    hopper = [f for f in report.changed if GATE_FROM.value in f.archs and not f.fields]
    assert hopper, "the unrestricted sm_90 request changes kernel"
    for f in hopper:
        assert f.before in moved and f.after not in moved
        sel = solve(load_manifest(head), Platform.hypothetical(GATE_FROM), KernelRequest(op=f.ops[0], arch=GATE_FROM))
        assert sel.kernel.name == f.after


# ----------------------------------------------------------- small manifests


def synthetic(kernels: list[dict]) -> dict:
    """A manifest with the bundled solutions, plan and adapters, and the given mha_decode kernels."""
    data = bundled_data()
    adapters = {k["solution"]: k["adapter"] for k in data["kernels"] if k["op"] == Op.MHA_DECODE.value}
    out = {key: data[key] for key in ("schema_version", "solutions", "attention_plan")}
    out["kernels"] = [
        {"op": Op.MHA_DECODE.value, "adapter": adapters[k["solution"]], "refs": ["tests/selector/tools/test_diff.py"]} | k
        for k in kernels
    ]
    return out


FAST = {"name": "a-fast", "solution": "flashinfer", "backend": "fa2", "arch": {"min": "sm_80"},
        "dtypes": {"q_dtype": ["bf16"], "kv_dtype": ["bf16"]}, "shapes": {"head_dim_qk": [128]}, "priority": 10}
PORTABLE = {"name": "b-portable", "solution": "triton", "backend": "triton", "arch": {"min": "sm_80"},
            "dtypes": {"q_dtype": ["bf16", "fp16"], "kv_dtype": ["bf16", "fp16"]},
            "shapes": {"head_dim_qk": [64, 128, 256]}, "features": {"sinks": True}, "priority": 5}


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "base.yaml", synthetic([FAST, PORTABLE]))


def edited(tmp_path, name, kernels) -> pathlib.Path:
    return write(tmp_path, name, synthetic(kernels))


def test_identical_manifests_say_no_changes_and_exit_0(cli, base):
    code, out, _ = cli("diff", base, base)
    assert code == 0
    assert out.strip().endswith("no changes")


def test_the_bundled_manifest_against_itself_finds_nothing_even_when_every_op_is_enumerated():
    m = load_manifest(BUNDLED)
    report = diff_manifests(m, m, skip_identical_ops=False)
    assert report.requests_checked > 0 and set(report.ops_compared) == {op.value for op in Op if m.by_op[op]}
    assert not report.has_changes and report.exit_status == 0


def test_a_narrowed_shape_changes_the_selection_and_says_why(cli, tmp_path, base):
    narrowed = copy.deepcopy(FAST) | {"shapes": {"head_dim_qk": [256]}}
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [narrowed, PORTABLE]), "--json")
    data = json.loads(out)
    # restricted to a-fast's solution, head dim 128 now has nothing
    assert code == 1 and [f["request"] for f in data["lost"]] == [{"head_dim_qk": ["128"], "solution": ["flashinfer"]}]
    away = next(f for f in data["changed"] if (f["before"], f["after"]) == ("a-fast", "b-portable"))
    back = next(f for f in data["changed"] if (f["before"], f["after"]) == ("b-portable", "a-fast"))
    assert away["request"] == {"head_dim_qk": ["128"]} and back["request"] == {"head_dim_qk": ["256"]}
    assert "a-fast: head_dim_qk 128 not in [256]" in away["because"]
    assert any(line.startswith("b-portable: eligible before, ranked below a-fast") for line in away["because"])
    assert {"field": "shapes.head_dim_qk", "base": "[128]", "head": "[256]"} in data["kernels"]["changed"][0]["fields"]


def test_a_dropped_dtype_loses_every_candidate_and_exits_1(cli, tmp_path, base):
    bf16_only = copy.deepcopy(PORTABLE) | {"dtypes": {"q_dtype": ["bf16"], "kv_dtype": ["bf16"]}}
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [FAST, bf16_only]))
    assert code == 1
    assert re.search(r"^  sm_80, .*sm_121 mha_decode with q_dtype=fp16: loses all candidates", out, re.MULTILINE), out
    assert "was b-portable (mha_decode): q_dtype fp16 not in [bf16]" in out


def test_an_added_kernel_gains_coverage_and_is_listed(cli, tmp_path, base):
    fp8 = copy.deepcopy(PORTABLE) | {"name": "c-fp8", "dtypes": {"q_dtype": ["fp8_e4m3"], "kv_dtype": ["fp8_e4m3"]},
                                     "features": {}}
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [FAST, PORTABLE, fp8]), "--json")
    data = json.loads(out)
    assert code == 0 and data["kernels"]["added"] == ["c-fp8"]
    gain = next(f for f in data["gained"])
    assert gain["request"] == {"q_dtype": ["fp8_e4m3"]}
    assert gain["because"] == ["now c-fp8 (mha_decode): added"]


def test_a_removed_kernel_is_listed_and_its_requests_move(cli, tmp_path, base):
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [PORTABLE]), "--json")
    data = json.loads(out)
    assert data["kernels"]["removed"] == ["a-fast"]
    moved = [f for f in data["changed"] if f["before"] == "a-fast"]
    assert moved and all(f["after"] == "b-portable" and "a-fast: removed" in f["because"] for f in moved)


def test_a_priority_only_edit_is_a_field_change_without_request_changes(cli, tmp_path, base):
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [FAST | {"priority": 11}, PORTABLE]))
    assert code == 0
    assert "no request changes its kernel" in out
    assert re.search(r"~ a-fast\n\s+priority: 10 -> 11", out)


def test_an_added_exclusion_is_seen_through_the_fields_it_joins(cli, tmp_path, base):
    excluded = copy.deepcopy(PORTABLE) | {"exclude": [{"when": {"q_dtype": "fp16", "sinks": True},
                                                       "reason": "test", "ref": "test"}]}
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [FAST, excluded]), "--json")
    data = json.loads(out)
    assert code == 1
    assert [f["request"] for f in data["lost"]] == [{"q_dtype": ["fp16"], "sinks": ["true"]}]
    assert data["kernels"]["changed"][0]["fields"][0]["field"] == "exclude"


# ------------------------------------------------------------- git objects


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_objects_are_read_with_git_show_and_named_by_their_ref(cli, tmp_path, monkeypatch, gate_edit):
    head, _ = gate_edit
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=kernelsel", "-c", "user.email=kernelsel@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(BUNDLED, repo / "kernels.yaml")
    subprocess.run(git + ["add", "kernels.yaml"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "base"], cwd=repo, check=True)
    shutil.copy(head, repo / "kernels.yaml")
    monkeypatch.chdir(repo)

    m = read_manifest("HEAD:kernels.yaml")
    assert m.path == "HEAD:kernels.yaml" and m.kernels[0].origin.startswith("HEAD:kernels.yaml:")
    code, out, _ = cli("diff", "HEAD:kernels.yaml", "kernels.yaml")
    assert code == 1 and out.startswith("base      HEAD:kernels.yaml")
    assert "mha_decode/mha_extend with solution=flashinfer: loses all candidates" in out

    code, _, err = cli("diff", "no-such-ref:kernels.yaml", "kernels.yaml")
    assert code == 2 and re.search(r"^kernelsel diff: 'no-such-ref:kernels\.yaml': not a file, and git cannot read it", err)
    code, _, err = cli("diff", "HEAD:missing.yaml", "kernels.yaml")
    assert code == 2 and "missing.yaml" in err and "Traceback" not in err


def _repo(tmp_path: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """A git repository with one commit holding ``files``."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=kernelsel", "-c", "user.email=kernelsel@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for name, data in files.items():
        (repo / name).write_bytes(data)
    subprocess.run(git + ["add", *files], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "base"], cwd=repo, check=True)
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
@pytest.mark.parametrize("ref", ["--output={out}", "--output={out}:x", "-o{out}:x", "--textconv", "-p"])
def test_a_ref_is_never_an_option_to_git(cli, tmp_path, monkeypatch, ref):
    """``git show --output=FILE`` writes a file: a ref that starts with '-' is refused and nothing is written."""
    repo = _repo(tmp_path, {"kernels.yaml": BUNDLED.read_bytes()})
    monkeypatch.chdir(repo)
    out = tmp_path / "written"
    code, _, err = cli("diff", "--", ref.format(out=out), "kernels.yaml")
    assert code == 2 and ("starts with '-'" in err or "no such file" in err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("written*")), "git was handed the ref as an option"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_a_git_blob_that_is_not_utf8_is_a_located_error(cli, tmp_path, monkeypatch):
    repo = _repo(tmp_path, {"k.yaml": b"schema_version: 1\nx: \"\xe9\"\n"})
    monkeypatch.chdir(repo)
    code, _, err = cli("diff", "HEAD:k.yaml", "k.yaml")
    assert code == 2 and err == ("kernelsel diff: BASE: HEAD:k.yaml:2:5: not UTF-8: byte 0xe9 cannot be decoded "
                                 "(invalid continuation byte); save the file as UTF-8\n")


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_an_overlay_from_git_with_a_path_base_is_refused_not_mixed_with_the_working_tree(cli, tmp_path, monkeypatch):
    repo = _repo(tmp_path, {"kernels.yaml": BUNDLED.read_bytes(), "ov.yaml": b"base: kernels.yaml\ndisable: [triton-mha-decode]\n"})
    monkeypatch.chdir(repo)
    code, _, err = cli("diff", "HEAD:ov.yaml", "kernels.yaml")
    assert code == 2 and err.startswith("kernelsel diff: 'HEAD:ov.yaml': an overlay read from git can only have base: bundled")


def test_a_path_on_disk_wins_over_a_git_object(tmp_path, monkeypatch, base):
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "main:kernels.yaml"
    odd.write_text(base.read_text())
    assert read_manifest("main:kernels.yaml").path == "main:kernels.yaml"
    assert len(read_manifest("main:kernels.yaml").kernels) == 2


def test_bad_arguments_exit_2_with_a_message(cli, base):
    code, _, err = cli("diff", "nowhere.yaml", base)
    assert code == 2 and err.startswith("kernelsel diff: 'nowhere.yaml': no such file")
    code, _, err = cli("diff", base, base, "--json", "--markdown")
    assert code == 2 and "not both" in err


# ------------------------------------------------------ the request space


@pytest.mark.parametrize("op", [op for op in Op])
def test_every_probe_is_solved_as_the_enumeration_expects(op, gate_edit):
    """The enumeration's own view of eligibility agrees with the solver on every probe it makes."""
    base, head = load_manifest(BUNDLED), load_manifest(gate_edit[0])
    for probe in request_space(op, base, head):
        for manifest, expected in zip((base, head), probe.expected):
            wanted = {n for n in expected if _restriction_admits(probe.request, manifest.by_name[n].solution)}
            for arch in probe.archs:  # every arch of the class behaves alike
                request = KernelRequest(**(probe.request.model_dump() | {"arch": arch}))
                sel = solve(manifest, Platform.hypothetical(arch), request)
                assert {k.name for k in sel.eligible} == wanted, (request.describe(), manifest.path)


def _restriction_admits(request: KernelRequest, solution: Solution) -> bool:
    """The solution restriction and the reference rule, which the enumeration leaves to the solver."""
    if request.solution is not None:
        return solution is request.solution
    return solution is not Solution.REFERENCE


def test_the_enumeration_reaches_every_outcome_a_brute_force_sweep_finds(tmp_path):
    """On a small pair of manifests, sweep arch x dtypes x head dim x page size x sinks exhaustively."""
    a = {"name": "a", "solution": "flashinfer", "backend": "fa2", "arch": {"min": "sm_80", "max": "sm_90"},
         "dtypes": {"q_dtype": ["bf16", "fp16"], "kv_dtype": ["bf16", "fp8_e4m3"]},
         "shapes": {"head_dim_qk": [8, 16, 32], "page_size": {"min": 8, "max": 32, "multiple_of": 8}},
         "exclude": [{"when": {"page_size": 16, "head_dim_qk": {"min": 16}}, "reason": "r", "ref": "r"}],
         "priority": 9}
    b = {"name": "b", "solution": "xqa", "backend": "xqa", "arch": ["sm_90", "sm_100"],
         "dtypes": {"q_dtype": ["bf16"], "kv_dtype": ["bf16"]},
         "shapes": {"head_dim_qk": {"min": 12, "max": 20}, "page_size": {"min": 4, "power_of_two": True}},
         "features": {"sinks": True}, "priority": 10}
    c = {"name": "c", "solution": "triton", "backend": "triton", "arch": {"min": "sm_80"},
         "dtypes": {"q_dtype": ["fp16"], "kv_dtype": ["fp16", "fp8_e4m3"]}, "shapes": {"page_size": [16, 24]},
         "priority": 5}
    b2 = b | {"arch": ["sm_100"], "shapes": {"head_dim_qk": [16], "page_size": {"min": 8, "power_of_two": True}}}
    base = load_manifest(write(tmp_path, "b.yaml", synthetic([a, b, c])))
    head = load_manifest(write(tmp_path, "h.yaml", synthetic([a, b2, c])))
    probes = request_space(Op.MHA_DECODE, base, head)
    reached = {(arch, p.expected) for p in probes if p.request.solution is None for arch in p.archs}

    swept = set()
    archs = (Arch.SM_70, Arch.SM_80, Arch.SM_90, Arch.SM_100, Arch.SM_121)  # each bound named above, and beyond
    dtypes = (DType.BF16, DType.FP16, DType.FP8_E4M3, DType.FP32)  # each dtype named above, and one more
    head_dims = range(4, 41, 4)  # every bound above is a multiple of 4
    page_sizes = (*range(1, 9), *range(12, 41, 4))
    for arch, q, kv, hd, ps, sinks in itertools.product(archs, dtypes, dtypes, head_dims, page_sizes, (False, True)):
        req = KernelRequest(op="mha_decode", arch=arch, q_dtype=q, kv_dtype=kv, head_dim_qk=hd, page_size=ps, sinks=sinks)
        platform = Platform.hypothetical(arch)
        eligible = tuple(frozenset(k.name for k in solve(m, platform, req).eligible) for m in (base, head))
        if any(eligible):
            swept.add((arch, eligible))
    assert swept <= reached, sorted((a.value, e) for a, e in swept - reached)


# ------------------------------------------------------ equals constraints

RELATED = PORTABLE | {"name": "r-related", "dtypes": {"q_dtype": ["bf16", "fp16"], "kv_dtype": {"equals": "q_dtype"}},
                      "shapes": {"head_dim_qk": [64, 128, 256], "head_dim_vo": {"equals": "head_dim_qk"}}}


def test_dropping_an_equals_constraint_is_seen_on_unequal_values(cli, tmp_path):
    base = write(tmp_path, "base.yaml", synthetic([RELATED]))
    loose = RELATED | {"shapes": {"head_dim_qk": [64, 128, 256], "head_dim_vo": [64, 128, 256]}}
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [loose]), "--json")
    data = json.loads(out)
    gained = [f["request"] for f in data["gained"]]
    assert gained and all(set(r) == {"head_dim_qk", "head_dim_vo"} for r in gained), gained
    assert all(not set(r["head_dim_qk"]) & set(r["head_dim_vo"]) for r in gained), "only unequal pairs gain"
    assert {"field": "shapes.head_dim_vo", "base": "{equals: head_dim_qk}", "head": "[64, 128, 256]"} in \
        data["kernels"]["changed"][0]["fields"]


def test_widening_an_equals_constraint_with_or_is_seen_on_the_new_value(cli, tmp_path):
    base = write(tmp_path, "base.yaml", synthetic([RELATED]))
    wider = RELATED | {"dtypes": {"q_dtype": ["bf16", "fp16"], "kv_dtype": {"equals": "q_dtype", "or": ["fp8_e4m3"]}}}
    code, out, _ = cli("diff", base, edited(tmp_path, "head.yaml", [wider]), "--json")
    data = json.loads(out)
    assert [f["request"] for f in data["gained"]] == [{"kv_dtype": ["fp8_e4m3"]}]
    assert data["gained"][0]["because"] == ["now r-related (mha_decode): before: kv_dtype fp8_e4m3 must equal q_dtype bf16"]
    assert {"field": "dtypes.kv_dtype", "base": "{equals: q_dtype}", "head": "{equals: q_dtype, or: [fp8_e4m3]}"} in \
        data["kernels"]["changed"][0]["fields"]


def test_the_enumeration_reaches_every_outcome_with_equals_across_field_groups(tmp_path):
    """Brute force against the enumeration when equals relates fields of one group and of two groups."""
    a = {"name": "a", "solution": "flashinfer", "backend": "fa2", "arch": {"min": "sm_80"},
         "dtypes": {"q_dtype": ["bf16", "fp16"], "kv_dtype": {"equals": "q_dtype", "or": ["fp8_e4m3"]}},
         "shapes": {"head_dim_qk": [8, 16], "head_dim_vo": {"equals": "head_dim_qk"},
                    "q_len": {"max": 4}, "page_size": {"equals": "q_len", "or": [16]}},
         "priority": 9}
    b = {"name": "b", "solution": "triton", "backend": "triton", "arch": {"min": "sm_80"},
         "dtypes": {"q_dtype": ["bf16"], "kv_dtype": ["bf16", "fp16"]},
         "shapes": {"head_dim_qk": [8, 16, 24], "head_dim_vo": [8, 16, 24]}, "priority": 5}
    a2 = a | {"dtypes": {"q_dtype": ["bf16", "fp16"], "kv_dtype": {"equals": "q_dtype"}},
              "shapes": a["shapes"] | {"head_dim_vo": [8, 16], "page_size": {"equals": "q_len"}}}
    base = load_manifest(write(tmp_path, "b.yaml", synthetic([a, b])))
    head = load_manifest(write(tmp_path, "h.yaml", synthetic([a2, b])))
    probes = request_space(Op.MHA_DECODE, base, head)
    reached = {p.expected for p in probes if p.request.solution is None}

    swept = set()
    dtypes = (DType.BF16, DType.FP16, DType.FP8_E4M3)
    dims, small = (None, 8, 16, 24, 32), (None, 1, 2, 4, 5, 16)
    for q, kv, qk, vo, q_len, page in itertools.product(dtypes, dtypes, dims, dims, small[1:], small):
        req = KernelRequest(op="mha_decode", arch="sm_90", q_dtype=q, kv_dtype=kv, head_dim_qk=qk, head_dim_vo=vo,
                            q_len=q_len, page_size=page)
        eligible = tuple(frozenset(k.name for k in solve(m, Platform.hypothetical("sm_90"), req).eligible)
                         for m in (base, head))
        if any(eligible):
            swept.add(eligible)
    assert len(swept) > 2 and swept <= reached, sorted(swept - reached)


# ------------------------------------------------------------- fuzzing git refs

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

REF_PARTS = st.sampled_from(["-", "--", "--output=", "-o", "--textconv", "--ext-diff", "HEAD", "HEAD~1", "main", "@{-1}",
                             ":", "::", "kernels.yaml", "ov.yaml", "bin.yaml", "../", "/etc/passwd", " ", "\u00e9", "^{tree}",
                             "x:y", "\\", "*", "?", "$(touch pwned)", ";touch pwned", "`touch pwned`", "pwned"])
REFS = st.lists(REF_PARTS | st.text(max_size=4).filter(lambda t: "\x00" not in t), min_size=1, max_size=5).map("".join)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
@settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", 80)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=REFS)
def test_any_ref_reads_a_manifest_or_fails_cleanly_and_writes_nothing(tmp_path_factory, spec):
    from registry.errors import KernelselError

    root = tmp_path_factory.mktemp("refs")
    repo = _repo(root, {"kernels.yaml": BUNDLED.read_bytes(), "ov.yaml": b"base: kernels.yaml\n",
                        "bin.yaml": b"schema_version: 1\nx: \"\xff\"\n"})
    before = sorted(p.relative_to(root) for p in root.rglob("*") if ".git" not in p.parts)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        read_manifest(spec)
    except KernelselError as exc:
        assert "Traceback" not in str(exc)
    finally:
        os.chdir(cwd)
    after = sorted(p.relative_to(root) for p in root.rglob("*") if ".git" not in p.parts)
    assert after == before, f"{spec!r} made git write {set(after) - set(before)}"


# ------------------------------------------------------------- bounded work

def random_kernels(n: int, seed: int) -> list[dict]:
    """``n`` mha_decode kernels, each constraining many fields independently (the case that blew up)."""
    import random

    rng = random.Random(seed)
    archs = [a.value for a in sorted(Arch)]
    dtypes = [d.value for d in DType if d is not DType.FP32]
    backends = {k["solution"]: k["backend"] for k in bundled_data()["kernels"] if k["op"] == Op.MHA_DECODE.value}
    solutions = [s for s in backends if s != Solution.REFERENCE.value]
    out = []
    for i in range(n):
        lo = rng.randrange(len(archs))
        solution = rng.choice(solutions)
        kernel = {
            "name": f"k{i:03d}", "solution": solution, "backend": backends[solution],
            "arch": {"min": archs[lo], "max": archs[rng.randrange(lo, len(archs))]},
            "dtypes": {"q_dtype": rng.sample(dtypes[:2], rng.randint(1, 2)), "kv_dtype": rng.sample(dtypes, rng.randint(1, 4))},
            "shapes": {"head_dim_qk": sorted(rng.sample([64, 96, 128, 192, 256], rng.randint(1, 4))),
                       "page_size": {"min": rng.choice([1, 8, 16]), "max": rng.choice([64, 128, 256])},
                       "num_qo_heads": {"max": rng.choice([64, 128, 256])}, "q_len": {"max": rng.choice([1, 2, 4, 8])}},
            "features": {f: rng.random() < 0.5 for f in ("sinks", "sliding_window", "logits_soft_cap", "return_lse")},
            "priority": rng.randint(4, 15),
        }
        if rng.random() < 0.3:
            kernel["exclude"] = [{"when": {"kv_dtype": rng.choice(dtypes[2:]), "head_dim_qk": 128},
                                  "reason": "random", "ref": "tests/selector/tools/test_diff.py"}]
        out.append(kernel)
    return out


def test_the_bundled_manifest_is_enumerated_completely_within_the_bound():
    """The bound on partial request classes never cuts a real manifest short (it needs a quarter of it)."""
    from selector.tools import diff
    from selector.tools.request_space import enumerate_requests

    m = load_manifest(BUNDLED)
    for op in Op:
        space = enumerate_requests(op, m, m, max_states=diff.MAX_STATES // 4)
        assert space.complete and len(space.probes) == len(request_space(op, m, m)), op


def test_a_diff_of_100_changed_kernels_is_bounded_and_what_it_names_is_real(tmp_path):
    """24 random kernels took 250 s and 480 MB, 32 did not finish in 600 s: the request classes grow
    exponentially.  Now the work is bounded (under 5 s of CPU for 100 changed kernels) and the report says
    where; every loss and change it names is one the solver confirms."""
    import random

    kernels = random_kernels(100, seed=5)
    rng = random.Random(6)
    changed = copy.deepcopy(kernels)
    for k in changed:  # every kernel changes: a priority step and one head dim in or out
        k["priority"] = max(4, min(15, k["priority"] + rng.choice([-1, 1])))
        k["shapes"]["head_dim_qk"] = sorted(set(k["shapes"]["head_dim_qk"]) ^ {rng.choice([64, 96, 128, 192, 256])}) or [128]
    base, head = write(tmp_path, "base.yaml", synthetic(kernels)), write(tmp_path, "head.yaml", synthetic(changed))
    probe = ("import json, sys, time\nfrom registry.loader import load_manifest\nfrom selector.tools.diff import diff_manifests\n"
             "b, h = load_manifest(sys.argv[1]), load_manifest(sys.argv[2])\nt = time.process_time()\n"
             "report = diff_manifests(b, h)\nprint(json.dumps({'cpu': time.process_time() - t, **report.to_dict()}))")
    out = subprocess.run([sys.executable, "-c", probe, str(base), str(head)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["cpu"] < 5.0, f"{data['cpu']:.1f} s of CPU"
    assert data["limits"] and all(line.startswith("mha_decode: ") for line in data["limits"])
    assert data["changed"] and data["lost"], "100 changed kernels change and lose some requests"
    m_base, m_head = load_manifest(base), load_manifest(head)
    for finding in data["lost"] + data["changed"]:
        for example in finding["examples"]:
            request = KernelRequest(**example["request"])
            old = solve(m_base, Platform.hypothetical(request.arch), request).name or None
            new = solve(m_head, Platform.hypothetical(request.arch), request).name or None
            assert (old, new) == (example["before"], example["after"]) and old != new, example
