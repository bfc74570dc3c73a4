"""Random inputs that follow an op's tensor contract, and the reference answer for them.

``kernelsel verify`` (and the examples) build inputs here, so every kernel of
an op is fed the same way (``registry.contracts``).  The request decides
everything: dtypes, shapes, and which features are exercised.  By default
sizes are small but reach the edges: a request with almost no cache, requests
spanning several shuffled pages, and spare pages full of garbage that a
correct kernel never reads.

``kernelsel bench`` asks for real sizes instead (``batch``, ``kv_len``,
``new_len``): every request then has the same lengths, and the tensors are
drawn on the target device straight into their stored dtype, a chunk at a
time, so a 30 GB bf16 cache never exists in float32 or on the host.  torch is
imported on use only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from registry.contracts import (
    AttentionResult,
    DecodeMetadata,
    ExtendMetadata,
    PrefillMetadata,
    default_sm_scale,
    softmax_scale,
)
from registry.cost import kv_bytes_per_token
from registry.errors import RequestError

if TYPE_CHECKING:
    import torch

    from selector.request import KernelRequest

PREFIX_LENS = (1, 37, 130)
"""Cached tokens before the new ones, per request: one almost empty, two spanning pages."""

RAGGED_NEW_LENS = (1, 5, 19)
"""New tokens per request for ``mha_extend`` and ``mha_prefill`` (ragged)."""

QUERY_GAIN = 2.0
"""Query std: scores of std ~2 make attention peaky, so an error on one key shows in the output."""

GARBAGE = 50.0
"""Value of every cache slot no request owns: reading one wrecks the result."""

Q_SCALE, KV_SCALE = 0.25, 0.5
"""FP8 dequant scales (stored * scale); not 1, so a kernel that ignores them fails."""

WINDOW_LEFT = 4
"""Sliding window for the ``sliding_window`` feature: far smaller than the longer requests."""

SOFT_CAP = 1.0
"""``logits_soft_cap`` for that feature: below the score spread, so capping changes the output."""

SINK_LOGIT = 5.0
"""Mean sink logit: comparable to the longer requests' log-denominators, so the sink matters."""

FEATURE_OPTIONS = ("sinks", "sliding_window", "logits_soft_cap", "non_causal")
"""Features that change what is computed; ``Workload.reference(without=...)`` can switch each off."""


