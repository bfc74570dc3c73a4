"""FlashInfer adapters without a GPU: refusals, input checks and the translation to FlashInfer's calls.

The translation tests swap FlashInfer for a recorder (``FakeFlashInfer``)
and check what each adapter hands it: CSR page lists, scales folded into the
right argument, LSE turned from base 2 into natural log, the exact inner
backend.  Numerics against the torch reference are in ``test_flashinfer.py``
(GPU).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from registry.errors import AdapterInputError, MissingDependencyError, UnsupportedFeatureError

torch = pytest.importorskip("torch")

from registry.adapters import flashinfer as fa  # noqa: E402
from registry.adapters import flashinfer_common as common  # noqa: E402
from registry.adapters import flashinfer_trtllm as trt  # noqa: E402
from registry.adapters.base import torch_dtype  # noqa: E402
from registry.contracts import DecodeMetadata, ExtendMetadata, PrefillMetadata  # noqa: E402

ALL_ADAPTERS = {
    fa.FA2Decode: "mha_decode",
    fa.FA2TCDecode: "mha_decode",
    fa.FA2Extend: "mha_extend",
    fa.FA3Extend: "mha_extend",
    fa.CuteDSLExtend: "mha_extend",
    fa.FA2Prefill: "mha_prefill",
    fa.FA3Prefill: "mha_prefill",
    fa.FA2MLADecode: "mla_decode",
    fa.FA3MLADecode: "mla_decode",
    trt.XQADecode: "mha_decode",
    trt.TrtllmGenDecode: "mha_decode",
    trt.TrtllmGenExtend: "mha_extend",
    trt.TrtllmGenMLADecode: "mla_decode",
    trt.XQAMLADecode: "mla_decode",
    trt.TrtllmGenSparseMLADecode: "sparse_mla_decode",
}


def make_request(op: str, **kw):
    fields = dict(
        op=op, arch="sm_90", q_dtype="bf16", kv_dtype="bf16", out_dtype=None,
        head_dim_qk=16, head_dim_vo=None, num_qo_heads=4, num_kv_heads=2, page_size=4, q_len=1,
        kv_lora_rank=None, qk_rope_head_dim=None, qk_nope_head_dim=None, topk=None,
        sinks=False, sliding_window=False, logits_soft_cap=False, return_lse=False,
        non_causal=False, noncontiguous_kv=False, cuda_graph=False,
    )
    if op in ("mla_decode", "sparse_mla_decode"):
        fields.update(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, head_dim_qk=None, num_kv_heads=None)
    fields.update(kw)
    return SimpleNamespace(**fields)


def make_spec(cls, op=None):
    return SimpleNamespace(name=f"test-{cls.__name__.lower()}", op=op or ALL_ADAPTERS[cls], solution="flashinfer", backend="x")


# ------------------------------------------------------------ import, refusal


DROPPED = [(cls, feature) for cls in ALL_ADAPTERS for feature in cls.drops]


@pytest.mark.parametrize("cls,feature", DROPPED, ids=[f"{c.__name__}-{f}" for c, f in DROPPED])
def test_a_feature_the_library_would_drop_is_refused_before_flashinfer_is_imported(monkeypatch, cls, feature):
    monkeypatch.setattr(common, "flashinfer", lambda: pytest.fail("flashinfer imported before the refusal"))
    with pytest.raises(UnsupportedFeatureError, match=rf"^test-{cls.__name__.lower()}: {feature} is not supported: "):
        cls(make_spec(cls), make_request(ALL_ADAPTERS[cls], **{feature: True}))


@pytest.mark.parametrize("cls", [fa.FA2Decode, fa.FA2TCDecode, fa.FA2Extend, fa.FA3Extend, fa.FA2Prefill, fa.FA3Prefill])
def test_flashinfer_fa_paths_refuse_sinks_they_would_ignore(cls):
    # Measured on H200: BatchDecode fa2 (with and without tensor cores) returns
    # bit-identical output with and without sinks=; prefill fa2/fa3 never forward it.
    with pytest.raises(UnsupportedFeatureError, match="sinks is not supported: FlashInfer 0.7.2 accepts sinks="):
        cls(make_spec(cls), make_request(ALL_ADAPTERS[cls], sinks=True))


def test_an_adapter_refuses_a_kernel_of_another_op():
    with pytest.raises(AdapterInputError, match="FA2Decode implements mha_decode, but kernel 'k' is mha_prefill"):
        fa.FA2Decode(SimpleNamespace(name="k", op="mha_prefill"), make_request("mha_decode"))


def test_missing_flashinfer_keeps_the_error_and_adds_the_install_hint(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_flashinfer(name, *a, **k):
        if name == "flashinfer":
            raise ImportError("No module named 'flashinfer'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_flashinfer)
    with pytest.raises(MissingDependencyError, match=r"No module named 'flashinfer' -- .*pip install 'kernelsel\[flashinfer\]'"):
        fa.FA2Decode(make_spec(fa.FA2Decode), make_request("mha_decode"))


# ------------------------------------------------------------ scale helpers


def test_split_scales_multiplies_floats_and_keeps_tensors():
    t = torch.tensor([2.0])
    host, dev = common.split_scales(0.5, t, 3, 1.0)
    assert host == 1.5 and len(dev) == 1 and dev[0] is t


def test_scale_product_is_a_float_without_tensors_and_a_device_product_with_them():
    buf = torch.empty(1)
    assert common.scale_product(buf, 0.25, []) == 0.25
    out = common.scale_product(buf, 0.5, [torch.tensor([3.0]), torch.tensor(4.0)])
    assert out is buf and buf.item() == 6.0


# ------------------------------------------------- translation (fake library)


class Call:
    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


class FakeWrapper:
    """Records the constructor, plan() and run() arguments; run() returns zeros and an LSE of 1.0."""

    def __init__(self, *args, **kwargs):
        self.init = Call(args, kwargs)
        self.plans: list = []
        self.runs: list = []

    def plan(self, *args, **kwargs):
        self.plans.append(Call(args, kwargs))

    def run(self, *args, **kwargs):
        self.runs.append(Call(args, kwargs))
        q = kwargs.get("query", args[0] if args else None)
        q = q[0] if isinstance(q, tuple) else q
        out = kwargs.get("out")
        if out is None:
            out = torch.zeros(q.shape[:-1] + (FakeFlashInfer.out_dim,), dtype=torch.float32)
        if not kwargs.get("return_lse"):
            return out
        lse = kwargs.get("lse")
        if lse is None:
            lse = torch.ones(q.shape[:2])
        else:
            lse.fill_(1.0)
        return out, lse


class FakeFlashInfer:
    out_dim = 16

    def __init__(self):
        self.wrappers: list = []
        self.calls: list = []
        make = lambda *a, **k: self._wrapper(*a, **k)  # noqa: E731
        self.BatchDecodeWithPagedKVCacheWrapper = make
        self.BatchPrefillWithPagedKVCacheWrapper = make
        self.BatchPrefillWithRaggedKVCacheWrapper = make
        self.utils = SimpleNamespace(
            device_support_pdl=lambda d: False,
            get_device_sm_count=lambda d: 132,
            get_trtllm_gen_multi_ctas_kv_counter_bytes=lambda b, h, sm: 4 * max(b * h, sm),
        )
        self.mla = SimpleNamespace(
            BatchMLAPagedAttentionWrapper=make,
            MLAPlanMetadata=SimpleNamespace(csr=lambda *a: ("csr",) + a),
            trtllm_batch_decode_with_kv_cache_mla=self._function("mla"),
            trtllm_batch_decode_sparse_mla_dsv4=self._function("dsv4"),
        )
        self.decode = SimpleNamespace(trtllm_batch_decode_with_kv_cache=self._function("decode"))
        self.prefill = SimpleNamespace(trtllm_batch_context_with_kv_cache=self._function("context"))

    def _wrapper(self, *a, **k):
        w = FakeWrapper(*a, **k)
        self.wrappers.append(w)
        return w

    def _function(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, Call(args, kwargs)))
            out = kwargs.get("out")
            if out is None:
                q = args[0]
                out = torch.zeros(q.shape[:-1] + (FakeFlashInfer.out_dim,), dtype=torch.bfloat16)
            if kwargs.get("return_lse"):
                return out, torch.ones(out.shape[0] * (out.shape[1] if out.dim() == 4 else 1), out.shape[-2])
            return out

        return call


@pytest.fixture
def fake(monkeypatch):
    lib = FakeFlashInfer()
    monkeypatch.setattr(common, "flashinfer", lambda: lib)

    def bind_cpu(self, t):
        self._device, self._device_index, self._pdl = t.device, t.get_device(), False

    monkeypatch.setattr(common.FlashInferAdapter, "_bind_device", bind_cpu)
    monkeypatch.setattr(common, "workspace", lambda device, nbytes, tag="float": torch.zeros(8, dtype=torch.uint8))
    return lib


def paged(batch=2, seq=(5, 9), page_size=4, max_pages=4):
    """A block table whose used pages are not in order, and its seq_lens."""
    bt = torch.tensor([[7, 2, 5, 0], [1, 6, 3, 4]], dtype=torch.int32)[:batch, :max_pages]
    return bt, torch.tensor(seq[:batch], dtype=torch.int32)


def offsets(*values):
    return torch.tensor(values, dtype=torch.int32)


CU_EXTEND = (0, 2, 5)  # new tokens of paged()'s two requests: 2 and 3
CU_PREFILL = (0, 3, 5)


def decode_inputs(req, t):
    """q ``[t, Hq, D]`` and paged k/v caches in the request's dtypes."""
    d = req.head_dim_qk
    q = torch.randn(t, req.num_qo_heads, d).to(torch_dtype(req.q_dtype))
    kv = torch.randn(8, req.page_size, req.num_kv_heads, d).to(torch_dtype(req.kv_dtype))
    return q, kv, kv.clone()


