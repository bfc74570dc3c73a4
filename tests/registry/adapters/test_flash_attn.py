"""flash-attn FA4 adapter: refusals and the translation on CPU (library recorded), numerics on a GPU.

The GPU test runs wherever ``flash_attn.cute`` imports and a CUDA device is
present, whatever arch the manifest declares for FA4, so an sm_90 machine can
check the adapter against the reference (FA4's source accepts CC 8.x-12.x,
``flash_attn/cute/interface.py:787-788``).
"""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from registry.adapters import flash_attn as fa4  # noqa: E402
from registry.adapters import reference as ref  # noqa: E402
from registry.contracts import PrefillMetadata  # noqa: E402
from registry.errors import AdapterInputError, MissingDependencyError, UnsupportedFeatureError  # noqa: E402


def request(**kw):
    fields = dict(op="mha_prefill", arch="sm_100", q_dtype="bf16", kv_dtype="bf16", out_dtype="bf16", head_dim_qk=64,
                  head_dim_vo=64, num_qo_heads=4, num_kv_heads=2, sinks=False, sliding_window=False,
                  logits_soft_cap=False, return_lse=False, non_causal=False, noncontiguous_kv=False, cuda_graph=False)
    fields.update(kw)
    return SimpleNamespace(**fields)


SPEC = SimpleNamespace(name="test-fa4", op="mha_prefill")


class FakeCute(types.ModuleType):
    def __init__(self):
        super().__init__("flash_attn.cute")
        self.calls = []

    def flash_attn_varlen_func(self, **kw):
        self.calls.append(kw)
        return torch.ones(kw["q"].shape[:-1] + (kw["v"].shape[-1],), dtype=kw["q"].dtype), None


@pytest.fixture
def cute(monkeypatch):
    lib = FakeCute()
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", lib)

    def bind_cpu(self, t):
        self._device, self._device_index = t.device, t.get_device()

    monkeypatch.setattr(fa4.FA4Prefill, "_bind_device", bind_cpu)
    return lib


CU = torch.tensor([0, 3, 8], dtype=torch.int32)


def planned(**meta):
    ad = fa4.FA4Prefill(SPEC, request())
    ad.plan(PrefillMetadata(cu_seqlens_q=CU, cu_seqlens_kv=CU, **meta))
    q = torch.randn(8, 4, 64).to(torch.bfloat16)
    k = torch.randn(8, 2, 64).to(torch.bfloat16)
    return ad, q, k, k.clone()


@pytest.mark.parametrize("feature", ["sinks", "sliding_window", "logits_soft_cap", "return_lse"])
def test_features_it_does_not_translate_are_refused_before_the_import(monkeypatch, feature):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # importing it would fail
    with pytest.raises(UnsupportedFeatureError, match=rf"^test-fa4: {feature} is not supported: "):
        fa4.FA4Prefill(SPEC, request(**{feature: True}))


def test_a_missing_flash_attn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'kernelsel\[flash-attn\]'"):
        fa4.FA4Prefill(SPEC, request())


def test_the_varlen_call_gets_offsets_lengths_scale_and_causal(cute):
    ad, q, k, v = planned(sm_scale=0.125)
    res = ad.run(q, k, v, q_scale=2.0, k_scale=0.25, v_scale=4.0)
    (kw,) = cute.calls
    assert kw["q"] is q and kw["k"] is k and kw["v"] is v
    assert kw["cu_seqlens_q"] is CU and kw["cu_seqlens_k"] is CU and (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (5, 5)
    assert kw["softmax_scale"] == pytest.approx(0.125 * 0.5) and kw["causal"] is True and kw["return_lse"] is False
    assert torch.all(res.out == 4.0) and res.lse is None  # v_scale applied to the output in place


def test_tensor_scales_stay_on_the_device(cute):
    ad, q, k, v = planned()
    out = torch.empty(8, 4, 64, dtype=torch.bfloat16)
    res = ad.run(q, k, v, k_scale=torch.tensor([0.5]), v_scale=torch.tensor([3.0]), out=out)
    (kw,) = cute.calls
    assert kw["softmax_scale"] == pytest.approx(1 / math.sqrt(64))
    assert torch.equal(kw["q"], (q.float() * 0.5).to(torch.bfloat16)) and kw["q"] is not q
    assert res.out is out and torch.all(out == 3.0)


def test_non_causal_needs_a_non_causal_request(cute):
    with pytest.raises(UnsupportedFeatureError, match="non_causal was passed"):
        planned(causal=False)


def test_run_names_the_argument_that_breaks_the_contract(cute):
    ad, q, k, v = planned()
    with pytest.raises(AdapterInputError, match=r"^k: shape \[8, 1, 64\] does not match \[8, 2, 64\]"):
        ad.run(q, k[:, :1], v)
    with pytest.raises(UnsupportedFeatureError, match="sinks was passed"):
        ad.run(q, k, v, sinks=torch.zeros(4))


# ------------------------------------------------------------------ GPU


def _fa4_importable() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "cannot run here"
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_fa4_prefill_matches_the_reference_on_this_gpu(dtype, head_dim, noncontiguous):
    if not _fa4_importable():
        pytest.skip("flash_attn.cute (flash-attn-4) does not import here")
    gen = torch.Generator().manual_seed(head_dim)
    t = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    lens = [37, 300, 1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    n, hq, hkv = int(cu[-1]), 8, 2
    q = torch.randn(n, hq, head_dim, generator=gen).to(t)
    if noncontiguous:  # K and V interleaved in one buffer: strided views
        kv = torch.randn(n, 2, hkv, head_dim, generator=gen).to(t)
        k, v = kv[:, 0], kv[:, 1]
    else:
        k = torch.randn(n, hkv, head_dim, generator=gen).to(t)
        v = torch.randn(n, hkv, head_dim, generator=gen).to(t)
    ad = fa4.FA4Prefill(SimpleNamespace(name="flash-attn-fa4-prefill", op="mha_prefill"),
                        request(q_dtype=dtype, kv_dtype=dtype, out_dtype=dtype, head_dim_qk=head_dim,
                                head_dim_vo=head_dim, num_qo_heads=hq, num_kv_heads=hkv, noncontiguous_kv=noncontiguous))
    dev = "cuda"
    ad.plan(PrefillMetadata(cu_seqlens_q=cu.to(dev), cu_seqlens_kv=cu.to(dev)))
    out = ad.run(q.to(dev), k.to(dev), v.to(dev), v_scale=0.5).out
    ref_out, _ = ref.mha_ragged(q, k, v, cu, cu, causal=True, sm_scale=1 / math.sqrt(head_dim), window_left=-1,
                                logits_soft_cap=0.0, sinks=None, v_scale=0.5)
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=3e-2, rtol=2e-2)
