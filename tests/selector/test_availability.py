"""Missing or broken backends: a kernel whose library does not import, or whose adapter does not build,
is recorded as unavailable with the reason and the selection moves on; a forced one is an error.

Every path runs on CPU, without torch, on the toy manifest: its adapters each import one stand-in
library, and a test makes that import fail (``sys.modules[name] = None``, or a finder that raises what
a broken CUDA install raises) or a constructor raise.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import weakref
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
from selector.availability import UnavailableKernels, adapter_class

DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
              page_size=16)
FAST_IMPORT = "unavailable: cannot import toy_fast: "


def library(toy, name: str) -> str:
    """The stand-in library kernel ``name``'s adapter imports: the one a broken install would break."""
    return adapter_class(toy.by_name[name].adapter).libraries[0]


def hypothetical(manifest, arch="sm_90", **kw) -> Selector:
    """Every library assumed installed (by metadata): import failures are the only thing that can stop one."""
    return Selector(manifest, Platform.hypothetical(arch), **kw)


def test_the_toy_cases_are_what_these_tests_assume(toy):
    first = hypothetical(toy).solve(KernelRequest(**DECODE))
    assert [k.name for k in first.eligible] == ["fast-decode", "portable-decode"]
    assert library(toy, "fast-decode") == "toy_fast" != library(toy, "portable-decode")


def test_missing_library_falls_back_to_the_next_eligible_kernel_and_explain_says_why(toy, break_import, caplog):
    sel = hypothetical(toy)
    first = sel.solve(KernelRequest(**DECODE))
    break_import("toy_fast")

    with caplog.at_level(logging.WARNING, logger="kernelsel"):
        adapter = first.adapter
    assert adapter.spec is toy.by_name["portable-decode"]
    assert any("fast-decode unavailable: cannot import toy_fast" in r.getMessage() and "using portable-decode" in r.getMessage()
               for r in caplog.records)

    # the stale selection says what happened; the selector now returns the fallback's selection
    text = first.explain()
    assert re.search(r"^fallback  fast-decode unavailable: cannot import toy_fast: ModuleNotFoundError", text, re.M)
    assert re.search(r"^adapter   portable-decode ", text, re.M)
    assert first.to_dict()["fallback"]["adapter_kernel"] == "portable-decode"
    again = sel.solve(KernelRequest(**DECODE))
    assert again is not first and again.kernel.name == "portable-decode"
    reason = dict((v.kernel.name, v.reasons) for v in again.rejected)["fast-decode"]
    assert reason == (sel.unavailable_reason("fast-decode"),)
    assert reason[0].startswith(FAST_IMPORT + "ModuleNotFoundError") and reason[0].endswith("(pip install toy-fast)")
    assert re.search(r"^  no  fast-decode .*unavailable: cannot import toy_fast", again.explain(), re.M)
    dumped = {r["name"]: r["reasons"] for r in again.to_dict()["rejected"]}
    assert dumped["fast-decode"] == list(reason)


def test_installed_but_broken_import_is_unavailable_with_the_original_error(toy, break_import):
    # an installed package whose import raises (not ImportError): CUDA driver too old for the runtime
    sel = hypothetical(toy)
    first = sel.solve(KernelRequest(**DECODE))
    finder = break_import("toy_fast", RuntimeError("CUDA driver version is insufficient for CUDA runtime version\ntrace..."))
    assert first.adapter.spec.name == "portable-decode"
    assert sel.unavailable_reason("fast-decode") == FAST_IMPORT + "RuntimeError: CUDA driver version is insufficient for CUDA runtime version"
    calls = finder.calls
    # memoized: later requests of any shape skip the kernel without importing again
    other = sel.select(KernelRequest(**{**DECODE, "page_size": 32}))
    assert other.kernel.name == "portable-decode" and other.make_adapter().spec is other.kernel
    assert finder.calls == calls == 1


def test_constructor_failure_is_recorded_for_that_request_only(toy, monkeypatch, caplog):
    sel = hypothetical(toy)
    first = sel.solve(KernelRequest(**DECODE))
    calls = []

    def jit_fails(self, spec, request):
        calls.append(request)
        raise RuntimeError("nvcc fatal   : Unsupported gpu architecture 'compute_90a'\nninja: build stopped")

    monkeypatch.setattr(adapter_class(first.kernel.adapter), "__init__", jit_fails)
    with caplog.at_level(logging.WARNING, logger="kernelsel"):
        adapter = first.adapter
    assert adapter.spec.name == "portable-decode"
    reason = "unavailable: adapter construction failed: RuntimeError: nvcc fatal   : Unsupported gpu architecture 'compute_90a'"
    assert sel.unavailable_reason("fast-decode", first.request) == reason
    assert sel.unavailable_reason("fast-decode") is None  # another shape may compile
    assert reason in {r for v in sel.solve(KernelRequest(**DECODE)).rejected for r in v.reasons}
    first.make_adapter()
    assert len(calls) == 1, "the failing constructor is not retried for the same request"
    other = sel.solve(KernelRequest(**{**DECODE, "page_size": 32}))
    assert other.kernel is first.kernel


def test_forced_unavailable_kernel_is_an_error_not_a_fallback(toy, break_import):
    sel = hypothetical(toy)
    break_import("toy_fast")
    forced = sel.select(KernelRequest(**DECODE, kernel="fast-decode"))
    with pytest.raises(KernelUnavailableError) as err:
        forced.adapter
    assert str(err.value).startswith("kernel fast-decode (forced by request kernel=fast-decode) cannot be used on "
                                     "this machine: " + FAST_IMPORT)
    assert isinstance(err.value, NoKernelError) and err.value.failures[0][0] == "fast-decode"
    # recorded: selecting it again fails at once, with the same reason
    with pytest.raises(KernelUnavailableError, match=r"^kernel fast-decode \(forced by request kernel="):
        sel.select(KernelRequest(**DECODE, kernel="fast-decode"))


