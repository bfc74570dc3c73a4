"""Our Triton decode kernels against the best FlashInfer kernel for the same request.

For each request shape it times the Triton adapter and every FlashInfer path
that serves the request, called directly:

* ``mha_decode`` -- ``BatchDecodeWithPagedKVCacheWrapper`` with and without
  tensor cores, and ``trtllm_batch_decode_with_kv_cache(backend="xqa")``;
* ``mla_decode`` -- ``BatchMLAPagedAttentionWrapper`` backends ``fa2`` and
  ``fa3`` (Triton's fp8-KV MLA is timed too, against FlashInfer's bf16 FA3).

Timing: each call is captured in a CUDA graph (eager if capture fails; the
row says which) and replayed under ``triton.testing.do_bench``, which
flushes L2 before every repetition and reports the median of CUDA-event
times.  Throughput is KV bytes read / time.  ``--sweep`` times Triton launch
configurations and split counts instead (used to tune ``planning.py``).

    python bench/triton_vs_flashinfer.py --out bench/results/triton_vs_flashinfer-h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.adapters.triton import TritonMHADecode, TritonMLADecode  # noqa: E402
from registry.contracts import DecodeMetadata, default_sm_scale, softmax_scale  # noqa: E402
from selector.timing import capture_graph  # noqa: E402

DEV = "cuda"
HQ, HKV, D, PAGE = 32, 8, 128, 16
MLA_H, RANK, ROPE, MLA_PAGE = 128, 512, 64, 64
DECODE_BATCHES, DECODE_CONTEXTS = (1, 8, 64, 256), (512, 4096, 32768)
MLA_BATCHES, MLA_CONTEXTS = (1, 16, 64), (1024, 8192)
FP8 = torch.float8_e4m3fn


def timed(fn: Callable[[], Any]) -> tuple[float, str]:
    """Median ms of ``fn`` replayed from a CUDA graph (eager if it cannot be captured), L2 flushed."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        graph, mode = capture_graph(fn)
    except Exception as exc:  # noqa: BLE001 - the warm-up itself failed: report and time eagerly
        torch.cuda.synchronize()
        graph, mode = None, f"eager ({type(exc).__name__})"
    call = fn if graph is None else graph.replay
    return triton.testing.do_bench(call, warmup=10, rep=60, return_mode="median"), mode


def _ns(**kw: Any) -> Any:
    return types.SimpleNamespace(**kw)


def spec(op: str) -> Any:
    return _ns(name=f"triton-{op.replace('_', '-')}", op=op)


# --------------------------------------------------------------------- MHA decode


def mha_request(kv: str) -> Any:
    return _ns(
        op="mha_decode", q_dtype="bf16", kv_dtype=kv, out_dtype=None, head_dim_qk=D, head_dim_vo=D,
        num_qo_heads=HQ, num_kv_heads=HKV, page_size=PAGE, q_len=1, sinks=False, sliding_window=False,
        logits_soft_cap=False, return_lse=False, non_causal=False,
    )


