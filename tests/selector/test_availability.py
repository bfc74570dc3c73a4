"""Missing or broken backends: a kernel whose library does not import, or whose adapter does not build,
is recorded as unavailable with the reason and the selection moves on; a forced one is an error.

Every path runs on CPU by making an import fail (``sys.modules[name] = None``, or a finder that raises
what a broken CUDA install raises) or a constructor raise.  Cases come from the manifest: the kernels
that win, and their adapters' ``libraries``, are looked up, never restated.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from selector import (
    KernelRequest,
    KernelUnavailableError,
    NoKernelError,
    Overrides,
    Platform,
    Selector,
    select_kernel,
)
from selector.availability import adapter_class

MHA = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
           page_size=16)


def library(kernel) -> str:
    """The library (not torch) the kernel's adapter imports: the one a broken install would break."""
    return [m for m in adapter_class(kernel.adapter).libraries if m != "torch"][-1]


def hypothetical(manifest, arch="sm_90", **kw) -> Selector:
    """Every library assumed installed (by metadata): import failures are the only thing that can stop one."""
    return Selector(manifest, Platform.hypothetical(arch), **kw)


def test_missing_library_falls_back_to_the_next_eligible_kernel_and_explain_says_why(manifest, break_import, caplog):
    sel = hypothetical(manifest)
    first = sel.solve(KernelRequest(**MHA))
    lib = library(first.kernel)
    break_import(lib)
    expected = next(k for k in first.eligible if lib not in adapter_class(k.adapter).libraries)
    skipped = first.eligible[: first.eligible.index(expected)]
    assert skipped, "the winner needs the broken library"

    with caplog.at_level(logging.WARNING, logger="kernelsel"):
        adapter = first.adapter
    assert adapter.spec is expected
    assert any(f"using {expected.name}" in r.getMessage() and first.kernel.name in r.getMessage() for r in caplog.records)

    # the stale selection says what happened; the selector now returns the fallback's selection
    text = first.explain()
    assert re.search(rf"^fallback  {re.escape(first.kernel.name)} unavailable: cannot import {lib}: ", text, re.M)
    assert re.search(rf"^adapter   {re.escape(expected.name)} ", text, re.M)
    assert first.to_dict()["fallback"]["adapter_kernel"] == expected.name
    again = sel.solve(KernelRequest(**MHA))
    assert again is not first and again.kernel is expected
    rejected = {v.kernel.name: v.reasons for v in again.rejected}
    for k in skipped:
        assert rejected[k.name][-1].startswith(f"unavailable: cannot import {lib}: ModuleNotFoundError"), rejected[k.name]
        assert sel.unavailable_reason(k.name) == rejected[k.name][-1]
    assert re.search(rf"^  no  {re.escape(first.kernel.name)} .*unavailable: cannot import {lib}", again.explain(), re.M)
    dumped = {r["name"]: r["reasons"] for r in again.to_dict()["rejected"]}
    assert dumped[first.kernel.name][-1].startswith("unavailable: ")


def test_installed_but_broken_import_is_unavailable_with_the_original_error(manifest, break_import):
    # an installed package whose import raises (not ImportError): CUDA driver too old for the runtime
    sel = hypothetical(manifest)
    first = sel.solve(KernelRequest(**MHA))
    lib = library(first.kernel)
    finder = break_import(lib, RuntimeError("CUDA driver version is insufficient for CUDA runtime version\ntrace..."))
    adapter = first.adapter
    assert lib not in adapter.libraries
    reason = sel.unavailable_reason(first.kernel.name)
    assert reason == f"unavailable: cannot import {lib}: RuntimeError: CUDA driver version is insufficient for CUDA runtime version"
    calls = finder.calls
    # memoized: later requests of any shape skip the kernel without importing again
    other = sel.select(KernelRequest(**{**MHA, "page_size": 32}))
    assert other.kernel.name not in sel.unavailable and other.make_adapter().spec is other.kernel
    assert finder.calls == calls


def test_constructor_failure_is_recorded_for_that_request_only(manifest, monkeypatch, caplog):
    sel = hypothetical(manifest)
    first = sel.solve(KernelRequest(**MHA))
    cls = adapter_class(first.kernel.adapter)
    for m in cls.libraries:  # let the probe pass: only the constructor fails
        monkeypatch.setitem(sys.modules, m, sys.modules.get(m) or type(sys)(m))
    calls = []

    def jit_fails(self, spec, request):
        calls.append(request)
        raise RuntimeError("nvcc fatal   : Unsupported gpu architecture 'compute_90a'\nninja: build stopped")

    monkeypatch.setattr(cls, "__init__", jit_fails)
    with caplog.at_level(logging.WARNING, logger="kernelsel"):
        adapter = first.adapter
    assert adapter.spec is not first.kernel
    reason = "unavailable: adapter construction failed: RuntimeError: nvcc fatal   : Unsupported gpu architecture 'compute_90a'"
    assert sel.unavailable_reason(first.kernel.name, first.request) == reason
    assert sel.unavailable_reason(first.kernel.name) is None  # another shape may compile
    assert reason in {r for v in sel.solve(KernelRequest(**MHA)).rejected for r in v.reasons}
    first.make_adapter()
    assert len(calls) == 1, "the failing constructor is not retried for the same request"
    other = sel.solve(KernelRequest(**{**MHA, "page_size": 32}))
    assert other.kernel is first.kernel


