"""Host time an adapter adds to the FlashInfer call it wraps, per call; prints JSON.

For each adapter: plan once, then time ``N`` back-to-back ``adapter.run()``
calls and ``N`` direct calls of the same planned FlashInfer object with the
same tensors and output buffer, synchronising only at the end.  The problem
is tiny (one request, 64 cached tokens) so the host, not the GPU, sets the
pace: the per-call time is Python + launch cost.  Adapter and direct runs
alternate ``REPS`` times; the minimum of each is reported, and ``added_us``
is their difference (target: <= 2 us).  ``graph_replay_us`` is one CUDA-graph
replay of the adapter's run for scale: what a captured decode step costs
the host.

Run on a GPU machine:  python bench/adapter_overhead.py [N]
"""

from __future__ import annotations

import json
import math
import sys
import time
from types import SimpleNamespace

import torch

from registry.adapters import flashinfer as fa
from registry.adapters import flashinfer_trtllm as trt
from registry.contracts import DecodeMetadata, ExtendMetadata, softmax_scale
from selector.timing import capture_graph

REPS = 7
HQ, HKV, D, PAGE, SEQ = 32, 8, 128, 16, 64


def _request(op: str, **kw):
    fields = dict(
        op=op, arch="sm_90", q_dtype="bf16", kv_dtype="bf16", out_dtype=None, head_dim_qk=D, head_dim_vo=None,
        num_qo_heads=HQ, num_kv_heads=HKV, page_size=PAGE, q_len=1, kv_lora_rank=None, qk_rope_head_dim=None,
        qk_nope_head_dim=None, topk=None, sinks=False, sliding_window=False, logits_soft_cap=False,
        return_lse=False, non_causal=False, noncontiguous_kv=False, cuda_graph=False,
    )
    fields.update(kw)
    return SimpleNamespace(**fields)


def _adapter(cls, op: str, **kw):
    return cls(SimpleNamespace(name=f"bench-{cls.__name__}", op=op, solution="flashinfer", backend="x"), _request(op, **kw))


def _paged(width: tuple):
    pages = math.ceil(SEQ / PAGE)
    bt = torch.arange(pages, dtype=torch.int32, device="cuda")[None]
    sl = torch.tensor([SEQ], dtype=torch.int32, device="cuda")
    caches = [torch.randn((pages, PAGE) + w, device="cuda").to(torch.bfloat16) for w in width]
    return bt, sl, caches


def _per_call_us(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def _graph_replay_us(fn, n: int) -> float:
    graph, mode = capture_graph(fn)
    if graph is None:
        raise RuntimeError(f"cannot capture the adapter call in a CUDA graph: {mode}")
    return _per_call_us(graph.replay, n)


def _decode_case(cls, want_lse: bool):
    bt, sl, (k, v) = _paged(((HKV, D), (HKV, D)))
    q = torch.randn(1, HQ, D, device="cuda").to(torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(1, HQ, device="cuda")
    ad = _adapter(cls, "mha_decode", return_lse=want_lse)
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    w, pdl, kw = ad._wrapper, ad._pdl, (dict(lse=lse) if want_lse else {})
    return (
        lambda: ad.run(q, k, v, out=out, **kw),
        lambda: w.run(q, (k, v), out=out, return_lse=want_lse, enable_pdl=pdl, **kw),
    )


def _xqa_case():
    fi = __import__("flashinfer")
    bt, sl, (k, v) = _paged(((HKV, D), (HKV, D)))
    q = torch.randn(1, HQ, D, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)
    ad = _adapter(trt.XQADecode, "mha_decode")
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    ws, sm, pdl = ad._workspace, softmax_scale(D), ad._pdl
    return (
        lambda: ad.run(q, k, v, out=out),
        lambda: fi.decode.trtllm_batch_decode_with_kv_cache(
            q, (k, v), ws, bt, sl, SEQ, bmm1_scale=sm, bmm2_scale=1.0, window_left=-1, out=out,
            out_dtype=torch.bfloat16, sinks=None, kv_layout="NHD", enable_pdl=pdl, backend="xqa", q_len_per_req=1,
        ),
    )


def _extend_case():
    bt, sl, (k, v) = _paged(((HKV, D), (HKV, D)))
    q = torch.randn(8, HQ, D, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)
    ad = _adapter(fa.FA2Extend, "mha_extend")
    cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    ad.plan(ExtendMetadata(block_table=bt, seq_lens=sl, cu_seqlens_q=cu))
    w, pdl = ad._wrapper, ad._pdl
    return lambda: ad.run(q, k, v, out=out), lambda: w.run(q, (k, v), out=out, enable_pdl=pdl)


def _mla_case():
    ad = _adapter(
        fa.FA3MLADecode, "mla_decode", head_dim_qk=None, num_kv_heads=None, num_qo_heads=16, page_size=64,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
    )
    kv = torch.randn(1, 64, 576, device="cuda").to(torch.bfloat16)
    q_nope = torch.randn(1, 16, 512, device="cuda").to(torch.bfloat16)
    q_pe = torch.randn(1, 16, 64, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q_nope)
    sl = torch.tensor([SEQ], dtype=torch.int32, device="cuda")
    ad.plan(DecodeMetadata(block_table=torch.zeros(1, 1, dtype=torch.int32, device="cuda"), seq_lens=sl))
    w = ad._wrapper
    return (
        lambda: ad.run(q_nope, q_pe, kv, out=out),
        lambda: w.run(query=(q_nope, q_pe), kv_cache=kv, out=out),
    )


CASES = {
    "FA2Decode": lambda: _decode_case(fa.FA2Decode, False),
    "FA2Decode+lse": lambda: _decode_case(fa.FA2Decode, True),
    "FA2TCDecode": lambda: _decode_case(fa.FA2TCDecode, False),
    "FA2TCDecode+lse": lambda: _decode_case(fa.FA2TCDecode, True),
    "XQADecode": _xqa_case,
    "FA2Extend": _extend_case,
    "FA3MLADecode": _mla_case,
}
"""name -> setup returning (adapter call, direct FlashInfer call) on identical inputs and output buffers."""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    fi = __import__("flashinfer")
    results = []
    for name, setup in CASES.items():
        try:
            adapter_call, direct_call = setup()
            for fn in (adapter_call, direct_call):  # warm-up: JIT, caches
                for _ in range(20):
                    fn()
            direct, adapter = [], []
            for _ in range(REPS):
                direct.append(_per_call_us(direct_call, n))
                adapter.append(_per_call_us(adapter_call, n))
            results.append(dict(
                adapter=name, direct_us=round(min(direct), 2), adapter_us=round(min(adapter), 2),
                added_us=round(min(adapter) - min(direct), 2),
                added_us_median=round(sorted(adapter)[REPS // 2] - sorted(direct)[REPS // 2], 2),
                graph_replay_us=round(_graph_replay_us(adapter_call, n), 2),
            ))
        except Exception as exc:  # report the others
            results.append(dict(adapter=name, error=f"{type(exc).__name__}: {exc}"[:300]))
    print(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, flashinfer=fi.__version__,
        calls_per_rep=n, reps=REPS, problem=dict(batch=1, seq=SEQ, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D),
        results=results,
    ), indent=1))


if __name__ == "__main__":
    main()