class DecodeCase:
    """One (batch, context, kv dtype) shape over a shared, randomly paged pool."""

    def __init__(self, pools: tuple, batch: int, context: int, kv_dtype: torch.dtype):
        self.batch, self.context, self.kv_dtype = batch, context, kv_dtype
        pages = context // PAGE
        perm = torch.randperm(pools[0].shape[0], device=DEV)[: batch * pages].int()
        self.block_table = perm.view(batch, pages)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        self.k, self.v = pools
        self.q = torch.randn(batch, HQ, D, device=DEV).to(torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.kv_bytes = 2 * batch * context * HKV * D * self.k.element_size()

    def triton(self, tuning: dict | None = None) -> Callable[[], Any]:
        name = "bf16" if self.kv_dtype == torch.bfloat16 else "fp8_e4m3"
        adapter = TritonMHADecode(spec("mha_decode"), mha_request(name), tuning=tuning)
        adapter.plan(DecodeMetadata(block_table=self.block_table, seq_lens=self.seq_lens))
        self.last_splits = adapter.num_splits
        return lambda: adapter.run(self.q, self.k, self.v, out=self.out)

    def _csr(self) -> tuple:
        pages = self.block_table.shape[1]
        indptr = torch.arange(self.batch + 1, dtype=torch.int32, device=DEV) * pages
        last = torch.full((self.batch,), PAGE, dtype=torch.int32, device=DEV)
        return indptr, self.block_table.flatten().contiguous(), last

    def flashinfer_wrapper(self, fi: Any, ws: Any, tensor_cores: bool) -> Callable[[], Any]:
        extra = {"backend": "fa2"} if tensor_cores else {}
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores, **extra)
        wrapper.plan(*self._csr(), HQ, HKV, D, PAGE, q_data_type=torch.bfloat16, kv_data_type=self.kv_dtype)
        return lambda: wrapper.run(self.q, (self.k, self.v), out=self.out)

    def flashinfer_xqa(self, fi: Any, ws: Any) -> Callable[[], Any]:
        sm = softmax_scale(D)
        return lambda: fi.decode.trtllm_batch_decode_with_kv_cache(
            self.q, (self.k, self.v), ws, self.block_table, self.seq_lens, self.context,
            bmm1_scale=sm, bmm2_scale=1.0, out=self.out, kv_layout="NHD", backend="xqa",
        )


def decode_pools(kv_dtype: torch.dtype, tokens: int) -> tuple:
    pages = tokens // PAGE + 64
    k = torch.randn(pages, PAGE, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(pages, PAGE, HKV, D, device=DEV, dtype=torch.bfloat16)
    if kv_dtype != torch.bfloat16:
        k, v = k.to(kv_dtype), v.to(kv_dtype)
    return k, v


# ---------------------------------------------------------------------- MLA decode


def mla_request(kv: str) -> Any:
    return _ns(
        op="mla_decode", q_dtype="bf16", kv_dtype=kv, out_dtype=None, num_qo_heads=MLA_H, page_size=MLA_PAGE,
        q_len=1, kv_lora_rank=RANK, qk_rope_head_dim=ROPE, qk_nope_head_dim=128, sinks=False,
        sliding_window=False, logits_soft_cap=False, return_lse=False,
    )


class MLACase:
    def __init__(self, pool: Any, batch: int, context: int):
        self.batch, self.context = batch, context
        pages = context // MLA_PAGE
        perm = torch.randperm(pool.shape[0], device=DEV)[: batch * pages].int()
        self.block_table = perm.view(batch, pages)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        self.pool = pool
        self.pool_fp8 = None
        self.q_nope = torch.randn(batch, MLA_H, RANK, device=DEV).to(torch.bfloat16)
        self.q_pe = torch.randn(batch, MLA_H, ROPE, device=DEV).to(torch.bfloat16)
        self.out = torch.empty_like(self.q_nope)
        self.sm_scale = default_sm_scale(mla_request("bf16"))
        self.tokens = batch * context
        self.flops = 2 * self.tokens * MLA_H * (RANK + ROPE + RANK)

    def kv_bytes(self, fp8: bool) -> int:
        return self.tokens * (RANK + ROPE) * (1 if fp8 else 2)

    def triton(self, tuning: dict | None = None, fp8: bool = False, pool_fp8: Any = None) -> Callable[[], Any]:
        adapter = TritonMLADecode(spec("mla_decode"), mla_request("fp8_e4m3" if fp8 else "bf16"), tuning=tuning)
        adapter.plan(DecodeMetadata(block_table=self.block_table, seq_lens=self.seq_lens))
        self.last_splits, self.last_kernel = adapter.num_splits, adapter.cfg.kernel
        kv = pool_fp8 if fp8 else self.pool
        return lambda: adapter.run(self.q_nope, self.q_pe, kv, out=self.out)

    def flashinfer(self, fi: Any, ws: Any, backend: str) -> Callable[[], Any]:
        wrapper = fi.mla.BatchMLAPagedAttentionWrapper(ws, backend=backend)
        pages = self.block_table.shape[1]
        kv_indptr = torch.arange(self.batch + 1, dtype=torch.int32, device=DEV) * pages
        qo_indptr = torch.arange(self.batch + 1, dtype=torch.int32, device=DEV)
        wrapper.plan(
            metadata=fi.mla.MLAPlanMetadata.csr(qo_indptr, kv_indptr, self.block_table.flatten().contiguous(), self.seq_lens),
            num_heads=MLA_H, head_dim_ckv=RANK, head_dim_kpe=ROPE, page_size=MLA_PAGE, causal=False,
            sm_scale=self.sm_scale, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
            query_layout="split", kv_cache_layout="packed",
        )
        return lambda: wrapper.run(query=(self.q_nope, self.q_pe), kv_cache=self.pool, out=self.out)


# ------------------------------------------------------------------------ driver


class Recorder:
    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))