def prefill_inputs(req):
    t, d = CU_PREFILL[-1], req.head_dim_qk
    q = torch.randn(t, req.num_qo_heads, d).to(torch_dtype(req.q_dtype))
    k = torch.randn(t, req.num_kv_heads, d).to(torch_dtype(req.kv_dtype))
    return q, k, k.clone()


def mla_request(**kw):
    return make_request("mla_decode", **kw)


def mla_inputs(req, t):
    r, dr = req.kv_lora_rank, req.qk_rope_head_dim
    q_nope = torch.randn(t, req.num_qo_heads, r).to(torch_dtype(req.q_dtype))
    q_pe = torch.randn(t, req.num_qo_heads, dr).to(torch_dtype(req.q_dtype))
    kv = torch.randn(8, req.page_size, r + dr).to(torch_dtype(req.kv_dtype))
    return q_nope, q_pe, kv


def planned(cls, req, **metadata):
    """``(adapter, run() inputs)``: ``cls`` for ``req`` planned on ``paged()`` (``CU_*`` offsets), ``metadata`` on top."""
    op = ALL_ADAPTERS[cls]
    ad = cls(make_spec(cls), req)
    if op == "mha_prefill":
        ad.plan(PrefillMetadata(**{"cu_seqlens_q": offsets(*CU_PREFILL), "cu_seqlens_kv": offsets(*CU_PREFILL), **metadata}))
        return ad, prefill_inputs(req)
    bt, sl = paged()
    if op == "mha_extend":
        ad.plan(ExtendMetadata(block_table=bt, seq_lens=sl, **{"cu_seqlens_q": offsets(*CU_EXTEND), **metadata}))
        return ad, decode_inputs(req, CU_EXTEND[-1])
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl, **{"q_len": req.q_len, **metadata}))
    tokens = bt.shape[0] * req.q_len
    return ad, mla_inputs(req, tokens) if op == "mla_decode" else decode_inputs(req, tokens)


