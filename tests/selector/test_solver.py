"""Solver behaviour: every reason kept, deterministic ranking, forcing, overrides, platforms, caching.

Cases use the toy manifest (``toy_manifest.yaml``): what the solver does with declared facts, not which
kernel of the bundled manifest wins (``tests/registry/test_manifest.py`` and ``test_seeds.py`` hold those).
The property test at the end runs over the bundled manifest, asserting invariants only.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selector
from registry.errors import RequestError
from registry.loader import load_manifest
from registry.vocab import Arch, DType, Op, Solution
from selector import KernelRequest, NoKernelError, Overrides, Platform, Selector, select_kernel
from selector.platform import GPU_SOURCES
from selector.solver import DISABLED, REFERENCE_ONLY, platform_reasons, reasons

DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16")


def solve(manifest, overrides=Overrides(), **fields):
    return Selector(manifest, Platform.hypothetical(fields["arch"]), overrides).solve(KernelRequest(**fields))


def verdict(selection, name):
    return next(v for v in selection.verdicts if v.kernel.name == name)


def test_a_rejection_lists_every_failing_constraint(toy):
    sel = solve(toy, op="mla_decode", arch="sm_90", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", q_len=2, num_qo_heads=16)
    assert verdict(sel, "fast-mla").reasons == (
        "arch sm_90 not in [sm_120, sm_121]",
        "num_qo_heads 16 not in [128]",
        "q_len 2 above maximum 1",
    )


def test_exclusions_and_undeclared_features_are_reasons(toy):
    sel = solve(toy, **DECODE, kv_dtype="fp16", sinks=True)
    assert verdict(sel, "fast-decode").reasons == ("needs sinks: unsupported", "excluded: mixed 16-bit q/kv dtypes (test)")
    assert sel.kernel.name == "portable-decode" and sel.kernel.features.sinks


def test_unrequested_feature_is_unsupported_unless_declared(toy):
    sel = solve(toy, **DECODE, sinks=True, head_dim_qk=128, page_size=16)
    for v in sel.verdicts:
        assert ("needs sinks: unsupported" in v.reasons) == (not v.kernel.features.sinks)


def test_reference_is_never_chosen_automatically_but_on_request(toy):
    for op in (Op.MHA_DECODE, Op.MLA_DECODE):
        ref = next(k for k in toy.by_op[op] if k.solution is Solution.REFERENCE)
        sel = solve(toy, op=op.value, arch="sm_70", q_dtype="fp32")
        assert sel.kernel is None
        assert REFERENCE_ONLY in verdict(sel, ref.name).reasons
        assert solve(toy, op=op.value, arch="sm_70", q_dtype="fp32", solution="reference").kernel is ref
        assert solve(toy, op=op.value, arch="sm_90", q_dtype="bf16", kernel=ref.name).kernel is ref


def test_no_kernel_error_lists_every_kernel_with_reasons(toy):
    s = Selector(toy, Platform.hypothetical("sm_70"))
    with pytest.raises(NoKernelError) as info:
        s.select(KernelRequest(op="mla_decode", arch="sm_70", q_dtype="bf16"))
    text = str(info.value)
    assert text.startswith("no kernel can serve mla_decode\nrequest: op=mla_decode arch=sm_70 ")
    for k in toy.by_op[Op.MLA_DECODE]:
        assert re.search(rf"^  {re.escape(k.name)} \(\S*toy_manifest\.yaml:\d+\): ", text, re.M), k.name


def test_forced_ineligible_kernel_is_an_error_that_says_why(toy):
    s = Selector(toy, Platform.hypothetical("sm_90"))
    with pytest.raises(NoKernelError, match=r"^kernel forced by request kernel=fast-mla cannot serve this request(.|\n)*"
                                            r"arch sm_90 not in \[sm_120, sm_121\]"):
        s.select(KernelRequest(op="mla_decode", arch="sm_90", kernel="fast-mla"))


def test_forcing_an_unknown_or_wrong_op_kernel_is_a_request_error(toy):
    s = Selector(toy, Platform.hypothetical("sm_90"))
    with pytest.raises(RequestError, match=r"no kernel named 'fast-ml' \(did you mean 'fast-mla'\?\)"):
        s.solve(KernelRequest(op="mla_decode", arch="sm_90", kernel="fast-ml"))
    with pytest.raises(RequestError, match=r"implements mla_decode, not mha_decode"):
        s.solve(KernelRequest(op="mha_decode", arch="sm_90", kernel="fast-mla"))


def test_solution_restriction_that_fails_lists_why(toy):
    s = Selector(toy, Platform.hypothetical("sm_90"))
    with pytest.raises(NoKernelError, match=r"fast-mla.*arch sm_90 not in"):
        s.select(KernelRequest(op="mla_decode", arch="sm_90", solution="xqa"))


def test_environment_overrides_force_and_disable(toy_env, monkeypatch):
    monkeypatch.setenv("KERNELSEL_FORCE_MHA_DECODE", "portable-decode")
    sel = select_kernel(**DECODE)
    assert sel.kernel.name == "portable-decode"
    assert sel.why == "forced by KERNELSEL_FORCE_MHA_DECODE=portable-decode"
    assert "override  KERNELSEL_FORCE_MHA_DECODE=portable-decode" in sel.explain()
    selector.reset()
    monkeypatch.delenv("KERNELSEL_FORCE_MHA_DECODE")
    monkeypatch.setenv("KERNELSEL_DISABLE", "fast-decode")
    sel = select_kernel(**DECODE)
    assert sel.kernel.name == "portable-decode"
    assert verdict(sel, "fast-decode").reasons == (DISABLED,) == ("disabled by KERNELSEL_DISABLE",)


def test_bad_environment_overrides_are_named(monkeypatch):
    monkeypatch.setenv("KERNELSEL_FORCE_MHA_DECOD", "x")
    with pytest.raises(RequestError, match=r"KERNELSEL_FORCE_MHA_DECOD: 'mha_decod' is not an op \(did you mean 'mha_decode'\?\)"):
        select_kernel(op="mha_decode", arch="sm_90")
    monkeypatch.delenv("KERNELSEL_FORCE_MHA_DECOD")
    selector.reset()
    monkeypatch.setenv("KERNELSEL_DISABLE", "nope")
    with pytest.raises(RequestError, match=r"KERNELSEL_DISABLE: no kernel named 'nope'"):
        select_kernel(op="mha_decode", arch="sm_90")


def test_manifest_env_var_loads_an_overlay(toy, toy_file, toy_allowlist, monkeypatch, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"base: {toy_file}\ndisable: [fast-decode]\n")
    monkeypatch.setenv("KERNELSEL_MANIFEST", str(overlay))
    monkeypatch.setenv("KERNELSEL_ADAPTER_ALLOWLIST", toy_allowlist)
    sel = selector.default_selector().solve(KernelRequest(**DECODE))
    assert [v.kernel.name for v in sel.verdicts] == [k.name for k in toy.by_op[Op.MHA_DECODE] if k.name != "fast-decode"]
    assert f"override  KERNELSEL_MANIFEST={overlay}" in sel.explain()


def test_missing_library_is_a_reason_with_the_install_hint(toy):
    nothing = Platform(arch=Arch.SM_90, libraries=())
    sel = Selector(toy, nothing).solve(KernelRequest(**DECODE))
    assert sel.kernel is None
    assert verdict(sel, "fast-decode").reasons == ("needs pydantic, not installed: pip install toy-fast",)


def test_priority_ties_break_by_name_the_same_way_every_time(toy, toy_file, toy_allowlist, tmp_path):
    overlay = tmp_path / "tie.yaml"
    overlay.write_text(
        f"base: {toy_file}\nkernels:\n"
        + "".join(
            f"  - {{name: {n}, op: mha_decode, solution: triton, backend: triton, adapter: '{toy_allowlist}:PortableDecode',"
            f" arch: {{min: sm_80}}, dtypes: {{q_dtype: [bf16], kv_dtype: [bf16]}}, priority: 11, refs: [test]}}\n"
            for n in ("zz-tie", "aa-tie")
        )
    )
    m = load_manifest(overlay, adapter_allowlist=(toy_allowlist,))
    sel = solve(m, **DECODE)
    assert [k.name for k in sel.eligible][:2] == ["aa-tie", "zz-tie"]
    assert sel.why.startswith("tied at priority 11 with zz-tie; the name breaks the tie")


def test_priority_ranks_and_why_names_the_runner_up(toy):
    sel = solve(toy, **DECODE)
    assert [k.name for k in sel.eligible] == ["fast-decode", "portable-decode"]
    assert sel.why == "highest priority 10 (performant) of 2 eligible; next portable-decode at 5 (portable)"
    assert solve(toy, **DECODE, sinks=True).why == "only eligible kernel (1 of 4)"


def test_cached_hit_returns_the_same_selection_object(toy_env):
    req = KernelRequest(**DECODE)
    first = select_kernel(req)
    assert first.kernel.name == "fast-decode"
    assert select_kernel(req) is first
    assert select_kernel(KernelRequest(op="mha_decode", arch="9.0", q_dtype="bfloat16")) is first


def test_missing_arch_without_a_gpu_is_a_request_error(monkeypatch):
    monkeypatch.setitem(GPU_SOURCES, "torch", lambda: ((), ""))
    with pytest.raises(RequestError, match=r"request\.arch: not given and no CUDA device was detected; pass arch='sm_90'"):
        select_kernel(op="mha_decode")


def test_platform_reasons_are_the_solvers_own_words(toy):
    """What doctor lists per kernel is exactly the part of the solver's reasons that holds for every request."""
    overrides = Overrides(disable=frozenset({"portable-decode"}))
    for libraries in ((), (("pydantic", "2"),)):
        platform = Platform(arch=Arch.SM_90, libraries=libraries)
        for k in toy.kernels:
            request = KernelRequest(op=k.op, arch="sm_90", q_dtype="bf16")
            unavailable = {k.name: "unavailable: cannot import x"}
            machine = platform_reasons(k, toy, platform, overrides, unavailable)
            assert machine and set(machine) <= set(reasons(k, request, toy, platform, overrides, unavailable=unavailable))


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
