"""Small ``@triton.jit`` helpers, constants and launch-time choices shared by every kernel family.

The kernels keep scores in base 2 (``exp2``/``log2``, one instruction each):
scores are multiplied by ``LOG2E`` once, in ``score_scales``, and an LSE is
turned back into the contract's natural log with ``LN2``.
"""

from __future__ import annotations

import functools
from typing import Any

import triton
import triton.language as tl


LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e): ``e^x = 2^(x * LOG2E)``."""

LN2 = tl.constexpr(0.6931471805599453)
"""ln(2): ``ln x = log2(x) * LN2``."""


@triton.jit
def load_scale(value, Ptr, FROM_PTR: tl.constexpr):
    """A float scale folded with an optional one-element device tensor (read here, never on the host)."""
    if FROM_PTR:
        value = value * tl.load(Ptr).to(tl.float32)
    return value


@triton.jit
def tanh(x):
    """tanh from exp2 (portable: no libdevice, runs in the interpreter)."""
    e = tl.exp2(x * (2 * LOG2E))  # e^(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def score_scales(qk_scale, soft_cap, HAS_SOFTCAP: tl.constexpr):
    """``(scale, cap_in, cap_out)`` of ``scale_scores`` for the scores' factor ``qk_scale``, ``LOG2E`` folded in.

    The contract's soft cap applies after scaling: ``cap * tanh(s * qk_scale / cap)``.
    """
    if HAS_SOFTCAP:
        cap_in = qk_scale / soft_cap
        cap_out = soft_cap * LOG2E
    else:
        qk_scale = qk_scale * LOG2E
        cap_in = 1.0  # unused
        cap_out = 1.0
    return qk_scale, cap_in, cap_out


@triton.jit
def scale_scores(s, scale, cap_in, cap_out, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products ``s`` -> base-2 scores (``score_scales`` made the factors)."""
    if HAS_SOFTCAP:
        s = cap_out * tanh(s * cap_in)
    else:
        s = s * scale
    return s


@triton.jit
def split_keys(kv_len, n_q, row0, ROWS: tl.constexpr, GROUP: tl.constexpr, window_left, split, num_splits,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``(first_tok, start, end)``: this split's keys among those rows ``[row0, row0 + ROWS)`` may see.

    Rows are (new token, head) pairs, ``GROUP`` heads per token; the ``n_q``
    new tokens are the last of ``kv_len`` (bottom-right causal).  Splits take
    whole ``BLOCK_N``-key blocks; ``first_tok`` is the tile's first token.
    """
    first_tok = row0 // GROUP
    last_tok = tl.minimum((row0 + ROWS - 1) // GROUP, n_q - 1)
    if CAUSAL:
        hi = kv_len - n_q + last_tok + 1
    else:
        hi = kv_len
    if HAS_WINDOW:
        lo = tl.maximum(kv_len - n_q + first_tok - window_left, 0)
    else:
        lo = 0
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    return first_tok, start, tl.minimum(start + chunk, hi)


@triton.jit
def mask_keys(s, offs_n, end, q_pos, window_left, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Scores ``[rows, keys]`` of keys a row may not see -- past ``end``, after its token, outside its window -- to -inf."""
    seen = offs_n[None, :] < end
    if CAUSAL:
        seen = seen & (offs_n[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        seen = seen & (offs_n[None, :] >= q_pos[:, None] - window_left)
    return tl.where(seen, s, float("-inf"))


@triton.jit
def softmax_step(s, m_i):
    """One online-softmax step in base 2: ``(p, alpha, m_new)``.

    ``p = 2^(s - m_new)`` and ``alpha = 2^(m_i - m_new)`` rescales the running
    sums; a row with no visible key yet keeps ``m = -inf`` and gets zeros, not NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp2(s - m_safe[:, None]), tl.exp2(m_i - m_safe), m_new


@triton.jit
def to_dot(x, DOT: tl.constexpr, FP8_CVT: tl.constexpr):
    """``x.to(DOT)``, or with ``FP8_CVT`` (``fp8_cvt_asm``) an FP8 tile converted to fp16 where it was loaded.

    Left to itself, Triton moves an FP8 tile's conversion past the layout
    change that feeds ``tl.dot``, so the tile crosses shared memory as bytes;
    for the value operand that transposed read is one ``ld.shared.b8`` per
    element (256 per thread per 64x128 tile).  The same conversion as opaque
    inline PTX (``is_pure=False``: not moved) makes it cross as fp16 through
    ``ldmatrix.trans``.  H200, FP8-KV decode B 256 context 4096: 0.682 ms
    against 0.720 ms.  Pinning the key tile too was slower (0.724 ms), and the
    MLA kernels, whose cache tile feeds both products, timed the same either
    way, so only ``paged_mha``'s value tile uses it.
    """
    if FP8_CVT != "":
        return tl.inline_asm_elementwise(
            FP8_CVT, "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4
        )
    else:
        return x.to(DOT)


_FP8_CVT = {"float8_e4m3fn": "cvt.rn.f16x2.e4m3x2", "float8_e5m2": "cvt.rn.f16x2.e5m2x2"}


def fp8_cvt_asm(kv_dtype: Any, kernel: Any, device: Any) -> str:
    """The ``FP8_CVT`` of ``to_dot`` for a cache dtype: the PTX (sm_89+, compiled) or ``""`` (plain ``.to``)."""
    cvt = _FP8_CVT.get(str(kv_dtype).removeprefix("torch."))
    if cvt is None or type(kernel).__name__ == "InterpretedFunction" or _capability(device.index) < (8, 9):
        return ""
    return "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; " + cvt + " $0, lo; " + cvt + " $1, hi; }"


@functools.lru_cache(maxsize=None)
def _capability(index: Any) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index)


def dot_dtype(q_dtype: Any, kernel: Any, kv_dtype: Any = None) -> Any:
    """The dtype the kernels feed ``tl.dot``.

    * the query's dtype by default;
    * fp16 when the KV cache is FP8 (compiled kernels): fp8 -> fp16 is one
      native conversion on sm_89+, while fp8 -> bf16 goes through fp32 and
      made FP8-KV decode no faster than bf16.  Every e4m3/e5m2 value is exact
      in fp16; a bf16 query is rounded to fp16's range (|q| < 65504, far
      above real activations), products still accumulate in fp32;
    * fp32 for bf16 under the interpreter: Triton's interpreter (3.6 through
      3.9) stores bf16 as uint16 and its ``tl.dot`` multiplies those raw
      integers; fp32 operands give the exact products there.
    """
    import torch

    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if kv_dtype is not None and kv_dtype.itemsize == 1 and not interpreted:
        return tl.float16
    if q_dtype == torch.bfloat16:
        return tl.float32 if interpreted else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[q_dtype]
