"""The reference adapters: contract checks, refused features, LSE iff requested, results = reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from registry.adapters import reference as ref  # noqa: E402
from registry.contracts import DecodeMetadata, ExtendMetadata, PrefillMetadata  # noqa: E402
from registry.errors import AdapterInputError, UnsupportedFeatureError  # noqa: E402

I32 = torch.int32
FEATURES = ("sinks", "sliding_window", "logits_soft_cap", "return_lse", "non_causal")


def request(op, **fields):
    """A request-like object with every field the adapters read (the solver's Request has them all)."""
    base = dict(
        op=op, arch="sm_90", q_dtype="bf16", kv_dtype="bf16", out_dtype=None, head_dim_qk=16, head_dim_vo=None,
        num_qo_heads=4, num_kv_heads=2, page_size=4, q_len=1, kv_lora_rank=None, qk_rope_head_dim=None,
        qk_nope_head_dim=None, topk=None, **{f: False for f in FEATURES},
    )
    base.update(fields)
    return SimpleNamespace(**base)


def adapter(cls, **fields):
    return cls(SimpleNamespace(name=f"test-{cls.op}", op=cls.op), request(cls.op, **fields))


def paged_inputs(batch=2, q_len=1, kv_len=6, hq=4, hkv=2, d=16, page=4, dtype=torch.bfloat16, kv_dtype=None):
    g = torch.Generator().manual_seed(0)
    pages = math.ceil(kv_len / page)
    block_table = torch.arange(batch * pages, dtype=I32).reshape(batch, pages)
    seq_lens = torch.full((batch,), kv_len, dtype=I32)
    q = torch.randn(batch * q_len, hq, d, generator=g).to(dtype)
    k = torch.randn(batch * pages, page, hkv, d, generator=g).to(kv_dtype or dtype)
    v = torch.randn(batch * pages, page, hkv, d, generator=g).to(kv_dtype or dtype)
    return block_table, seq_lens, q, k, v


# ----------------------------------------------------------------- mha_decode


def test_decode_matches_reference_and_returns_lse_only_when_requested():
    bt, sl, q, k, v = paged_inputs(q_len=2)
    cu = torch.tensor([0, 2, 4], dtype=I32)
    want_o, want_l = ref.mha_paged(q, k, v, bt, sl, cu)
    for return_lse in (False, True):
        a = adapter(ref.TorchMHADecode, q_len=2, return_lse=return_lse)
        a.plan(DecodeMetadata(block_table=bt, seq_lens=sl, q_len=2))
        res = a.run(q, k, v)
        assert torch.equal(res.out, want_o)
        assert (res.lse is not None) == return_lse
        if return_lse:
            assert torch.equal(res.lse, want_l)


def test_decode_writes_into_given_out_and_lse():
    bt, sl, q, k, v = paged_inputs()
    a = adapter(ref.TorchMHADecode, return_lse=True)
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    out, lse = torch.empty(2, 4, 16, dtype=torch.bfloat16), torch.empty(2, 4)
    res = a.run(q, k, v, out=out, lse=lse)
    assert res.out is out and res.lse is lse
    assert torch.equal(out, ref.mha_paged(q, k, v, bt, sl, torch.tensor([0, 1, 2], dtype=I32))[0])


@pytest.mark.parametrize(
    "arg, change, message",
    [
        ("q", lambda x: x.half(), r"^q: dtype float16 not in \[bfloat16\] \(mha_decode\)$"),
        ("q", lambda x: x[:, :3], r"^q: shape \[2, 3, 16\] does not match \[2, 4, 16\]"),
        ("k_cache", lambda x: x[:, :2], r"^k_cache: shape \[4, 2, 2, 16\] does not match \[\*, 4, 2, 16\]"),
        ("v_cache", lambda x: x[:3], r"^v_cache: shape \[3, 4, 2, 16\] does not match \[4, 4, 2, 16\]"),
        ("k_cache", lambda x: x.to("meta"), r"^k_cache: on meta, expected cpu"),
    ],
)
def test_decode_run_names_the_bad_argument(arg, change, message):
    bt, sl, q, k, v = paged_inputs()
    a = adapter(ref.TorchMHADecode)
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    args = dict(q=q, k_cache=k, v_cache=v)
    args[arg] = change(args[arg])
    with pytest.raises(AdapterInputError, match=message):
        a.run(**args)


def test_decode_plan_validates_metadata():
    bt, sl, *_ = paged_inputs()
    a = adapter(ref.TorchMHADecode)
    with pytest.raises(AdapterInputError, match=r"^block_table: dtype int64 not in \[int32\]"):
        a.plan(DecodeMetadata(block_table=bt.long(), seq_lens=sl))
    with pytest.raises(AdapterInputError, match=r"^seq_lens: a request holds 9 tokens"):
        a.plan(DecodeMetadata(block_table=bt, seq_lens=torch.tensor([9, 1], dtype=I32)))
    with pytest.raises(UnsupportedFeatureError, match=r"selected for q_len=1; select with q_len=3"):
        a.plan(DecodeMetadata(block_table=bt, seq_lens=sl, q_len=3))


def test_run_before_plan_is_an_error():
    _, _, q, k, v = paged_inputs()
    with pytest.raises(AdapterInputError, match=r"run\(\) before plan\(\)"):
        adapter(ref.TorchMHADecode).run(q, k, v)


def test_features_not_requested_are_refused_never_dropped():
    bt, sl, q, k, v = paged_inputs()
    a = adapter(ref.TorchMHADecode)
    for meta, feature in [
        (DecodeMetadata(block_table=bt, seq_lens=sl, window_left=2), "sliding_window"),
        (DecodeMetadata(block_table=bt, seq_lens=sl, logits_soft_cap=30.0), "logits_soft_cap"),
    ]:
        with pytest.raises(UnsupportedFeatureError, match=rf"^test-mha_decode: {feature} was passed"):
            a.plan(meta)
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    with pytest.raises(UnsupportedFeatureError, match=r"^test-mha_decode: sinks was passed"):
        a.run(q, k, v, sinks=torch.zeros(4))
    with pytest.raises(UnsupportedFeatureError, match=r"^test-mha_decode: return_lse was passed"):
        a.run(q, k, v, lse=torch.empty(2, 4))


def test_requested_features_reach_the_computation():
    bt, sl, q, k, v = paged_inputs(kv_len=8)
    a = adapter(ref.TorchMHADecode, sinks=True, sliding_window=True, logits_soft_cap=True)
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl, window_left=2, logits_soft_cap=1.0, sm_scale=0.5))
    sinks = torch.full((4,), 2.0)
    got = a.run(q, k, v, sinks=sinks).out
    want = ref.mha_paged(
        q, k, v, bt, sl, torch.tensor([0, 1, 2], dtype=I32), window_left=2, logits_soft_cap=1.0, sm_scale=0.5,
        sinks=sinks,
    )[0]
    assert torch.equal(got, want)
    with pytest.raises(AdapterInputError, match=r"^sinks: dtype bfloat16 not in \[float32\]"):
        a.run(q, k, v, sinks=sinks.bfloat16())