def test_fa2_decode_plans_flashinfer_csr_and_the_planned_options(fake):
    req = make_request("mha_decode", sliding_window=True, logits_soft_cap=True)
    planned(fa.FA2Decode, req, window_left=3, logits_soft_cap=30.0)
    w = fake.wrappers[0]
    assert w.init.args[1] == "NHD" and w.init.kwargs == {"use_tensor_cores": False, "backend": "fa2"}
    indptr, indices, last, hq, hkv, d, s = w.plans[0].args
    assert indptr.tolist() == [0, 2, 5] and indices.tolist() == [7, 2, 1, 6, 3] and last.tolist() == [1, 1]
    assert (hq, hkv, d, s) == (4, 2, 16, 4)
    kw = w.plans[0].kwargs
    assert kw["window_left"] == 3 and kw["logits_soft_cap"] == 30.0
    assert kw["sm_scale"] == pytest.approx(1 / math.sqrt(16))
    assert kw["q_data_type"] == kw["kv_data_type"] == kw["o_data_type"] == torch.bfloat16


def test_fa2_tc_decode_asks_for_the_fa2_kernel_and_the_planned_q_len(fake):
    planned(fa.FA2TCDecode, make_request("mha_decode", q_len=3))
    w = fake.wrappers[0]
    assert w.init.kwargs == {"use_tensor_cores": True, "backend": "fa2"}
    assert w.plans[0].kwargs["q_len_per_req"] == 3


def test_cuda_core_decode_refuses_multi_token_requests(fake):
    with pytest.raises(UnsupportedFeatureError, match="q_len=2; the CUDA-core decode kernel takes one query token"):
        planned(fa.FA2Decode, make_request("mha_decode", q_len=2))


@pytest.mark.parametrize(
    "metadata,feature",
    [
        (dict(window_left=8), "sliding_window"),
        (dict(logits_soft_cap=5.0), "logits_soft_cap"),
    ],
)
def test_plan_options_the_request_did_not_select_are_refused(fake, metadata, feature):
    with pytest.raises(UnsupportedFeatureError, match=f"{feature} was passed, but the request"):
        planned(fa.FA2Decode, make_request("mha_decode"), **metadata)


def test_non_causal_extend_needs_a_non_causal_request(fake):
    with pytest.raises(UnsupportedFeatureError, match="non_causal was passed"):
        planned(fa.FA2Extend, make_request("mha_extend"), causal=False)


def test_decode_run_folds_float_scales_and_turns_the_lse_into_natural_log(fake):
    ad, (q, k, v) = planned(fa.FA2Decode, make_request("mha_decode", return_lse=True, kv_dtype="fp8_e4m3"))
    res = ad.run(q, k, v, q_scale=2.0, k_scale=0.25, v_scale=3.0)
    call = fake.wrappers[0].runs[0]
    assert call.args[0] is q and call.kwargs["q_scale"] == 0.5 and call.kwargs["v_scale"] == 3.0
    assert call.kwargs["return_lse"] is True
    assert torch.allclose(res.lse, torch.full_like(res.lse, math.log(2.0)))
    res = ad.run(q, k, v)
    assert fake.wrappers[0].runs[1].kwargs == dict(out=None, lse=None, return_lse=True, enable_pdl=False)
    assert torch.allclose(res.lse, torch.full_like(res.lse, math.log(2.0)))


