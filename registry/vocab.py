"""The closed vocabularies of kernelsel: ops, solutions, backends, SMs, dtypes.

One spelling per value, the one the manifest uses (``sm_90``, ``bf16``).
Friendly spellings (``9.0``, ``sm90``, ``bfloat16``) are accepted only where a
person types them (CLI, keyword requests) and normalised by ``parse_arch`` /
``parse_dtype``.
"""

from __future__ import annotations

import difflib
import re
from enum import Enum

from registry.errors import RequestError, brief


class _Vocab(str, Enum):
    """A str enum that prints as its manifest spelling."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class Op(_Vocab):
    MHA_DECODE = "mha_decode"
    MHA_PREFILL = "mha_prefill"
    MHA_EXTEND = "mha_extend"
    MLA_DECODE = "mla_decode"
    SPARSE_MLA_DECODE = "sparse_mla_decode"


class Solution(_Vocab):
    FLASHINFER = "flashinfer"
    XQA = "xqa"
    TRTLLM_GEN = "trtllm-gen"
    FLASH_ATTN = "flash-attn"
    TRITON = "triton"
    REFERENCE = "reference"


class Backend(_Vocab):
    FA2 = "fa2"
    FA2_TC = "fa2-tc"
    FA3 = "fa3"
    XQA = "xqa"
    TRTLLM_GEN = "trtllm-gen"
    CUDNN = "cudnn"
    CUTLASS = "cutlass"
    CUTE_DSL = "cute-dsl"
    FA4 = "fa4"
    TRITON = "triton"
    TORCH = "torch"


class DType(_Vocab):
    BF16 = "bf16"
    FP16 = "fp16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    FP32 = "fp32"

    @property
    def is_fp8(self) -> bool:
        return self in (DType.FP8_E4M3, DType.FP8_E5M2)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return 1 if self.is_fp8 else 4 if self is DType.FP32 else 2


class Arch(_Vocab):
    """NVIDIA streaming-multiprocessor versions, ordered by compute capability."""

    SM_70 = "sm_70"
    SM_75 = "sm_75"
    SM_80 = "sm_80"
    SM_86 = "sm_86"
    SM_89 = "sm_89"
    SM_90 = "sm_90"
    SM_100 = "sm_100"
    SM_103 = "sm_103"
    SM_110 = "sm_110"
    SM_120 = "sm_120"
    SM_121 = "sm_121"

    @property
    def number(self) -> int:
        """Compute capability as an integer (sm_90 -> 90), for ordering."""
        return int(self.value[3:])

    @property
    def major(self) -> int:
        return self.number // 10

    def __lt__(self, other: object) -> bool:  # ordering by capability, not by text
        if not isinstance(other, Arch):
            return NotImplemented
        return self.number < other.number

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Arch):
            return NotImplemented
        return self.number <= other.number

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Arch):
            return NotImplemented
        return self.number > other.number

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Arch):
            return NotImplemented
        return self.number >= other.number


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' for a near miss in a closed vocabulary, else ''."""
    if not isinstance(word, str) or len(word) > 100:  # no near miss is that long; keep untrusted input cheap
        return ""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _spelling(value: object, what: str) -> str:
    """A typed-in spelling as text; other objects (whose str() might fail or mislead) are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (isinstance(value, int) and value.bit_length() > 64):
        return str(value)
    raise RequestError(f"expected {what}, got {type(value).__name__} {brief(value)}")


_ARCH_FORMS = re.compile(r"(?:sm_?|compute_?)?([0-9]{1,4})(?:\.([0-9]))?[af]?", re.IGNORECASE)
"""Matched with ``fullmatch``; at most four digits, so a 5,000-digit number is refused, never converted."""


def parse_arch(text: str | int | float | Arch) -> Arch:
    """Normalise 'sm_90', 'sm90', '9.0', '90', '90a', (9, 0) spellings to an Arch.

    Raises RequestError (a ValueError) naming the accepted values.
    """
    if isinstance(text, Arch):
        return text
    if isinstance(text, tuple) and len(text) == 2 and all(isinstance(p, int) and 0 <= p < 1000 for p in text):
        text = f"{text[0]}.{text[1]}"
    raw = _spelling(text, "an SM like 'sm_90', '9.0' or (9, 0)").strip()
    m = _ARCH_FORMS.fullmatch(raw)
    if m:
        major, minor = m.group(1), m.group(2)
        number = int(major) * 10 + int(minor) if minor is not None else int(major)
        try:
            return Arch(f"sm_{number}")
        except ValueError:
            pass
    raise RequestError(
        f"{brief(raw)} is not an SM like sm_90; expected one of {', '.join(Arch.values())}"
        + did_you_mean(raw, Arch.values())
    )


_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float8_e4m3fn": "fp8_e4m3",
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
    "e5m2": "fp8_e5m2",
}


def parse_dtype(text: str | DType) -> DType:
    """Normalise 'bf16', 'bfloat16', 'torch.bfloat16', 'fp8' (= e4m3) to a DType."""
    if isinstance(text, DType):
        return text
    if not isinstance(text, str) and type(text).__module__.split(".")[0] in ("torch", "numpy"):  # torch.bfloat16
        text = str(text)
    raw = _spelling(text, "a dtype like 'bf16'").strip().lower().removeprefix("torch.")
    raw = _DTYPE_ALIASES.get(raw, raw)
    try:
        return DType(raw)
    except ValueError:
        raise RequestError(
            f"{brief(text)} is not a dtype; expected one of {', '.join(DType.values())}"
            + did_you_mean(raw, DType.values())
        ) from None
