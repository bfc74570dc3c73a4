"""Launch-time choices of ``triton_kernels.common`` (pure Python; no GPU needed)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from registry.adapters.triton_kernels import common  # noqa: E402


class Compiled:  # stands for a compiled @triton.jit kernel (JITFunction)
    pass


class InterpretedFunction:  # the interpreter's kernel type, matched by name
    pass


@pytest.fixture
def gpu(monkeypatch):
    def set_capability(capability):
        monkeypatch.setattr(common, "_capability", lambda index: capability)
    return set_capability


@pytest.mark.parametrize("dtype,instruction", [(torch.float8_e4m3fn, "cvt.rn.f16x2.e4m3x2"),
                                               (torch.float8_e5m2, "cvt.rn.f16x2.e5m2x2")])
def test_fp8_caches_get_their_own_conversion_on_sm_89_and_later(gpu, dtype, instruction):
    gpu((9, 0))
    asm = common.fp8_cvt_asm(dtype, Compiled(), torch.device("cuda", 0))
    assert asm.count(instruction) == 2  # both halves of the packed register
    assert "$0" in asm and "$1" in asm and "$2" in asm


@pytest.mark.parametrize("capability", [(8, 0), (8, 6)])
def test_no_inline_conversion_before_sm_89(gpu, capability):
    gpu(capability)
    assert common.fp8_cvt_asm(torch.float8_e4m3fn, Compiled(), torch.device("cuda", 0)) == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_16_and_32_bit_caches_keep_the_plain_conversion(gpu, dtype):
    gpu((9, 0))
    assert common.fp8_cvt_asm(dtype, Compiled(), torch.device("cuda", 0)) == ""


def test_the_interpreter_never_gets_inline_ptx(gpu):
    gpu((9, 0))
    assert common.fp8_cvt_asm(torch.float8_e4m3fn, InterpretedFunction(), torch.device("cpu")) == ""