def test_decode_run_applies_a_tensor_scale_to_the_query_on_the_device(fake):
    ad, (q, k, v) = planned(fa.FA2Decode, make_request("mha_decode", kv_dtype="fp8_e4m3"))
    planned_q = ad._buffers["q"]
    ad.run(q, k, v, k_scale=torch.tensor([0.5]), v_scale=torch.tensor([2.0]))
    call = fake.wrappers[0].runs[0]
    assert call.args[0] is planned_q and torch.equal(planned_q, (q.float() * 0.5).to(torch.bfloat16))
    assert call.kwargs["q_scale"] is None and isinstance(call.kwargs["v_scale"], torch.Tensor)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v: (q[:1], k, v), r"^q: shape \[1, 4, 16\] does not match \[2, 4, 16\]"),
        (lambda q, k, v: (q.half(), k, v), r"^q: dtype float16 not in \[bfloat16\]"),
        (lambda q, k, v: (q, k[:, :, :1], v), r"^k_cache: shape \[8, 4, 1, 16\] does not match \[\*, 4, 2, 16\]"),
        (lambda q, k, v: (q, k, "v"), r"^v_cache: expected a torch.Tensor, got str"),
    ],
)
def test_run_names_the_argument_that_breaks_the_contract(fake, change, message):
    ad, inputs = planned(fa.FA2Decode, make_request("mha_decode"))
    with pytest.raises(AdapterInputError, match=message):
        ad.run(*change(*inputs))


NAMED_LAST = {"mha_decode": "v_cache", "mha_extend": "v_cache", "mha_prefill": "v", "mla_decode": "kv_cache"}


@pytest.mark.parametrize("cls", [cls for cls, op in ALL_ADAPTERS.items() if op in NAMED_LAST], ids=lambda c: c.__name__)
def test_every_adapter_names_an_argument_that_is_not_a_tensor(fake, cls):
    ad, inputs = planned(cls, make_request(ALL_ADAPTERS[cls]))
    with pytest.raises(AdapterInputError, match=rf"^{NAMED_LAST[ALL_ADAPTERS[cls]]}: expected a torch.Tensor, got str"):
        ad.run(*inputs[:-1], "x")


def test_run_before_plan_says_so(fake):
    ad = fa.FA2Decode(make_spec(fa.FA2Decode), make_request("mha_decode"))
    with pytest.raises(AdapterInputError, match=r"run\(\) before plan\(\)"):
        ad.run(*decode_inputs(make_request("mha_decode"), 2))


def test_run_refuses_sinks_and_an_lse_buffer_the_request_did_not_ask_for(fake):
    ad, (q, k, v) = planned(fa.FA2TCDecode, make_request("mha_decode"))
    with pytest.raises(UnsupportedFeatureError, match="sinks was passed"):
        ad.run(q, k, v, sinks=torch.zeros(4))
    with pytest.raises(UnsupportedFeatureError, match=r"return_lse \(an lse= buffer\) was passed"):
        ad.run(q, k, v, lse=torch.zeros(2, 4))


@pytest.mark.parametrize("cls", [cls for cls in ALL_ADAPTERS if "sinks" in cls.drops and cls.__module__ == fa.__name__])
def test_every_fa_path_refuses_run_time_sinks(fake, cls):
    ad, inputs = planned(cls, make_request(ALL_ADAPTERS[cls]))
    with pytest.raises(UnsupportedFeatureError, match=rf"^test-{cls.__name__.lower()}: sinks was passed"):
        ad.run(*inputs, sinks=torch.zeros(4))


@pytest.mark.parametrize("cls", [cls for cls, op in ALL_ADAPTERS.items() if op in NAMED_LAST], ids=lambda c: c.__name__)
def test_no_lse_comes_back_unless_the_request_asked_for_it(fake, cls):
    ad, inputs = planned(cls, make_request(ALL_ADAPTERS[cls]))
    assert ad.run(*inputs).lse is None


def test_ragged_prefill_applies_every_scale_itself(fake):
    cu_kv = offsets(0, 4, 9)
    ad, _ = planned(fa.FA2Prefill, make_request("mha_prefill", non_causal=True), cu_seqlens_kv=cu_kv, causal=False)
    w = fake.wrappers[0]
    assert w.init.kwargs == {"backend": "fa2"} and w.plans[0].kwargs["causal"] is False
    q = torch.randn(5, 4, 16).to(torch.bfloat16)
    k = torch.randn(9, 2, 16).to(torch.bfloat16)
    out = torch.ones(5, 4, 16, dtype=torch.bfloat16)
    res = ad.run(q, k, k.clone(), q_scale=2.0, v_scale=torch.tensor([3.0]), out=out)
    call = w.runs[0]
    assert torch.equal(call.args[0], (q.float() * 2).to(torch.bfloat16))
    assert "q_scale" not in call.kwargs and call.kwargs["lse_base"] == "ln"
    assert res.out is out and torch.all(out == 3.0)


