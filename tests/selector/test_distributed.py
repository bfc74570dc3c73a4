"""Many ranks: ``select_kernel(req, group=pg)`` gives every rank the same kernel, or the same error everywhere.

Three CPU processes join one gloo group (``init_method=file://``) and run every scenario in order; each
prints its outcomes as JSON.  Ranks are made heterogeneous the way real nodes are: one without
FlashInfer (package metadata), one whose FlashInfer does not import, one with another perf table, one
with ``KERNELSEL_DISABLE`` in its environment, one whose request cannot be completed.  FlashInfer is not
installed on CPU machines, so ranks that "have" it get a stand-in module: its adapters then construct
(they import flashinfer in the constructor and touch it only in ``plan()``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
WORLD = 3

WORKER = r"""
import datetime, json, os, sys, types
rank, world, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
from registry.loader import load_manifest, bundled_perf_dir, load_perf_table
from selector import KernelRequest, Overrides, Platform, Selector, select_kernel
import selector.availability as availability

built = []  # every adapter construction attempt, to tell a prebuilt adapter from one built on first use
real_build = availability.build
availability.build = lambda kernel, request, install="": built.append(kernel.name) or real_build(kernel, request, install)

manifest = load_manifest()
MHA = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8, page_size=16)
ALL = (("flashinfer-python", "0.7.2"), ("torch", "2"), ("triton", "3"))
NO_FI = (("torch", "2"), ("triton", "3"))


def flashinfer(present):
    sys.modules["flashinfer"] = types.ModuleType("flashinfer") if present else None


def outcome(fn):
    try:
        s = fn()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    attempts = len(built)
    adapter = s.adapter.spec.name
    return {"kernel": s.kernel.name, "eligible": [k.name for k in s.eligible], "why": s.why, "group": s.group,
            "explain": s.explain(), "adapter": adapter, "prebuilt": len(built) == attempts}


def run(name, libraries, request, fi=True, overrides=Overrides(), perf=None):
    flashinfer(fi)
    sel = Selector(manifest, Platform(arch=request.get("arch") and __import__("registry.vocab").vocab.parse_arch(request["arch"]),
                                      libraries=libraries), overrides, perf)
    req = KernelRequest(**request)
    try:
        local = sel.solve(req)
    except Exception:
        local = None
    out[name] = {"local": local.name if local else None,
                 "local_eligible": [k.name for k in local.eligible] if local else [],
                 **outcome(lambda: sel.select(req, group=dist.group.WORLD))}


out = {}
# a rank without FlashInfer (package metadata)
run("library", NO_FI if rank == 1 else ALL, MHA)
# FlashInfer installed on every rank, but its import fails on rank 2
run("broken", ALL, MHA, fi=(rank != 2))
# rank 1 has nothing left: no FlashInfer, and the Triton kernel disabled
run("empty", NO_FI if rank == 1 else ALL, MHA,
    overrides=Overrides(disable=frozenset({"triton-mha-decode"})) if rank == 1 else Overrides())
# eligible sets that do not overlap
run("disjoint", NO_FI if rank == 1 else ALL, MHA,
    overrides=Overrides(disable=frozenset({"triton-mha-decode"})) if rank == 0 else Overrides())
# ranks asking different requests
run("mismatch", ALL, {**MHA, "page_size": 32} if rank == 2 else MHA)
# a rank whose local selection raises (here: it disables a kernel that does not exist) must not leave the
# others waiting
run("local-error", ALL, MHA, overrides=Overrides(disable=frozenset({"no-such-kernel"})) if rank == 2 else Overrides())
# different perf tables: rank 0 ranks by priority, ranks 1 and 2 by measured time
table = next(load_perf_table(p) for p in sorted(bundled_perf_dir().glob("*.yaml")))
entry = next(e for e in table.entries
             if Selector(manifest, Platform.hypothetical(table.arch)).solve(KernelRequest(op=e.op, arch=table.arch, **e.shape)).name
             != Selector(manifest, Platform.hypothetical(table.arch), perf=table).solve(KernelRequest(op=e.op, arch=table.arch, **e.shape)).name)