def test_forced_by_environment_unavailable_kernel_is_an_error(toy, break_import):
    sel = hypothetical(toy, overrides=Overrides.from_env({"KERNELSEL_FORCE_MHA_DECODE": "fast-decode"}))
    break_import("toy_fast")
    with pytest.raises(KernelUnavailableError, match=r"forced by KERNELSEL_FORCE_MHA_DECODE="):
        sel.select(KernelRequest(**DECODE)).adapter
    with pytest.raises(KernelUnavailableError, match=r"cannot be used on this machine: unavailable: cannot import"):
        sel.select(KernelRequest(**DECODE))


def test_no_eligible_kernel_can_be_built_lists_every_failure(toy, break_import):
    sel = hypothetical(toy)
    first = sel.solve(KernelRequest(**DECODE))
    break_import("toy_fast")
    break_import("toy_portable")
    with pytest.raises(KernelUnavailableError) as err:
        first.adapter
    lines = str(err.value).splitlines()
    assert lines[0] == "no eligible kernel for mha_decode can be used on this machine"
    assert [ln.split(":")[0].strip() for ln in lines[2:]] == ["fast-decode", "portable-decode"]
    with pytest.raises(NoKernelError, match="unavailable: cannot import"):
        sel.select(KernelRequest(**DECODE))


def test_no_fallback_to_a_kernel_that_needs_other_settings(toy, break_import):
    sel = hypothetical(toy, "sm_100")
    found = sel.solve(KernelRequest(**{**DECODE, "arch": "sm_100"}))
    assert found.kernel.name == "layout-decode" and found.settings and not found.eligible[1].settings
    break_import(library(toy, "layout-decode"))
    with pytest.raises(KernelUnavailableError, match=r"the next eligible kernel, fast-decode, needs settings \{\} instead of "
                                                     r"\{'kv_layout': 'HND'\}: select again"):
        found.adapter
    assert sel.select(found.request).kernel.name == "fast-decode"


def test_one_adapter_per_selection_under_concurrent_first_use(toy):
    sel = Selector(toy, Platform.hypothetical("sm_90"))
    selection = sel.select(KernelRequest(**DECODE, solution="reference"))
    barrier = threading.Barrier(16)

    def get(_):
        barrier.wait()
        return selection.adapter

    with ThreadPoolExecutor(16) as pool:
        adapters = list(pool.map(get, range(16)))
    assert all(a is adapters[0] for a in adapters)


def test_mark_unavailable_is_public_and_drops_cached_selections(toy):
    sel = hypothetical(toy)
    first = sel.select(KernelRequest(**DECODE))
    sel.mark_unavailable(first.kernel.name, "unavailable: warm-up run failed: CUDA error: an illegal memory access")
    again = sel.select(KernelRequest(**DECODE))
    assert again.kernel is first.eligible[1]
    assert sel.unavailable == {first.kernel.name: "unavailable: warm-up run failed: CUDA error: an illegal memory access"}


def test_a_selection_records_failures_without_holding_its_selector(toy, break_import):
    sel = hypothetical(toy)
    selection = sel.select(KernelRequest(**DECODE))
    assert selection.unavailable_kernels is sel.unavailable_kernels
    gone = weakref.ref(sel)
    del sel
    gc.collect()
    assert gone() is None, "a selection keeps its selector alive"
    break_import("toy_fast")
    assert selection.adapter.spec.name == "portable-decode"  # records into the shared record; nobody to tell
    assert selection.unavailable_kernels.reason("fast-decode").startswith(FAST_IMPORT)


def test_the_record_is_per_request_or_kernel_wide_and_tells_its_subscribers():
    record = UnavailableKernels()
    told = []
    record.subscribe(lambda: told.append(len(record.kernel_wide)))
    record.mark("a", "unavailable: import")
    record.mark("b", "unavailable: constructor", request="r1")
    record.mark("a", "unavailable: constructor", request="r1")
    assert told == [1, 1, 1]
    assert record.reason("a") == record.reason("a", "r1") == "unavailable: import"  # kernel-wide first
    assert record.reason("b") is None and record.reason("b", "r2") is None and record.reason("b", "r1")
    assert dict(record.reasons("r1")) == {"a": "unavailable: constructor", "b": "unavailable: constructor"}
    assert dict(record.reasons()) == {"a": "unavailable: import"} == record.kernel_wide


def test_default_selector_records_unavailability_for_later_calls(toy_env, break_import):
    req = KernelRequest(**DECODE, solution="reference")
    sel = select_kernel(req)
    break_import("toy_reference", OSError("libcudart.so.12: cannot open shared object file"))
    with pytest.raises(KernelUnavailableError, match=r"reference-decode: unavailable: cannot import toy_reference: OSError: libcudart"):
        sel.adapter
    with pytest.raises(NoKernelError, match=r"unavailable: cannot import toy_reference: OSError: libcudart"):
        select_kernel(req)


def test_cli_explain_probe_shows_unavailable_kernels(cli, break_import, toy, toy_file, toy_allowlist):
    break_import("toy_fast")
    args = ["explain", "--manifest", toy_file, "--allow-adapter", toy_allowlist,
            "--op", "mha_decode", "--arch", "sm_90", "--head-dim", 128, "--num-qo-heads", 32, "--num-kv-heads", 8,
            "--page-size", 16]
    code, out, _ = cli(*args)
    assert code == 0 and "selected  fast-decode " in out
    code, out, _ = cli(*args, "--probe")
    assert code == 0 and "selected  portable-decode " in out
    assert re.search(r"^  no  fast-decode .*unavailable: cannot import toy_fast", out, re.M)
