"""Explain names what runs: a kernel with launch variants gets a ``variant`` line and ``selected.variant`` in JSON.

The line comes from the adapter's own decision function (the one its
``plan()`` follows), evaluated on the selection's arch and platform without
importing torch or triton.  The manifests here are written for the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from registry.loader import load_manifest
from registry.vocab import Arch
from selector import KernelRequest, Platform, Selector

MANIFEST_TEXT = """
schema_version: 1
solutions:
  triton: {requires: [triton, torch], install: "pip install 'kernelsel[triton]'"}
  reference: {requires: [torch], install: "pip install torch"}
attention_plan: {postwrite_min_priority: 12, refs: [test]}
kernels:
  - name: mla-two-launches
    op: mla_decode
    solution: triton
    backend: triton
    adapter: registry.adapters.triton:TritonMLADecode
    arch: {min: sm_80}
    dtypes: {q_dtype: [bf16, fp16], kv_dtype: [bf16, fp16, fp8_e4m3]}
    priority: 5
    refs: [test]
  - name: mla-one-launch
    op: mla_decode
    solution: reference
    backend: torch
    adapter: registry.adapters.reference:TorchMLADecode
    arch: {min: sm_80}
    dtypes: {q_dtype: [bf16, fp16], kv_dtype: [bf16, fp16, fp8_e4m3]}
    priority: 1
    refs: [test]
