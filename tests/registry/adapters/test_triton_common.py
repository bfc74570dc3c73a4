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


def test_scores_are_scaled_soft_capped_and_turned_base_2_once():
    """``score_scales`` + ``scale_scores``: ``s * scale`` or ``cap * tanh(s * scale / cap)``, times log2(e)."""
    import math

    import triton
    import triton.language as tl

    @triton.jit
    def scores(S, Out, qk_scale, soft_cap, HAS_SOFTCAP: tl.constexpr):
        offs = tl.arange(0, 16)
        scale, cap_in, cap_out = common.score_scales(qk_scale, soft_cap, HAS_SOFTCAP)
        tl.store(Out + offs, common.scale_scores(tl.load(S + offs), scale, cap_in, cap_out, HAS_SOFTCAP))

    s = torch.linspace(-40.0, 40.0, 16)
    for cap, want in ((0.0, s * 0.125), (5.0, 5.0 * torch.tanh(s * 0.125 / 5.0))):
        out = torch.empty(16)
        scores[(1,)](s, out, 0.125, cap, HAS_SOFTCAP=cap > 0)
        torch.testing.assert_close(out, want * math.log2(math.e), rtol=1e-5, atol=1e-5)


def test_the_kernels_take_log2e_and_the_soft_cap_from_common_only():
    import pathlib
    import re

    folder = pathlib.Path(common.__file__).parent
    repeated = re.compile(r"1\.44269|0\.69314|2\.88539|tanh\(s \* cap_in\)|soft_cap \* LOG2E")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(folder.glob("*.py")) if path.name != "common.py"
        for n, line in enumerate(path.read_text().splitlines(), 1) if repeated.search(line)
    ]
    assert not offenders, "\n".join(offenders)
