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


def dot_dtype(q_dtype: Any, kernel: Any) -> Any:
    """The dtype the kernels feed ``tl.dot``: the query's, except bf16 under the interpreter.

    Triton's interpreter (3.6 through 3.9) stores bf16 as uint16 and its
    ``tl.dot`` multiplies those raw integers; fp32 operands give the exact
    products there instead.  Compiled kernels always use the 16-bit type.
    """
    import torch

    if q_dtype == torch.bfloat16:
        interpreted = type(kernel).__name__ == "InterpretedFunction"
        return tl.float32 if interpreted else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[q_dtype]