def test_fp8_kv_scale_as_float_or_tensor_and_bad_scale():
    fp8 = torch.float8_e4m3fn
    bt, sl, q, k, v = paged_inputs(kv_dtype=fp8)
    a = adapter(ref.TorchMHADecode, kv_dtype="fp8_e4m3")
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    as_float = a.run(q, k, v, k_scale=0.5, v_scale=2.0).out
    as_tensor = a.run(q, k, v, k_scale=torch.tensor([0.5]), v_scale=torch.tensor(2.0)).out
    assert torch.equal(as_float, as_tensor)
    with pytest.raises(AdapterInputError, match=r"^k_scale: expected a float or a one-element fp32 tensor"):
        a.run(q, k, v, k_scale=torch.ones(2))


# ----------------------------------------------------------------- mha_extend / mha_prefill


def test_extend_checks_cu_seqlens_and_matches_reference():
    bt, sl, _, k, v = paged_inputs(kv_len=6)
    q = torch.randn(7, 4, 16).bfloat16()
    a = adapter(ref.TorchMHAExtend)
    with pytest.raises(AdapterInputError, match=r"^cu_seqlens_q: offsets decrease"):
        a.plan(ExtendMetadata(block_table=bt, seq_lens=sl, cu_seqlens_q=torch.tensor([0, 5, 4], dtype=I32)))
    with pytest.raises(AdapterInputError, match=r"^cu_seqlens_q: a request has more new tokens than seq_lens"):
        a.plan(ExtendMetadata(block_table=bt, seq_lens=sl, cu_seqlens_q=torch.tensor([0, 7, 7], dtype=I32)))
    with pytest.raises(UnsupportedFeatureError, match=r"non_causal was passed"):
        a.plan(ExtendMetadata(block_table=bt, seq_lens=sl, cu_seqlens_q=torch.tensor([0, 4, 7], dtype=I32), causal=False))
    cu = torch.tensor([0, 4, 7], dtype=I32)
    a.plan(ExtendMetadata(block_table=bt, seq_lens=sl, cu_seqlens_q=cu))
    assert torch.equal(a.run(q, k, v).out, ref.mha_paged(q, k, v, bt, sl, cu)[0])
    with pytest.raises(AdapterInputError, match=r"^q: shape \[6, 4, 16\] does not match \[7, 4, 16\]"):
        a.run(q[:6], k, v)