def attempt(rec: Recorder, base: dict, kernel: str, make: Callable[[], Callable[[], Any]], nbytes: int, flops: int = 0) -> float:
    try:
        ms, mode = timed(make())
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot serve the shape is a result too
        torch.cuda.synchronize()
        rec.add(**base, kernel=kernel, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return math.inf
    row = dict(base, kernel=kernel, ms=round(ms, 4), tbps=round(nbytes / ms / 1e9, 3), mode=mode)
    if flops:
        row["tflops"] = round(flops / ms / 1e9, 1)
    rec.add(**row)
    return ms


LAUNCH_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "value_splits")


def tuned_from_sweep(path: str | None) -> dict:
    """Best launch configuration per (op, kv) from a ``--sweep`` result file (config rows only)."""
    if not path or not Path(path).is_file():
        return {}
    best: dict = {}
    for row in json.loads(Path(path).read_text())["rows"]:
        if "ms" not in row or not any(k in row for k in LAUNCH_KEYS) or row["batch"] < 16:
            continue
        key = (row["op"], row["kv"])
        score = row["ms"] / row["batch"] / row["context"]
        if key not in best or score < best[key][0]:
            best[key] = (score, {k: row[k] for k in LAUNCH_KEYS if k in row})
    return {k: v[1] for k, v in best.items()}


def run_decode(rec: Recorder, fi: Any, args: Any) -> list[dict]:
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=DEV)
    xqa_ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
    summary = []
    for kv_dtype in (torch.bfloat16, FP8):
        batches = args.batches or DECODE_BATCHES
        contexts = args.contexts or DECODE_CONTEXTS
        pools = decode_pools(kv_dtype, max(batches) * max(contexts))
        kv_name = "bf16" if kv_dtype == torch.bfloat16 else "fp8_e4m3"
        for batch in batches:
            for context in contexts:
                case = DecodeCase(pools, batch, context, kv_dtype)
                base = dict(op="mha_decode", kv=kv_name, batch=batch, context=context)
                t = attempt(rec, base, "triton", case.triton, case.kv_bytes)
                splits = getattr(case, "last_splits", 0)
                tuned = args.tuned.get(("mha_decode", kv_name))
                if tuned:
                    attempt(rec, dict(base, **tuned), "triton-tuned", lambda: case.triton(tuned), case.kv_bytes)
                fis = {
                    "fa2-cuda-cores": attempt(rec, base, "flashinfer-fa2", lambda: case.flashinfer_wrapper(fi, ws, False), case.kv_bytes),
                    "fa2-tensor-cores": attempt(rec, base, "flashinfer-fa2-tc", lambda: case.flashinfer_wrapper(fi, ws, True), case.kv_bytes),
                    "xqa": attempt(rec, base, "flashinfer-xqa", lambda: case.flashinfer_xqa(fi, xqa_ws), case.kv_bytes),
                }
                best = min(fis, key=fis.get)
                summary.append(dict(base, triton_ms=t, splits=splits, best=best, best_ms=fis[best], ratio=fis[best] / t,
                                    triton_tbps=case.kv_bytes / t / 1e9))
        pools = case = None  # free the pools; the lambdas that read case have run
        torch.cuda.empty_cache()
    return summary