run("perf", ALL, {"op": entry.op.value, "arch": table.arch.value, **entry.shape}, perf=table if rank else None)
# a kernel forced on every rank, and one forced on one rank only
run("forced", ALL, {**MHA, "kernel": "triton-mha-decode"})
run("forced-one", ALL, {**MHA, "kernel": "triton-mha-decode"} if rank == 0 else MHA)

# a rank whose request cannot even be built (a bad field, not a request at all) must not leave the others waiting
out["bad-request"] = outcome(lambda: select_kernel(**(dict(MHA, head_dim_qk=0) if rank == 2 else MHA), group=dist.group.WORLD))
out["bad-type"] = outcome(lambda: select_kernel({"op": "mha_decode"} if rank == 1 else KernelRequest(**MHA),
                                                group=dist.group.WORLD))
out["bad-group"] = outcome(lambda: select_kernel(KernelRequest(**MHA), group=[1]))

# the default selector (this machine's platform; this process's environment: rank 1 disables every
# mha_decode kernel but the reference), cached per request
sys.modules.pop("flashinfer", None)
ref = dict(MHA, solution="reference")
first = outcome(lambda: select_kernel(KernelRequest(**ref), group=dist.group.WORLD))
same = select_kernel(KernelRequest(**ref), group=dist.group.WORLD) is select_kernel(KernelRequest(**ref), group=dist.group.WORLD)
out["default"] = {**first, "cached": same}
out["default-env"] = outcome(lambda: select_kernel(KernelRequest(**MHA), group=dist.group.WORLD))
dist.barrier()
dist.destroy_process_group()
print(json.dumps(out), flush=True)
os._exit(0)  # torch's C++ teardown at interpreter exit sometimes aborts ("terminate called without an active exception")
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from registry.loader import load_manifest
    from registry.vocab import Op, Solution

    manifest = load_manifest()
    store = tmp_path_factory.mktemp("gloo") / "store"
    procs = []
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELSEL_")}  # cwd=ROOT: importable
        if rank == 1:  # every mha_decode kernel but the reference: nothing left to choose automatically
            env["KERNELSEL_DISABLE"] = ",".join(
                k.name for k in manifest.by_op[Op.MHA_DECODE] if k.solution is not Solution.REFERENCE)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(WORLD), str(store)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung: the group collective did not complete")
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def _same(ranks, scenario):
    results = [r[scenario] for r in ranks]
    keys = ("kernel", "eligible", "why", "group") if "kernel" in results[0] else ("error", "message")
    for k in keys:
        assert all(r.get(k) == results[0].get(k) for r in results), (scenario, k, [r.get(k) for r in results])
    return results


def test_a_rank_without_the_library_makes_every_rank_use_a_kernel_it_has(ranks):
    results = _same(ranks, "library")
    local = [r["local"] for r in results]
    assert local[0] == local[2] != local[1], "ranks 0 and 2 alone would pick another kernel than rank 1"
    common = [n for n in results[0]["local_eligible"] if all(n in r["local_eligible"] for r in results)]
    assert results[0]["kernel"] == common[0] == local[1]
    assert all(r["adapter"] == r["kernel"] and r["prebuilt"] for r in results)
    assert results[0]["group"] == f"the {WORLD} ranks of its process group"
    assert results[0]["why"] == f"only kernel eligible and usable on all {WORLD} ranks"
    # rank 0's explain says which rank lacks its own favourite, and why
    assert f"no  {local[0]}" in results[0]["explain"] and "not eligible on rank 1: needs flashinfer-python, not installed" in results[0]["explain"]


def test_a_rank_whose_library_does_not_import_drops_the_kernel_everywhere(ranks):
    results = _same(ranks, "broken")
    assert results[0]["local"] == results[2]["local"] != results[0]["kernel"]
    assert all(r["adapter"] == r["kernel"] for r in results)
    assert "unavailable on rank 2: cannot import flashinfer: ModuleNotFoundError" in results[0]["explain"]


