"""Each adapter's exact library call, pinned, with the library replaced by a recorder (no GPU).

Parametrized over every kernel of the bundled manifest that runs a library
(not ``reference``, not ``triton``): the request is built from the kernel's
own declared values and must select it; the library module (``flashinfer``,
``flash_attn.cute``) is a fake in ``sys.modules`` that records every call.
Each adapter class has one pin below: which function or wrapper it calls,
with which backend, which scale arguments for ``q_scale=2, k_scale=0.25,
v_scale=4`` (``kv_scale=0.5`` for MLA) and ``sm_scale=0.125``, and which
layouts.  The pins are the translation this project promises; the FlashInfer
source lines that make each value right are cited beside it (and in
docs/audit-flashinfer-0.7.2.md).  A new adapter class fails here until it
brings its pin.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from registry.adapters import flash_attn as flash_attn_adapter  # noqa: E402
from registry.adapters import flashinfer_common as common  # noqa: E402
from registry.adapters.base import torch_dtype  # noqa: E402
from registry.constraints import IntRange, OneOf  # noqa: E402
from registry.contracts import DecodeMetadata, ExtendMetadata, PrefillMetadata  # noqa: E402
from registry.loader import load_manifest  # noqa: E402
from selector import KernelRequest, Platform, Selector  # noqa: E402

MANIFEST = load_manifest()
KERNELS = [k for k in MANIFEST.kernels if k.solution.value not in ("reference", "triton")]
SM_SCALE = 0.125
MHA_SCALES = dict(q_scale=2.0, k_scale=0.25, v_scale=4.0)
MLA_SCALES = dict(q_scale=2.0, kv_scale=0.5)


# ------------------------------------------------------------------ the fake libraries


class Recorder:
    """A callable or wrapper class stand-in: every call lands in ``log`` as ``(name, args, kwargs)``."""

    def __init__(self, log: list, name: str, result: Any = None):
        self.log, self.name, self.result = log, name, result

    def __call__(self, *args, **kwargs):
        self.log.append((self.name, args, kwargs))
        return self.result(*args, **kwargs) if callable(self.result) else self.result

    def __getattr__(self, attr):  # wrapper methods: plan, run
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Recorder(self.log, f"{self.name}.{attr}", _output if attr == "run" else None)


def _output(*args, **kwargs):
    """A plausible result: ``out`` if given, else zeros shaped like the query's leading dims."""
    out = kwargs.get("out")
    if out is None:
        q = kwargs.get("query", kwargs.get("q", args[0] if args else None))
        q = q[0] if isinstance(q, tuple) else q
        out = torch.zeros(q.shape[:-1] + (8,))
    return (out, torch.zeros(out.shape[:-1])) if kwargs.get("return_lse") else out


def fake_flashinfer(log: list) -> types.ModuleType:
    fi = types.ModuleType("flashinfer")
    wrapper = lambda name: Recorder(log, name, lambda *a, **k: Recorder(log, name))  # noqa: E731
    fi.BatchDecodeWithPagedKVCacheWrapper = wrapper("BatchDecodeWithPagedKVCacheWrapper")
    fi.BatchPrefillWithPagedKVCacheWrapper = wrapper("BatchPrefillWithPagedKVCacheWrapper")
    fi.BatchPrefillWithRaggedKVCacheWrapper = wrapper("BatchPrefillWithRaggedKVCacheWrapper")
    fi.mla = types.SimpleNamespace(
        BatchMLAPagedAttentionWrapper=wrapper("mla.BatchMLAPagedAttentionWrapper"),
        MLAPlanMetadata=types.SimpleNamespace(csr=lambda *a: ("csr",) + a),
        trtllm_batch_decode_with_kv_cache_mla=Recorder(log, "mla.trtllm_batch_decode_with_kv_cache_mla", _output),
        trtllm_batch_decode_sparse_mla_dsv4=Recorder(log, "mla.trtllm_batch_decode_sparse_mla_dsv4", _output),
    )
    fi.decode = types.SimpleNamespace(
        trtllm_batch_decode_with_kv_cache=Recorder(log, "decode.trtllm_batch_decode_with_kv_cache", _output)
    )
    fi.prefill = types.SimpleNamespace(
        trtllm_batch_context_with_kv_cache=Recorder(log, "prefill.trtllm_batch_context_with_kv_cache", _output)
    )
    fi.utils = types.SimpleNamespace(
        device_support_pdl=lambda device: False,
        get_device_sm_count=lambda device: 132,
        get_trtllm_gen_multi_ctas_kv_counter_bytes=lambda b, h, sm: 64,
    )
    return fi


