"""The selection caches: bounded, a hit one dict lookup, the keyword form keyed before the request is built.

* ``Selector(cache_size=N)`` / ``KERNELSEL_CACHE_SIZE`` cap every cache; an insert into a full one keeps its
  newer half; a hit takes no lock.
* ``select_kernel(op=..., ...)`` keys its raw arguments (``batch_size``/``kv_len`` bucketed): a hit builds no
  request, a growing KV length keeps hitting, and anything it cannot key safely raises what it always raised.
* A cached selection is small whatever the manifest's size: under 3 KB per entry -- request, selection and key
  -- on a 1000-kernel op, with the arch given or detected (a size bound measured with tracemalloc, not a timing);
  and whatever the perf table ranking it: a table adds at most a few hundred bytes, however many kernels it
  cannot time (measured and predicted buckets, on a 1000-kernel op and on the bundled manifest's committed table).
"""

from __future__ import annotations

import gc
import threading
import tracemalloc

import pytest

import selector
import selector.api as api
from registry.errors import RequestError
from registry.loader import bundled_perf_dir, load_manifest, load_perf_table
from registry.perf import PerfEntry, PerfTable, entry_data
from registry.vocab import Arch
from selector import KernelRequest, Platform, Selector, select_kernel
from selector.overrides import ENV_ADAPTER_ALLOWLIST, ENV_CACHE_SIZE, ENV_MANIFEST, ENV_PERF
from selector.platform import GPU_SOURCES, TORCH, Gpu
from selector.tuning import ENV_TUNE_CACHE

DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128)


def test_a_selector_keeps_at_most_cache_size_selections_and_the_newest_ones(toy):
    sel = Selector(toy, Platform.hypothetical("sm_90"), cache_size=8)
    requests = [KernelRequest(**DECODE, batch_size=1 << i) for i in range(40)]
    first = [sel.solve(r) for r in requests]
    assert len(sel._cache) <= 8
    assert sel.solve(requests[-1]) is first[-1]  # the newest is still a hit
    again = sel.solve(requests[0])  # the oldest was dropped: solved again, the same decision
    assert again is not first[0] and again.name == first[0].name and again.why == first[0].why
    assert Selector(toy, Platform.hypothetical("sm_90")).cache_size == api.DEFAULT_CACHE_SIZE


def test_a_cache_hit_takes_no_lock(toy):
    sel = Selector(toy, Platform.hypothetical("sm_90"))
    request = KernelRequest(**DECODE)
    hit = sel.solve(request)

    class NoLock:
        def __enter__(self):
            raise AssertionError("a hit took the lock")

        acquire = __enter__

    sel._lock = NoLock()
    assert sel.solve(request) is hit and sel.select(request) is hit


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "16"])
def test_a_bad_cache_size_is_named(toy, bad):
    with pytest.raises(RequestError, match=r"^Selector\(cache_size=\.\.\.\): expected a whole number of selections >= 1"):
        Selector(toy, Platform.hypothetical("sm_90"), cache_size=bad)


def test_the_cache_size_comes_from_the_environment(toy_env, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_SIZE, "16")
    selector.reset()
    assert selector.default_selector().cache_size == 16
    for bad in ("abc", "0", "-3", "²", "9" * 40):
        monkeypatch.setenv(ENV_CACHE_SIZE, bad)
        selector.reset()
        with pytest.raises(RequestError, match=rf"^{ENV_CACHE_SIZE}: .* is not a whole number of selections >= 1"):
            select_kernel(**DECODE)


# ------------------------------------------------------------------ the keyword form

def test_the_keyword_form_hits_without_building_a_request_and_buckets_first(toy_env, monkeypatch):
    first = select_kernel(**DECODE, batch_size=3, kv_len=1000)
    built = []
    build = KernelRequest.__init__
    # counted where every request is built (the api checks isinstance(..., KernelRequest): the class stays itself)
    monkeypatch.setattr(KernelRequest, "__init__", lambda self, **fields: built.append(fields) or build(self, **fields))
    for kv_len in (1000, 1001, 1023, 1024):  # one bucket: the same selection, no request built
        assert select_kernel(**DECODE, batch_size=4, kv_len=kv_len) is first
    assert built == []
    assert select_kernel(**DECODE, batch_size=4, kv_len=1025) is not first  # the next bucket: a miss
    assert len(built) == 1
    assert select_kernel(**DECODE, batch_size=4, kv_len=2000).request.kv_len == 2048


