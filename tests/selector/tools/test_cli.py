"""The CLI through its real entry points: exit codes, text, JSON, and no tracebacks."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from registry.loader import load_manifest
from registry.vocab import Op
from selector import KernelRequest, Platform, solve

ROOT = pathlib.Path(__file__).resolve().parents[3]
GOLDEN = pathlib.Path(__file__).parent / "golden"


MLA_FP8_SM120 = ["explain", "--op", "mla_decode", "--arch", "sm_120", "--q-dtype", "bf16", "--kv-dtype", "fp8_e4m3",
                 "--num-qo-heads", "128", "--kv-lora-rank", "512", "--qk-rope-head-dim", "64", "--qk-nope-head-dim", "128",
                 "--page-size", "64"]


def _mask(text: str) -> str:
    return re.sub(r"sha [0-9a-f]{12}", "sha <digest>", text)


def test_explain_text_matches_golden(cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli(*MLA_FP8_SM120)
    assert code == 0, err
    golden = GOLDEN / "explain_mla_sm120_fp8kv.txt"
    if os.environ.get("KERNELSEL_UPDATE_GOLDEN"):
        golden.write_text(_mask(out))
    assert _mask(out) == golden.read_text()


def test_explain_json_keys(cli):
    code, out, _ = cli(*MLA_FP8_SM120, "--json")
    data = json.loads(out)
    assert code == 0
    assert {"request", "selected", "eligible", "rejected"} <= set(data)
    assert data["selected"]["solution"] == "triton" and set(data["selected"]) >= {"name", "solution", "backend", "priority"}
    assert [e["name"] for e in data["eligible"]][0] == data["selected"]["name"]
    assert all(set(r) >= {"name", "solution", "backend", "reasons"} and r["reasons"] for r in data["rejected"])


def test_explain_exit_3_when_nothing_fits_and_lists_reasons(cli):
    code, out, _ = cli("explain", "--op", "mla_decode", "--arch", "sm_70")
    assert code == 3
    assert "selected  none" in out and "arch sm_70 below minimum sm_80" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "--op", "mla_decode", "--arch", "sm_95"], r"'sm_95' is not an SM like sm_90"),
        (["explain", "--op", "mla_decode", "--arch", "sm_90", "--kv-dtype", "bf17"], r"^kernelsel explain: --kv-dtype: 'bf17' is not a dtype"),
        (["explain", "--op", "mla_decod", "--arch", "sm_90"], r"^kernelsel explain: --op: 'mla_decod' is not one of .* \(did you mean 'mla_decode'\?\)$"),
        (["explain", "--op", "mha_decode", "--arch", "sm_90", "--head-dim", "0"], r"^kernelsel explain: --head-dim: must be >= 1, got 0$"),
        (["explain", "--op", "mha_decode", "--arch", "sm_90", "--kernel", "nope"], r"no kernel named 'nope'"),
        (["explain", "--op", "mha_decode", "--arch", "sm_90", "--manifest", "missing.yaml"], r"cannot read manifest"),
        (["show", "flashinfer-fa2-decod"], r"no kernel named 'flashinfer-fa2-decod' \(did you mean 'flashinfer-fa2-decode'\?\)"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err + out


def test_validate_takes_several_paths_and_reports_each(cli, tmp_path, monkeypatch):
    """The pre-commit hook passes every changed manifest: one command, every problem, exit 1 if any."""
    monkeypatch.chdir(tmp_path)
    good = ROOT / "tests/registry/broken/_valid.yaml"
    broken = [ROOT / "tests/registry/broken" / n for n in ("bad_dtype.yaml", "unknown_op.yaml")]
    code, out, err = cli("validate", good, *broken, ROOT / "kernels.yaml")
    assert code == 1
    assert out.count(": ok (") == 2 and "_valid.yaml: ok (1 kernels" in out
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in err.splitlines()[:-1]] == ["bad_dtype.yaml", "unknown_op.yaml"]
    assert err.splitlines()[-1] == "2 problems"
    assert cli("validate", good, ROOT / "kernels.yaml")[0] == 0


def test_validate_perf_checks_a_table_against_the_manifest_and_lists_every_problem(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = cli("validate", "--perf", "perf/nvidia-h200-sm_90.yaml")
    assert code == 0 and re.search(r"^perf/nvidia-h200-sm_90\.yaml: ok \(\d+ buckets, NVIDIA H200, sm_90; fits kernels\.yaml\)$",
                                   out, re.M)
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\ngpu: x\narch: sm_90\nentries:\n"
                   "- {op: mha_decode, shape: {q_dtype: bf16}, median_us: {triton-mha-decod: 1, triton-mla-decode: 2}}\n")
    code, _, err = cli("validate", "--perf", bad)
    assert code == 1 and err.splitlines()[-1] == "3 problems"
    assert [line.split(": ", 2)[1] for line in err.splitlines()[:-1]] == [
        "entries[0].median_us.triton-mha-decod", "entries[0].median_us.triton-mla-decode", "entries[0].shape"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_the_pre_commit_hooks_run_as_pre_commit_runs_them(tmp_path):
    """Each hook's entry with its args and, when pass_filenames, every tracked file its pattern matches."""
    import yaml

    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    for config in (".pre-commit-hooks.yaml", ".pre-commit-config.yaml"):
        data = yaml.safe_load((ROOT / config).read_text())
        hooks = data if isinstance(data, list) else [h for repo in data["repos"] for h in repo["hooks"]]
        for hook in hooks:
            files = [f for f in tracked if re.search(hook.get("files", ""), f)]
            argv = hook["entry"].split() + hook.get("args", []) + (files if hook.get("pass_filenames", True) else [])
            assert argv[0] == "kernelsel"
            proc = subprocess.run([sys.executable, "-m", "selector.tools.cli", *argv[1:]], capture_output=True,
                                  text=True, cwd=ROOT)
            assert proc.returncode == 0, (config, hook["id"], argv, proc.stderr)


