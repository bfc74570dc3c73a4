"""Tuning on first use, on the CPU: the budget, the cache file, concurrent writers, the capture refusal."""

from __future__ import annotations

import logging
import multiprocessing
import time

import pytest

from registry.loader import load_manifest, load_perf_table
from registry.vocab import Arch
from selector import KernelRequest, Platform, Selector
from selector.tuning import TuneBudget, TuneCache, TuneResult, TuningError, eligible_to_tune, software_digest, tune

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