def test_new_tokens_are_bucketed_in_the_keyword_key_too(toy_env, monkeypatch):
    extend = dict(op="mha_extend", arch="sm_90", q_dtype="bf16", head_dim_qk=128, kv_len=4096)
    first = select_kernel(**extend, new_len=100)
    monkeypatch.setattr(api, "KernelRequest", None)  # building one now would raise TypeError
    assert all(select_kernel(**extend, new_len=n) is first for n in (65, 100, 128))


def test_a_torch_dtype_argument_is_keyed(toy_env, monkeypatch):
    torch = pytest.importorskip("torch")
    first = select_kernel(**{**DECODE, "q_dtype": torch.bfloat16})
    monkeypatch.setattr(api, "KernelRequest", None)  # building one now would raise TypeError
    assert select_kernel(**{**DECODE, "q_dtype": torch.bfloat16}) is first


@pytest.mark.parametrize("cached, other", [
    ({"arch": 9.0}, {"arch": 9}),  # 9.0 == 9, but sm_9 does not exist
    ({"kv_len": 1}, {"kv_len": True}),  # True == 1: pydantic's reading of a bool, not the cache's
    ({"kv_len": 2**63 - 1}, {"kv_len": 2**63}),  # the bucket of the first is the second, out of range
    ({"kv_len": 1}, {"kv_len": 0}),
    ({"head_dim_qk": 128}, {"head_dim_qk": 128.5}),
    ({"head_dim_qk": 128}, {"head_dim_qk": 128.0}),
    ({"sinks": True}, {"sinks": 1.5}),
    ({"q_dtype": "bf16"}, {"q_dtype": "BF16 "}),
])
def test_the_keyword_form_answers_what_the_full_path_answers(toy_env, cached, other):
    select_kernel(**{**DECODE, **cached})  # cached under its key
    fields = {**DECODE, **other}
    try:
        expected = KernelRequest(**fields)
    except RequestError as exc:
        with pytest.raises(RequestError) as got:
            select_kernel(**fields)
        assert str(got.value) == str(exc)
    else:
        assert select_kernel(**fields).request == expected


def test_unhashable_and_unusual_arguments_take_the_full_path(toy_env):
    select_kernel(**{**DECODE, "arch": (9, 0)})  # a tuple: valid, not keyed
    assert select_kernel(**{**DECODE, "arch": (9, 0)}).request.arch.value == "sm_90"
    with pytest.raises(RequestError, match=r"request\.head_dim_qk"):
        select_kernel(**{**DECODE, "head_dim_qk": [128]})
    assert api._fields_key({"op": "mha_decode", "group": object()}) is None


def test_an_unavailable_kernel_drops_the_keyword_cache_too(toy_env):
    first = select_kernel(**DECODE)
    selector.default_selector().mark_unavailable(first.name, "unavailable: broken here")
    second = select_kernel(**DECODE)
    assert second is not first and second.name != first.name


def test_keyword_hits_from_many_threads_get_one_selection(toy_env):
    barrier = threading.Barrier(8)
    out = []

    def one():
        barrier.wait()
        out.extend(select_kernel(**DECODE, kv_len=k) for k in range(1, 200))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_bucket = {}
    for s in out:
        assert by_bucket.setdefault(s.request.kv_len, s) is s


# ------------------------------------------------------------------ memory

def _big_manifest(tmp_path, n: int = 1000):
    """``n`` mla_decode kernels with varied constraints; solutions that need only pydantic (installed anywhere)."""
    lines = ["schema_version: 1", "solutions:", "  triton: {requires: [pydantic], install: pip install pydantic}",
             "attention_plan: {postwrite_min_priority: 12, refs: [test]}", "kernels:"]
    for i in range(n):
        lines.append(
            f"  - {{name: big-{i:04d}, op: mla_decode, solution: triton, backend: triton,"
            f" adapter: 'registry.adapters.triton:TritonMLADecode', arch: {{min: sm_80, max: sm_{[90, 100, 120][i % 3]}}},"
            f" dtypes: {{q_dtype: [bf16], kv_dtype: {{equals: q_dtype, or: [fp8_e4m3]}}}},"
            f" shapes: {{kv_lora_rank: [512], page_size: {{min: {1 + i % 64}, multiple_of: {1 + i % 2}}}, q_len: {{max: {1 + i % 8}}}}},"
            f" features: {{return_lse: {str(i % 2 == 0).lower()}}}, priority: {4 + i % 8}, refs: [test],"
            f" exclude: [{{when: {{page_size: {i % 97 + 1}}}, reason: bad page, ref: test}}]}}"
        )
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


