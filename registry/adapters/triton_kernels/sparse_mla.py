"""Sparse MLA decode: each query token attends to its own top-k cache positions.

``topk_indices [T, K]`` holds logical positions of the token's request
(``-1`` = unused); the kernel translates them through the block table
itself, so no slot tensor is built per step.  Tokens share no keys, so a
program owns one token and a tile of its heads (all heads read the same
selected latent rows) and one split of its ``K`` positions.  No causal mask
or window: which positions are read is the indexer's choice.
"""

from __future__ import annotations

from typing import Any, Optional

import triton
import triton.language as tl

from registry.adapters.triton_kernels.common import LOG2E, dot_dtype, load_scale, softmax_step
from registry.adapters.triton_kernels.merge import merge_splits, write_rows


@triton.jit
def _sparse_mla_kernel(
    QN, QP, KV, BlockTable, SeqLens, TopK, Sinks, QScale, KVScale, Out, Lse, OPart, LsePart,
    sm_scale, q_mul, kv_mul, q_len, num_tokens, topk,
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_kvp, stride_kvs,
    stride_bt, stride_tk, stride_ot, stride_oh, stride_lt, stride_lh,
    HEADS: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINKS: tl.constexpr, Q_SCALE_PTR: tl.constexpr, KV_SCALE_PTR: tl.constexpr,
    WRITE_LSE: tl.constexpr, FINAL: tl.constexpr, DOT: tl.constexpr,
):
    hblk = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    t = tl.program_id(2)
    b = t // q_len
    kv_len = tl.load(SeqLens + b)
    h_idx = hblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = h_idx < HEADS
    t_idx = tl.zeros([BLOCK_M], tl.int32) + t

    chunk = tl.cdiv(tl.cdiv(topk, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, topk)

    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_dr = tl.arange(0, BLOCK_DR)
    dr_ok = offs_dr < DR
    t64 = t.to(tl.int64)
    qn = tl.load(
        QN + t64 * stride_qnt + h_idx[:, None] * stride_qnh + offs_r[None, :],
        mask=row_ok[:, None] & r_ok[None, :], other=0.0,
    ).to(DOT)
    qp = tl.load(
        QP + t64 * stride_qpt + h_idx[:, None] * stride_qph + offs_dr[None, :],
        mask=row_ok[:, None] & dr_ok[None, :], other=0.0,
    ).to(DOT)
    qk_scale = sm_scale * load_scale(q_mul, QScale, Q_SCALE_PTR) * load_scale(kv_mul, KVScale, KV_SCALE_PTR)
    qk_scale = qk_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    bt = BlockTable + b.to(tl.int64) * stride_bt
    idx_row = TopK + t64 * stride_tk
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        pos = tl.load(idx_row + offs_n, mask=offs_n < end, other=-1)
        n_ok = (pos >= 0) & (pos < kv_len)
        page = tl.load(bt + pos // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        row_base = KV + page * stride_kvp + (pos % PAGE_SIZE) * stride_kvs
        c = tl.load(row_base[:, None] + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        kpe = tl.load(row_base[:, None] + R + offs_dr[None, :], mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
        c = c.to(DOT)
        s = tl.dot(qn, tl.trans(c))
        s = tl.dot(qp, tl.trans(kpe.to(DOT)), s) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        p, alpha, m_new = softmax_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DOT), c, acc * alpha[:, None])
        m_i = m_new

    write_rows(
        acc, m_i, l_i, t_idx, h_idx, row_ok, offs_r, r_ok,
        Sinks, KVScale, kv_mul, Out, stride_ot, stride_oh, Lse, stride_lt, stride_lh,
        OPart, LsePart, split, num_tokens, HEADS,
        R, HAS_SINKS, KV_SCALE_PTR, WRITE_LSE, FINAL,
    )


def sparse_mla_decode(
    q_nope: Any, q_pe: Any, kv_cache: Any, block_table: Any, seq_lens: Any, topk_indices: Any,
    out: Any, lse: Optional[Any], *,
    q_len: int, sm_scale: float, sinks: Any, q_scale: tuple, kv_scale: tuple,
    o_part: Any, lse_part: Any, block_m: int, block_n: int, num_warps: int, num_stages: int,
) -> None:
    """Launch stage 1 (and the merge when ``o_part`` holds more than one split)."""
    num_tokens, heads, rank = q_nope.shape
    rope = q_pe.shape[2]
    page_size = kv_cache.shape[1]
    topk = topk_indices.shape[1]
    num_splits = 1 if o_part is None else o_part.shape[0]
    if num_tokens == 0:
        return
    final = num_splits == 1
    dummy = out
    grid = (triton.cdiv(heads, block_m), num_splits, num_tokens)
    _sparse_mla_kernel[grid](
        q_nope, q_pe, kv_cache, block_table, seq_lens, topk_indices,
        dummy if sinks is None else sinks,
        dummy if q_scale[1] is None else q_scale[1], dummy if kv_scale[1] is None else kv_scale[1],
        out, dummy if lse is None else lse,
        dummy if final else o_part, dummy if final else lse_part,
        sm_scale, q_scale[0], kv_scale[0], q_len, num_tokens, topk,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        block_table.stride(0), topk_indices.stride(0), out.stride(0), out.stride(1),
        0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
        HEADS=heads, R=rank, DR=rope, BLOCK_R=triton.next_power_of_2(rank),
        BLOCK_DR=max(16, triton.next_power_of_2(rope)),
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SINKS=sinks is not None and final,
        Q_SCALE_PTR=q_scale[1] is not None, KV_SCALE_PTR=kv_scale[1] is not None,
        WRITE_LSE=lse is not None and final, FINAL=final,
        DOT=dot_dtype(q_nope.dtype, _sparse_mla_kernel, kv_cache.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if not final:
        merge_splits(o_part, lse_part, out, lse, sinks=sinks, v_mul=kv_scale[0], v_scale_ptr=kv_scale[1])
