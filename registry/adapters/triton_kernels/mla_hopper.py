"""Absorbed MLA decode for Hopper (sm_90) in Gluon: the scores split across warpgroups.

The portable kernel (``mla.py``) leaves the MMA layout to Triton, which for a
chained ``dot`` puts all 8 warps along the 64 rows: both warpgroups compute
the whole ``64 x BLOCK_N`` score tile (``K = 576``) and each keeps half of the
``64 x 512`` output -- 1.5x the tensor-core work of the ideal split, and the
reason it reaches under half of FlashInfer's FA3 MLA at large batch.

Here the layouts are explicit.  Each warpgroup computes the scores of half the
keys of a block (``warps_per_cta = [4, 2]``), the probabilities meet in shared
memory, and each warpgroup multiplies all of them by its half of the value
columns, as FA3's MLA kernel does.  The cache block for step ``i + 1`` is
copied (``cp.async``) into the other shared-memory stage while step ``i``
computes.  The row sums stay per thread until the loop ends, which saves a
cross-warpgroup reduction per step.  The epilogue is the portable kernels'
``write_rows``.

H200 (bench/results/triton_vs_flashinfer-h200.json): 0.67-1.11 of FA3's
throughput where the portable kernel reached 0.43-0.93.  Tried and slower:
waiting for the value product one step later, so it overlaps the next
scores (B 64, context 8192: 0.485 ms against 0.415 ms).

Only sm_90 (warpgroup MMA) and a 16-bit cache of the same dtype as the query;
``mla.mla_decode`` routes everything else to the portable kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from registry.adapters.triton_kernels.common import (
    load_scale, mask_keys, scale_scores, score_scales, softmax_step, split_keys,
)
from registry.adapters.triton_kernels.merge import write_rows

# Gluon names that later Triton releases changed (3.6: async_copy_global_to_shared and thread_barrier;
# 3.9: async_load and barrier, the old names raising or gone).
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_M = 64
"""Rows (new token, head) per program: one warpgroup MMA's M."""
NUM_WARPS = 8
"""Two warpgroups: each computes half of a block's scores and half of the output columns."""


@gluon.jit
def _copy_cache_cols(buf, Ptr, bt, n0, end, stride_kvp, stride_kvs,
                     WIDTH: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, layout: gl.constexpr):
    """Start copying ``WIDTH`` columns from ``Ptr`` of cache rows ``[n0, n0 + BLOCK_N)`` (zeros past ``end``)."""
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    n_ok = offs_n < end
    page = gl.load(bt + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(gl.int64)
    row = page * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvs
    offs_c = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    _async_load(buf, Ptr + row[:, None] + offs_c[None, :], mask=n_ok[:, None])


@gluon.jit
def _issue_block(c_buf, kpe_buf, KV, bt, n0, end, stride_kvp, stride_kvs,
                 R: gl.constexpr, DR: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                 ld_c: gl.constexpr, ld_pe: gl.constexpr):
    """Start copying one block of cache rows into one stage: the latent part and the rope part, one group."""
    _copy_cache_cols(c_buf, KV, bt, n0, end, stride_kvp, stride_kvs, R, PAGE_SIZE, BLOCK_N, ld_c)
    _copy_cache_cols(kpe_buf, KV + R, bt, n0, end, stride_kvp, stride_kvs, DR, PAGE_SIZE, BLOCK_N, ld_pe)
    async_copy.commit_group()


@gluon.jit
def _query_to_shared(Q, stride_t, stride_h, mblk, b, q_len, HEADS: gl.constexpr, WIDTH: gl.constexpr,
                     BM: gl.constexpr, layout: gl.constexpr, smem_layout: gl.constexpr):
    """This program's rows (new token, head) of ``Q`` in shared memory, zeros past the last row."""
    rows = mblk * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    t = (b * q_len + rows // HEADS).to(gl.int64)
    ptrs = Q + t[:, None] * stride_t + (rows % HEADS)[:, None] * stride_h
    q = gl.load(ptrs + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))[None, :],
                mask=(rows < q_len * HEADS)[:, None], other=0.0)
    return gl.allocate_shared_memory(Q.dtype.element_ty, [BM, WIDTH], smem_layout, q)