def test_fa3_fp8_prefill_passes_scales_as_per_head_arrays_or_floats(fake):
    ad, (q, k, v) = planned(fa.FA3Prefill, make_request("mha_prefill", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3"))
    ad.run(q, k, v, q_scale=torch.tensor([0.5]), k_scale=0.25, v_scale=torch.tensor(2.0))
    call = fake.wrappers[0].runs[0]
    sq, sk, sv = call.args[3:6]
    assert sq.tolist() == [0.5] * 4 and sk == 0.25 and sv.tolist() == [2.0, 2.0]
    assert ad.out_dtype == torch.bfloat16 and fake.wrappers[0].plans[0].kwargs["o_data_type"] == torch.bfloat16


def test_fp8_query_with_soft_cap_is_refused(fake):
    req = make_request("mha_extend", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", logits_soft_cap=True)
    with pytest.raises(UnsupportedFeatureError, match="logits_soft_cap with an FP8 query"):
        planned(fa.FA3Extend, req, logits_soft_cap=10.0)


@pytest.mark.parametrize("cls", [fa.FA2Extend, fa.FA2Prefill])
def test_an_fp8_cache_under_a_16_bit_query_plans_a_buffer_for_the_scaled_query(fake, cls):
    ad, (q, _, _) = planned(cls, make_request(ALL_ADAPTERS[cls], kv_dtype="fp8_e4m3"))
    assert {slot: (b.dtype, tuple(b.shape)) for slot, b in ad._buffers.items()} == {"q": (q.dtype, tuple(q.shape))}


# ----------------------------------------------- paged prefill (mha_extend)


@pytest.mark.parametrize("cls,backend", [(fa.FA2Extend, "fa2"), (fa.FA3Extend, "fa3"), (fa.CuteDSLExtend, "cute-dsl")])
def test_paged_prefill_plans_csr_after_the_query_offsets_and_asks_for_a_natural_log_lse(fake, cls, backend):
    ad, (q, k, v) = planned(cls, make_request("mha_extend", return_lse=True))
    w = fake.wrappers[0]
    assert w.init.args[1:] == ("NHD",) and w.init.kwargs == {"backend": backend}
    cu, indptr, indices, last, hq, hkv, d, s = w.plans[0].args
    assert cu.tolist() == list(CU_EXTEND) and indptr.tolist() == [0, 2, 5] and indices.tolist() == [7, 2, 1, 6, 3]
    assert last.tolist() == [1, 1] and (hq, hkv, d, s) == (4, 2, 16, 4)
    kw = w.plans[0].kwargs
    assert kw.pop("seq_lens").tolist() == [5, 9] and kw.pop("sm_scale") == pytest.approx(1 / math.sqrt(16))
    assert kw == dict(
        head_dim_vo=16, causal=True, window_left=-1, logits_soft_cap=0.0,
        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, o_data_type=torch.bfloat16,
    )
    res = ad.run(q, k, v)
    call = w.runs[0]
    assert call.args[0] is q and call.args[1][0] is k and call.args[1][1] is v and len(call.args) == 2
    assert call.kwargs == dict(out=None, lse=None, return_lse=True, lse_base="ln", enable_pdl=False)
    assert torch.all(res.lse == 1.0)  # asked for in natural log: no conversion here


def test_paged_prefill_folds_float_scales_and_scales_the_query_by_a_tensor_one(fake):
    ad, (q, k, v) = planned(fa.FA2Extend, make_request("mha_extend"))
    ad.run(q, k, v, q_scale=2.0, k_scale=torch.tensor([0.5]), v_scale=3.0)
    call = fake.wrappers[0].runs[0]
    assert call.args[0] is ad._buffers["q"] and torch.equal(call.args[0], (q.float() * 0.5).to(torch.bfloat16))
    assert call.kwargs == dict(q_scale=2.0, v_scale=3.0, out=None, lse=None, return_lse=False, lse_base="ln", enable_pdl=False)
    ad.run(q, k, v, q_scale=0.5, k_scale=2.0, v_scale=torch.tensor([2.0]))
    call = fake.wrappers[0].runs[1]
    assert call.args[0] is q and call.kwargs["q_scale"] is None and call.kwargs["v_scale"].tolist() == [2.0]


def test_fa3_fp8_paged_prefill_passes_per_head_scale_arrays(fake):
    ad, (q, k, v) = planned(fa.FA3Extend, make_request("mha_extend", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3"))
    assert {slot: tuple(b.shape) for slot, b in ad._buffers.items()} == {"scale_q": (4,), "scale_k": (2,), "scale_v": (2,)}
    ad.run(q, k, v, q_scale=torch.tensor([0.5]), k_scale=2, v_scale=torch.tensor(3.0))
    call = fake.wrappers[0].runs[0]
    sq, sk, sv = call.args[2:]
    assert sq is ad._buffers["scale_q"] and sq.tolist() == [0.5] * 4 and sk == 2.0 and sv.tolist() == [3.0, 3.0]
    assert call.kwargs["q_scale"] is None and call.kwargs["v_scale"] is None


def test_cute_dsl_extend_refuses_scales_it_cannot_take(fake):
    ad, inputs = planned(fa.CuteDSLExtend, make_request("mha_extend"))
    with pytest.raises(UnsupportedFeatureError, match="k_scale is not supported by FlashInfer's cute-dsl paged route"):
        ad.run(*inputs, k_scale=0.5)


# --------------------------------------------------------------- CUDA graphs


GRAPH_BUFFERS = [  # FlashInfer's CUDA-graph constructor buffers (int32) per wrapper, for paged(): B=2, 4 pages a row
    (fa.FA2Decode, {"paged_kv_indptr_buffer": 3, "paged_kv_indices_buffer": 8, "paged_kv_last_page_len_buffer": 2}),
    (fa.FA2TCDecode, {"paged_kv_indptr_buffer": 3, "paged_kv_indices_buffer": 8, "paged_kv_last_page_len_buffer": 2}),
    (fa.FA3Extend, {"qo_indptr_buf": 3, "paged_kv_indptr_buf": 3, "paged_kv_indices_buf": 8, "paged_kv_last_page_len_buf": 2}),
    (fa.FA2Prefill, {"qo_indptr_buf": 3, "kv_indptr_buf": 3}),
    (fa.FA2MLADecode, {"qo_indptr": 3, "kv_indptr": 3, "kv_indices": 8, "kv_len_arr": 2}),
]


@pytest.mark.parametrize("cls,buffers", GRAPH_BUFFERS, ids=[c.__name__ for c, _ in GRAPH_BUFFERS])
def test_cuda_graph_mode_builds_the_wrapper_once_with_fixed_buffers_and_refuses_another_shape(fake, cls, buffers):
    ad, _ = planned(cls, make_request(ALL_ADAPTERS[cls], cuda_graph=True))
    plan = fake.wrappers[0].plans[0]
    if ALL_ADAPTERS[cls] == "mha_prefill":
        ad.plan(PrefillMetadata(cu_seqlens_q=plan.args[0], cu_seqlens_kv=plan.args[1]))
        other = PrefillMetadata(cu_seqlens_q=offsets(0, 3), cu_seqlens_kv=offsets(0, 3))
        fixed = r"fixes the batch at the first plan \(2,\); got \(1,\)\. "
    else:
        bt, sl = paged()
        extra = {"cu_seqlens_q": offsets(*CU_EXTEND)} if ALL_ADAPTERS[cls] == "mha_extend" else {}
        meta = ExtendMetadata if extra else DecodeMetadata
        ad.plan(meta(block_table=bt, seq_lens=sl, **extra))
        other = meta(block_table=bt[:, :3], seq_lens=sl, **extra)
        fixed = r"fixes batch and block_table width at the first plan \(2, 4\); got \(2, 3\)\. "
    assert len(fake.wrappers) == 1 and len(fake.wrappers[0].plans) == 2
    kw = fake.wrappers[0].init.kwargs
    graph = {k: (v.dtype, v.shape[0]) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    assert kw["use_cuda_graph"] is True and graph == {k: (torch.int32, n) for k, n in buffers.items()}
    assert [k for k in kw if k in buffers or k == "use_cuda_graph"] == ["use_cuda_graph", *buffers]
    with pytest.raises(AdapterInputError, match=rf"^test-{cls.__name__.lower()}: CUDA-graph mode {fixed}Use one adapter"):
        ad.plan(other)


# ---------------------------------------------------------------- MLA (FA)


def test_fa_mla_uses_the_keyword_plan_and_natural_log_lse(fake):
    ad, (q_nope, q_pe, kv) = planned(fa.FA3MLADecode, mla_request(return_lse=True, q_len=2))
    w = fake.wrappers[0]
    assert w.init.kwargs == {"backend": "fa3"} and not w.plans[0].args
    kw = w.plans[0].kwargs
    tag, qo, kv_indptr, kv_indices, kv_len = kw["metadata"]
    assert tag == "csr" and qo.tolist() == [0, 2, 4] and kv_indices.tolist() == [7, 2, 1, 6, 3]
    assert kw["lse_mode"] == "basee" and kw["causal"] is True and kw["scale_mode"] == "default"
    assert kw["sm_scale"] == pytest.approx(1 / math.sqrt(16 + 8))
    res = ad.run(q_nope, q_pe, kv)
    call = w.runs[0].kwargs
    assert call["query"][0] is q_nope and call["kv_cache"] is kv and call["return_lse_base_on_e"] is True
    assert torch.all(res.lse == 1.0)  # the kernel already wrote natural log


def test_fa_mla_fp8_float_scale_goes_to_the_kernel_and_a_tensor_scale_to_q_and_out(fake):
    ad, (q_nope, q_pe, kv) = planned(fa.FA2MLADecode, mla_request(kv_dtype="fp8_e4m3"))
    ad.run(q_nope, q_pe, kv, kv_scale=0.5)
    call = fake.wrappers[0].runs[0].kwargs
    assert call["ckv_scale"] == call["kpe_scale"] == 0.5 and call["query"][0] is q_nope
    out = torch.ones(2, 4, 32, dtype=torch.bfloat16)
    ad.run(q_nope, q_pe, kv, kv_scale=torch.tensor([0.5]), out=out)
    call = fake.wrappers[0].runs[1].kwargs
    assert call["ckv_scale"] == 1.0 and torch.equal(call["query"][0], (q_nope.float() * 0.5).to(torch.bfloat16))
    assert torch.all(out == 0.5)


# ------------------------------------------------------------------ TRT-LLM


def test_xqa_gets_bmm_scales_the_engine_block_table_and_its_own_workspace(fake):
    req = make_request("mha_decode", sinks=True, sliding_window=True)
    ad = trt.XQADecode(make_spec(trt.XQADecode), req)
    bt, sl = paged()
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl, window_left=6))
    q, k, v = decode_inputs(req, 2)
    sinks = torch.zeros(4)
    out = torch.ones(2, 4, 16, dtype=torch.bfloat16)
    ad.run(q, k, v, sinks=sinks, q_scale=2.0, k_scale=0.5, v_scale=torch.tensor([3.0]), out=out)
    name, call = fake.calls[0]
    assert name == "decode" and call.args[3] is bt and call.args[4] is sl and call.args[5] == 9
    kw = call.kwargs
    assert kw["backend"] == "xqa" and kw["kv_layout"] == "NHD" and kw["window_left"] == 6 and kw["sinks"] is sinks
    # XQA applies its KV scale to FP8 caches only: a 16-bit cache gets bmm2 = 1 and the output is scaled here
    assert kw["bmm1_scale"] == pytest.approx(1 / math.sqrt(16)) and kw["bmm2_scale"] == 1.0
    assert torch.all(out == 3.0)


def test_xqa_passes_the_v_scale_as_bmm2_for_an_fp8_cache(fake):
    ad, (q, k, v) = planned(trt.XQADecode, make_request("mha_decode", kv_dtype="fp8_e4m3"))
    ad.run(q, k, v, k_scale=torch.tensor([0.5]), v_scale=3.0)
    kw = fake.calls[0][1].kwargs
    assert kw["bmm1_scale"].tolist() == [pytest.approx(0.5 / math.sqrt(16))] and kw["bmm2_scale"] == 3.0


def test_xqa_refuses_multi_token_decode(fake):
    with pytest.raises(UnsupportedFeatureError, match="q_len=2; XQA multi-token decode needs a bit-packed draft mask"):
        planned(trt.XQADecode, make_request("mha_decode", q_len=2))


def test_sinks_requested_but_not_passed_is_an_input_error(fake):
    ad, inputs = planned(trt.XQADecode, make_request("mha_decode", sinks=True))
    with pytest.raises(AdapterInputError, match=r"the request has sinks=True; pass sinks="):
        ad.run(*inputs)


def test_trtllm_gen_decode_passes_a_tensor_bmm1_in_log2_form_and_its_counter_buffer(fake):
    ad, (q, k, v) = planned(trt.TrtllmGenDecode, make_request("mha_decode", return_lse=True, q_len=2), sm_scale=0.5)
    res = ad.run(q, k, v, k_scale=torch.tensor([2.0]))
    kw = fake.calls[0][1].kwargs
    assert kw["backend"] == "trtllm-gen" and kw["q_len_per_req"] == 2 and kw["bmm1_scale"] == 1.0
    assert kw["bmm1_scale_log2"].item() == pytest.approx(1.0 / math.log(2.0))
    counter = kw["multi_ctas_kv_counter_buffer"]
    assert counter.dtype == torch.uint8 and not counter.any()
    assert torch.allclose(res.lse, torch.full_like(res.lse, math.log(2.0)))


def test_trtllm_gen_extend_passes_the_context_call_its_offsets_and_turns_the_lse_into_natural_log(fake):
    req = make_request("mha_extend", return_lse=True, sinks=True, non_causal=True)
    ad = trt.TrtllmGenExtend(make_spec(trt.TrtllmGenExtend), req)
    bt, sl = paged()
    cu = offsets(*CU_EXTEND)
    ad.plan(ExtendMetadata(block_table=bt, seq_lens=sl, cu_seqlens_q=cu, causal=False, sm_scale=0.5))
    q, k, v = decode_inputs(req, CU_EXTEND[-1])
    sinks = torch.zeros(4)
    res = ad.run(q, k, v, sinks=sinks, q_scale=2.0, v_scale=torch.tensor([3.0]))
    name, call = fake.calls[0]
    assert name == "context" and call.args[0] is q and call.args[1] == (k, v) and call.args[3] is bt and call.args[4] is sl
    max_q, max_kv, bmm1, bmm2, batch, cu_q, cu_kv = call.args[5:]
    assert (max_q, max_kv, bmm1, batch) == (3, 9, 1.0, 2) and bmm2.tolist() == [3.0]
    assert cu_q is cu and cu_kv.tolist() == [0, 5, 14]
    counter = call.kwargs.pop("multi_ctas_kv_counter_buffer")
    assert counter.dtype == torch.uint8 and not counter.any()
    assert call.kwargs == dict(
        window_left=-1, out=None, out_dtype=torch.bfloat16, kv_layout="NHD", enable_pdl=False, sinks=sinks,
        causal=False, lse=None, return_lse=True, backend="trtllm-gen",
    )
    assert torch.allclose(res.lse, torch.full_like(res.lse, math.log(2.0)))


def test_trtllm_mla_packs_adjacent_query_halves_without_a_copy(fake):
    ad, (_, _, kv) = planned(trt.TrtllmGenMLADecode, mla_request())
    row = torch.randn(2, 4, 40).to(torch.bfloat16)
    q_nope, q_pe = row[..., :32], row[..., 32:]
    ad.run(q_nope, q_pe, kv)
    query = fake.calls[0][1].args[0]
    assert query.shape == (2, 1, 4, 40) and query.data_ptr() == row.data_ptr()
    ad.run(q_nope.clone(), q_pe.clone(), kv)
    query = fake.calls[1][1].args[0]
    assert query.data_ptr() == ad._buffers["query"].data_ptr() and torch.equal(query.flatten(0, 1), row)


def test_xqa_mla_passes_q_and_kv_scales_apart_and_no_lse_or_counter(fake):
    # the XQA MLA kernel scales the logits by q_scale * kv_scale and the output by kv_scale
    # (csrc/xqa/mla_sm120.cu:464, 1319): folding kv_scale into bmm1 would apply it twice
    req = mla_request(q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3")
    ad = trt.XQAMLADecode(make_spec(trt.XQAMLADecode), req)
    bt, sl = paged()
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    q_nope, q_pe, kv = mla_inputs(req, 2)
    res = ad.run(q_nope, q_pe, kv, q_scale=2.0, kv_scale=0.5)
    name, call = fake.calls[0]
    assert name == "mla" and call.args[1] is kv and call.args[3:6] == (16, 32, 8)
    assert call.kwargs == dict(
        out=None, bmm1_scale=pytest.approx(2.0 / math.sqrt(16 + 8)), bmm2_scale=0.5, enable_pdl=False, backend="xqa",
    )
    assert res.lse is None and res.out.shape == (2, 4, 16)


def test_xqa_mla_pads_the_block_table_to_a_multiple_of_128_tokens(fake):
    req = mla_request(q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3")  # page_size 4: 32 columns per 128 tokens
    ad = trt.XQAMLADecode(make_spec(trt.XQAMLADecode), req)
    bt, sl = paged()
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    ad.run(*mla_inputs(req, 2))
    table = fake.calls[0][1].args[6]
    assert table.shape == (2, 32) and torch.equal(table[:, :4], bt) and not table[:, 4:].any()
    wide = torch.zeros(2, 64, dtype=torch.int32)
    wide[:, :4] = bt
    ad.plan(DecodeMetadata(block_table=wide, seq_lens=sl))
    ad.run(*mla_inputs(req, 2))
    assert fake.calls[1][1].args[6] is wide  # already a multiple: passed as it is


def test_xqa_mla_hands_a_caller_out_over_as_batch_heads_rank(fake):
    # xqa_batch_decode_with_kv_cache_mla checks a given out against [B, H, R] (mla/_core.py:5433-5445)
    req = mla_request(q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3")
    ad = trt.XQAMLADecode(make_spec(trt.XQAMLADecode), req)
    bt, sl = paged()
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    out = torch.empty(2, 4, 32, dtype=torch.bfloat16)
    res = ad.run(*mla_inputs(req, 2), out=out)
    assert fake.calls[0][1].kwargs["out"] is out and res.out is out


def test_dsv4_sparse_mla_table_has_empty_window_columns_then_global_slots(fake):
    req = make_request(
        "sparse_mla_decode", kv_lora_rank=512, qk_rope_head_dim=0, qk_nope_head_dim=448, topk=4, num_qo_heads=2
    )
    ad = trt.TrtllmGenSparseMLADecode(make_spec(trt.TrtllmGenSparseMLADecode), req)
    bt, sl = paged()
    ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    q_nope = torch.randn(2, 2, 512).to(torch.bfloat16)
    q_pe = torch.empty(2, 2, 0, dtype=torch.bfloat16)
    kv = torch.randn(8, 4, 512).to(torch.bfloat16)
    topk = torch.tensor([[0, 4, -1, -1], [8, 5, 0, -1]], dtype=torch.int32)
    ad.run(q_nope, q_pe, kv, topk)
    kw = fake.calls[0][1].kwargs
    table = kw["sparse_indices"]
    assert table.shape == (2, 132) and torch.all(table[:, :128] == -1)
    assert table[:, 128:].tolist() == [[28, 8, -1, -1], [12, 25, 4, -1]]
    assert kw["sparse_topk_lens"].tolist() == [132, 132] and kw["seq_lens"].tolist() == [0, 0]
    assert kw["bmm1_scale"] == pytest.approx(1 / math.sqrt(448))


def test_dsv4_sparse_mla_needs_the_512_wide_no_rope_geometry(fake):
    req = make_request("sparse_mla_decode", topk=4)
    ad = trt.TrtllmGenSparseMLADecode(make_spec(trt.TrtllmGenSparseMLADecode), req)
    bt, sl = paged()
    with pytest.raises(AdapterInputError, match="request kv_lora_rank=512, qk_rope_head_dim=0"):
        ad.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
