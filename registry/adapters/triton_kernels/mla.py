"""Absorbed MLA decode over a paged latent cache ``[P, S, R + Dr]``.

Every query head reads the same latent row, so one program owns a tile of
rows (new token, head) of one request -- up to 64, enough for Hopper's
warpgroup MMA -- and a split of its keys; each cache row is loaded once and
used twice: the whole row as the key (``q_nope . c + q_pe . k_pe``) and its
first ``R`` columns as the value.  Head tiles of one request are adjacent in
the grid, so their repeated reads of a split hit L2, not HBM.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from registry.adapters.triton_kernels import planning
from registry.adapters.triton_kernels.common import (
    dot_dtype, load_scale, mask_keys, scale_scores, score_scales, softmax_step, split_keys,
)
from registry.adapters.triton_kernels.merge import merge_splits, write_rows

log = logging.getLogger("kernelsel")


@triton.jit
def _mla_decode_kernel(
    QN, QP, KV, BlockTable, SeqLens, Sinks, QScale, KVScale, Out, Lse, OPart, LsePart,
    sm_scale, q_mul, kv_mul, soft_cap, window_left, q_len, num_tokens,
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_kvp, stride_kvs,
    stride_bt, stride_ot, stride_oh, stride_lt, stride_lh,
    HEADS: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    Q_SCALE_PTR: tl.constexpr, KV_SCALE_PTR: tl.constexpr, WRITE_LSE: tl.constexpr, FINAL: tl.constexpr,
    DOT: tl.constexpr,
):
    mblk = tl.program_id(0) // VALUE_SPLITS
    vblk = tl.program_id(0) % VALUE_SPLITS
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = tl.program_id(2)
    kv_len = tl.load(SeqLens + b)
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * HEADS
    tok = rows // HEADS
    h_idx = rows % HEADS
    t_idx = b * q_len + tok
    q_pos = kv_len - q_len + tok

    _, start, end = split_keys(
        kv_len, q_len, mblk * BLOCK_M, BLOCK_M, HEADS, window_left, split, num_splits, BLOCK_N, True, HAS_WINDOW
    )

    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_dr = tl.arange(0, BLOCK_DR)
    dr_ok = offs_dr < DR
    offs_v = vblk * (BLOCK_R // VALUE_SPLITS) + tl.arange(0, BLOCK_R // VALUE_SPLITS)
    v_ok = offs_v < R
    t64 = t_idx.to(tl.int64)
    qn = tl.load(
        QN + t64[:, None] * stride_qnt + h_idx[:, None] * stride_qnh + offs_r[None, :],
        mask=row_ok[:, None] & r_ok[None, :], other=0.0,
    ).to(DOT)
    qp = tl.load(
        QP + t64[:, None] * stride_qpt + h_idx[:, None] * stride_qph + offs_dr[None, :],
        mask=row_ok[:, None] & dr_ok[None, :], other=0.0,
    ).to(DOT)
    qk_scale = sm_scale * load_scale(q_mul, QScale, Q_SCALE_PTR) * load_scale(kv_mul, KVScale, KV_SCALE_PTR)
    qk_scale, cap_in, cap_out = score_scales(qk_scale, soft_cap, HAS_SOFTCAP)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R // VALUE_SPLITS], tl.float32)
    bt = BlockTable + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page = tl.load(bt + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        row_base = KV + page * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvs
        c = tl.load(row_base[:, None] + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        kpe = tl.load(row_base[:, None] + R + offs_dr[None, :], mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
        c = c.to(DOT)
        s = tl.dot(qn, tl.trans(c))
        s = tl.dot(qp, tl.trans(kpe.to(DOT)), s)
        s = scale_scores(s, qk_scale, cap_in, cap_out, HAS_SOFTCAP)
        s = mask_keys(s, offs_n, end, q_pos, window_left, True, HAS_WINDOW)
        p, alpha, m_new = softmax_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        if VALUE_SPLITS == 1:
            cv = c
        else:  # this program's value columns, again (an L1/L2 hit)
            cv = tl.load(row_base[:, None] + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), cv, acc * alpha[:, None])
        m_i = m_new

    write_rows(
        acc, m_i, l_i, t_idx, h_idx, row_ok, offs_v, v_ok,
        Sinks, KVScale, kv_mul, Out, stride_ot, stride_oh, Lse, stride_lt, stride_lh,
        OPart, LsePart, split, num_tokens, HEADS,
        R, HAS_SINKS, KV_SCALE_PTR, WRITE_LSE, FINAL,
    )


def _launch_hopper(args: tuple, flags: dict, *, q_len: int, heads: int, rank: int, rope: int, page_size: int,
                   block_n: int, splits: int, batch: int) -> bool:
    """Run the Gluon kernel; False (and the portable kernel from now on) if it cannot be built here.

    Gluon's API changes between Triton releases, and a release the kernel was
    not built against fails at compile time, before anything runs; that is
    logged once and this process goes on with the portable kernel.
    """
    from registry.adapters.triton_kernels import mla_hopper

    if planning.hopper_mla_disabled is not None:
        return False
    grid = (triton.cdiv(q_len * heads, mla_hopper.BLOCK_M), splits, batch)
    try:
        mla_hopper.launch(grid, args, heads=heads, rank=rank, rope=rope, page_size=page_size, block_n=block_n,
                          flags=flags)
    except (CompilationError, OutOfResources) as exc:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        planning.disable_hopper_mla(reason)
        log.warning("triton-mla-decode: the Gluon sm_90 kernel cannot be built with triton %s (%s); "
                    "using the portable Triton kernel from now on", triton.__version__, reason)
        return False
    return True


def mla_decode(
    q_nope: Any, q_pe: Any, kv_cache: Any, block_table: Any, seq_lens: Any, out: Any, lse: Optional[Any], *,
    q_len: int, sm_scale: float, window_left: int, soft_cap: float, sinks: Any,
    q_scale: tuple, kv_scale: tuple,
    o_part: Any, lse_part: Any, block_m: int, block_n: int, num_warps: int, num_stages: int, value_splits: int = 1,
    kernel: str = "portable",
) -> None:
    """Launch stage 1 (and the merge when ``o_part`` holds more than one split); causal within ``q_len``.

    ``value_splits > 1`` gives each program a slice of the ``R`` output
    columns (smaller accumulator, scores recomputed per slice).
    ``kernel="hopper"`` runs the Gluon sm_90 kernel (``mla_hopper``) instead,
    which has its own tile shape (64 rows, 8 warps).
    """
    num_tokens, heads, rank = q_nope.shape
    rope = q_pe.shape[2]
    page_size = kv_cache.shape[1]
    batch = block_table.shape[0]
    num_splits = 1 if o_part is None else o_part.shape[0]
    if batch == 0:
        return
    final = num_splits == 1
    dummy = out
    args = (
        q_nope, q_pe, kv_cache, block_table, seq_lens,
        dummy if sinks is None else sinks,
        dummy if q_scale[1] is None else q_scale[1], dummy if kv_scale[1] is None else kv_scale[1],
        out, dummy if lse is None else lse,
        dummy if final else o_part, dummy if final else lse_part,
        sm_scale, q_scale[0], kv_scale[0], soft_cap, window_left, q_len, num_tokens,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
    )
    flags = dict(
        HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=soft_cap > 0, HAS_SINKS=sinks is not None and final,
        Q_SCALE_PTR=q_scale[1] is not None, KV_SCALE_PTR=kv_scale[1] is not None,
        WRITE_LSE=lse is not None and final, FINAL=final,
    )
    if kernel == "hopper" and not _launch_hopper(args, flags, q_len=q_len, heads=heads, rank=rank, rope=rope,
                                                   page_size=page_size, block_n=block_n, splits=num_splits, batch=batch):
        kernel = "portable"
    if kernel != "hopper":
        grid = (triton.cdiv(q_len * heads, block_m) * value_splits, num_splits, batch)
        _mla_decode_kernel[grid](
            *args,
            HEADS=heads, R=rank, DR=rope, BLOCK_R=triton.next_power_of_2(rank),
            BLOCK_DR=max(16, triton.next_power_of_2(rope)),
            PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, VALUE_SPLITS=value_splits, **flags,
            DOT=dot_dtype(q_nope.dtype, _mla_decode_kernel, kv_cache.dtype), num_warps=num_warps,
            num_stages=num_stages,
        )
    if not final:
        merge_splits(o_part, lse_part, out, lse, sinks=sinks, v_mul=kv_scale[0], v_scale_ptr=kv_scale[1])