def test_no_candidate_on_one_rank_raises_the_same_error_naming_it(ranks):
    results = _same(ranks, "empty")
    assert results[0]["error"] == "GroupSelectionError"
    lines = results[0]["message"].splitlines()
    assert lines[0] == f"no kernel for mha_decode is eligible on every rank of a {WORLD}-rank process group: rank 1 has no eligible kernel"
    assert "  rank 1 (sm_90; torch 2, triton 3): eligible none" in lines
    assert any("disabled by KERNELSEL_DISABLE" in ln for ln in lines)


def test_eligible_sets_that_do_not_overlap_raise_the_same_error(ranks):
    results = _same(ranks, "disjoint")
    assert results[0]["message"].splitlines()[0].endswith("the ranks' eligible kernels do not overlap")


def test_ranks_with_different_requests_refuse_to_agree(ranks):
    results = _same(ranks, "mismatch")
    msg = results[0]["message"]
    assert msg.splitlines()[1] == "the ranks use different requests (the arch may differ):"
    assert "\n  rank 0, rank 1: op=mha_decode " in msg and "\n  rank 2: op=mha_decode " in msg and "page_size=32" in msg


def test_a_local_error_reaches_every_rank_instead_of_a_hang(ranks):
    results = _same(ranks, "local-error")
    assert results[0]["error"] == "GroupSelectionError"
    assert "\n  rank 2 (sm_90; " in results[0]["message"]
    assert "RequestError: KERNELSEL_DISABLE: no kernel named 'no-such-kernel'" in results[0]["message"]


def test_a_request_that_cannot_be_built_on_one_rank_reaches_every_rank_instead_of_a_hang(ranks):
    """select_kernel(**bad fields, group=) raised before the collective: the other ranks waited for the timeout."""
    results = _same(ranks, "bad-request")
    assert results[0]["error"] == "GroupSelectionError"
    assert "rank 2 (" in results[0]["message"] and "request.head_dim_qk: must be >= 1, got 0" in results[0]["message"]
    results = _same(ranks, "bad-type")
    assert results[0]["error"] == "GroupSelectionError"
    assert "rank 1 (" in results[0]["message"] and "select_kernel takes a KernelRequest or keyword fields" in results[0]["message"]


def test_a_group_that_is_not_a_process_group_is_named(ranks):
    results = _same(ranks, "bad-group")
    assert results[0]["error"] == "RequestError"
    assert results[0]["message"].startswith("group= takes a torch.distributed process group")


def test_ranks_with_different_perf_tables_follow_the_first_rank(ranks):
    results = _same(ranks, "perf")
    assert results[1]["local"] == results[2]["local"] != results[0]["local"]
    assert results[0]["kernel"] == results[0]["local"]
    assert results[0]["why"].endswith("in rank 0's order")


def test_forced_kernels_must_match_on_every_rank(ranks):
    assert _same(ranks, "forced")[0]["kernel"] == "triton-mha-decode"
    results = _same(ranks, "forced-one")
    assert results[0]["message"].splitlines()[1:] == [
        "the ranks use different forced kernels:", "  rank 0: triton-mha-decode", "  rank 1, rank 2: none"]


def test_default_selector_with_group_is_cached_and_reads_each_ranks_environment(ranks):
    results = _same(ranks, "default")
    assert results[0]["kernel"].startswith("torch-") and all(r["cached"] for r in results)
    env = _same(ranks, "default-env")
    assert env[0]["error"] == "GroupSelectionError" and "rank 1 has no eligible kernel" in env[0]["message"]



def test_group_without_initialised_torch_distributed_is_a_clear_error(manifest):
    from selector import GroupSelectionError, KernelRequest, Platform, Selector

    if dist.is_initialized():
        pytest.skip("this process is in a process group")
    sel = Selector(manifest, Platform.hypothetical("sm_90"))
    with pytest.raises(GroupSelectionError, match=r"^group= needs an initialised torch.distributed"):
        sel.select(KernelRequest(op="mha_decode", arch="sm_90"), group=object())
