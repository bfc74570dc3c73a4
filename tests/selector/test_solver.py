"""Solver behaviour: every reason kept, deterministic ranking, forcing, overrides, platforms, caching."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selector
from registry.errors import RequestError
from registry.vocab import Arch, DType, Op, Solution
from selector import KernelRequest, NoKernelError, Platform, Selector, select_kernel
from selector.platform import GPU_SOURCES


def test_a_rejection_lists_every_failing_constraint(pick):
    sel = pick(op="mla_decode", arch="sm_90", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", q_len=2, num_qo_heads=16)
    xqa = next(v for v in sel.verdicts if v.kernel.name == "xqa-mla-decode")
    assert xqa.reasons == (
        "arch sm_90 not in [sm_120, sm_121]",
        "num_qo_heads 16 not in [128]",
        "q_len 2 above maximum 1",
    )


def test_unrequested_feature_is_unsupported_unless_declared(pick):
    sel = pick(op="mha_decode", arch="sm_90", q_dtype="bf16", sinks=True, head_dim_qk=128, page_size=16)
    for v in sel.verdicts:
        assert ("needs sinks: unsupported" in v.reasons) == (not v.kernel.features.sinks)
    assert sel.kernel.features.sinks


def test_reference_is_never_chosen_automatically_but_on_request(pick, manifest):
    for op in Op:
        ref = next(k for k in manifest.by_op[op] if k.solution is Solution.REFERENCE)
        sel = pick(op=op.value, arch="sm_70", q_dtype="fp32")
        assert sel.kernel is None or sel.kernel.solution is not Solution.REFERENCE
        assert any(r.startswith("reference kernel: chosen only") for v in sel.verdicts if v.kernel is ref for r in v.reasons)
        assert pick(op=op.value, arch="sm_70", q_dtype="fp32", solution="reference").kernel is ref
        assert pick(op=op.value, arch="sm_90", q_dtype="bf16", kernel=ref.name).kernel is ref


def test_no_kernel_error_lists_every_kernel_with_reasons(manifest):
    s = Selector(manifest, Platform.hypothetical("sm_70"))
    with pytest.raises(NoKernelError) as info:
        s.select(KernelRequest(op="mla_decode", arch="sm_70", q_dtype="bf16"))
    text = str(info.value)
    assert text.startswith("no kernel can serve mla_decode")
    for k in manifest.by_op[Op.MLA_DECODE]:
        assert re.search(rf"^  {re.escape(k.name)} \(kernels\.yaml:\d+\): ", text, re.M), k.name


def test_forced_ineligible_kernel_is_an_error_that_says_why(manifest):
    s = Selector(manifest, Platform.hypothetical("sm_90"))
    with pytest.raises(NoKernelError, match=r"kernel forced by request kernel=xqa-mla-decode cannot serve this request(.|\n)*arch sm_90 not in \[sm_120, sm_121\]"):
        s.select(KernelRequest(op="mla_decode", arch="sm_90", kernel="xqa-mla-decode"))


def test_forcing_an_unknown_or_wrong_op_kernel_is_a_request_error(manifest):
    s = Selector(manifest, Platform.hypothetical("sm_90"))
    with pytest.raises(RequestError, match=r"no kernel named 'xqa-mla-decod' \(did you mean 'xqa-mla-decode'\?\)"):
        s.solve(KernelRequest(op="mla_decode", arch="sm_90", kernel="xqa-mla-decod"))
    with pytest.raises(RequestError, match=r"implements mla_decode, not mha_decode"):
        s.solve(KernelRequest(op="mha_decode", arch="sm_90", kernel="xqa-mla-decode"))


def test_solution_restriction_that_fails_lists_why(manifest):
    s = Selector(manifest, Platform.hypothetical("sm_90"))
    with pytest.raises(NoKernelError, match=r"xqa-mla-decode.*arch sm_90 not in"):
        s.select(KernelRequest(op="mla_decode", arch="sm_90", solution="xqa"))


def test_environment_overrides_force_and_disable(monkeypatch):
    monkeypatch.setenv("KERNELSEL_FORCE_MHA_DECODE", "triton-mha-decode")
    sel = select_kernel(op="mha_decode", arch="sm_90", q_dtype="bf16")
    assert sel.kernel.name == "triton-mha-decode"
    assert sel.why == "forced by KERNELSEL_FORCE_MHA_DECODE=triton-mha-decode"
    assert "override  KERNELSEL_FORCE_MHA_DECODE=triton-mha-decode" in sel.explain()
    selector.reset()
    monkeypatch.delenv("KERNELSEL_FORCE_MHA_DECODE")
    monkeypatch.setenv("KERNELSEL_DISABLE", "flashinfer-fa2-tc-decode")
    sel = select_kernel(op="mha_decode", arch="sm_90", q_dtype="bf16")
    assert sel.kernel.name != "flashinfer-fa2-tc-decode"
    assert "disabled by KERNELSEL_DISABLE" in next(v for v in sel.verdicts if v.kernel.name == "flashinfer-fa2-tc-decode").reasons


def test_bad_environment_overrides_are_named(monkeypatch):
    monkeypatch.setenv("KERNELSEL_FORCE_MHA_DECOD", "x")
    with pytest.raises(RequestError, match=r"KERNELSEL_FORCE_MHA_DECOD: 'mha_decod' is not an op \(did you mean 'mha_decode'\?\)"):
        select_kernel(op="mha_decode", arch="sm_90")
    monkeypatch.delenv("KERNELSEL_FORCE_MHA_DECOD")
    selector.reset()
    monkeypatch.setenv("KERNELSEL_DISABLE", "nope")
    with pytest.raises(RequestError, match=r"KERNELSEL_DISABLE: no kernel named 'nope'"):
        select_kernel(op="mha_decode", arch="sm_90")


def test_manifest_env_var_loads_an_overlay(monkeypatch, tmp_path, manifest):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("base: bundled\ndisable: [flashinfer-fa2-tc-decode]\n")
    monkeypatch.setenv("KERNELSEL_MANIFEST", str(overlay))
    sel = selector.default_selector().solve(KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16"))
    assert "flashinfer-fa2-tc-decode" not in [v.kernel.name for v in sel.verdicts]
    assert "flashinfer-fa2-decode" in [v.kernel.name for v in sel.verdicts]
    assert f"override  KERNELSEL_MANIFEST={overlay}" in sel.explain()


def test_missing_library_is_a_reason_with_the_install_hint(manifest):
    torch_only = Platform(arch=Arch.SM_90, libraries=(("torch", "2.13.0"),))
    sel = Selector(manifest, torch_only).solve(KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16"))
    fi = next(v for v in sel.verdicts if v.kernel.name == "flashinfer-fa2-tc-decode")
    assert "needs flashinfer-python, not installed: pip install 'kernelsel[flashinfer]'" in fi.reasons


def test_priority_ties_break_by_name_the_same_way_every_time(tmp_path, manifest):
    overlay = tmp_path / "tie.yaml"
    overlay.write_text(
        "base: bundled\nkernels:\n"
        + "".join(
            f"  - {{name: {n}, op: mha_decode, solution: triton, backend: triton, adapter: 'registry.adapters.triton:TritonMHADecode',"
            f" arch: {{min: sm_80}}, dtypes: {{q_dtype: [bf16], kv_dtype: [bf16]}}, priority: 11, refs: [test]}}\n"
            for n in ("zz-tie", "aa-tie")
        )
    )
    from registry.loader import load_manifest

    m = load_manifest(overlay)
    sel = Selector(m, Platform.hypothetical("sm_90")).solve(KernelRequest(op="mha_decode", arch="sm_90"))
    assert [k.name for k in sel.eligible][:2] == ["aa-tie", "zz-tie"]
    assert sel.why.startswith("tied at priority 11 with zz-tie; the name breaks the tie")


def test_cached_hit_returns_the_same_selection_object(monkeypatch):
    req = KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16")
    first = select_kernel(req)
    assert select_kernel(req) is first
    assert select_kernel(KernelRequest(op="mha_decode", arch="9.0", q_dtype="bfloat16")) is first


def test_missing_arch_without_a_gpu_is_a_request_error(monkeypatch):
    monkeypatch.setitem(GPU_SOURCES, "torch", lambda: ((), ""))
    with pytest.raises(RequestError, match=r"request\.arch: not given and no CUDA device was detected; pass arch='sm_90'"):
        select_kernel(op="mha_decode")


_ops = st.sampled_from(list(Op))
_archs = st.sampled_from(list(Arch))
_dtypes = st.sampled_from([DType.BF16, DType.FP16, DType.FP8_E4M3])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=_ops, arch=_archs, q=_dtypes, kv=_dtypes, q_len=st.integers(1, 4), sinks=st.booleans(),
       lse=st.booleans(), window=st.booleans(), heads=st.sampled_from([None, 16, 64, 96, 128]))
def test_the_winner_is_eligible_and_no_eligible_kernel_outranks_it(manifest, op, arch, q, kv, q_len, sinks, lse, window, heads):
    fields = dict(op=op, arch=arch, q_dtype=q, kv_dtype=kv, sinks=sinks, return_lse=lse, sliding_window=window, num_qo_heads=heads)
    if op in (Op.MHA_DECODE, Op.MLA_DECODE, Op.SPARSE_MLA_DECODE):
        fields["q_len"] = q_len
    sel = Selector(manifest, Platform.hypothetical(arch)).solve(KernelRequest(**fields))
    for v in sel.verdicts:
        assert v.eligible == (v.kernel in sel.eligible)
    if sel.kernel is not None:
        assert sel.kernel.arch.allows(arch)  # never a kernel whose declared arch excludes the request
        assert sel.kernel.solution is not Solution.REFERENCE
        assert sel.eligible[0] is sel.kernel
        assert all(k.priority <= sel.kernel.priority for k in sel.eligible)
    else:
        assert all(k.solution is Solution.REFERENCE for k in sel.eligible) or not sel.eligible