def test_validate_ok_and_broken(cli):
    code, out, _ = cli("validate")
    assert code == 0 and re.match(r"kernels\.yaml: ok \(\d+ kernels, schema 1, sha [0-9a-f]{12}\)", out.strip().split("/")[-1])
    broken = ROOT / "tests/registry/broken/unknown_key.yaml"
    code, _, err = cli("validate", str(broken))
    assert code == 1
    assert re.search(r"unknown_key\.yaml:16:5: kernels\[0\]\.prioriti: unknown key 'prioriti'", err)
    assert err.strip().endswith("1 problem")


def test_list_and_show(cli, manifest):
    code, out, _ = cli("list", "--op", "mla_decode")
    names = [k.name for k in manifest.by_op[manifest.kernels[0].op.__class__("mla_decode")]]
    assert code == 0 and all(n in out for n in names)
    code, out, _ = cli("show", "xqa-mla-decode")
    assert code == 0 and out.startswith("# kernels.yaml:") and "num_qo_heads:\n  - 128" in out.replace("    ", "  ") or "128" in out


def test_plan_command(cli):
    code, out, _ = cli("plan", "--arch", "sm_100", "--q-dtype", "fp8_e4m3")
    assert code == 0 and out.startswith("plan      prewrite")


_PLAN_KERNELS = [k for op in (Op.MHA_PREFILL, Op.MHA_EXTEND) for k in load_manifest().by_op[op]]


@pytest.mark.parametrize("spec", _PLAN_KERNELS, ids=lambda k: k.name)
def test_plan_kernel_forces_the_kernel_and_the_mode_it_implies(cli, spec):
    """``plan --kernel`` used to force the name on both the prefill and the extend request: always an error."""
    arch = spec.arch.members()[-1]
    q = next(d for d in spec.dtypes.q_dtype.values if not d.is_fp8) if spec.op is Op.MHA_PREFILL else spec.dtypes.q_dtype.values[0]
    request = KernelRequest(op=spec.op, arch=arch, q_dtype=q, kernel=spec.name)
    eligible = solve(load_manifest(), Platform.hypothetical(arch), request).kernel is not None
    code, out, err = cli("plan", "--arch", arch.value, "--q-dtype", q.value, "--kernel", spec.name)
    assert code == (0 if eligible else 3), err
    if eligible:
        mode = "postwrite" if spec.op is Op.MHA_PREFILL else "prewrite"
        assert out.startswith(f"plan      {mode}\nwhy       forced by kernel={spec.name} (an {spec.op.value} kernel: {mode})")
        assert re.search(rf"^selected  {re.escape(spec.name)} ", out, re.M)


@pytest.mark.skipif(shutil.which("kernelsel") is None, reason="console script not installed (pip install -e .)")
def test_console_script_imports_no_heavy_library():
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['kernelsel', 'explain', '--op', 'mha_decode', '--arch', 'sm_90']\n"
        "try:\n    from selector.tools.cli import main; main()\nexcept SystemExit: pass\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'flashinfer', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip().endswith("HEAVY="), out
    real = subprocess.run(["kernelsel", "explain", "--op", "mha_decode", "--arch", "sm_90"], capture_output=True, text=True)
    assert real.returncode == 0 and "selected  " in real.stdout
