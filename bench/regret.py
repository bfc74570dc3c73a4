"""Regret of kernel selection on the GPU: how much slower each strategy's kernel is than the fastest eligible one.

For every request of ``bench/regret_suite.yaml`` this times every eligible
kernel with ``kernelsel bench``'s harness (``selector.tools.bench``: the adapter
from ``select_kernel(..., kernel=NAME)``, CUDA-graph replay, L2 flushed,
CUDA events, median) and FlashInfer's own ``backend="auto"`` on the same
inputs.  Per request and strategy it reports chosen time / best eligible
time, then the geometric mean and the worst case of that ratio:

* ``perf_table`` -- kernelsel as it ships: the eligible kernels ranked by a
  perf table recorded earlier (``--perf``; default: the committed table for
  this GPU), measured times where the table has the request's bucket and
  predicted ones (``selector.prediction``) where it does not;
* ``measured_only`` -- the same table, its recorded buckets only
  (``KERNELSEL_PREDICT=off``: other buckets rank by priority);
* ``predicted`` -- predictions only: each request ranked by a model fitted to
  the table without the request's own bucket (for a suite whose buckets are
  not in the table, the same as ``perf_table``);
* ``tuned`` (``--tune``) -- tuning on first use (``selector.tuning``): the
  eligible kernels timed within the tuning budget on their own workload, the
  fastest of those times picked; each request also reports what tuning cost;
* ``priority`` -- kernelsel by manifest priority alone;
* ``flashinfer_auto`` -- FlashInfer choosing for itself, called directly:
  ``trtllm_batch_decode_with_kv_cache(backend="auto")`` (mha_decode),
  ``BatchPrefillWithPagedKVCacheWrapper(backend="auto")`` (mha_extend),
  ``BatchMLAPagedAttentionWrapper(backend="auto")`` (mla_decode).  Its ratio
  may be below 1 when it runs a kernel the manifest does not list.  Not
  scored on requests with sinks, a soft cap or a sliding window (the calls
  above do not pass them: they would time another computation).

Targets with the perf table: geometric mean <= 1.03, worst <= 1.15.

Ratios are per strategy and op too (``by_op``).  The run also times a
device-to-device copy (``meta.copy_tbps``, read and write counted): the ceiling
``kernelsel bench --plot`` draws.

Two device calls: one records the table for exactly the suites' buckets,
a later one measures again and reports (a table never grades its own run)::

    python bench/regret.py --record perf/ --suite bench/regret_suite.yaml      # two calls, each under
    python bench/regret.py --record perf/ --suite bench/record_suite.yaml      # 10 minutes: they merge
    python bench/regret.py --perf perf/nvidia-h200-sm_90.yaml   # -> bench/results/regret-nvidia-h200.json
    python bench/regret.py --perf perf/nvidia-h200-sm_90.yaml --suite bench/heldout_suite.yaml --tune \
        --out bench/results/heldout-nvidia-h200.json

``--device cpu --arch sm_90`` runs the same code on the CPU (wall clock,
tests; with ``TRITON_INTERPRET=1`` the Triton kernels run too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registry.contracts import sm_scale  # noqa: E402
from registry.loader import load_manifest  # noqa: E402
from registry.perf import PerfTable  # noqa: E402
from selector import tuning  # noqa: E402
from selector.tools import bench  # noqa: E402
from registry.perf_policy import choose_perf_table  # noqa: E402
from selector.api import Selector  # noqa: E402
from selector.overrides import Overrides  # noqa: E402
from selector.tuning import TuneBudget  # noqa: E402

SUITE = ROOT / "bench" / "regret_suite.yaml"
TARGETS = {"perf_table": {"geomean": 1.03, "worst": 1.15}}
AUTO = "flashinfer-auto"


# ------------------------------------------------------------ FlashInfer's own choice


def _flashinfer() -> Any:
    from registry.adapters.flashinfer_common import flashinfer

    return flashinfer()


def _workspace(work: Any, tag: str, nbytes: int) -> Any:
    """A zeroed buffer per tag: XQA keeps semaphores in its first 8 MiB, which no FA plan may overwrite."""
    from registry.adapters.flashinfer_common import float_workspace

    return float_workspace(work.device, f"regret-flashinfer-auto-{tag}", nbytes)


def _scales(work: Any, *names: str) -> list[float]:
    return [float(work.scales.get(f"{n}_scale", 1.0)) for n in names]


def auto_decode(work: Any) -> Callable[[], Any]:
    """``trtllm_batch_decode_with_kv_cache(backend="auto")``: trtllm-gen on sm_10x, XQA elsewhere."""
    from registry.adapters.flashinfer_common import XQA_WORKSPACE_BYTES

    fi, r, md = _flashinfer(), work.request, work.metadata
    q, k, v = work.inputs
    q_scale, k_scale, v_scale = _scales(work, "q", "k", "v")
    bmm1 = sm_scale(md, r, kernel="flashinfer auto decode") * q_scale * k_scale
    ws, out, max_len = _workspace(work, "xqa", XQA_WORKSPACE_BYTES), work.new_out(), int(md.seq_lens.max())
    return lambda: fi.decode.trtllm_batch_decode_with_kv_cache(
        q, (k, v), ws, md.block_table, md.seq_lens, max_len, bmm1_scale=bmm1, bmm2_scale=v_scale, out=out,
        out_dtype=out.dtype, kv_layout="NHD", backend="auto", q_len_per_req=r.q_len,
    )


def auto_extend(work: Any) -> Callable[[], Any]:
    """``BatchPrefillWithPagedKVCacheWrapper(backend="auto")``: fa3 on sm_90a when eligible, else fa2."""
    from registry.adapters.flashinfer_common import FLOAT_WORKSPACE_BYTES
    from registry.adapters.paged import block_table_to_csr

    fi, r, md = _flashinfer(), work.request, work.metadata
    q, k, v = work.inputs
    out = work.new_out()
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(_workspace(work, "fa", FLOAT_WORKSPACE_BYTES), "NHD", backend="auto")
    indptr, indices, last = block_table_to_csr(md.block_table, md.seq_lens, r.page_size)
    wrapper.plan(
        md.cu_seqlens_q, indptr, indices, last, r.num_qo_heads, r.num_kv_heads, r.head_dim_qk, r.page_size,
        head_dim_vo=r.head_dim_vo, causal=md.causal, q_data_type=q.dtype, kv_data_type=k.dtype,
        o_data_type=out.dtype, seq_lens=md.seq_lens,
    )
    q_scale, k_scale, v_scale = _scales(work, "q", "k", "v")
    extra = {}
    if q_scale * k_scale != 1.0:
        extra["q_scale"] = q_scale * k_scale
    if v_scale != 1.0:
        extra["v_scale"] = v_scale
    return lambda: wrapper.run(q, (k, v), out=out, **extra)


def auto_mla(work: Any) -> Callable[[], Any]:
    """``BatchMLAPagedAttentionWrapper(backend="auto")``: on sm_90a fa3, then fa2."""
    from registry.adapters.flashinfer_common import FLOAT_WORKSPACE_BYTES
    from registry.adapters.paged import block_table_to_csr, uniform_cu_seqlens

    fi, r, md = _flashinfer(), work.request, work.metadata
    q_nope, q_pe, kv = work.inputs
    out = work.new_out()
    batch = md.seq_lens.shape[0]
    kv_indptr, kv_indices, _ = block_table_to_csr(md.block_table, md.seq_lens, r.page_size)
    qo_indptr = uniform_cu_seqlens(batch, r.q_len, device=q_nope.device)
    scale = sm_scale(md, r, kernel="flashinfer auto MLA")
    fp8_kv = kv.element_size() == 1
    wrapper = fi.mla.BatchMLAPagedAttentionWrapper(_workspace(work, "fa", FLOAT_WORKSPACE_BYTES), backend="auto")
    wrapper.plan(
        metadata=fi.mla.MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, md.seq_lens),
        num_heads=r.num_qo_heads, head_dim_ckv=r.kv_lora_rank, head_dim_kpe=r.qk_rope_head_dim,
        page_size=r.page_size, causal=r.q_len > 1, sm_scale=scale, q_data_type=q_nope.dtype,
        kv_data_type=kv.dtype, query_layout="split", kv_cache_layout="packed",
        scale_mode="kv-per-tensor" if fp8_kv else "default",
    )
    (kv_scale,) = _scales(work, "kv")
    extra = dict(ckv_scale=kv_scale, kpe_scale=kv_scale) if fp8_kv else {}
    return lambda: wrapper.run(query=(q_nope, q_pe), kv_cache=kv, out=out, **extra)


AUTO_BY_OP = {"mha_decode": auto_decode, "mha_extend": auto_extend, "mla_decode": auto_mla}
"""op -> builder of FlashInfer's backend="auto" call on a workload (ops where FlashInfer has one)."""

