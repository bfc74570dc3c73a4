"""Split-KV epilogue and merge, shared by every kernel family.

Each stage-1 program keeps the online-softmax state of its rows in base 2:
``m`` (running max of ``s * log2(e)``), ``l`` (sum of ``2^(s - m)``) and the
unnormalised ``acc``.  With one split, ``write_rows`` finishes the job in
the same kernel (sink, normalise, ``v_scale``, natural-log LSE).  With
several, each split stores its normalised partial output and base-2 LSE in
fp32 buffers ``[splits, T, H, Dv]`` / ``[splits, T, H]`` and ``merge_splits``
combines them; the sink enters once, in the merge.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from registry.adapters.triton_kernels.common import LN2, LOG2E, load_scale


@triton.jit
def write_rows(
    acc, m_i, l_i, t_idx, h_idx, row_ok, offs_dv, dv_ok,
    Sinks, VScale, v_mul, Out, stride_ot, stride_oh, Lse, stride_lt, stride_lh,
    OPart, LsePart, split, num_tokens, num_heads,
    DV: tl.constexpr, HAS_SINKS: tl.constexpr, V_SCALE_PTR: tl.constexpr,
    WRITE_LSE: tl.constexpr, FINAL: tl.constexpr,
):
    """Store a tile's rows: the final output (``FINAL``) or this split's partial result."""
    if FINAL:
        if HAS_SINKS:
            sink = tl.load(Sinks + h_idx, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
            m_new = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.exp2(sink - m_new)
            acc = acc * alpha[:, None]
            m_i = m_new
        has = l_i > 0
        scale = load_scale(v_mul, VScale, V_SCALE_PTR)
        o = acc * (scale / tl.where(has, l_i, 1.0))[:, None]
        ptrs = Out + t_idx.to(tl.int64)[:, None] * stride_ot + h_idx[:, None] * stride_oh + offs_dv[None, :]
        tl.store(ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        if WRITE_LSE:
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
            tl.store(Lse + t_idx.to(tl.int64) * stride_lt + h_idx * stride_lh, lse, mask=row_ok)
    else:
        has = l_i > 0
        row = (split * num_tokens + t_idx.to(tl.int64)) * num_heads + h_idx
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(OPart + row[:, None] * DV + offs_dv[None, :], o, mask=row_ok[:, None] & dv_ok[None, :])
        lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LsePart + row, lse2, mask=row_ok)


@triton.jit
def _merge_kernel(
    OPart, LsePart, Sinks, VScale, Out, Lse,
    v_mul, num_splits, num_tokens, num_heads, stride_ot, stride_oh, stride_lt, stride_lh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, SPLITS_P2: tl.constexpr,
    HAS_SINKS: tl.constexpr, V_SCALE_PTR: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # t * H + h
    t = row // num_heads
    h = row % num_heads
    rows = num_tokens * num_heads
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < num_splits
    lse = tl.load(LsePart + offs_s * rows + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32) * LOG2E
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m_safe)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < DV
    o = tl.load(
        OPart + (offs_s[:, None] * rows + row) * DV + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )
    acc = tl.sum(o * w[:, None], 0)
    has = denom > 0
    scale = load_scale(v_mul, VScale, V_SCALE_PTR)
    acc = acc * (scale / tl.where(has, denom, 1.0))
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d, acc.to(Out.dtype.element_ty), mask=d_ok)
    if WRITE_LSE:
        lse_out = tl.where(has, (m_safe + tl.log2(tl.where(has, denom, 1.0))) * LN2, float("-inf"))
        tl.store(Lse + t * stride_lt + h * stride_lh, lse_out)


def merge_splits(
    o_part: Any, lse_part: Any, out: Any, lse: Any, *, sinks: Any, v_mul: float, v_scale_ptr: Any
) -> None:
    """Combine ``[splits, T, H, Dv]`` partials into ``out [T, H, Dv]`` (and ``lse [T, H]``, natural log)."""
    num_splits, num_tokens, num_heads, dv = o_part.shape
    if num_tokens * num_heads == 0:
        return
    _merge_kernel[(num_tokens * num_heads,)](
        o_part, lse_part, out if sinks is None else sinks, out if v_scale_ptr is None else v_scale_ptr,
        out, out if lse is None else lse,
        v_mul, num_splits, num_tokens, num_heads, out.stride(0), out.stride(1),
        0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
        DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
        SPLITS_P2=max(2, triton.next_power_of_2(num_splits)),
        HAS_SINKS=sinks is not None, V_SCALE_PTR=v_scale_ptr is not None, WRITE_LSE=lse is not None,
        num_warps=4 if dv > 256 else 2,
    )