@dataclass
class Workload:
    """One batch for one request: plan() metadata, run() inputs, and how to get the reference."""

    request: "KernelRequest"
    metadata: Any
    inputs: tuple
    scales: dict[str, float]
    sinks: Optional["torch.Tensor"]
    out_shape: tuple[int, int, int]
    _reference_args: dict = field(repr=False, default_factory=dict)
    kv_bytes: int = 0
    """Bytes of KV cache (or K/V) a kernel must read for this batch: what achieved bandwidth divides."""

    @property
    def device(self) -> "torch.device":
        return self.inputs[0].device

    def new_out(self) -> "torch.Tensor":
        import torch

        from registry.adapters.base import torch_dtype

        return torch.empty(self.out_shape, dtype=torch_dtype(self.request.out_dtype), device=self.device)

    def new_lse(self) -> "torch.Tensor":
        import torch

        return torch.empty(self.out_shape[:2], dtype=torch.float32, device=self.device)

    def run(self, adapter: Any, *, tensor_scales: bool = False, out: Any = None, lse: Any = None) -> AttentionResult:
        """``adapter.run`` on these inputs; scales as floats or as one-element fp32 tensors."""
        import torch

        kwargs: dict[str, Any] = {
            k: torch.tensor([v], dtype=torch.float32, device=self.device) if tensor_scales else v
            for k, v in self.scales.items()
        }
        if self.sinks is not None:
            kwargs["sinks"] = self.sinks
        if out is not None:
            kwargs["out"] = out
        if lse is not None:
            kwargs["lse"] = lse
        return adapter.run(*self.inputs, **kwargs)

    def reference(self, *, without: Optional[str] = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The torch reference in float32 (out, lse), optionally with one feature switched off."""
        import torch

        from registry.adapters import reference as ref

        args = dict(self._reference_args)
        fn, positional = args.pop("fn"), args.pop("positional")
        off = {"sinks": ("sinks", None), "sliding_window": ("window_left", -1),
               "logits_soft_cap": ("logits_soft_cap", 0.0), "non_causal": ("causal", True)}
        if without is not None:
            key, value = off[without]
            args[key] = value
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # no TF32 in the ground truth
        try:
            return getattr(ref, fn)(*positional, out_dtype=torch.float32, **args)
        finally:
            torch.set_float32_matmul_precision(previous)


def _need(request: "KernelRequest", *fields: str) -> list[int]:
    missing = [f for f in fields if getattr(request, f) is None]
    if missing:
        raise RequestError(f"a {request.op.value} workload needs {', '.join(missing)} in the request")
    return [getattr(request, f) for f in fields]


def _store(x: "torch.Tensor", dtype_name: Any, scale: float) -> tuple["torch.Tensor", float]:
    """Cast to the request dtype; FP8 stores ``x / scale`` and reports the scale, others scale 1."""
    from registry.adapters.base import torch_dtype
    from registry.vocab import parse_dtype

    dtype = parse_dtype(dtype_name)
    if dtype.is_fp8:
        return (x / scale).to(torch_dtype(dtype)), scale
    return x.to(torch_dtype(dtype)), 1.0


def _paged(lens: list[int], page_size: int, width: tuple[int, ...], gen: "torch.Generator", n_caches: int):
    """Per-request fp32 rows scattered into shuffled pages, spare pages and slots full of garbage.

    Returns ``(caches [P, S, *width] fp32, block_table int32 [B, max_pages+1])``.
    """
    import torch

    pages = [math.ceil(n / page_size) for n in lens]
    total = sum(pages) + 2
    order = torch.randperm(total, generator=gen).tolist()
    block_table = torch.full((len(lens), max(pages) + 1), order[-1], dtype=torch.int32)
    caches = [torch.full((total, page_size, *width), GARBAGE) for _ in range(n_caches)]
    used = 0
    for b, n in enumerate(lens):
        for p in range(pages[b]):
            page, used = order[used], used + 1
            block_table[b, p] = page
            rows = min(page_size, n - p * page_size)
            for cache in caches:
                cache[page, :rows] = torch.randn(rows, *width, generator=gen)
    return caches, block_table


CHUNK_ELEMENTS = 1 << 26
"""Sized workloads draw this many float32 values at a time (256 MB) before storing them in their dtype."""


def sized_lengths(
    request: "KernelRequest", batch: Optional[int], kv_len: Optional[int], new_len: Optional[int]
) -> tuple[list[int], list[int]]:
    """``(new tokens, cached tokens)`` per request of a sized workload; every request is the same.

    ``batch`` defaults to the request's ``batch_size`` (else 1) and ``kv_len``
    to its ``kv_len``.  ``kv_len`` counts the new tokens too (the contract's
    ``seq_lens``).  Decode ops take their new tokens from ``q_len``;
    ``mha_extend`` needs ``new_len``; for ``mha_prefill`` every token is new.
    """
    op = request.op.value
    batch = batch if batch is not None else (request.batch_size or 1)
    kv_len = kv_len if kv_len is not None else request.kv_len
    if batch < 1:
        raise RequestError(f"batch: {batch}, expected >= 1")
    if op == "mha_prefill":
        if kv_len is not None and new_len is not None and kv_len != new_len:
            raise RequestError(f"mha_prefill: every token is new, so new_len {new_len} must equal kv_len {kv_len}; give one")
        n = kv_len if kv_len is not None else new_len
        if n is None or n < 1:
            raise RequestError("a sized mha_prefill workload needs kv_len >= 1 (tokens per request)")
        return [n] * batch, [n] * batch
    if kv_len is None or kv_len < 1:
        raise RequestError(f"a sized {op} workload needs kv_len >= 1 (cached tokens per request, new ones included)")
    if op == "mha_extend":
        if new_len is None or new_len < 1:
            raise RequestError("a sized mha_extend workload needs new_len >= 1 (new tokens per request)")
        new = new_len
    else:
        if new_len is not None:
            raise RequestError(
                f"new_len is for the ragged ops (mha_extend, mha_prefill); {op} takes its new tokens from q_len"
            )
        new = request.q_len
    if new > kv_len:
        raise RequestError(f"{new} new tokens per request do not fit in kv_len {kv_len} (kv_len counts them too)")
    return [new] * batch, [kv_len] * batch


class _Draw:
    """Random tensors in their stored dtype.

    Small workloads draw float32 on the host from one generator (in the
    order that fixes their values for a seed) and move to the device last;
    sized ones draw on the device, ``CHUNK_ELEMENTS`` at a time.
    """

    def __init__(self, gen: "torch.Generator", device: Any, sized: bool, seed: int):
        import torch

        self.gen, self.device, self.sized = gen, torch.device(device), sized
        self.device_gen = torch.Generator(device=self.device).manual_seed(seed) if sized else None

    def stored(self, shape: tuple[int, ...], dtype_name: Any, scale: float, gain: Optional[float] = None):
        """``(tensor, scale)``: standard normal (times ``gain``) stored as ``dtype_name`` (see ``_store``)."""
        import torch

        from registry.adapters.base import torch_dtype
        from registry.vocab import parse_dtype

        if not self.sized:
            x = torch.randn(*shape, generator=self.gen)
            return _store(x * gain if gain is not None else x, dtype_name, scale)
        dtype = parse_dtype(dtype_name)
        out = torch.empty(shape, dtype=torch_dtype(dtype), device=self.device)
        step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
        for i in range(0, shape[0], step):
            x = torch.randn((min(shape[0], i + step) - i, *shape[1:]), generator=self.device_gen, device=self.device)
            out[i:i + step] = _store(x * gain if gain is not None else x, dtype, scale)[0]
        return out, (scale if dtype.is_fp8 else 1.0)

    def paged(self, lens: list[int], page_size: int, widths: list[tuple[int, ...]], dtype_name: Any, scale: float):
        """Sized paged caches: ``([caches], block_table int32 [B, max_pages], scale)``, pages shuffled."""
        import torch

        pages = [math.ceil(n / page_size) for n in lens]
        total = sum(pages) + 1  # one spare page: the block table's padding points there
        order = torch.randperm(total, generator=self.device_gen, device=self.device).to(torch.int32)
        block_table = order[-1:].repeat(len(lens), max(pages))
        used = 0
        for b, p in enumerate(pages):
            block_table[b, :p] = order[used:used + p]
            used += p
        caches, stored_scale = [], 1.0
        for width in widths:
            cache, stored_scale = self.stored((total, page_size, *width), dtype_name, scale)
            caches.append(cache)
        return caches, block_table, stored_scale


def make_workload(
    request: "KernelRequest",
    *,
    device: Any = "cpu",
    seed: int = 0,
    batch: Optional[int] = None,
    kv_len: Optional[int] = None,
    new_len: Optional[int] = None,
) -> Workload:
    """Inputs for ``request`` on ``device``: its op's contract, its dtypes and shapes, its features on.

    Without sizes: the small, edge-reaching batch described above.  With any
    of ``batch``, ``kv_len``, ``new_len``: a sized batch for benchmarks
    (``sized_lengths`` says how the three combine).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    op = request.op.value
    sized = batch is not None or kv_len is not None or new_len is not None
    draw = _Draw(gen, device, sized, seed)
    sinks_on, window, cap = request.sinks, WINDOW_LEFT if request.sliding_window else -1, (
        SOFT_CAP if request.logits_soft_cap else 0.0
    )
    causal = not request.non_causal
    if sized:
        sized_new, sized_kv = sized_lengths(request, batch, kv_len, new_len)
        batch = len(sized_kv)
    else:
        batch = len(PREFIX_LENS)

    def heads_sinks(hq: int) -> Optional["torch.Tensor"]:
        return (torch.randn(hq, generator=gen) * 0.5 + SINK_LOGIT).to(device) if sinks_on else None

    def dev(*ts):
        return tuple(t.to(device) for t in ts)

    options = dict(sm_scale=None, window_left=window, logits_soft_cap=cap)
    if op in ("mha_decode", "mha_extend", "mha_prefill"):
        d, hkv = _need(request, "head_dim_qk", "num_kv_heads")
        dv = request.head_dim_vo or d
        hq = request.num_qo_heads or hkv
        if sized:
            new, kv_lens = sized_new, sized_kv
        elif op == "mha_decode":
            new = [request.q_len] * batch
        else:
            new = list(RAGGED_NEW_LENS)
        if not sized:
            kv_lens = [n if op == "mha_prefill" else p + n for p, n in zip(PREFIX_LENS, new)]
        q, q_scale = draw.stored((sum(new), hq, d), request.q_dtype, Q_SCALE, gain=QUERY_GAIN)
        cu_q = torch.tensor([0] + list(torch.tensor(new).cumsum(0).tolist()), dtype=torch.int32)
        sinks = heads_sinks(hq)
        if op == "mha_prefill":
            cu_kv = torch.tensor([0] + list(torch.tensor(kv_lens).cumsum(0).tolist()), dtype=torch.int32)
            k, k_scale = draw.stored((sum(kv_lens), hkv, d), request.kv_dtype, KV_SCALE)
            v, v_scale = draw.stored((sum(kv_lens), hkv, dv), request.kv_dtype, KV_SCALE)
            if request.noncontiguous_kv:
                k, v = _strided(k), _strided(v)
            q, k, v, cu_q, cu_kv = dev(q, k, v, cu_q, cu_kv)
            metadata = PrefillMetadata(cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, causal=causal, **options)
            fn, positional = "mha_ragged", (q, k, v, cu_q, cu_kv)
        else:
            (page_size,) = _need(request, "page_size")
            if sized:
                widths = [(hkv, d)] + [(hkv, dv)]
                (kc, vc), block_table, k_scale = draw.paged(kv_lens, page_size, widths, request.kv_dtype, KV_SCALE)
                v_scale = k_scale
            else:
                (kc, vc), block_table = _paged_kv(kv_lens, page_size, hkv, d, dv, gen)
                kc, k_scale = _store(kc, request.kv_dtype, KV_SCALE)
                vc, v_scale = _store(vc, request.kv_dtype, KV_SCALE)
            if request.noncontiguous_kv:
                kc, vc = _strided(kc), _strided(vc)
            seq_lens = torch.tensor(kv_lens, dtype=torch.int32)
            q, kc, vc, block_table, seq_lens, cu_q = dev(q, kc, vc, block_table, seq_lens, cu_q)
            if op == "mha_decode":
                metadata = DecodeMetadata(block_table=block_table, seq_lens=seq_lens, q_len=request.q_len, **options)
            else:
                metadata = ExtendMetadata(
                    block_table=block_table, seq_lens=seq_lens, cu_seqlens_q=cu_q, causal=causal, **options
                )
            k, v = kc, vc
            fn, positional = "mha_paged", (q, kc, vc, block_table, seq_lens, cu_q)
        scales = _scales(q=q_scale, k=k_scale, v=v_scale)
        ref_args = dict(fn=fn, positional=positional, causal=causal, sinks=sinks, **options, **scales)
        kv_bytes = sum(kv_lens) * kv_bytes_per_token(request)
        return Workload(request, metadata, (q, k, v), scales, sinks, (q.shape[0], hq, dv), ref_args, kv_bytes=kv_bytes)

    # mla_decode / sparse_mla_decode
    rank, rope, hq, page_size = _need(request, "kv_lora_rank", "qk_rope_head_dim", "num_qo_heads", "page_size")
    kv_lens = sized_kv if sized else [p + request.q_len for p in PREFIX_LENS]
    tokens = batch * request.q_len
    q_nope, q_scale = draw.stored((tokens, hq, rank), request.q_dtype, Q_SCALE, gain=QUERY_GAIN)
    q_pe, _ = draw.stored((tokens, hq, rope), request.q_dtype, Q_SCALE, gain=QUERY_GAIN)
    if sized:
        (kv,), block_table, kv_scale = draw.paged(kv_lens, page_size, [(rank + rope,)], request.kv_dtype, KV_SCALE)
    else:
        (kv,), block_table = _paged(kv_lens, page_size, (rank + rope,), gen, 1)
        kv, kv_scale = _store(kv, request.kv_dtype, KV_SCALE)
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32)
    sinks = heads_sinks(hq)
    sm_scale = default_sm_scale(request)
    if sm_scale is None:  # the contract has no default without qk_nope_head_dim: pass a scale explicitly
        options["sm_scale"] = sm_scale = softmax_scale(rank + rope)
    scales = _scales(q=q_scale, kv=kv_scale)
    q_nope, q_pe, kv, block_table, seq_lens = dev(q_nope, q_pe, kv, block_table, seq_lens)
    metadata = DecodeMetadata(block_table=block_table, seq_lens=seq_lens, q_len=request.q_len, **options)
    token_bytes = kv_bytes_per_token(request)
    if op == "mla_decode":
        inputs = (q_nope, q_pe, kv)
        ref_args = dict(fn="mla_paged", positional=(q_nope, q_pe, kv, block_table, seq_lens), q_len=request.q_len,
                        causal=True, window_left=window, logits_soft_cap=cap)
        kv_bytes = sum(kv_lens) * token_bytes
    else:
        (topk,) = _need(request, "topk")
        topk_indices = _topk(kv_lens, request.q_len, topk, gen).to(device)
        inputs = (q_nope, q_pe, kv, topk_indices)
        ref_args = dict(fn="sparse_mla_paged", positional=(q_nope, q_pe, kv, block_table, seq_lens, topk_indices))
        kv_bytes = sum(min(topk, n) for n in kv_lens) * request.q_len * token_bytes
    ref_args.update(sm_scale=sm_scale, sinks=sinks, **scales)
    return Workload(request, metadata, inputs, scales, sinks, (tokens, hq, rank), ref_args, kv_bytes=kv_bytes)


