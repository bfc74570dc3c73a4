"""Small ``@triton.jit`` helpers and launch-time choices shared by every kernel family."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def load_scale(value, Ptr, FROM_PTR: tl.constexpr):
    """A float scale folded with an optional one-element device tensor (read here, never on the host)."""
    if FROM_PTR:
        value = value * tl.load(Ptr).to(tl.float32)
    return value


@triton.jit
def tanh(x):
    """tanh from exp2 (portable: no libdevice, runs in the interpreter)."""
    e = tl.exp2(x * 2.8853900817779268)  # e^(2x)
    return 1.0 - 2.0 / (e + 1.0)


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