"""
MANIFEST = load_manifest(text=MANIFEST_TEXT)
DEEPSEEK = dict(op="mla_decode", arch="sm_90", q_dtype="bf16", num_qo_heads=128, kv_lora_rank=512,
                qk_rope_head_dim=64, qk_nope_head_dim=128, page_size=64)
INSTALLED = (("torch", "2.13.0"), ("triton", "3.6.0"))


def select(platform: Platform, **fields):
    return Selector(MANIFEST, platform).select(KernelRequest(**{**DEEPSEEK, **fields}))


def variant_line(selection) -> str:
    lines = selection.explain().splitlines()
    (line,) = [ln for ln in lines if ln.startswith("variant ")]
    assert lines.index(line) == [i for i, ln in enumerate(lines) if ln.startswith("selected ")][0] + 1
    return line


def test_the_hopper_kernel_on_an_h200_with_triton_36():
    sel = select(Platform(arch=Arch.SM_90, libraries=INSTALLED))
    assert variant_line(sel) == (
        "variant   hopper (the Gluon sm_90 kernel, triton_kernels/mla_hopper.py): sm_90; a bf16 cache of the query's "
        "dtype; kv_lora_rank 512, qk_rope_head_dim 64 fit its layouts; triton 3.6.0 >= 3.6; "
        "128 rows per request (q_len 1 x 128 heads) >= 64"
    )
    assert sel.to_dict()["selected"]["variant"] == {
        "name": "hopper",
        "runs": "the Gluon sm_90 kernel, triton_kernels/mla_hopper.py",
        "why": ["sm_90", "a bf16 cache of the query's dtype", "kv_lora_rank 512, qk_rope_head_dim 64 fit its layouts",
                "triton 3.6.0 >= 3.6", "128 rows per request (q_len 1 x 128 heads) >= 64"],
        "passed_over": {},
        "depends_on": [],
        "candidate": None,
        "otherwise": None,
        "text": variant_line(sel).removeprefix("variant   "),
    }


@pytest.mark.parametrize("platform,fields,why", [
    (Platform(arch=Arch.SM_90, libraries=INSTALLED), dict(kv_dtype="fp8_e4m3"),
     "kv_dtype fp8_e4m3: needs a 16-bit cache of the query's dtype \\(bf16\\)"),
    (Platform(arch=Arch.SM_120, libraries=INSTALLED), dict(arch="sm_120"), "arch sm_120: warpgroup MMA is sm_90 only"),
    (Platform(arch=Arch.SM_90, libraries=(("torch", "2.13.0"), ("triton", "3.5.1"))), {},
     "triton 3.5.1 < 3.6 \\(Gluon's Hopper API\\)"),
    (Platform(arch=Arch.SM_90, libraries=INSTALLED), dict(num_qo_heads=32),
     "32 rows per request \\(q_len 1 x 32 heads\\) < 64"),
], ids=["fp8-cache", "sm_120", "old-triton", "few-rows"])
def test_the_portable_kernel_says_why_not_hopper(platform, fields, why):
    sel = select(platform, **fields)
    assert re.fullmatch(rf"variant   portable \(triton_kernels/mla\.py\), not hopper: (.*; )?{why}(; .*)?", variant_line(sel))
    data = sel.to_dict()["selected"]["variant"]
    assert data["name"] == "portable" and data["why"] == [] and list(data["passed_over"]) == ["hopper"]
    assert any(re.fullmatch(why, text) for text in data["passed_over"]["hopper"])


def test_a_hypothetical_platform_says_what_it_assumes():
    line = variant_line(select(Platform.hypothetical("sm_90")))
    assert line.startswith("variant   hopper (") and "; triton >= 3.6 assumed (hypothetical platform); " in line


@pytest.mark.parametrize("fields,depends,condition", [
    (dict(num_qo_heads=None), "num_qo_heads", "q_len x num_qo_heads >= 64"),
    (dict(num_qo_heads=16, q_len=8), "the plan's q_len", "the plan's q_len >= 4 \\(4 x 16 heads >= 64 rows\\)"),
], ids=["heads-unset", "rows-depend-on-q_len"])
def test_what_the_request_leaves_open_is_named_not_guessed(fields, depends, condition):
    sel = select(Platform(arch=Arch.SM_90, libraries=INSTALLED), **fields)
    assert re.fullmatch(
        rf"variant   depends on {depends}: hopper \(the Gluon sm_90 kernel, triton_kernels/mla_hopper\.py\) "
        rf"if {condition}, else portable \(triton_kernels/mla\.py\)", variant_line(sel)
    )
    data = sel.to_dict()["selected"]["variant"]
    assert data["name"] is None and data["depends_on"] == [depends] and data["candidate"] == "hopper"
    assert data["otherwise"]["name"] == "portable"


def test_a_kernel_with_one_launch_has_no_variant_line():
    sel = select(Platform(arch=Arch.SM_90, libraries=INSTALLED), kernel="mla-one-launch")
    assert not [ln for ln in sel.explain().splitlines() if ln.startswith("variant")]
    assert "variant" not in sel.to_dict()["selected"]


def test_explaining_a_variant_imports_neither_torch_nor_triton():
    probe = (
        "import sys, json\n"
        "from registry.loader import load_manifest\n"
        "from registry.vocab import Arch\nfrom selector import KernelRequest, Platform, Selector\n"
        f"m = load_manifest(text={MANIFEST_TEXT!r})\n"
        f"s = Selector(m, Platform(arch=Arch.SM_90, libraries={INSTALLED!r})).select(KernelRequest(**{DEEPSEEK!r}))\n"
        "text, data = s.explain(), s.to_dict()\n"
        "print(json.dumps([data['selected']['variant']['name'],"
        " [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'flashinfer')]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["hopper", []]


def test_explain_runs_no_code_of_an_allowlisted_adapter_package(tmp_path, monkeypatch):
    """A plugin adapter is asked for its variants only once the engine imported it; explain never imports it."""
    package = tmp_path / "variant_plugin_probe"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('explain imported the plugin')\n\n\nclass MLA:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = MANIFEST_TEXT.replace("registry.adapters.triton:TritonMLADecode", "variant_plugin_probe:MLA")
    manifest = load_manifest(text=text, adapter_allowlist=["variant_plugin_probe"])
    sel = Selector(manifest, Platform(arch=Arch.SM_90, libraries=INSTALLED)).select(KernelRequest(**DEEPSEEK))
    assert sel.variant is None and "variant" not in sel.to_dict()["selected"]
    assert not [ln for ln in sel.explain().splitlines() if ln.startswith("variant")]