def _paged_kv(kv_lens, page_size, hkv, d, dv, gen):
    if d == dv:
        return _paged(kv_lens, page_size, (hkv, d), gen, 2)
    (kc,), block_table = _paged(kv_lens, page_size, (hkv, d), gen, 1)
    vc = _regather(kc, block_table, kv_lens, page_size, (hkv, dv), gen)
    return (kc, vc), block_table


def _regather(like, block_table, kv_lens, page_size, width, gen):
    """A second cache with another width on the same pages (head_dim_vo != head_dim_qk)."""
    import torch

    cache = torch.full((like.shape[0], page_size, *width), GARBAGE)
    for b, n in enumerate(kv_lens):
        for p in range(math.ceil(n / page_size)):
            rows = min(page_size, n - p * page_size)
            cache[int(block_table[b, p]), :rows] = torch.randn(rows, *width, generator=gen)
    return cache


def _strided(t: "torch.Tensor") -> "torch.Tensor":
    """The same values as a strided view ``buf[:, 0]`` of ``[N, 2, ...]``: the engines' K/V-pair layout."""
    import torch

    buf = torch.zeros(t.shape[0], 2, *t.shape[1:], dtype=t.dtype, device=t.device)
    buf[:, 0] = t
    return buf[:, 0]


def _scales(**stored: float) -> dict[str, float]:
    """Only FP8 tensors get a scale argument; others keep the contract default of 1."""
    return {f"{name}_scale": s for name, s in stored.items() if s != 1.0}


def _topk(kv_lens: list[int], q_len: int, topk: int, gen: "torch.Generator") -> "torch.Tensor":
    """Per token, up to ``topk`` distinct positions of its request in random order, padded with -1."""
    import torch

    rows = []
    for n in kv_lens:
        for _ in range(q_len):
            picks = torch.randperm(n, generator=gen)[:topk].tolist()
            rows.append(picks + [-1] * (topk - len(picks)))
    return torch.tensor(rows, dtype=torch.int32)