def fake_flash_attn(log: list) -> dict:
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = Recorder(log, "flash_attn.cute.flash_attn_varlen_func", lambda *a, **k: (
        torch.zeros(k["q"].shape[:-1] + (k["v"].shape[-1],)),
        torch.zeros(k["q"].shape[1], k["q"].shape[0]) if k.get("return_lse") else None,
    ))
    root = types.ModuleType("flash_attn")
    root.cute = cute
    return {"flash_attn": root, "flash_attn.cute": cute}


@pytest.fixture
def library(monkeypatch):
    """The recorded calls; the fakes are installed in ``sys.modules`` and adapters run on CPU tensors."""
    log: list = []
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer(log))
    for name, module in fake_flash_attn(log).items():
        monkeypatch.setitem(sys.modules, name, module)

    def bind_cpu(self, t):
        self._device, self._device_index, self._pdl = t.device, t.get_device(), False

    monkeypatch.setattr(common.FlashInferAdapter, "_bind_device", bind_cpu)
    monkeypatch.setattr(flash_attn_adapter.FA4Prefill, "_bind_device",
                        lambda self, t: setattr(self, "_device", t.device) or setattr(self, "_device_index", t.get_device()))
    monkeypatch.setattr(common, "workspace", lambda device, nbytes, tag="float": torch.zeros(8, dtype=torch.uint8))
    return log


# ------------------------------------------------- a request each kernel declares


def _first(constraint: Any, preferred: tuple, fallback: int) -> int:
    """A value the constraint allows: the first preferred one it admits, else its first or minimum."""
    for v in preferred:
        if constraint is None or constraint.allows(v):
            return v
    if isinstance(constraint, OneOf):
        return constraint.values[0]
    assert isinstance(constraint, IntRange)
    return constraint.min if constraint.min is not None else fallback