@gluon.jit
def _mla_decode_hopper_kernel(
    QN, QP, KV, BlockTable, SeqLens, Sinks, QScale, KVScale, Out, Lse, OPart, LsePart,
    sm_scale, q_mul, kv_mul, soft_cap, window_left, q_len, num_tokens,
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_kvp, stride_kvs,
    stride_bt, stride_ot, stride_oh, stride_lt, stride_lh,
    HEADS: gl.constexpr, R: gl.constexpr, DR: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
    HAS_WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SINKS: gl.constexpr,
    Q_SCALE_PTR: gl.constexpr, KV_SCALE_PTR: gl.constexpr, WRITE_LSE: gl.constexpr, FINAL: gl.constexpr,
):
    BM: gl.constexpr = 64
    dtype: gl.constexpr = KV.dtype.element_ty
    # scores [BM, BLOCK_N]: warpgroup w owns keys [w * BLOCK_N / 2, (w + 1) * BLOCK_N / 2)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BLOCK_N // 2, 16])
    # output [BM, R]: warpgroup w owns value columns [w * R / 2, (w + 1) * R / 2)
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, R // 2, 16])
    ld_c: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])
    ld_pe: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    c_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], dtype)
    pe_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], dtype)
    qn_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, R], dtype)
    qp_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, DR], dtype)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BLOCK_N], dtype)

    mblk = gl.program_id(0)
    split = gl.program_id(1)
    num_splits = gl.num_programs(1)
    b = gl.program_id(2)
    kv_len = gl.load(SeqLens + b)

    _, start, end = split_keys(kv_len, q_len, mblk * BM, BM, HEADS, window_left, split, num_splits, BLOCK_N, True,
                               HAS_WINDOW)
    bt = BlockTable + b.to(gl.int64) * stride_bt

    # queries -> shared memory (the A operand of the score MMA)
    qn_smem = _query_to_shared(QN, stride_qnt, stride_qnh, mblk, b, q_len, HEADS, R, BM, ld_c, qn_sl)
    qp_smem = _query_to_shared(QP, stride_qpt, stride_qph, mblk, b, q_len, HEADS, DR, BM, ld_pe, qp_sl)

    c_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, R], c_sl)
    pe_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, DR], pe_sl)
    p_smem = gl.allocate_shared_memory(dtype, [BM, BLOCK_N], p_sl)

    rows = mblk * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    q_pos = kv_len - q_len + rows // HEADS
    qk_scale = sm_scale * load_scale(q_mul, QScale, Q_SCALE_PTR) * load_scale(kv_mul, KVScale, KV_SCALE_PTR)
    qk_scale, cap_in, cap_out = score_scales(qk_scale, soft_cap, HAS_SOFTCAP)

    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_2d = gl.zeros([BM, BLOCK_N], gl.float32, layout=s_layout)  # row sums, reduced once after the loop
    acc = gl.zeros([BM, R], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BM, BLOCK_N], gl.float32, layout=s_layout)

    num_blocks = gl.cdiv(end - start, BLOCK_N)
    _issue_block(c_smem.index(0), pe_smem.index(0), KV, bt, start, end, stride_kvp, stride_kvs,
                 R, DR, PAGE_SIZE, BLOCK_N, ld_c, ld_pe)
    for i in range(num_blocks):
        n0 = start + i * BLOCK_N
        stage = i % 2
        async_copy.wait_group(0)
        _barrier()  # every thread's copies landed; both warpgroups are done with step i - 1
        fence_async_shared()
        if i + 1 < num_blocks:
            _issue_block(c_smem.index(1 - stage), pe_smem.index(1 - stage), KV, bt, n0 + BLOCK_N, end,
                         stride_kvp, stride_kvs, R, DR, PAGE_SIZE, BLOCK_N, ld_c, ld_pe)
        c_buf = c_smem.index(stage)
        pe_buf = pe_smem.index(stage)
        s = warpgroup_mma(qn_smem, c_buf.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(qp_smem, pe_buf.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))

        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = scale_scores(s, qk_scale, cap_in, cap_out, HAS_SOFTCAP)
        s = mask_keys(s, offs_n, end, q_pos, window_left, True, HAS_WINDOW)
        p, alpha, m_new = softmax_step(s, m_i)
        l_2d = l_2d * alpha[:, None] + p
        m_i = m_new
        p_smem.store(p.to(dtype))
        fence_async_shared()
        _barrier()  # both halves of the probabilities are in shared memory
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_smem, c_buf, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    l_i = gl.sum(l_2d, 1)
    o_rows = mblk * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    row_ok = o_rows < q_len * HEADS
    t_idx = b * q_len + o_rows // HEADS
    h_idx = o_rows % HEADS
    offs_v = gl.arange(0, R, layout=gl.SliceLayout(0, o_layout))
    write_rows(
        acc, gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)), gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)),
        t_idx, h_idx, row_ok, offs_v, offs_v < R,
        Sinks, KVScale, kv_mul, Out, stride_ot, stride_oh, Lse, stride_lt, stride_lh,
        OPart, LsePart, split, num_tokens, HEADS,
        R, HAS_SINKS, KV_SCALE_PTR, WRITE_LSE, FINAL,
    )


def launch(grid: tuple, args: tuple, *, heads: int, rank: int, rope: int, page_size: int, block_n: int,
           flags: dict) -> None:
    """Launch stage 1 with the portable kernel's argument list (``flags``: its feature constexprs)."""
    _mla_decode_hopper_kernel[grid](
        *args, HEADS=heads, R=rank, DR=rope, PAGE_SIZE=page_size, BLOCK_N=block_n, **flags,
        num_warps=NUM_WARPS,
    )