def run_mla(rec: Recorder, fi: Any, args: Any) -> list[dict]:
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=DEV)
    batches, contexts = args.mla_batches or MLA_BATCHES, args.mla_contexts or MLA_CONTEXTS
    tokens = max(batches) * max(contexts)
    pool = torch.randn(tokens // MLA_PAGE + 16, MLA_PAGE, RANK + ROPE, device=DEV).to(torch.bfloat16)
    pool_fp8 = pool.to(FP8)
    summary = []
    for batch in batches:
        for context in contexts:
            case = MLACase(pool, batch, context)
            base = dict(op="mla_decode", kv="bf16", batch=batch, context=context)
            t = attempt(rec, base, "triton", case.triton, case.kv_bytes(False), case.flops)
            splits, kernel = getattr(case, "last_splits", 0), getattr(case, "last_kernel", "?")
            t_portable = t
            if kernel != "portable":  # the portable kernel on the same request, for the record
                t_portable = attempt(rec, base, "triton-portable", lambda: case.triton({"kernel": "portable"}),
                                     case.kv_bytes(False), case.flops)
            tuned = args.tuned.get(("mla_decode", "bf16"))
            if tuned:
                attempt(rec, dict(base, **tuned), "triton-tuned", lambda: case.triton(tuned), case.kv_bytes(False), case.flops)
            t8 = attempt(rec, dict(base, kv="fp8_e4m3"), "triton", lambda: case.triton(fp8=True, pool_fp8=pool_fp8),
                         case.kv_bytes(True), case.flops)
            fis = {b: attempt(rec, base, f"flashinfer-{b}", lambda b=b: case.flashinfer(fi, ws, b), case.kv_bytes(False), case.flops)
                   for b in ("fa2", "fa3")}
            summary.append(dict(base, triton_ms=t, triton_kernel=kernel, triton_portable_ms=t_portable, triton_fp8_ms=t8,
                                splits=splits, fa3_ms=fis["fa3"], fa2_ms=fis["fa2"],
                                ratio_fa3=fis["fa3"] / t, triton_tflops=case.flops / t / 1e9))
    return summary


def run_sweep(rec: Recorder, args: Any) -> None:
    """Triton launch configurations and split counts on representative shapes (no FlashInfer)."""
    pools = decode_pools(torch.bfloat16, 64 * 32768)
    for batch, context in ((64, 4096), (8, 4096), (256, 512)):
        case = DecodeCase(pools, batch, context, torch.bfloat16)
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    tuning = dict(block_n=bn, num_warps=warps, num_stages=stages)
                    attempt(rec, dict(op="mha_decode", kv="bf16", batch=batch, context=context, **tuning),
                            "triton", lambda: case.triton(tuning), case.kv_bytes)
    for batch, context in ((1, 32768), (1, 4096), (8, 4096), (8, 32768), (64, 4096), (1, 512)):
        case = DecodeCase(pools, batch, context, torch.bfloat16)
        for splits in (1, 2, 4, 8, 16, 32, 48, 64):
            attempt(rec, dict(op="mha_decode", kv="bf16", batch=batch, context=context, num_splits=splits),
                    "triton", lambda: case.triton({"num_splits": splits}), case.kv_bytes)
    pools = case = None  # free the pools; the lambdas that read case have run
    torch.cuda.empty_cache()
    run_fp8_sweep(rec)
    pool = torch.randn(64 * 8192 // MLA_PAGE + 16, MLA_PAGE, RANK + ROPE, device=DEV).to(torch.bfloat16)
    for batch, context in ((64, 8192), (16, 8192)):
        case = MLACase(pool, batch, context)
        for bm, bn, warps, stages, vs in ((64, 32, 8, 2, 1), (64, 32, 8, 3, 1), (64, 64, 8, 2, 1), (64, 16, 8, 2, 1),
                                          (64, 32, 4, 2, 1), (32, 32, 4, 2, 1), (32, 64, 4, 2, 1), (16, 64, 4, 2, 1),
                                          (64, 64, 8, 1, 1), (64, 32, 4, 2, 2), (64, 32, 8, 2, 2), (64, 64, 4, 3, 2),
                                          (128, 32, 8, 2, 2)):
            tuning = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, value_splits=vs)
            attempt(rec, dict(op="mla_decode", kv="bf16", batch=batch, context=context, **tuning), "triton",
                    lambda: case.triton(tuning), case.kv_bytes(False), case.flops)
    for batch, context in ((1, 8192), (1, 1024), (16, 1024), (16, 8192)):
        case = MLACase(pool, batch, context)
        for splits in (1, 2, 4, 8, 16, 32, 64):
            attempt(rec, dict(op="mla_decode", kv="bf16", batch=batch, context=context, num_splits=splits), "triton",
                    lambda: case.triton({"num_splits": splits}), case.kv_bytes(False), case.flops)


def run_fp8_sweep(rec: Recorder) -> None:
    """FP8-KV decode: small-tile launch configs x split counts on the table's shapes, against XQA when available.

    Recorded on an H200 as bench/results/triton_fp8_sweep-h200.json (the basis of ``planning.mha_config``).
    """
    try:
        import flashinfer as fi
    except ImportError:
        fi = None
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
    pools = decode_pools(FP8, 256 * 32768)
    configs = [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in ((64, 1, 1), (32, 1, 1), (32, 1, 2), (64, 2, 1))]
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            case = DecodeCase(pools, batch, context, FP8)
            base = dict(op="mha_decode", kv="fp8_e4m3", batch=batch, context=context)
            if fi is not None:
                attempt(rec, base, "flashinfer-xqa", lambda: case.flashinfer_xqa(fi, ws), case.kv_bytes)
            attempt(rec, dict(base, planner=True), "triton", case.triton, case.kv_bytes)
            for cfg in configs:
                for splits in (1, 2, 4, 8, 16, 32, 64):
                    if splits * 64 <= context:
                        tuning = dict(cfg, num_splits=splits)
                        attempt(rec, dict(base, **tuning), "triton", lambda: case.triton(tuning), case.kv_bytes)
    pools = case = None  # free the pools; the lambdas that read case have run
    torch.cuda.empty_cache()


def print_summary(decode: list[dict], mla: list[dict]) -> None:
    if decode:
        print("\nmha_decode (Hq 32 / Hkv 8, D 128, page 16): Triton vs best FlashInfer")
        print(f"{'kv':9}{'B':>5}{'ctx':>7}{'splits':>7}{'triton ms':>11}{'TB/s':>7}{'best FI':>18}{'FI ms':>9}{'FI/triton':>10}")
        for r in decode:
            print(f"{r['kv']:9}{r['batch']:>5}{r['context']:>7}{r['splits']:>7}{r['triton_ms']:>11.4f}{r['triton_tbps']:>7.2f}"
                  f"{r['best']:>18}{r['best_ms']:>9.4f}{r['ratio']:>10.2f}")
    if mla:
        print("\nmla_decode (128 heads, 512+64, page 64): Triton vs FlashInfer FA3 / FA2 (bf16)")
        print(f"{'B':>5}{'ctx':>7}{'splits':>7}{'kernel':>9}{'triton ms':>11}{'portable':>9}{'TFLOP/s':>9}{'fp8 ms':>9}"
              f"{'fa3 ms':>9}{'fa2 ms':>9}{'fa3/triton':>11}")
        for r in mla:
            print(f"{r['batch']:>5}{r['context']:>7}{r['splits']:>7}{r.get('triton_kernel', '?'):>9}{r['triton_ms']:>11.4f}"
                  f"{r.get('triton_portable_ms', r['triton_ms']):>9.4f}{r['triton_tflops']:>9.1f}"
                  f"{r['triton_fp8_ms']:>9.4f}{r['fa3_ms']:>9.4f}{r['fa2_ms']:>9.4f}{r['ratio_fa3']:>11.2f}")


def target(row: dict) -> str:
    """The project's performance target for a decode row: >= 0.8 at B >= 8, >= 0.6 at B = 1 with a long context."""
    if row["batch"] >= 8:
        want = 0.8
    elif row["context"] >= 32768:
        want = 0.6
    else:
        return ""
    return f"≥{want}: {'met' if row['ratio'] >= want else 'missed'}"


def markdown(result: dict) -> str:
    """The report of one run (``--markdown FILE.json``): the decode and MLA tables with targets."""
    meta, summary = result["meta"], result["meta"]["summary"]
    out = [
        f"# Triton vs FlashInfer decode on one {meta['gpu']} ({meta['started'][:10]})", "",
        f"{meta['gpu']} ({meta['sms']} SMs), torch {meta['torch']}, triton {meta['triton']}, "
        f"FlashInfer {meta.get('flashinfer', '?')}, shipped launch defaults. Command (device tool, `.devdeps` carried):", "",
        "    python bench/triton_vs_flashinfer.py --out $OUT/table.json", "",
        "Each call is captured in a CUDA graph and replayed under `triton.testing.do_bench` (L2 flushed before every",
        "repetition); the figure is the median of CUDA-event times. Ratio = Triton throughput / the best FlashInfer",
        "kernel's throughput for the same request (KV bytes read / time), measured in the same run; above 1: Triton faster.",
        "", f"## mha_decode: {HQ} query heads / {HKV} KV heads, head_dim {D}, page {PAGE}, q bf16", "",
        "| kv | B | ctx | splits | best FlashInfer | FI ms | Triton ms | Triton TB/s | Triton / best FI | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["mha_decode"]:
        out.append(f"| {r['kv']} | {r['batch']} | {r['context']} | {r['splits']} | {r['best']} | {r['best_ms']:.4f} | "
                   f"{r['triton_ms']:.4f} | {r['triton_tbps']:.2f} | {r['ratio']:.3f} | {target(r)} |")
    out += ["", f"## mla_decode: {MLA_H} heads, kv_lora_rank {RANK} + rope {ROPE}, page {MLA_PAGE}, q bf16", "",
            "| B | ctx | splits | FA3 ms | FA2 ms | Triton kernel | Triton ms | portable kernel ms | Triton fp8-KV ms "
            "| Triton TFLOP/s | Triton / FA3 | target ≥0.6 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["mla_decode"]:
        out.append(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['fa3_ms']:.4f} | {r['fa2_ms']:.4f} | "
                   f"{r.get('triton_kernel', 'portable')} | {r['triton_ms']:.4f} | "
                   f"{r.get('triton_portable_ms', r['triton_ms']):.4f} | {r['triton_fp8_ms']:.4f} | "
                   f"{r['triton_tflops']:.0f} | {r['ratio_fa3']:.3f} | "
                   f"{'met' if r['ratio_fa3'] >= 0.6 else 'missed'} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write all rows as JSON here")
    p.add_argument("--sweep", action="store_true", help="time Triton configurations and split counts instead")
    p.add_argument("--only", choices=("decode", "mla"), help="one op only")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument("--contexts", type=int, nargs="*")
    p.add_argument("--mla-batches", type=int, nargs="*")
    p.add_argument("--mla-contexts", type=int, nargs="*")
    p.add_argument("--tuned-from", help="also time Triton with the best launch config of this --sweep result")
    p.add_argument("--markdown", metavar="JSON", help="print the Markdown report of a recorded run (no GPU) and exit")
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return
    args.tuned = tuned_from_sweep(args.tuned_from)
    import triton

    props = torch.cuda.get_device_properties(0)
    meta = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if not args.sweep:
        import flashinfer

        meta["flashinfer"] = flashinfer.__version__
    meta["tuned"] = {f"{op}/{kv}": cfg for (op, kv), cfg in args.tuned.items()}
    rec = Recorder(args.out, meta)
    print(json.dumps(meta), flush=True)
    if args.sweep:
        run_sweep(rec, args)
        return
    import flashinfer as fi

    decode = run_decode(rec, fi, args) if args.only in (None, "decode") else []
    mla = run_mla(rec, fi, args) if args.only in (None, "mla") else []
    rec.meta["summary"] = {"mha_decode": decode, "mla_decode": mla}
    rec.add(summary=True)
    print_summary(decode, mla)


if __name__ == "__main__":
    main()