DTYPE_PAIRS = {
    "16-bit": (("bf16", "bf16"), ("fp16", "fp16")),
    "fp8": (("bf16", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3"), ("fp16", "fp8_e4m3")),
}
"""(q_dtype, kv_dtype) candidates per variant, in order; a kernel is pinned with the first it serves."""


def request_for(spec, variant: str = "16-bit"):
    """The first request of ``variant`` that ``spec`` serves, built from its declared shapes; None if none."""
    s = spec.shapes
    fields: dict[str, Any] = dict(
        op=spec.op.value, arch=spec.arch.members()[0].value, kernel=spec.name,
        num_qo_heads=_first(s.num_qo_heads, (8, 16, 128), 8),
    )
    if spec.op.value.startswith("mha"):
        d = _first(s.head_dim_qk, (64, 128), 64)
        group = _first(s.gqa_group_size, (4, 2, 1), 1)
        fields.update(head_dim_qk=d, head_dim_vo=d, num_kv_heads=max(1, fields["num_qo_heads"] // group))
    else:
        fields.update(kv_lora_rank=_first(s.kv_lora_rank, (512,), 512), qk_rope_head_dim=_first(s.qk_rope_head_dim, (64,), 64),
                      qk_nope_head_dim=_first(s.qk_nope_head_dim, (128,), 128))
        if spec.op.value == "sparse_mla_decode":
            fields["topk"] = _first(s.topk, (8,), 8)
    if spec.op.value != "mha_prefill":
        fields["page_size"] = _first(s.page_size, (16, 64, 32), 16)
    selector = Selector(MANIFEST, Platform.hypothetical(fields["arch"]))
    for q, kv in DTYPE_PAIRS[variant]:
        request = KernelRequest(q_dtype=q, kv_dtype=kv, **fields)
        if selector.solve(request).kernel is spec:
            return request
    return None


def adapter_for(spec, request):
    module, name = spec.adapter.split(":")
    return getattr(importlib.import_module(module), name)(spec, request)


def planned(ad, request):
    """plan() for two requests of 5 and 9 tokens (2 and 3 new ones for extend); returns ``run(**scales)``."""
    r, s = request, request.page_size or 16
    dev_q, dev_kv = torch_dtype(r.q_dtype), torch_dtype(r.kv_dtype)
    seq = torch.tensor([5, 9], dtype=torch.int32)
    table = torch.tensor([[3, 0, 0, 0], [1, 2, 0, 0]], dtype=torch.int32)
    op = r.op.value
    if op == "mha_prefill":
        cu = torch.tensor([0, 5, 14], dtype=torch.int32)
        ad.plan(PrefillMetadata(cu_seqlens_q=cu, cu_seqlens_kv=cu, sm_scale=SM_SCALE))
        q = torch.zeros(14, r.num_qo_heads, r.head_dim_qk, dtype=dev_q)
        k = torch.zeros(14, r.num_kv_heads, r.head_dim_qk, dtype=dev_kv)
        return lambda **scales: ad.run(q, k, k.clone(), **scales)
    if op == "mha_extend":
        ad.plan(ExtendMetadata(block_table=table, seq_lens=seq, sm_scale=SM_SCALE,
                               cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32)))
        q = torch.zeros(5, r.num_qo_heads, r.head_dim_qk, dtype=dev_q)
    else:
        ad.plan(DecodeMetadata(block_table=table, seq_lens=seq, sm_scale=SM_SCALE))
        q = torch.zeros(2, r.num_qo_heads, r.head_dim_qk or r.kv_lora_rank, dtype=dev_q)
    if op.startswith("mha"):
        kv = torch.zeros(4, s, r.num_kv_heads, r.head_dim_qk, dtype=dev_kv)
        return lambda **scales: ad.run(q, kv, kv.clone(), **scales)
    q_pe = torch.zeros(2, r.num_qo_heads, r.qk_rope_head_dim, dtype=dev_q)
    cache = torch.zeros(4, s, r.kv_lora_rank + r.qk_rope_head_dim, dtype=dev_kv)
    if op == "sparse_mla_decode":
        topk = torch.zeros(2, r.topk, dtype=torch.int32)
        return lambda **scales: ad.run(q, q_pe, cache, topk, **scales)
    return lambda **scales: ad.run(q, q_pe, cache, **scales)


UNSCALED = {"CuteDSLExtend"}
"""Adapters whose library route takes no scales (they refuse them; tested in test_flashinfer_inputs.py)."""


# ----------------------------------------------------------------------- the pins


def one(log: list, name: str) -> tuple:
    calls = [c for c in log if c[0] == name]
    assert len(calls) == 1, f"expected one call of {name}, got {[c[0] for c in log]}"
    return calls[0][1], calls[0][2]


def pin_decode_wrapper(log, r, *, tensor_cores):
    # BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=..., backend="fa2"): never "auto",
    # which may resolve a plan to cuDNN (decode.py:1433-1496); fa2 + no tensor cores is the CUDA-core kernel
    args, kw = one(log, "BatchDecodeWithPagedKVCacheWrapper")
    assert args[1:] == ("NHD",) and kw == {"use_tensor_cores": tensor_cores, "backend": "fa2"}
    _, plan = one(log, "BatchDecodeWithPagedKVCacheWrapper.plan")
    assert plan["sm_scale"] == SM_SCALE and plan["q_data_type"] == torch_dtype(r.q_dtype)
    # q_scale * k_scale multiply sm_scale (decode.py:2907-2910), v_scale multiplies out after the kernel (decode.py:3312-3318)
    args, run = one(log, "BatchDecodeWithPagedKVCacheWrapper.run")
    assert isinstance(args[1], tuple) and run == dict(
        q_scale=0.5, v_scale=4.0, out=None, lse=None, return_lse=False, enable_pdl=False
    )


def pin_paged_prefill(log, r, *, backend):
    args, kw = one(log, "BatchPrefillWithPagedKVCacheWrapper")
    assert args[1:] == ("NHD",) and kw == {"backend": backend}
    _, plan = one(log, "BatchPrefillWithPagedKVCacheWrapper.plan")
    assert plan["sm_scale"] == SM_SCALE and plan["head_dim_vo"] == r.head_dim_vo and plan["causal"] is True
    args, run = one(log, "BatchPrefillWithPagedKVCacheWrapper.run")
    assert isinstance(args[1], tuple)
    if r.q_dtype.is_fp8:  # FA3's FP8 kernel reads scale_q/k/v from the positional args (prefill.py:903-930)
        assert args[2:] == (2.0, 0.25, 4.0)
        assert run == dict(q_scale=None, v_scale=None, out=None, lse=None, return_lse=False, lse_base="ln", enable_pdl=False)
    else:
        assert len(args) == 2 and run == dict(
            q_scale=0.5, v_scale=4.0, out=None, lse=None, return_lse=False, lse_base="ln", enable_pdl=False
        )


def pin_cute_dsl_prefill(log, r):
    # the cute-dsl route takes no q/k/v scales (prefill.py:4185-4189): the adapter refuses them, so the
    # pin is the unscaled call
    args, kw = one(log, "BatchPrefillWithPagedKVCacheWrapper")
    assert args[1:] == ("NHD",) and kw == {"backend": "cute-dsl"}
    _, plan = one(log, "BatchPrefillWithPagedKVCacheWrapper.plan")
    assert plan["sm_scale"] == SM_SCALE and plan["head_dim_vo"] == r.head_dim_qk
    _, run = one(log, "BatchPrefillWithPagedKVCacheWrapper.run")
    assert run == dict(out=None, lse=None, return_lse=False, lse_base="ln", enable_pdl=False)


def pin_ragged_prefill(log, r, *, backend):
    # the ragged wrapper ignores q/k/v scales for a 16-bit query (prefill.py:5998-6004): the adapter
    # scales q into a buffer and out in place, so the library call carries none
    args, kw = one(log, "BatchPrefillWithRaggedKVCacheWrapper")
    assert args[1:] == ("NHD",) and kw == {"backend": backend}
    _, plan = one(log, "BatchPrefillWithRaggedKVCacheWrapper.plan")
    assert plan["sm_scale"] == SM_SCALE and plan["causal"] is True
    args, run = one(log, "BatchPrefillWithRaggedKVCacheWrapper.run")
    assert args[3:] == ((2.0, 0.25, 4.0) if r.q_dtype.is_fp8 else ())
    assert run == dict(out=None, lse=None, return_lse=False, lse_base="ln", enable_pdl=False)


def pin_fa_mla(log, r, *, backend):
    # keyword API (_wrapper.py:316-343): split query, packed latent cache; sm_scale from the plan;
    # a float kv_scale of a 16-bit cache is applied outside the kernel (q and out scaled by the adapter)
    _, kw = one(log, "mla.BatchMLAPagedAttentionWrapper")
    assert kw == {"backend": backend}
    _, plan = one(log, "mla.BatchMLAPagedAttentionWrapper.plan")
    assert plan["sm_scale"] == SM_SCALE and plan["query_layout"] == "split" and plan["kv_cache_layout"] == "packed"
    assert plan["lse_mode"] == "none"
    _, run = one(log, "mla.BatchMLAPagedAttentionWrapper.run")
    keys = {"query", "kv_cache", "out", "lse", "return_lse", "return_lse_base_on_e"}
    if r.kv_dtype.is_fp8:  # a float kv_scale is the kernel's ckv/kpe scale (_fa_common.py:691-724)
        assert plan["scale_mode"] == "kv-per-tensor" and run["ckv_scale"] == run["kpe_scale"] == 0.5
        assert set(run) == keys | {"ckv_scale", "kpe_scale"}
    else:
        assert plan["scale_mode"] == "default" and set(run) == keys


def pin_xqa_decode(log, r):
    # bmm1 = sm_scale * q_scale * k_scale; a 16-bit cache gets bmm2 = 1 and the adapter scales out
    # (XQA applies its kv scale to quantized caches only, csrc/xqa/mha.cu:1817, 2614)
    args, kw = one(log, "decode.trtllm_batch_decode_with_kv_cache")
    assert isinstance(args[1], tuple)
    assert (kw["backend"], kw["kv_layout"], kw["q_len_per_req"]) == ("xqa", "NHD", 1)
    assert kw["bmm1_scale"] == pytest.approx(SM_SCALE * 0.5)
    assert kw["bmm2_scale"] == (4.0 if r.kv_dtype.is_fp8 else 1.0)
    assert "lse" not in kw and "return_lse" not in kw


def pin_trtllm_gen_decode(log, r):
    # trtllm-gen convention: bmm1 = sm_scale * q_scale * k_scale, bmm2 = v_scale (decode.py:3427-3449)
    args, kw = one(log, "decode.trtllm_batch_decode_with_kv_cache")
    assert isinstance(args[1], tuple)
    assert (kw["backend"], kw["kv_layout"], kw["q_len_per_req"]) == ("trtllm-gen", "NHD", 1)
    assert kw["bmm1_scale"] == pytest.approx(SM_SCALE * 0.5) and kw["bmm2_scale"] == 4.0
    assert kw["bmm1_scale_log2"] is None and kw["multi_ctas_kv_counter_buffer"] is not None


def pin_trtllm_gen_context(log, r):
    args, kw = one(log, "prefill.trtllm_batch_context_with_kv_cache")
    bmm1, bmm2 = args[7:9]
    assert isinstance(args[1], tuple) and bmm1 == pytest.approx(SM_SCALE * 0.5) and bmm2 == 4.0
    assert (kw["backend"], kw["kv_layout"], kw["causal"]) == ("trtllm-gen", "NHD", True)


def pin_trtllm_gen_mla(log, r):
    # packed query [B, q_len, H, R+Dr]; bmm1 = sm_scale * q_scale * kv_scale, bmm2 = kv_scale
    args, kw = one(log, "mla.trtllm_batch_decode_with_kv_cache_mla")
    assert args[0].shape == (2, 1, r.num_qo_heads, r.kv_lora_rank + r.qk_rope_head_dim)
    assert args[3:6] == (r.qk_nope_head_dim, r.kv_lora_rank, r.qk_rope_head_dim)
    assert kw["backend"] == "trtllm-gen" and kw["multi_ctas_kv_counter_buffer"] is not None
    assert kw["bmm1_scale"] == pytest.approx(SM_SCALE * 2.0 * 0.5) and kw["bmm2_scale"] == 0.5


def pin_xqa_mla(log, r):
    # FlashInfer passes bmm1 as the kernel's q_scale and bmm2 as its kv_scale (mla/_core.py:5463-5464);
    # the kernel multiplies the logits by q_scale * kv_scale (csrc/xqa/mla_sm120.cu:464): bmm1 = sm * q_scale
    args, kw = one(log, "mla.trtllm_batch_decode_with_kv_cache_mla")
    assert args[0].shape == (2, 1, r.num_qo_heads, r.kv_lora_rank + r.qk_rope_head_dim)
    assert args[6].shape[1] % (128 // r.page_size) == 0  # mla/_core.py:831-834
    assert kw == dict(out=None, bmm1_scale=pytest.approx(SM_SCALE * 2.0), bmm2_scale=0.5, enable_pdl=False, backend="xqa")


def pin_dsv4_sparse_mla(log, r):
    args, kw = one(log, "mla.trtllm_batch_decode_sparse_mla_dsv4")
    assert args[0].shape == (2, 1, r.num_qo_heads, 512) and args[1].shape[1:] == (1, r.page_size, 512)
    assert kw["compressed_kv_cache"] is args[1] and kw["kv_layout"] == "HND" and kw["backend"] == "trtllm-gen"
    assert kw["bmm1_scale"] == pytest.approx(SM_SCALE * 2.0 * 0.5) and kw["bmm2_scale"] == 0.5
    assert kw["sparse_indices"].shape == (2, 128 + r.topk) and kw["seq_lens"].tolist() == [0, 0]


def pin_fa4_varlen(log, r):
    # flash_attn.cute.flash_attn_varlen_func (interface.py:3905-3941): fresh ragged K/V, causal,
    # softmax_scale = sm_scale * q_scale * k_scale (16-bit: no descale arguments); v_scale on out
    _, kw = one(log, "flash_attn.cute.flash_attn_varlen_func")
    assert kw["softmax_scale"] == pytest.approx(SM_SCALE * 0.5) and kw["causal"] is True
    assert kw["cu_seqlens_q"] is kw["cu_seqlens_k"] or torch.equal(kw["cu_seqlens_q"], kw["cu_seqlens_k"])
    assert kw["return_lse"] is False and "page_table" not in kw


PINS = {
    "FA2Decode": lambda log, r: pin_decode_wrapper(log, r, tensor_cores=False),
    "FA2TCDecode": lambda log, r: pin_decode_wrapper(log, r, tensor_cores=True),
    "FA2Extend": lambda log, r: pin_paged_prefill(log, r, backend="fa2"),
    "FA3Extend": lambda log, r: pin_paged_prefill(log, r, backend="fa3"),
    "CuteDSLExtend": pin_cute_dsl_prefill,
    "FA2Prefill": lambda log, r: pin_ragged_prefill(log, r, backend="fa2"),
    "FA3Prefill": lambda log, r: pin_ragged_prefill(log, r, backend="fa3"),
    "FA2MLADecode": lambda log, r: pin_fa_mla(log, r, backend="fa2"),
    "FA3MLADecode": lambda log, r: pin_fa_mla(log, r, backend="fa3"),
    "XQADecode": pin_xqa_decode,
    "TrtllmGenDecode": pin_trtllm_gen_decode,
    "TrtllmGenExtend": pin_trtllm_gen_context,
    "TrtllmGenMLADecode": pin_trtllm_gen_mla,
    "XQAMLADecode": pin_xqa_mla,
    "TrtllmGenSparseMLADecode": pin_dsv4_sparse_mla,
    "FA4Prefill": pin_fa4_varlen,
}


CASES = [(k, v) for k in KERNELS for v in DTYPE_PAIRS if request_for(k, v) is not None]


@pytest.mark.parametrize("spec,variant", CASES, ids=[f"{k.name}-{v}" for k, v in CASES])
def test_the_adapter_makes_its_pinned_library_call(library, spec, variant):
    adapter_class = spec.adapter.split(":")[1]
    assert adapter_class in PINS, f"{adapter_class} has no pinned library call in this file: add one"
    request = request_for(spec, variant)
    run = planned(adapter_for(spec, request), request)
    run(**({} if adapter_class in UNSCALED else MLA_SCALES if "mla" in request.op.value else MHA_SCALES))
    PINS[adapter_class](library, request)


def test_every_library_kernel_is_pinned_with_some_dtypes():
    assert {k.name for k, _ in CASES} == {k.name for k in KERNELS}


def test_xqa_mla_keeps_the_kv_scale_out_of_bmm1_for_any_value(library):
    """The fixed bug: with kv_scale != 1 the XQA MLA logits were scaled by kv_scale twice."""
    spec = MANIFEST.by_name["xqa-mla-decode"]
    request = request_for(spec, "fp8")
    run = planned(adapter_for(spec, request), request)
    for kv_scale in (0.5, 3.0, torch.tensor([3.0])):
        library.clear()
        run(q_scale=2.0, kv_scale=kv_scale)
        _, kw = one(library, "mla.trtllm_batch_decode_with_kv_cache_mla")
        assert float(kw["bmm1_scale"]) == pytest.approx(SM_SCALE * 2.0) and float(kw["bmm2_scale"]) == float(kv_scale)