def test_forced_unavailable_kernel_is_an_error_not_a_fallback(manifest, break_import):
    sel = hypothetical(manifest)
    winner = sel.solve(KernelRequest(**MHA)).kernel
    break_import(library(winner))
    forced = sel.select(KernelRequest(**MHA, kernel=winner.name))
    with pytest.raises(KernelUnavailableError) as err:
        forced.adapter
    text = str(err.value)
    assert text.startswith(f"kernel {winner.name} (forced by request kernel={winner.name}) cannot be used on this machine: "
                           f"unavailable: cannot import {library(winner)}")
    assert isinstance(err.value, NoKernelError) and err.value.failures[0][0] == winner.name
    # recorded: selecting it again fails at once, with the same reason
    with pytest.raises(KernelUnavailableError, match=rf"^kernel {re.escape(winner.name)} \(forced by request kernel="):
        sel.select(KernelRequest(**MHA, kernel=winner.name))


def test_forced_by_environment_unavailable_kernel_is_an_error(manifest, break_import):
    probe = hypothetical(manifest).solve(KernelRequest(**MHA)).kernel
    sel = hypothetical(manifest, overrides=Overrides.from_env({"KERNELSEL_FORCE_MHA_DECODE": probe.name}))
    break_import(library(probe))
    with pytest.raises(KernelUnavailableError, match=r"forced by KERNELSEL_FORCE_MHA_DECODE="):
        sel.select(KernelRequest(**MHA)).adapter
    with pytest.raises(KernelUnavailableError, match=r"cannot be used on this machine: unavailable: cannot import"):
        sel.select(KernelRequest(**MHA))


def test_no_eligible_kernel_can_be_built_lists_every_failure(manifest, break_import):
    sel = hypothetical(manifest)
    first = sel.solve(KernelRequest(**MHA))
    for lib in {library(k) for k in first.eligible}:
        break_import(lib)
    with pytest.raises(KernelUnavailableError) as err:
        first.adapter
    lines = str(err.value).splitlines()
    assert lines[0] == "no eligible kernel for mha_decode can be used on this machine"
    assert [ln.split(":")[0].strip() for ln in lines[2:]] == [k.name for k in first.eligible]
    with pytest.raises(NoKernelError, match="unavailable: cannot import"):
        sel.select(KernelRequest(**MHA))


def _settings_case(manifest):
    """A selection whose winner carries settings (e.g. a KV-cache layout) and whose runner-up has others."""
    for k in manifest.kernels:
        if not k.settings:
            continue
        for arch in k.arch.members():
            for q in k.dtypes.q_dtype.values:
                for kv in k.dtypes.kv_dtype.values:
                    s = hypothetical(manifest, arch).solve(KernelRequest(op=k.op, arch=arch, q_dtype=q, kv_dtype=kv))
                    if s.kernel is k and len(s.eligible) > 1 and s.eligible[1].settings != k.settings:
                        return s
    return None


def test_no_fallback_to_a_kernel_that_needs_other_settings(manifest, break_import):
    found = _settings_case(manifest)
    if found is None:
        pytest.skip("no kernel with settings wins over a runner-up without them in this manifest")
    break_import(library(found.kernel))
    with pytest.raises(KernelUnavailableError, match=r"needs settings .* instead of .*: select again"):
        found.adapter
    assert hypothetical(manifest, found.request.arch).select(found.request).kernel is found.eligible[1]  # TODO


def test_one_adapter_per_selection_under_concurrent_first_use(manifest):
    sel = Selector(manifest, Platform.hypothetical("sm_90"))
    selection = sel.select(KernelRequest(**MHA, solution="reference"))
    barrier = threading.Barrier(16)

    def get(_):
        barrier.wait()
        return selection.adapter

    with ThreadPoolExecutor(16) as pool:
        adapters = list(pool.map(get, range(16)))
    assert all(a is adapters[0] for a in adapters)


def test_mark_unavailable_is_public_and_drops_cached_selections(manifest):
    sel = hypothetical(manifest)
    first = sel.select(KernelRequest(**MHA))
    sel.mark_unavailable(first.kernel.name, "unavailable: warm-up run failed: CUDA error: an illegal memory access")
    again = sel.select(KernelRequest(**MHA))
    assert again.kernel is first.eligible[1]
    assert sel.unavailable == {first.kernel.name: "unavailable: warm-up run failed: CUDA error: an illegal memory access"}


def test_default_selector_records_unavailability_for_later_calls(break_import):
    req = KernelRequest(**MHA, solution="reference")
    sel = select_kernel(req)
    break_import("torch", OSError("libcudart.so.12: cannot open shared object file"))
    with pytest.raises(KernelUnavailableError, match=r"torch-mha-decode: unavailable: cannot import torch: OSError: libcudart"):
        sel.adapter
    with pytest.raises(NoKernelError, match=r"unavailable: cannot import torch: OSError: libcudart"):
        select_kernel(req)


def test_cli_explain_probe_shows_unavailable_kernels(cli, break_import, manifest):
    winner = hypothetical(manifest).solve(KernelRequest(**MHA)).kernel
    break_import(library(winner))
    args = ["explain", "--op", "mha_decode", "--arch", "sm_90", "--head-dim", 128, "--num-qo-heads", 32,
            "--num-kv-heads", 8, "--page-size", 16]
    code, out, _ = cli(*args)
    assert code == 0 and f"selected  {winner.name} " in out
    code, out, _ = cli(*args, "--probe")
    assert code == 0 and f"selected  {winner.name} " not in out
    assert re.search(rf"^  no  {re.escape(winner.name)} .*unavailable: cannot import {library(winner)}", out, re.M)
