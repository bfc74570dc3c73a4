"""Tuning on first use, on the CPU: the budget, the cache file, concurrent writers, the capture refusal."""

from __future__ import annotations

import logging
import multiprocessing
import time

import pytest

from registry.loader import load_manifest, load_perf_table
from registry.vocab import Arch
from selector import KernelRequest, Platform, Selector
import selector.api as api
from selector.tuning import (
    TuneBudget,
    TuneCache,
    TuneResult,
    TuneSettings,
    TuningError,
    eligible_to_tune,
    software_digest,
    software_key,
    tune,
)

pytest.importorskip("torch")

DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=64, num_qo_heads=4, num_kv_heads=2,
              page_size=16, batch_size=2, kv_len=64)
SOFTWARE = {"torch": "2.13.0", "kernelsel": "0.1.0"}


class SleepyAdapter:
    """Runs in ``seconds`` of wall time (so the budget arithmetic is checkable) and returns the output."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def plan(self, metadata):
        self.planned = metadata

    def run(self, q, k, v, *, out=None, lse=None, **scales):
        time.sleep(self.seconds)
        return out


def test_the_budget_fits_repeats_into_the_share_with_a_floor():
    budget = TuneBudget(seconds=0.2, min_repeats=3, max_repeats=20, warmup=2)
    assert budget.runs(0.05, 0.001) == (20, 2)  # short runs: capped at max_repeats
    assert budget.runs(0.05, 0.005) == (8, 2)  # 10 runs fit: 2 warm-up + 8 timed
    assert budget.runs(0.05, 0.012) == (3, 1)  # 4 fit: warm-up shrinks first
    assert budget.runs(0.05, 0.1) == (3, 0)  # nothing fits: the floor of 3 timed runs, no warm-up


def test_tuning_times_every_kernel_within_the_budget():
    request = KernelRequest(**DECODE)
    budget = TuneBudget(seconds=0.12, min_repeats=3, max_repeats=20, warmup=2)
    result = tune(request, ["a", "b"], lambda name: SleepyAdapter(0.01 if name == "a" else 0.002), device="cpu",
                  budget=budget)
    assert set(result.times) == {"a", "b"} and not result.errors
    assert result.times["a"] > result.times["b"]
    assert result.repeats["b"] == budget.max_repeats  # 30 runs of 2 ms fit the 60 ms share
    assert result.repeats["a"] in (3, 4)  # 6 runs of 10 ms fit (5 with sleep overshoot): 2 warm-up, the rest timed
    assert result.timing_s <= budget.seconds * 1.5  # the share, plus sleep overshoot and timer overhead
    assert "wall clock" in result.method


def test_a_failing_kernel_is_skipped_and_reported():
    class Broken(SleepyAdapter):
        def run(self, *a, **k):
            raise RuntimeError("no kernel image\nsecond line")

    result = tune(KernelRequest(**DECODE), ["ok", "bad"], lambda n: Broken(0) if n == "bad" else SleepyAdapter(0),
                  device="cpu", budget=TuneBudget(seconds=0.01))
    assert set(result.times) == {"ok"} and result.errors == {"bad": "RuntimeError: no kernel image"}


def test_tuning_with_the_reference_kernel_through_the_selector():
    manifest = load_manifest()
    selector = Selector(manifest, Platform.hypothetical("sm_90"))
    assert "torch-mha-decode" not in eligible_to_tune(selector.solve(KernelRequest(**DECODE)))
    request = KernelRequest(**DECODE, solution="reference")  # reference kernels are tuned only when asked for
    names = eligible_to_tune(selector.solve(request))
    assert names == ["torch-mha-decode"]
    result = tune(request, names, lambda n: selector.select(request.forcing(n)).make_adapter(),
                  device="cpu", budget=TuneBudget(seconds=0.02))
    assert result.times["torch-mha-decode"] > 0 and result.workload_s > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"batch_size": None}, r"^cannot tune mha_decode without batch_size \(the bucket's sizes\)$"),
        ({"op": "mha_extend", "q_len": 1}, r"^cannot tune mha_extend without new_len"),
        ({"batch_size": 1024, "kv_len": 1 << 20}, r"^cannot tune this bucket: its synthetic inputs take 512\.\d GiB, "
                                                   r"over the 4\.0 GiB tuning limit$"),
    ],
)
def test_buckets_that_cannot_be_tuned_say_why(fields, message):
    request = KernelRequest(**{**DECODE, **fields})
    with pytest.raises(TuningError, match=message):
        tune(request, ["a"], lambda n: SleepyAdapter(0), device="cpu")


def test_never_inside_cuda_graph_capture():
    built = []
    with pytest.raises(TuningError, match=r"^cannot tune inside CUDA-graph capture"):
        tune(KernelRequest(**DECODE), ["a"], lambda n: built.append(n), device="cuda", capturing=lambda: True)
    assert built == []  # refused before any workload or adapter


# ------------------------------------------------------------------ the cache file


def _cache(tmp_path, software=SOFTWARE) -> TuneCache:
    return TuneCache.for_machine("NVIDIA H200", Arch.SM_90, software, directory=tmp_path)


def _result(batch: int, **times: float) -> TuneResult:
    return TuneResult(KernelRequest(**{**DECODE, "batch_size": batch}), times={k.replace("_", "-"): v for k, v in times.items()})


def test_the_cache_is_a_perf_table_per_gpu_arch_and_library_versions(tmp_path):
    cache = _cache(tmp_path)
    assert cache.path.name == f"nvidia-h200-sm_90-{software_digest(SOFTWARE)}.yaml"
    assert _cache(tmp_path, {**SOFTWARE, "torch": "2.14.0"}).path != cache.path
    assert cache.load() is None
    table = cache.add([_result(2, triton_mha_decode=10.0, xqa_decode=12.0)], "tuned on first use: test")
    assert table.gpu == "NVIDIA H200" and table.arch is Arch.SM_90 and table.software == SOFTWARE
    assert cache.path.read_text().startswith("# kernelsel tuned table")
    assert [e.median_us for e in load_perf_table(cache.path).entries] == [{"triton-mha-decode": 10.0, "xqa-decode": 12.0}]
    again = cache.add([_result(2, xqa_decode=9.0), _result(8, triton_mha_decode=30.0)], "m")
    assert [(e.shape["batch_size"], e.median_us) for e in again.entries] == [
        (2, {"triton-mha-decode": 10.0, "xqa-decode": 9.0}), (8, {"triton-mha-decode": 30.0})]
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path.name, cache.path.name + ".lock"]  # no temp left


def test_a_broken_cache_file_is_set_aside_not_trusted(tmp_path, caplog):
    cache = _cache(tmp_path)
    cache.path.write_text("gpu: NVIDIA H200\narch: sm_90\nentries: [{op: mha_decode, shape: {}, median_us: {x: -1}}]\n")
    with caplog.at_level(logging.WARNING, logger="kernelsel"):
        assert cache.load() is None
    assert "does not load" in caplog.text and (tmp_path / (cache.path.name + ".corrupt")).exists()
    assert not cache.path.exists()
    cache.add([_result(2, xqa_decode=5.0)], "m")  # timed again, a fresh file
    assert load_perf_table(cache.path).entries[0].median_us == {"xqa-decode": 5.0}


def test_a_write_that_would_not_load_never_replaces_the_file(tmp_path, monkeypatch):
    cache = _cache(tmp_path)
    cache.add([_result(2, xqa_decode=5.0)], "m")
    before = cache.path.read_text()
    monkeypatch.setattr("selector.tuning.table_text", lambda **kw: "entries: [1, 2]\n")
    with pytest.raises(Exception):
        cache.add([_result(8, xqa_decode=7.0)], "m")
    assert cache.path.read_text() == before


def _writer(directory: str, batch: int, rounds: int) -> None:
    cache = TuneCache.for_machine("NVIDIA H200", Arch.SM_90, SOFTWARE, directory=__import__("pathlib").Path(directory))
    for r in range(rounds):
        cache.add([_result(batch, xqa_decode=float(batch * 100 + r))], "m")


def test_concurrent_writers_keep_every_bucket_and_never_tear_the_file(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    batches = [1, 2, 4, 8, 16, 32]
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), b, 5)) for b in batches]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    table = load_perf_table(_cache(tmp_path).path)
    assert {e.shape["batch_size"]: e.median_us["xqa-decode"] for e in table.entries} == {
        b: float(b * 100 + 4) for b in batches}


# ------------------------------------------------------------------ a selector that tunes


TOY_DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=64, num_qo_heads=4, num_kv_heads=2,
                  page_size=16, batch_size=2, kv_len=64)


@pytest.fixture
def toy_delays(toy, monkeypatch):
    """The toy decode kernels' run() times: the low-priority portable kernel is the faster one."""
    import toy_adapters

    monkeypatch.setattr(toy_adapters.PortableDecode, "delay", 0.002)
    monkeypatch.setattr(toy_adapters.FastDecode, "delay", 0.006)
    return toy


