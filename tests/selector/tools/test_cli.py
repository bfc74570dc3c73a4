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