def test_prefill_head_dim_vo_and_non_causal():
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=I32), torch.tensor([0, 4, 6], dtype=I32)
    q, k, v = torch.randn(5, 4, 16).half(), torch.randn(6, 2, 16).half(), torch.randn(6, 2, 8).half()
    a = adapter(ref.TorchMHAPrefill, q_dtype="fp16", kv_dtype="fp16", head_dim_vo=8, non_causal=True)
    a.plan(PrefillMetadata(cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, causal=False))
    assert torch.equal(a.run(q, k, v).out, ref.mha_ragged(q, k, v, cu_q, cu_k, causal=False)[0])
    with pytest.raises(AdapterInputError, match=r"^v: shape \[6, 2, 16\] does not match \[6, 2, 8\]"):
        a.run(q, k, torch.randn(6, 2, 16).half())
    with pytest.raises(AdapterInputError, match=r"^cu_seqlens_kv: shape \[2\] does not match \[3\]"):
        a.plan(PrefillMetadata(cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k[:2]))


# ----------------------------------------------------------------- MLA


MLA = dict(num_qo_heads=2, num_kv_heads=None, head_dim_qk=None, kv_lora_rank=16, qk_rope_head_dim=4, page_size=4)


def mla_inputs(batch=2, q_len=1, kv_len=6):
    pages = math.ceil(kv_len / 4)
    bt = torch.arange(batch * pages, dtype=I32).reshape(batch, pages)
    sl = torch.full((batch,), kv_len, dtype=I32)
    qn, qp = torch.randn(batch * q_len, 2, 16).bfloat16(), torch.randn(batch * q_len, 2, 4).bfloat16()
    return bt, sl, qn, qp, torch.randn(batch * pages, 4, 20).bfloat16()


def test_mla_default_scale_needs_qk_nope_head_dim():
    bt, sl, qn, qp, kv = mla_inputs()
    with pytest.raises(AdapterInputError, match=r"DecodeMetadata.sm_scale is not set and its default 1/sqrt\(qk_nope_head_dim \+ qk_rope_head_dim\) needs request.qk_nope_head_dim"):
        adapter(ref.TorchMLADecode, **MLA).plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    a = adapter(ref.TorchMLADecode, **MLA, qk_nope_head_dim=12, return_lse=True)
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    got = a.run(qn, qp, kv)
    want = ref.mla_paged(qn, qp, kv, bt, sl, sm_scale=1 / math.sqrt(16))
    assert torch.equal(got.out, want[0]) and torch.equal(got.lse, want[1])
    with pytest.raises(AdapterInputError, match=r"^kv_cache: shape \[4, 4, 16\] does not match \[\*, 4, 20\]"):
        a.run(qn, qp, kv[..., :16])


def test_sparse_mla_checks_topk_and_refuses_window():
    bt, sl, qn, qp, kv = mla_inputs()
    a = adapter(ref.TorchSparseMLADecode, **MLA, topk=4)
    with pytest.raises(UnsupportedFeatureError, match=r"takes no window_left or logits_soft_cap"):
        a.plan(DecodeMetadata(block_table=bt, seq_lens=sl, window_left=4, sm_scale=0.1))
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl, sm_scale=0.1))
    idx = torch.tensor([[0, 2, -1, -1], [5, 4, 3, -1]], dtype=I32)
    assert torch.equal(a.run(qn, qp, kv, idx).out, ref.sparse_mla_paged(qn, qp, kv, bt, sl, idx, sm_scale=0.1)[0])
    with pytest.raises(AdapterInputError, match=r"^topk_indices: shape \[2, 3\] does not match \[2, 4\]"):
        a.run(qn, qp, kv, idx[:, :3])
    with pytest.raises(UnsupportedFeatureError, match=r"sinks was passed"):
        a.run(qn, qp, kv, idx, sinks=torch.zeros(2))


# ----------------------------------------------------------------- through the selector


def test_selected_reference_adapter_runs_the_contract():
    """select_kernel(solution='reference') hands back an adapter equal to the reference function."""
    from selector import select_kernel

    selection = select_kernel(
        op="mha_decode", arch="sm_90", solution="reference", q_dtype="bf16", head_dim_qk=16, num_qo_heads=4,
        num_kv_heads=2, page_size=4, q_len=2, sinks=True, return_lse=True,
    )
    a = selection.make_adapter()
    assert isinstance(a, ref.TorchMHADecode)
    bt, sl, q, k, v = paged_inputs(q_len=2)
    a.plan(DecodeMetadata(block_table=bt, seq_lens=sl, q_len=2))
    sinks = torch.ones(4)
    got = a.run(q, k, v, sinks=sinks)
    want = ref.mha_paged(q, k, v, bt, sl, torch.tensor([0, 2, 4], dtype=I32), sinks=sinks)
    assert torch.equal(got.out, want[0]) and torch.equal(got.lse, want[1])


def test_selected_adapter_with_unset_shapes_takes_them_from_the_tensors():
    from selector import select_kernel

    a = select_kernel(op="mha_prefill", arch="sm_90", solution="reference").make_adapter()
    cu_q = torch.tensor([0, 3], dtype=I32)
    a.plan(PrefillMetadata(cu_seqlens_q=cu_q, cu_seqlens_kv=cu_q))
    q, k, v = (torch.randn(3, 2, 8).bfloat16() for _ in range(3))
    assert torch.equal(a.run(q, k, v).out, ref.mha_ragged(q, k, v, cu_q, cu_q)[0])