MLA = dict(op="mla_decode", arch="sm_90", q_dtype="bf16", kv_dtype="fp8_e4m3", num_qo_heads=128, kv_lora_rank=512,
           qk_rope_head_dim=64, page_size=64)
BUCKETS = [(1 << b, 1 << k) for b in range(16) for k in range(20)]


def _bytes_per_entry(fill) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / len(BUCKETS)
    finally:
        tracemalloc.stop()


NO_ARCH = {k: v for k, v in MLA.items() if k != "arch"}
H200 = Gpu("NVIDIA H200", "9.0", Arch("sm_90"), "570.86.15")


@pytest.mark.parametrize("arch_given", [True, False], ids=["arch given", "arch detected"])
def test_a_cached_selection_takes_under_3_kb_on_a_1000_kernel_op(tmp_path, arch_given):
    """Arch detected (an engine's usual request): the entry keeps the caller's request as its key and the selection
    the completed one, with the arch."""
    fields = MLA if arch_given else NO_ARCH
    manifest = load_manifest(_big_manifest(tmp_path))
    sel = Selector(manifest, Platform.hypothetical("sm_90"), cache_size=len(BUCKETS) + 1)
    first = sel.solve(KernelRequest(**fields))
    assert len(first.eligible) > 300 and first.request.arch == "sm_90"  # compiled, a large eligible set, completed
    per_entry = _bytes_per_entry(lambda: [sel.solve(KernelRequest(**fields, batch_size=b, kv_len=k)) for b, k in BUCKETS])
    assert len(sel._cache) == len(BUCKETS) + 1
    assert all(s.request.arch == "sm_90" for s in sel._cache.values())
    assert per_entry <= 3 * 1024, per_entry


@pytest.mark.parametrize("arch_given", [True, False], ids=["arch given", "arch detected"])
def test_a_keyword_cache_entry_takes_under_3_kb_on_a_1000_kernel_op(tmp_path, monkeypatch, arch_given):
    """The keyword form keeps its key, the request built from it and the selection (arch detected: also the
    completed request)."""
    fields = MLA if arch_given else NO_ARCH
    monkeypatch.setenv(ENV_MANIFEST, str(_big_manifest(tmp_path)))
    monkeypatch.setenv(ENV_CACHE_SIZE, str(2 * len(BUCKETS)))
    monkeypatch.setenv(ENV_PERF, "off")  # no committed table for a GPU that is not there
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    monkeypatch.setitem(GPU_SOURCES, TORCH, lambda: ((H200,), ""))  # as if torch saw an H200
    selector.reset()
    first = select_kernel(**fields)
    assert len(first.eligible) > 300 and first.request.arch == "sm_90"
    per_entry = _bytes_per_entry(lambda: [select_kernel(**fields, batch_size=b, kv_len=k) for b, k in BUCKETS])
    assert len(selector.default_selector()._by_fields) == len(BUCKETS) + 1
    assert per_entry <= 3 * 1024, per_entry


# ------------------------------------------------------------------ memory, ranked by a perf table

TABLE_GAIN = 512
"""Bytes a perf table may add to a cached entry (the ranked kernels' bits): not a string per kernel it cannot time."""


def _synthetic_table(buckets, kernels) -> PerfTable:
    """An H200 table of ``MLA`` buckets timing ``kernels`` (each at its own speed, varied a little by bucket)."""
    entries = tuple(
        PerfEntry.model_validate(entry_data(KernelRequest(**MLA, batch_size=b, kv_len=k),
                                            {n: 10.0 + j + b * k / 1e4 + i % 3 for j, n in enumerate(kernels)}))
        for i, (b, k) in enumerate(buckets))
    return PerfTable(gpu="NVIDIA H200", arch="sm_90", entries=entries)