AUTO_OMITS = ("sinks", "logits_soft_cap", "sliding_window")
"""Features the builders above do not pass: FlashInfer auto is not scored on requests that need them."""


# ------------------------------------------------------------ scoring


def _choice(selector: Optional[Selector], case: bench.BenchCase, result: bench.CaseResult,
            best: Optional[bench.KernelTiming]) -> Optional[dict[str, Any]]:
    """What one kernelsel strategy picks for the case and its time relative to the best eligible kernel."""
    if selector is None:
        return None
    selection = selector.solve(case.request)
    if selection.kernel is None:
        return {"kernel": None, "error": selection.why}
    name = selection.kernel.name
    timing = next((t for t in result.kernels if t.kernel == name), None)
    row: dict[str, Any] = {"kernel": name, "perf_hit": bool(selection.perf_source)}
    if timing is None or not timing.ok or best is None:
        row["error"] = timing.error if timing is not None and timing.error else "chosen kernel not timed here"
        return row
    return row | {"us": round(timing.median_us, 3), "ratio": timing.median_us / best.median_us}


def _tuned_choice(tuned: Any, result: bench.CaseResult, best: Optional[bench.KernelTiming]) -> dict[str, Any]:
    """The kernel tuning on first use picks (fastest of its own, budgeted times), scored by this run's times."""
    if not tuned.times:
        return {"error": "; ".join(f"{k}: {e}" for k, e in tuned.errors.items()) or "no kernel timed"}
    name = min(tuned.times, key=lambda k: (tuned.times[k], k))
    timing = next((t for t in result.kernels if t.kernel == name and t.ok), None)
    row: dict[str, Any] = {"kernel": name}
    if timing is None or best is None:
        return row | {"error": "chosen kernel not timed here"}
    return row | {"us": round(timing.median_us, 3), "ratio": timing.median_us / best.median_us}


