"""Selection cost on the CPU: cache hits against plain dict lookups, uncached solves up to 1000 kernels, memory.

Prints JSON (``--out`` also writes it).  Every figure names the op and how
many kernels it covers; ratios compare figures taken in this one run, since
machines differ.  Targets, checked at the end (never asserted in tests):

* a hit with the same request object <= 0.3 us, with an equal but different one <= 0.5 us
  (baselines: a dict keyed by the request object, looked up with that object / an equal one);
* the keyword form ``select_kernel(op=..., arch=..., batch_size=..., kv_len=...)`` on a hit <= 2 us
  (baseline: a dict keyed by the tuple of the same keyword arguments);
* an uncached solve (``solve()``, the op's compiled index warm) <= 15 us for every op of the bundled
  manifest and for 250/500/1000-kernel ops;
* <= 3 KB per cached entry on a 1000-kernel op (tracemalloc: the request, the selection, the keys), for a
  request object and the keyword form, each with the arch given and detected; and ranked by a perf table:
  on that op with a table timing 4 of its kernels (every bucket measured, or predicted from 3 others), and on
  the bundled manifest's mha_decode with the committed H200 table (an engine's case on an H200).

Runs on a plain ``pip install -e .`` (no torch, no triton, no GPU): the
solver figures use a hypothetical platform (``Platform.hypothetical``: every
library assumed installed), and the ``select_kernel`` figures use the default
selector on a generated manifest whose solutions need only pydantic (installed
with kernelsel), pointed to by ``KERNELSEL_MANIFEST`` -- so every machine can
serve the request and a hit is a hit.  For the keyword form without an arch,
the GPU the default selector finds is a stand-in H200 (``GPU_SOURCES``; nothing
runs on it).

    python bench/selection.py [--repeat N] [--out bench/results/selection-cpu.json]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform as host
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.loader import bundled_perf_dir, load_manifest, load_perf_table  # noqa: E402
from registry.perf import PerfEntry, PerfTable, entry_data  # noqa: E402
from registry.vocab import Arch, Op  # noqa: E402
import selector  # noqa: E402
from selector import KernelRequest, Platform, Selector, select_kernel  # noqa: E402
from selector.platform import GPU_SOURCES, TORCH, Gpu  # noqa: E402
from selector.solver import solve  # noqa: E402

ARCH = "sm_90"
MLA = dict(op="mla_decode", arch=ARCH, q_dtype="bf16", kv_dtype="fp8_e4m3", num_qo_heads=128, kv_lora_rank=512,
           qk_rope_head_dim=64, qk_nope_head_dim=128, page_size=64)
"""The request of the synthetic-manifest figures (and, with ``batch_size``/``kv_len``, of the hit figures)."""

PER_OP = {
    "mha_decode": dict(op="mha_decode", arch=ARCH, q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
                       page_size=16),
    "mha_extend": dict(op="mha_extend", arch=ARCH, q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
                       page_size=16),
    "mha_prefill": dict(op="mha_prefill", arch=ARCH, q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8),
    "mla_decode": MLA,
    "sparse_mla_decode": dict(MLA, op="sparse_mla_decode", topk=2048),
}
"""One ordinary request per op of the bundled manifest."""

SIZES = (250, 500, 1000)


def best_ns(fn, *, number: int, repeat: int) -> float:
    """The best of ``repeat`` rounds of the mean time per call of ``number`` calls, in ns.

    The best round, not the median: on a shared machine other processes only
    ever add time, so the fastest round is the closest to the code's own cost
    (``timeit``'s advice).  The load average is recorded with the results.
    """
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter_ns() - t0) / number)
    return min(rounds)


def synthetic_manifest(n: int, op: str, directory: Path) -> Path:
    """A whole manifest of ``n`` kernels of ``op`` with varied constraints: arch ranges, dtype sets and an equals
    relation, shape lists, minimums, maximums and steps, features, an exclusion each; priorities in four bands.
    Its one solution needs only pydantic, so a default selector built from it finds every kernel installed
    (the adapters are never built)."""
    mla = op.endswith("mla_decode")
    adapter = {"mha_decode": "TritonMHADecode", "mla_decode": "TritonMLADecode",
               "sparse_mla_decode": "TritonSparseMLADecode"}[op]
    lines = ["schema_version: 1", "solutions:", "  triton: {requires: [pydantic], install: pip install pydantic}",
             "attention_plan: {postwrite_min_priority: 12, refs: [synthetic]}", "kernels:"]
    for i in range(n):
        shapes = (f"kv_lora_rank: [512], page_size: {{min: {1 + i % 64}, multiple_of: {1 + i % 2}}}, q_len: {{max: {1 + i % 8}}}"
                  if mla else
                  f"head_dim_qk: [64, 128, 256], head_dim_vo: {{equals: head_dim_qk}}, page_size: {{min: {1 + i % 64}}},"
                  f" gqa_group_size: {{max: {1 << (i % 5)}, power_of_two: true}}")
        lines.append(
            f"  - {{name: synth-{i:04d}, op: {op}, solution: triton, backend: triton,"
            f" adapter: 'registry.adapters.triton:{adapter}', arch: {{min: sm_80, max: sm_{[90, 100, 120][i % 3]}}},"
            f" dtypes: {{q_dtype: [bf16, fp16], kv_dtype: {{equals: q_dtype, or: [fp8_e4m3]}}}}, shapes: {{{shapes}}},"
            f" features: {{return_lse: {str(i % 2 == 0).lower()}}}, priority: {4 + i % 16}, refs: [synthetic],"
            f" exclude: [{{when: {{page_size: {2 * (1 + i % 64)}}}, reason: synthetic, ref: synthetic}}]}}"
        )
    path = directory / f"synthetic-{op}-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def synthetic_table(buckets, kernels) -> PerfTable:
    """An H200 table of ``MLA`` buckets timing ``kernels`` (each at its own speed, varied a little by bucket)."""
    entries = tuple(
        PerfEntry.model_validate(entry_data(KernelRequest(**MLA, batch_size=b, kv_len=k),
                                            {n: 10.0 + j + b * k / 1e4 + i % 3 for j, n in enumerate(kernels)}))
        for i, (b, k) in enumerate(buckets))
    table = PerfTable(gpu="NVIDIA H200", arch=ARCH, entries=entries)
    table._path = "synthetic table"
    return table


def bytes_per_entry(fill, entries: int) -> float:
    """Memory the cache keeps per entry: traced bytes after ``fill()`` minus before, over ``entries``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / entries
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="rounds per figure, times 4 for the microsecond ones")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    r = 4 * args.repeat  # short rounds, many of them: on a shared machine the best one dodges preemption
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), host.processor()) if Path("/proc/cpuinfo").exists() else host.processor()
    results: dict = {"python": sys.version.split()[0], "host": host.node(), "cpu": cpu, "cores": os.cpu_count(),
                     "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                     "timing": "best of --repeat rounds, each the mean of many calls",
                     "platform": f"Platform.hypothetical({ARCH!r}) for solve(); the default selector on a generated "
                                 "manifest whose solution needs only pydantic for select_kernel()"}
    tmp = Path(tempfile.mkdtemp(prefix="kernelsel-bench-"))

    # ---------------------------------------------------------------- uncached solves
    bundled = load_manifest()
    hypothetical = Platform.hypothetical(ARCH)
    per_op = {}
    for op, fields in PER_OP.items():
        request = KernelRequest(**fields)
        gc.collect()  # one-shot timings: a full collection falling inside one adds 50-250 ms
        t0 = time.perf_counter_ns()
        selection = solve(bundled, hypothetical, request)  # compiles the op once
        compile_us = (time.perf_counter_ns() - t0) / 1000
        per_op[op] = {"kernels": len(bundled.by_op[Op(op)]), "eligible": len(selection.eligible),
                      "first_solve_with_compile_us": round(compile_us, 1),
                      "uncached_solve_us": best_ns(lambda: solve(bundled, hypothetical, request), number=500,
                                                     repeat=r) / 1000}
    results["bundled"] = {"kernels": len(bundled.kernels), "per_op": per_op,
                          "load_validate_ms": best_ns(lambda: load_manifest(), number=1, repeat=args.repeat) / 1e6}
    synthetic = {}
    manifests = {}
    for op in ("mla_decode", "mha_decode"):
        for n in SIZES:
            m = manifests[op, n] = load_manifest(synthetic_manifest(n, op, tmp))
            fields = MLA if op == "mla_decode" else PER_OP["mha_decode"]
            request = KernelRequest(**fields)
            gc.collect()
            t0 = time.perf_counter_ns()
            selection = solve(m, hypothetical, request)
            compile_ms = (time.perf_counter_ns() - t0) / 1e6
            unseen = [KernelRequest(**{**fields, "page_size": 4096 + 8 * i}) for i in range(300)]
            stream = iter(unseen * r)
            synthetic[f"{op}/{n}"] = {
                "op": op, "kernels": len(m.by_op[Op(op)]), "eligible": len(selection.eligible),
                "compile_ms": round(compile_ms, 1),
                "uncached_solve_us": best_ns(lambda: solve(m, hypothetical, request), number=300, repeat=r) / 1000,
                "uncached_solve_unseen_page_size_us": best_ns(lambda: solve(m, hypothetical, next(stream)),
                                                                number=300, repeat=r) / 1000,
                "explain_ms": best_ns(lambda: selection.explain(), number=1, repeat=3) / 1e6,
            }
    results["synthetic"] = synthetic

    # ---------------------------------------------------------------- hits (the default selector)
    path = synthetic_manifest(1000, "mla_decode", tmp)
    os.environ["KERNELSEL_MANIFEST"] = str(path)
    os.environ["KERNELSEL_CACHE_SIZE"] = "100000"  # the memory figures fill more than the default 4096
    selector.reset()
    kw = dict(op="mla_decode", arch=ARCH, batch_size=8, kv_len=4000)
    same = KernelRequest(**kw)
    equal = KernelRequest(**kw)
    hit = select_kernel(same)
    assert hit.kernel is not None and select_kernel(equal) is hit and select_kernel(**kw) is hit
    by_request = {same: hit}
    by_kwargs = {tuple(kw.items()): hit}

    def kwargs_lookup(**fields):
        return by_kwargs.get(tuple(fields.items()))

    growing = itertools.cycle(range(4097, 8193))  # one kv_len bucket
    n = 4000
    hits = {
        "manifest": f"{path.name} (mla_decode, {len(hit.manifest.by_op[Op.MLA_DECODE])} kernels)",
        "dict_get_same_request_ns": best_ns(lambda: by_request.get(same), number=n, repeat=r),
        "dict_get_equal_request_ns": best_ns(lambda: by_request.get(equal), number=n, repeat=r),
        "dict_get_kwargs_tuple_ns": best_ns(lambda: kwargs_lookup(op="mla_decode", arch=ARCH, batch_size=8, kv_len=4000),
                                              number=n, repeat=r),
        "hit_same_request_ns": best_ns(lambda: select_kernel(same), number=n, repeat=r),
        "hit_equal_request_ns": best_ns(lambda: select_kernel(equal), number=n, repeat=r),
        "hit_keyword_ns": best_ns(lambda: select_kernel(op="mla_decode", arch=ARCH, batch_size=8, kv_len=4000),
                                    number=n, repeat=r),
        "hit_keyword_growing_kv_len_ns": best_ns(
            lambda: select_kernel(op="mla_decode", arch=ARCH, batch_size=8, kv_len=next(growing)), number=n, repeat=r),
        "build_request_ns": best_ns(lambda: KernelRequest(**kw), number=200, repeat=r),
    }
    results["hits"] = hits

    # ---------------------------------------------------------------- memory per cached entry
    buckets = [(1 << b, 1 << k) for b in range(16) for k in range(20)]
    big = manifests["mla_decode", 1000]
    no_arch = {k: v for k, v in MLA.items() if k != "arch"}
    cached = Selector(big, hypothetical, cache_size=10 * len(buckets))
    cached.solve(KernelRequest(**MLA))
    detected = Selector(big, hypothetical, cache_size=10 * len(buckets))  # arch given by the platform, as if detected
    detected.solve(KernelRequest(**no_arch))
    select_kernel(**MLA)
    results["memory"] = {
        "op": f"mla_decode, {len(big.by_op[Op.MLA_DECODE])} kernels, {len(cached.solve(KernelRequest(**MLA)).eligible)} eligible",
        "entries": len(buckets),
        "bytes_per_entry_request_object": bytes_per_entry(
            lambda: [cached.solve(KernelRequest(**MLA, batch_size=b, kv_len=k)) for b, k in buckets], len(buckets)),
        "bytes_per_entry_keyword_form": bytes_per_entry(
            lambda: [select_kernel(**MLA, batch_size=b, kv_len=k) for b, k in buckets], len(buckets)),
        "bytes_per_entry_arch_detected": bytes_per_entry(
            lambda: [detected.solve(KernelRequest(**no_arch, batch_size=b, kv_len=k)) for b, k in buckets], len(buckets)),
    }
    # the keyword form without arch, as an engine calls it: the default selector finds the GPU through torch, here
    # a stand-in H200 (nothing runs on it); no perf table, as above
    GPU_SOURCES[TORCH] = lambda: ((Gpu("NVIDIA H200", "9.0", Arch("sm_90"), ""),), "")
    os.environ["KERNELSEL_PERF"] = "off"
    os.environ["KERNELSEL_TUNE_CACHE"] = str(tmp / "tuned")  # no tuned table of this machine
    selector.reset()
    assert select_kernel(**no_arch).request.arch is Arch(ARCH)
    results["memory"] |= {
        "bytes_per_entry_keyword_form_arch_detected": bytes_per_entry(
            lambda: [select_kernel(**no_arch, batch_size=b, kv_len=k) for b, k in buckets], len(buckets)),
        "note": "traced bytes the cache keeps per entry: the request (and, arch detected, the completed request with the "
                "arch), the selection, the keyword key and the dict slots",
    }

    # ranked by a perf table: on the 1000-kernel op, a table timing its 4 fastest eligible kernels in every bucket
    # (measured) or in 3 buckets far from these (predicted); the others have no time, and a cached entry keeps none
    fastest = [k.name for k in cached.solve(KernelRequest(**MLA)).eligible[-4:]]
    tables = {"measured": synthetic_table(buckets, fastest),
              "predicted": synthetic_table([(1, 1 << 21), (64, 1 << 22), (1024, 1 << 23)], fastest)}
    with_table = {}
    for kind, table in tables.items():
        for arch, fields in (("arch_given", MLA), ("arch_detected", no_arch)):
            timed = Selector(big, hypothetical, perf=table, cache_size=10 * len(buckets))
            timed.solve(KernelRequest(**fields, batch_size=3, kv_len=3))  # the table's model fitted once
            with_table[f"bytes_per_entry_{kind}_bucket_{arch}"] = bytes_per_entry(
                lambda: [timed.solve(KernelRequest(**fields, batch_size=b, kv_len=k)) for b, k in buckets], len(buckets))
            assert timed.solve(KernelRequest(**fields, batch_size=8, kv_len=512)).estimates.kind == kind
    results["memory_with_perf_table"] = {
        "op": results["memory"]["op"] + ", 4 of them timed by the table", "entries": len(buckets), **with_table}
    # the bundled manifest and the committed H200 table, as an engine on an H200 gets it: mha_decode (12 of the
    # buckets measured, the others predicted), the keyword form; arch given (KERNELSEL_PERF names the table: the
    # default selector does not import torch to find the GPU then) and detected (the table found for the GPU)
    h200 = bundled_perf_dir() / "nvidia-h200-sm_90.yaml"
    decode = PER_OP["mha_decode"]
    decode_no_arch = {k: v for k, v in decode.items() if k != "arch"}
    del os.environ["KERNELSEL_MANIFEST"]
    committed = {}
    for arch, fields, perf in (("arch_given", decode, str(h200)), ("arch_detected", decode_no_arch, None)):
        if perf is None:
            del os.environ["KERNELSEL_PERF"]
        else:
            os.environ["KERNELSEL_PERF"] = perf
        selector.reset()
        select_kernel(**fields, batch_size=3, kv_len=3)
        committed[f"bytes_per_entry_keyword_form_{arch}"] = bytes_per_entry(
            lambda: [select_kernel(**fields, batch_size=b, kv_len=k) for b, k in buckets], len(buckets))
        assert {select_kernel(**fields, batch_size=b, kv_len=k).estimates.kind for b, k in buckets} == {
            "measured", "predicted"}
    table = load_perf_table(h200)
    for arch, fields in (("arch_given", decode), ("arch_detected", decode_no_arch)):
        plain = Selector(bundled, hypothetical, perf=table, cache_size=10 * len(buckets))
        plain.solve(KernelRequest(**fields, batch_size=3, kv_len=3))
        committed[f"bytes_per_entry_request_object_{arch}"] = bytes_per_entry(
            lambda: [plain.solve(KernelRequest(**fields, batch_size=b, kv_len=k)) for b, k in buckets], len(buckets))
    results["memory_with_perf_table"]["bundled"] = {
        "op": f"mha_decode, {len(bundled.by_op[Op.MHA_DECODE])} kernels", "table": f"perf/{h200.name}", **committed}

    # ---------------------------------------------------------------- ratios and targets
    worst_solve = max([v["uncached_solve_us"] for v in per_op.values()] + [v["uncached_solve_us"] for v in synthetic.values()]
                      + [v["uncached_solve_unseen_page_size_us"] for v in synthetic.values()])
    mem = results["memory"]
    timed = results["memory_with_perf_table"]
    every_entry = [v for k, v in mem.items() if k.startswith("bytes_per_entry")] + [
        v for k, v in {**timed, **timed["bundled"]}.items() if k.startswith("bytes_per_entry")]
    results["ratios"] = {
        "hit_same_over_dict_get_same": hits["hit_same_request_ns"] / hits["dict_get_same_request_ns"],
        "hit_equal_over_dict_get_equal": hits["hit_equal_request_ns"] / hits["dict_get_equal_request_ns"],
        "hit_keyword_over_dict_get_kwargs_tuple": hits["hit_keyword_ns"] / hits["dict_get_kwargs_tuple_ns"],
        "hit_keyword_over_building_the_request": hits["hit_keyword_ns"] / hits["build_request_ns"],
        "uncached_solve_1000_over_250_kernels_mla": synthetic["mla_decode/1000"]["uncached_solve_us"]
        / synthetic["mla_decode/250"]["uncached_solve_us"],
    }
    results["targets"] = {
        "hit_same_request_us<=0.3": hits["hit_same_request_ns"] / 1000 <= 0.3,
        "hit_equal_request_us<=0.5": hits["hit_equal_request_ns"] / 1000 <= 0.5,
        "hit_keyword_us<=2": hits["hit_keyword_ns"] / 1000 <= 2,
        "uncached_solve_us<=15_every_op_up_to_1000_kernels": worst_solve <= 15,
        "bytes_per_entry<=3072_every_form_with_and_without_a_perf_table": max(every_entry) <= 3072,
    }
    results["worst_uncached_solve_us"] = worst_solve
    results["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