def _tuning_selector(manifest, tmp_path, **kw):
    settings = TuneSettings(device="cpu", budget=TuneBudget(seconds=0.05), cache_dir=tmp_path)
    return Selector(manifest, Platform.hypothetical("sm_90"), tune_settings=settings, **kw)


def test_a_selector_that_tunes_times_an_unmeasured_bucket_once_and_ranks_by_it(toy_delays, tmp_path, monkeypatch):
    calls = []
    real = api.tune_bucket
    monkeypatch.setattr(api, "tune_bucket", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    tuner = _tuning_selector(toy_delays, tmp_path, tune=True)
    request = KernelRequest(**TOY_DECODE)
    by_priority = Selector(toy_delays, Platform.hypothetical("sm_90")).solve(request)
    assert by_priority.kernel.name == "fast-decode"
    sel = tuner.select(request)
    assert sel.kernel.name == "portable-decode" and set(sel.measured) == {"fast-decode", "portable-decode"}
    assert sel.measured["portable-decode"] < sel.measured["fast-decode"] and len(calls) == 1
    (table_file,) = tmp_path.glob("cpu-sm_90-*.yaml")
    assert str(table_file) in sel.explain().split("\nperf      ")[1].splitlines()[0]
    assert tuner.select(request) is sel and tuner.select(KernelRequest(**{**TOY_DECODE, "kv_len": 50})) is sel
    assert len(calls) == 1  # one bucket, timed once
    # a later process loads the tuned table without tuning
    later = _tuning_selector(toy_delays, tmp_path, tuned_tables=True)
    again = later.select(request)
    assert again.kernel.name == "portable-decode" and again.measured == sel.measured and len(calls) == 1
    assert later.tune is False


def test_a_measured_bucket_is_not_tuned(toy_delays, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "tune_bucket", lambda *a, **k: pytest.fail("timed a measured bucket"))
    tuner = _tuning_selector(toy_delays, tmp_path, tune=True)
    request = KernelRequest(**TOY_DECODE)
    TuneCache.for_machine("cpu", Arch.SM_90, software_key(Platform.hypothetical("sm_90")), tmp_path).add(
        [TuneResult(request, times={"fast-decode": 1.0, "portable-decode": 2.0})], "earlier")
    assert tuner.select(request).kernel.name == "fast-decode"


def test_tuning_waits_until_cuda_graph_capture_is_over(toy_delays, tmp_path, monkeypatch):
    import selector.tuning as tuning_module
    from selector.platform import GPU_SOURCES, Gpu

    monkeypatch.setitem(GPU_SOURCES, "torch", lambda: ((Gpu("NVIDIA H200", "", Arch.SM_90),), ""))
    capturing = [True]
    monkeypatch.setattr(tuning_module, "_capturing", lambda: capturing[0])
    settings = TuneSettings(device="cuda", cache_dir=tmp_path)
    tuner = Selector(toy_delays, Platform.hypothetical("sm_90"), tune=True, tune_settings=settings)
    request = KernelRequest(**TOY_DECODE)
    first = tuner.solve(request)
    assert first.kernel.name == "fast-decode" and not first.measured  # by priority, not timed
    assert tuner.solve(request) is not first  # not cached: the next miss tries again
    capturing[0] = False
    monkeypatch.setattr(api, "tune_bucket", lambda req, names, build, **k: TuneResult(
        req, times={"fast-decode": 9.0, "portable-decode": 3.0}, method="fake"))
    after = tuner.solve(request)
    assert after.kernel.name == "portable-decode" and after.measured == {"fast-decode": 9.0, "portable-decode": 3.0}
    assert tuner.solve(request) is after


def test_tune_keyword_and_environment(toy_env, tmp_path, monkeypatch):
    import selector
    from selector.platform import GPU_SOURCES, Gpu

    monkeypatch.setenv("KERNELSEL_TUNE", "1")
    monkeypatch.setenv("KERNELSEL_TUNE_CACHE", str(tmp_path))
    selector.reset()
    assert selector.default_selector().tune is True
    sel = selector.select_kernel(**TOY_DECODE)  # no GPU here: selected without tuning (the log says why)
    assert not sel.measured and "override  KERNELSEL_TUNE=on" in sel.explain()
    monkeypatch.setenv("KERNELSEL_TUNE", "0")
    selector.reset()
    assert selector.default_selector().tune is False
    monkeypatch.setitem(GPU_SOURCES, "torch", lambda: ((Gpu("NVIDIA H200", "", Arch.SM_90),), ""))
    monkeypatch.setattr(api, "tune_bucket", lambda req, names, build, **k: TuneResult(
        req, times={n: 5.0 + i for i, n in enumerate(reversed(names))}, method="fake"))
    plain = selector.select_kernel(**{**TOY_DECODE, "kv_len": 512})
    assert not plain.measured  # tuning off: a miss is not timed
    tuned = selector.select_kernel(**{**TOY_DECODE, "kv_len": 1024}, tune=True)  # per call: this miss is timed
    assert tuned.measured and tuned.kernel.name == "portable-decode"
    assert list(tmp_path.glob("nvidia-h200-sm_90-*.yaml"))


GROUP_WORKER = r"""
import datetime, json, os, sys, types
from pathlib import Path
rank, world, store, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
sys.path.insert(0, str(Path("tests/selector").resolve()))
for lib in ("toy_fast", "toy_layout", "toy_portable", "toy_reference"):
    sys.modules[lib] = types.ModuleType(lib)
import toy_adapters
from registry.loader import load_manifest
from selector import KernelRequest, Platform, Selector
import selector.api as api
from selector.tuning import TuneBudget, TuneSettings
# on the first rank the portable kernel is faster; on the others slower: tuned alone they would disagree
toy_adapters.PortableDecode.delay = 0.001 if rank == 0 else 0.03
toy_adapters.FastDecode.delay = 0.01
calls = []
real = api.tune_bucket
api.tune_bucket = lambda *a, **k: calls.append(1) or real(*a, **k)
manifest = load_manifest(Path("tests/selector/toy_manifest.yaml"), adapter_allowlist=("toy_adapters",))
settings = TuneSettings(device="cpu", budget=TuneBudget(seconds=0.06), cache_dir=root / f"rank{rank}")
sel = Selector(manifest, Platform.hypothetical("sm_90"), tune=True, tune_settings=settings)
request = KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=64, num_qo_heads=4,
                        num_kv_heads=2, page_size=16, batch_size=2, kv_len=64)
s = sel.select(request, group=dist.group.WORLD)
local = sel.solve(request, tune=False)
dist.barrier()
dist.destroy_process_group()
print(json.dumps({"kernel": s.kernel.name, "group": s.group, "calls": len(calls), "measured": local.measured}), flush=True)
os._exit(0)  # torch's C++ teardown at interpreter exit sometimes aborts ("terminate called without an active exception")
"""


def test_ranks_of_a_group_agree_on_one_measurement(tmp_path):
    """The first rank tunes; every rank keeps its times, so the ranks' rankings cannot diverge."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = Path(__file__).resolve().parents[2]
    world = 3
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELSEL_")}
    procs = [subprocess.Popen([sys.executable, "-c", GROUP_WORKER, str(r), str(world), str(tmp_path / "store"),
                               str(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung in the tuning collective")
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["calls"] for o in outs] == [1, 0, 0], outs  # only the first rank timed
    assert all(o["kernel"] == "portable-decode" and o["group"] == "the 3 ranks of its process group" for o in outs), outs
    assert all(o["measured"] == outs[0]["measured"] for o in outs) and len(outs[0]["measured"]) == 2, outs
    assert all(list((tmp_path / f"rank{r}").glob("cpu-sm_90-*.yaml")) for r in range(world))  # each rank kept them


def test_without_platformdirs_selection_goes_on_without_a_tuned_table(toy, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "platformdirs", None)
    monkeypatch.delenv("KERNELSEL_TUNE_CACHE", raising=False)
    from selector.tuning import cache_dir

    with pytest.raises(TuningError, match=r"needs platformdirs .*pip install platformdirs, or set KERNELSEL_TUNE_CACHE=DIR"):
        cache_dir()
    tuner = Selector(toy, Platform.hypothetical("sm_90"), tune=True, tune_settings=TuneSettings(device="cpu"))
    with caplog.at_level(logging.INFO, logger="kernelsel"):
        sel = tuner.select(KernelRequest(**TOY_DECODE))
    assert sel.kernel.name == "fast-decode" and not sel.measured  # by priority
    assert "no tuned table: the tuned tables' folder needs platformdirs" in caplog.text
    assert "selected without tuning: the tuned tables' folder needs platformdirs" in caplog.text