@pytest.mark.parametrize("bucket", ["measured", "predicted"])
@pytest.mark.parametrize("arch_given", [True, False], ids=["arch given", "arch detected"])
def test_a_cached_selection_ranked_by_a_perf_table_takes_under_3_kb_on_a_1000_kernel_op(tmp_path, bucket, arch_given):
    """The table times 4 kernels of the 1000: every bucket (measured) or 4 far from these (the rest predicted).  The
    entry keeps no time and no reason for the 900-odd kernels it cannot time: explain words them when read."""
    fields = MLA if arch_given else NO_ARCH
    manifest = load_manifest(_big_manifest(tmp_path))
    platform = Platform.hypothetical("sm_90")
    fastest = [k.name for k in Selector(manifest, platform).solve(KernelRequest(**MLA)).eligible[-4:]]
    table = _synthetic_table(BUCKETS if bucket == "measured" else [(1, 1 << 21), (64, 1 << 22), (1024, 1 << 23)], fastest)
    sizes = {}
    for perf in (None, table):
        sel = Selector(manifest, platform, perf=perf, cache_size=len(BUCKETS) + 1)
        sel.solve(KernelRequest(**fields, batch_size=3, kv_len=3))  # compiled; the table's model fitted
        sizes[perf is None] = _bytes_per_entry(
            lambda: [sel.solve(KernelRequest(**fields, batch_size=b, kv_len=k)) for b, k in BUCKETS])
    timed = sel.solve(KernelRequest(**fields, batch_size=8, kv_len=512))
    assert timed.estimates.kind == bucket and len(timed.estimates.missing) > 300
    assert timed.name in fastest and {k.name for k in timed.eligible[:4]} == set(fastest)  # the table ranked them
    assert sizes[False] <= 3 * 1024 and sizes[False] - sizes[True] <= TABLE_GAIN, sizes


H200_TABLE = bundled_perf_dir() / "nvidia-h200-sm_90.yaml"
BUNDLED_DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
                      page_size=16)


@pytest.mark.parametrize("arch_given", [True, False], ids=["arch given", "arch detected"])
def test_a_keyword_cache_entry_ranked_by_the_committed_h200_table_takes_under_3_kb(tmp_path, monkeypatch, arch_given):
    """The engine's case on an H200: the bundled manifest, the committed table (picked up for the GPU torch sees;
    named by KERNELSEL_PERF when the arch is given, since then torch is not asked), the keyword form."""
    pytest.importorskip("torch", reason="the default selector ranks installed kernels: torch's references at least")
    fields = BUNDLED_DECODE if arch_given else {k: v for k, v in BUNDLED_DECODE.items() if k != "arch"}
    monkeypatch.setenv(ENV_CACHE_SIZE, str(2 * len(BUCKETS)))
    monkeypatch.setenv(ENV_TUNE_CACHE, str(tmp_path))  # no tuned table of this machine
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    monkeypatch.setitem(GPU_SOURCES, TORCH, lambda: ((H200,), ""))  # as if torch saw an H200
    sizes = {}
    for perf in ("off", str(H200_TABLE) if arch_given else None):
        if perf is None:
            monkeypatch.delenv(ENV_PERF, raising=False)
        else:
            monkeypatch.setenv(ENV_PERF, perf)
        selector.reset()
        select_kernel(**fields, batch_size=3, kv_len=3)  # the table's model fitted
        sizes[perf == "off"] = _bytes_per_entry(lambda: [select_kernel(**fields, batch_size=b, kv_len=k) for b, k in BUCKETS])
    ranked = [select_kernel(**fields, batch_size=b, kv_len=k).estimates for b, k in BUCKETS]
    assert {e.kind for e in ranked} == {"measured", "predicted"}  # 12 of the buckets measured, the others predicted
    assert all(e.source.endswith(f"{H200_TABLE.name}, NVIDIA H200") for e in ranked)
    assert sizes[False] <= 3 * 1024 and sizes[False] - sizes[True] <= TABLE_GAIN, sizes


@pytest.mark.parametrize("arch_given", [True, False], ids=["arch given", "arch detected"])
def test_a_cached_selection_ranked_by_the_committed_h200_table_takes_under_3_kb(arch_given):
    """A request object against the bundled manifest and the committed table, measured buckets among the predicted."""
    fields = BUNDLED_DECODE if arch_given else {k: v for k, v in BUNDLED_DECODE.items() if k != "arch"}
    manifest, platform, table = load_manifest(), Platform.hypothetical("sm_90"), load_perf_table(H200_TABLE)
    sizes = {}
    for perf in (None, table):
        sel = Selector(manifest, platform, perf=perf, cache_size=len(BUCKETS) + 1)
        sel.solve(KernelRequest(**fields, batch_size=3, kv_len=3))
        sizes[perf is None] = _bytes_per_entry(
            lambda: [sel.solve(KernelRequest(**fields, batch_size=b, kv_len=k)) for b, k in BUCKETS])
    assert {s.estimates.kind for s in sel._cache.values()} == {"measured", "predicted"}
    assert sizes[False] <= 3 * 1024 and sizes[False] - sizes[True] <= TABLE_GAIN, sizes