def score(case: bench.BenchCase, result: bench.CaseResult, strategies: dict[str, Optional[Selector]],
          tuned: Any = None) -> dict[str, Any]:
    """One case: every kernel's time, the best, and each strategy's choice with its ratio."""
    best = result.best()
    row = result.to_dict()
    row["best"] = {"kernel": best.kernel, "us": round(best.median_us, 3)} if best else None
    row["strategies"] = {}
    for name, selector in strategies.items():
        choice = _choice(selector, case, result, best)
        if choice is not None:
            row["strategies"][name] = choice
    if tuned is not None:
        row["strategies"]["tuned"] = _tuned_choice(tuned, result, best)
        row["tuning"] = tuned.to_dict()
    auto = next((t for t in result.extra if t.kernel == AUTO), None)
    if auto is not None:
        row["strategies"]["flashinfer_auto"] = (
            {"us": round(auto.median_us, 3), "ratio": auto.median_us / best.median_us, "mode": auto.mode}
            if auto.ok and best else {"error": auto.error or "no eligible kernel timed"}
        )
    return row


def _ratios(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    scored = [(r["strategies"][name]["ratio"], r["request"]) for r in rows if "ratio" in r["strategies"].get(name, {})]
    missing = [f"{r['request']}: {r['strategies'][name].get('error', '')}" for r in rows
               if name in r["strategies"] and "ratio" not in r["strategies"][name]]
    s: dict[str, Any] = {"requests": len(scored), "unscored": missing}
    if scored:
        worst = max(scored)
        s |= {"geomean": math.exp(sum(math.log(x) for x, _ in scored) / len(scored)),
              "worst": worst[0], "worst_request": worst[1], "picked_best": sum(1 for x, _ in scored if x <= 1.0)}
    return s


def summarize(rows: list[dict[str, Any]], targets: Optional[dict[str, dict[str, float]]] = None) -> dict[str, Any]:
    """Per strategy: how many requests scored, geometric mean and worst ratio (overall and per op), what was not."""
    targets = TARGETS if targets is None else targets
    names = sorted({s for r in rows for s in r["strategies"]})
    ops = sorted({r["op"] for r in rows})
    out = {}
    for name in names:
        s = _ratios(rows, name)
        if "geomean" in s and name in targets:
            t = targets[name]
            s["targets"] = t
            s["meets_targets"] = s["geomean"] <= t["geomean"] and s["worst"] <= t["worst"] and not s["unscored"]
        s["by_op"] = {op: {k: v for k, v in _ratios([r for r in rows if r["op"] == op], name).items() if k != "unscored"}
                      for op in ops}
        out[name] = s
    tuning = [r["tuning"] for r in rows if "tuning" in r]
    if tuning:
        out["tuning_cost"] = {
            "buckets": len(tuning),
            "timing_s_mean": sum(t["timing_s"] for t in tuning) / len(tuning),
            "timing_s_max": max(t["timing_s"] for t in tuning),
            "first_calls_s_mean": sum(t["first_calls_s"] for t in tuning) / len(tuning),
            "workload_s_mean": sum(t["workload_s"] for t in tuning) / len(tuning),
            "note": "timing_s: the budgeted warm-up and timed runs per bucket; first_calls_s: each kernel's first "
                    "call (plan and run; JIT builds happened earlier in this run, when the kernels were first timed)",
        }
    return out


# ------------------------------------------------------------ driver


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", help="suite file (default: bench/regret_suite.yaml); repeat to combine")
    p.add_argument("--tune", action="store_true", help="also score tuning on first use and report what it cost")
    p.add_argument("--tune-budget-ms", type=float, default=TuneBudget().seconds * 1e3,
                   help="timing budget per bucket for --tune (default: the runtime's)")
    p.add_argument("--perf", help="perf table for the perf_table strategy (default: the committed one for this GPU)")
    p.add_argument("--record", metavar="PATH", help="record the perf table for the suite's buckets into PATH "
                   "(a folder: <gpu>-<arch>.yaml in it), then stop")
    p.add_argument("--out", help="report JSON file or folder (default: bench/results/regret-<gpu>.json)")
    p.add_argument("--op", action="append", help="only this op's requests (repeatable)")
    p.add_argument("--repeats", type=int, default=bench.DEFAULT_REPEATS)
    p.add_argument("--warmup", type=int, default=bench.DEFAULT_WARMUP)
    p.add_argument("--device", default="cuda", help="cuda, or cpu (wall clock; needs --arch)")
    p.add_argument("--arch", help="with --device cpu: the nominal arch")
    p.add_argument("--manifest", help="manifest or overlay (default: bundled)")
    args = p.parse_args(argv)

    manifest = load_manifest(args.manifest)
    env = bench.environment(manifest, args.device, args.arch)
    suites = args.suite or [str(SUITE)]
    cases = [c for suite in suites for c in bench.load_suite(suite, env.arch)
             if not args.op or c.request.op.value in args.op]
    timer = bench.default_timer(args.device, args.repeats, args.warmup)
    timing_selector = Selector(manifest, env.platform, Overrides())

    if args.record:
        record = Path(args.record)
        if record.is_dir():  # a folder: the table's usual name for this GPU inside it
            record = record / bench.default_table_path(env.gpu, env.arch).name
        report = bench.run_bench(cases, timing_selector, env, timer=timer, out=record)
        print(json.dumps({"recorded": str(record), "gpu": env.gpu, "arch": env.arch.value, "requests": len(cases),
                          "buckets": len(report.table.entries) if report.table else 0,
                          "kernel_timings": report.recorded, "errors": report.errors, "method": report.method}, indent=1))
        return 0 if report.table is not None else 1

    table = choose_perf_table(args.perf, env.gpu, env.arch, setting_name="--perf").table
    if table is None:
        print(f"regret: no perf table for {env.gpu} ({env.arch.value}); perf_table strategy not scored "
              "(record one with --record, or pass --perf)", file=sys.stderr)
    elif table.gpu != env.gpu or table.arch is not env.arch:
        print(f"regret: {table.path} was recorded on {table.gpu} ({table.arch.value}); this is {env.gpu}", file=sys.stderr)
    strategies = {
        "perf_table": Selector(manifest, env.platform, Overrides(), table) if table is not None else None,
        "measured_only": Selector(manifest, env.platform, Overrides(predict=False), table) if table is not None else None,
        "priority": Selector(manifest, env.platform, Overrides()),
    }

    def predicted(case: bench.BenchCase) -> Optional[Selector]:
        """Predictions only: the table without the case's own bucket (the same table when it lacks the bucket)."""
        if table is None or case.key not in table.by_key:
            return strategies["perf_table"]
        rest = PerfTable(gpu=table.gpu, arch=table.arch, entries=tuple(e for e in table.entries if e.key != case.key))
        return Selector(manifest, env.platform, Overrides(), rest)

    budget = TuneBudget(seconds=args.tune_budget_ms / 1e3, max_bytes=1 << 62)

    def tuned(case: bench.BenchCase) -> Any:
        """Tuning on first use for the case's bucket, as the runtime does it (its own workload and budget)."""
        names = tuning.eligible_to_tune(timing_selector.solve(case.request))
        return tuning.tune(case.request, names, lambda name: timing_selector.select(case.request.forcing(name))
                           .make_adapter(), device=env.device, budget=budget, seed=1)
    out = Path(args.out) if args.out else ROOT / "bench" / "results"
    if out.is_dir():
        out = out / f"regret-{bench.gpu_slug(env.gpu)}.json"
    data: dict[str, Any] = {
        "meta": {"gpu": env.gpu, "arch": env.arch.value, "software": env.software, "method": timer.method(),
                 "suite": suites if len(suites) > 1 else suites[0], "requests": len(cases),
                 "copy_tbps": bench.copy_bandwidth(env.device, timer),
                 "perf_table": {"path": table.path, "gpu": table.gpu, "recorded": table.recorded} if table else None,
                 "date": datetime.date.today().isoformat(),
                 "ratio": "chosen kernel's median / fastest eligible kernel's median, both measured in this run"},
        "summary": {}, "cases": [],
    }

    def extra(case: bench.BenchCase) -> dict[str, Callable]:
        build = AUTO_BY_OP.get(case.request.op.value)
        if any(getattr(case.request, f) for f in AUTO_OMITS):  # it would time a different computation
            return {}
        return {AUTO: build} if build else {}

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows, eager = data["cases"], set()
    for i, case in enumerate(cases, 1):  # one case at a time, so the file holds everything done so far
        result = bench.time_case(case, timing_selector, timer=timer, device=env.device, extra=extra(case))
        progress(bench.progress_line(i, len(cases), result))
        tune_result = tuned(case) if args.tune else None
        rows.append(score(case, result, {**strategies, "predicted": predicted(case)}, tune_result))
        eager |= {t.kernel for t in result.kernels + result.extra if t.ok and t.mode.startswith("eager")}
        data["summary"] = summarize(rows)
        data["meta"]["method"] = timer.method(eager)
        _write(out, data)
    print(json.dumps({"out": str(out), "summary": data["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
