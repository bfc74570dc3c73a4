"""The torch reference against an independent naive implementation, plus its properties.

The naive version below loops over queries, heads and keys in float64 and
reads each request's KV from contiguous per-request tensors; the reference
reads them through a shuffled paged cache.  Agreement means both the math
and the paging are right.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from registry.adapters import reference as ref  # noqa: E402

F64 = torch.float64
FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------ the naive oracle


def naive_attention(q, k, v, *, causal=True, window_left=-1, sm_scale, cap=0.0, sinks=None):
    """One request in float64, query by query, key by key, straight from the contract text."""
    tq, hq, _ = q.shape
    tk, hkv, dv = v.shape
    out = torch.zeros(tq, hq, dv, dtype=F64)
    lse = torch.full((tq, hq), -math.inf, dtype=F64)
    for i in range(tq):
        pos = tk - tq + i
        for h in range(hq):
            kh = h // (hq // hkv)
            logits, values = [], []
            for j in range(tk):
                if causal and j > pos:
                    continue
                if window_left >= 0 and j < pos - window_left:
                    continue
                s = float(q[i, h].double() @ k[j, kh].double()) * sm_scale
                if cap > 0:
                    s = cap * math.tanh(s / cap)
                logits.append(s)
                values.append(v[j, kh].double())
            terms = logits + ([float(sinks[h])] if sinks is not None else [])
            if not terms:
                continue
            m = max(terms)
            lse[i, h] = m + math.log(sum(math.exp(t - m) for t in terms))
            for s, val in zip(logits, values):
                out[i, h] += math.exp(s - lse[i, h]) * val
    return out, lse


# ------------------------------------------------------------------ case builders


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def quantize(x, dtype, scale=1.0):
    """Stored tensor in ``dtype`` and the real float64 values it stands for."""
    stored = (x / scale).to(dtype)
    return stored, stored.double() * scale


def build_paged(per_request, page_size, gen):
    """Scatter per-request ``[L, ...]`` tensors (one list per cache) into shuffled pages.

    Unused slots and spare pages hold large garbage, so reading past a
    request's length shows up in the result.
    """
    lens = [t.shape[0] for t in per_request[0]]
    pages = [math.ceil(n / page_size) for n in lens]
    total = sum(pages) + 2
    perm = torch.randperm(total, generator=gen).tolist()
    block_table = torch.full((len(lens), max(pages + [1]) + 1), perm[-1], dtype=torch.int32)
    caches = [torch.full((total, page_size, *ts[0].shape[1:]), 50.0) for ts in per_request]
    nxt = 0
    for b in range(len(lens)):
        for p in range(pages[b]):
            page = perm[nxt]
            nxt += 1
            block_table[b, p] = page
            for cache, ts in zip(caches, per_request):
                chunk = ts[b][p * page_size : (p + 1) * page_size]
                cache[page, : chunk.shape[0]] = chunk
    return caches, block_table, torch.tensor(lens, dtype=torch.int32)


def cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def assert_close(got, want, atol=1e-4):
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)


def assert_lse_close(got, want):
    assert got.dtype == torch.float32
    both_inf = torch.isinf(got) & torch.isinf(want.float())
    assert torch.equal(torch.isinf(got), torch.isinf(want.float()))
    torch.testing.assert_close(got.double()[~both_inf], want[~both_inf], atol=1e-4, rtol=1e-4)


def paged_mha_case(seed, *, q_lens, kv_lens, hq, hkv, d, dv=None, page_size, kv_dtype=torch.float32, scale=1.0):
    dv = dv or d
    g = _gen(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    ks = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    vs = [torch.randn(n, hkv, dv, generator=g) for n in kv_lens]
    (k_cache, v_cache), block_table, seq_lens = build_paged([ks, vs], page_size, g)
    if kv_dtype != torch.float32:
        k_cache, _ = quantize(k_cache, kv_dtype, scale)
        v_cache, _ = quantize(v_cache, kv_dtype, scale)
        ks = [quantize(t, kv_dtype, scale)[1] for t in ks]
        vs = [quantize(t, kv_dtype, scale)[1] for t in vs]
    sinks = torch.randn(hq, generator=g) * 2
    return q, ks, vs, k_cache, v_cache, block_table, seq_lens, sinks


def naive_batched(q, ks, vs, q_lens, **kw):
    outs, lses, start = [], [], 0
    for n, k, v in zip(q_lens, ks, vs):
        o, l = naive_attention(q[start : start + n], k, v, **kw)
        outs.append(o)
        lses.append(l)
        start += n
    return torch.cat(outs), torch.cat(lses)


# ------------------------------------------------------------------ MHA paged


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    page_size=st.sampled_from([1, 4, 16]),
    q_len=st.integers(1, 4),
    extra=st.lists(st.integers(0, 20), min_size=3, max_size=3),
    window_left=st.sampled_from([-1, 0, 3]),
    cap=st.sampled_from([0.0, 2.0]),
    use_sinks=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mha_paged_matches_naive(batch, hkv, group, page_size, q_len, extra, window_left, cap, use_sinks, seed):
    kv_lens = [q_len + e for e in extra[:batch]]
    q_lens = [q_len] * batch
    q, ks, vs, kc, vc, bt, sl, sinks = paged_mha_case(
        seed, q_lens=q_lens, kv_lens=kv_lens, hq=hkv * group, hkv=hkv, d=8, page_size=page_size
    )
    sinks = sinks if use_sinks else None
    scale = 0.3
    out, lse = ref.mha_paged(
        q, kc, vc, bt, sl, torch.arange(batch + 1, dtype=torch.int32) * q_len, sm_scale=scale,
        window_left=window_left, logits_soft_cap=cap, sinks=sinks,
    )
    want_o, want_l = naive_batched(
        q, ks, vs, q_lens, sm_scale=scale, window_left=window_left, cap=cap, sinks=sinks
    )
    assert_close(out, want_o)
    assert_lse_close(lse, want_l)


def test_mha_paged_ragged_extend_noncausal_and_default_scale():
    q_lens, kv_lens = [3, 1, 5], [7, 1, 5]
    q, ks, vs, kc, vc, bt, sl, _ = paged_mha_case(1, q_lens=q_lens, kv_lens=kv_lens, hq=4, hkv=2, d=16, page_size=4)
    for causal in (True, False):
        out, lse = ref.mha_paged(q, kc, vc, bt, sl, cu(q_lens), causal=causal)
        want_o, want_l = naive_batched(q, ks, vs, q_lens, causal=causal, sm_scale=1 / math.sqrt(16))
        assert_close(out, want_o)
        assert_lse_close(lse, want_l)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_mha_paged_fp8_kv_float_and_tensor_scale_identical(fp8):
    q_lens, kv_lens, scale = [2, 2], [9, 4], 0.25
    q, ks, vs, kc, vc, bt, sl, _ = paged_mha_case(
        2, q_lens=q_lens, kv_lens=kv_lens, hq=4, hkv=1, d=8, page_size=4, kv_dtype=fp8, scale=scale
    )
    q8, q_real = quantize(q, fp8, 0.5)
    as_float = ref.mha_paged(q8, kc, vc, bt, sl, cu(q_lens), q_scale=0.5, k_scale=scale, v_scale=scale)
    t = lambda x: torch.tensor([x], dtype=torch.float32)  # noqa: E731
    as_tensor = ref.mha_paged(q8, kc, vc, bt, sl, cu(q_lens), q_scale=t(0.5), k_scale=t(scale), v_scale=t(scale))
    assert torch.equal(as_float[0], as_tensor[0]) and torch.equal(as_float[1], as_tensor[1])
    assert as_float[0].dtype == torch.bfloat16  # fp8 query -> bf16 output by default
    want_o, want_l = naive_batched(q_real, ks, vs, q_lens, sm_scale=1 / math.sqrt(8))
    assert_close(as_float[0], want_o, atol=2e-2)
    assert_lse_close(as_float[1], want_l)


def test_out_dtype_defaults_to_q_dtype_and_can_be_overridden():
    q, _, _, kc, vc, bt, sl, _ = paged_mha_case(3, q_lens=[1], kv_lens=[5], hq=2, hkv=2, d=8, page_size=4)
    assert ref.mha_paged(q.half(), kc.half(), vc.half(), bt, sl, cu([1]))[0].dtype == torch.float16
    assert ref.mha_paged(q.half(), kc.half(), vc.half(), bt, sl, cu([1]), out_dtype="bf16")[0].dtype == torch.bfloat16
    assert ref.mha_paged(q, kc, vc, bt, sl, cu([1]), out_dtype=torch.float16)[1].dtype == torch.float32


# ------------------------------------------------------------------ MHA ragged (prefill)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_mha_ragged_matches_naive_with_head_dim_vo_different(causal, use_sinks):
    g = _gen(4)
    q_lens, kv_lens, hq, hkv, d, dv = [4, 1, 6], [4, 3, 6], 6, 2, 16, 8
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    k = torch.randn(sum(kv_lens), hkv, d, generator=g)
    v = torch.randn(sum(kv_lens), hkv, dv, generator=g)
    sinks = torch.randn(hq, generator=g) if use_sinks else None
    out, lse = ref.mha_ragged(
        q, k, v, cu(q_lens), cu(kv_lens), causal=causal, window_left=2, logits_soft_cap=5.0, sinks=sinks
    )
    assert out.shape == (sum(q_lens), hq, dv)
    kc, vc = cu(kv_lens).tolist(), cu(kv_lens).tolist()
    want_o, want_l = naive_batched(
        q, [k[a:b] for a, b in zip(kc, kc[1:])], [v[a:b] for a, b in zip(vc, vc[1:])], q_lens,
        causal=causal, window_left=2, cap=5.0, sm_scale=1 / math.sqrt(d), sinks=sinks,
    )
    assert_close(out, want_o)
    assert_lse_close(lse, want_l)


def test_empty_rows_give_zero_output_and_lse_of_the_sink_alone():
    """More new tokens than keys (causal) and an empty request: out 0, LSE -inf (or the sink)."""
    g = _gen(5)
    q = torch.randn(5, 2, 8, generator=g)
    k, v = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    cu_q, cu_k = cu([4, 1]), cu([2, 0])
    out, lse = ref.mha_ragged(q, k, v, cu_q, cu_k)
    assert torch.equal(out[[0, 1, 4]], torch.zeros(3, 2, 8))
    assert torch.isneginf(lse[[0, 1, 4]]).all() and torch.isfinite(lse[[2, 3]]).all()
    sinks = torch.tensor([0.5, -1.0])
    out, lse = ref.mha_ragged(q, k, v, cu_q, cu_k, sinks=sinks)
    assert torch.equal(out[4], torch.zeros(2, 8))
    assert torch.equal(lse[4], sinks)


# ------------------------------------------------------------------ properties


def _decode_case(seed=6, hq=4, hkv=2):
    q, _, _, kc, vc, bt, sl, _ = paged_mha_case(seed, q_lens=[2, 2], kv_lens=[11, 6], hq=hq, hkv=hkv, d=8, page_size=4)
    return q, kc, vc, bt, sl, cu([2, 2])


def test_positive_sink_lowers_output_norm_and_adds_to_lse():
    q, kc, vc, bt, sl, c = _decode_case()
    base_o, base_l = ref.mha_paged(q, kc, vc, bt, sl, c)
    sinks = torch.full((4,), 3.0)
    o, l = ref.mha_paged(q, kc, vc, bt, sl, c, sinks=sinks)
    assert (o.norm(dim=-1) < base_o.norm(dim=-1)).all()
    torch.testing.assert_close(l, torch.logaddexp(base_l, sinks))
    # the sink only rescales: out_with = out_without * exp(lse_without - lse_with)
    torch.testing.assert_close(o, base_o * torch.exp(base_l - l)[..., None])


def test_window_covering_everything_changes_nothing_and_small_window_does():
    q, kc, vc, bt, sl, c = _decode_case()
    full = ref.mha_paged(q, kc, vc, bt, sl, c)[0]
    assert torch.equal(ref.mha_paged(q, kc, vc, bt, sl, c, window_left=100)[0], full)
    assert not torch.allclose(ref.mha_paged(q, kc, vc, bt, sl, c, window_left=1)[0], full)


def test_huge_soft_cap_is_no_cap():
    q, kc, vc, bt, sl, c = _decode_case()
    torch.testing.assert_close(
        ref.mha_paged(q, kc, vc, bt, sl, c, logits_soft_cap=1e6)[0], ref.mha_paged(q, kc, vc, bt, sl, c)[0]
    )


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, kc, vc, bt, sl, c = _decode_case(hq=4, hkv=2)
    gqa = ref.mha_paged(q, kc, vc, bt, sl, c)
    mha = ref.mha_paged(q, kc.repeat_interleave(2, dim=2), vc.repeat_interleave(2, dim=2), bt, sl, c)
    torch.testing.assert_close(gqa, mha)


def test_paged_equals_ragged_when_queries_are_the_whole_sequence():
    q_lens = [5, 3]
    q, ks, vs, kc, vc, bt, sl, _ = paged_mha_case(7, q_lens=q_lens, kv_lens=q_lens, hq=2, hkv=1, d=8, page_size=2)
    paged = ref.mha_paged(q, kc, vc, bt, sl, cu(q_lens))
    ragged = ref.mha_ragged(q, torch.cat(ks), torch.cat(vs), cu(q_lens), cu(q_lens))
    torch.testing.assert_close(paged, ragged)


# ------------------------------------------------------------------ MLA


def mla_case(seed, *, batch, q_len, kv_lens, hq, rank, rope, page_size, kv_dtype=torch.float32, scale=1.0):
    g = _gen(seed)
    t = batch * q_len
    q_nope = torch.randn(t, hq, rank, generator=g)
    q_pe = torch.randn(t, hq, rope, generator=g)
    kvs = [torch.randn(n, rank + rope, generator=g) for n in kv_lens]
    (kv_cache,), bt, sl = build_paged([kvs], page_size, g)
    if kv_dtype != torch.float32:
        kv_cache, _ = quantize(kv_cache, kv_dtype, scale)
        kvs = [quantize(x, kv_dtype, scale)[1] for x in kvs]
    return q_nope, q_pe, kvs, kv_cache, bt, sl, torch.randn(hq, generator=g)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_mla_paged_matches_naive(q_len, use_sinks):
    kv_lens, rank, rope = [7, 3, 12], 16, 4
    qn, qp, kvs, kv, bt, sl, sinks = mla_case(8, batch=3, q_len=q_len, kv_lens=kv_lens, hq=4, rank=rank, rope=rope, page_size=4)
    sinks = sinks if use_sinks else None
    out, lse = ref.mla_paged(qn, qp, kv, bt, sl, q_len=q_len, sm_scale=0.2, sinks=sinks, window_left=4, logits_soft_cap=3.0)
    q = torch.cat([qn, qp], -1)
    want_o, want_l = naive_batched(
        q, [x[:, None, :] for x in kvs], [x[:, None, :rank] for x in kvs], [q_len] * 3,
        sm_scale=0.2, sinks=sinks, window_left=4, cap=3.0,
    )
    assert out.shape == (3 * q_len, 4, rank)
    assert_close(out, want_o)
    assert_lse_close(lse, want_l)


def test_mla_fp8_float_and_tensor_scale_identical():
    qn, qp, _, kv, bt, sl, _ = mla_case(9, batch=2, q_len=1, kv_lens=[5, 9], hq=2, rank=16, rope=4, page_size=4,
                                          kv_dtype=FP8, scale=0.5)
    a = ref.mla_paged(qn.bfloat16(), qp.bfloat16(), kv, bt, sl, sm_scale=0.1, kv_scale=0.5)
    b = ref.mla_paged(qn.bfloat16(), qp.bfloat16(), kv, bt, sl, sm_scale=0.1, kv_scale=torch.tensor([0.5]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.bfloat16


# ------------------------------------------------------------------ sparse MLA


def naive_sparse(q, kvs, topk, q_len, rank, *, sm_scale, sinks=None):
    """Per token: attend to exactly the listed positions of its request."""
    t, hq, _ = q.shape
    out = torch.zeros(t, hq, rank, dtype=F64)
    lse = torch.full((t, hq), -math.inf, dtype=F64)
    for i in range(t):
        kv = kvs[i // q_len]
        for h in range(hq):
            logits = [float(q[i, h].double() @ kv[j].double()) * sm_scale for j in topk[i].tolist() if j >= 0]
            vals = [kv[j, :rank].double() for j in topk[i].tolist() if j >= 0]
            terms = logits + ([float(sinks[h])] if sinks is not None else [])
            if not terms:
                continue
            m = max(terms)
            lse[i, h] = m + math.log(sum(math.exp(x - m) for x in terms))
            for s, val in zip(logits, vals):
                out[i, h] += math.exp(s - lse[i, h]) * val
    return out, lse


@pytest.mark.parametrize("use_sinks", [False, True])
@pytest.mark.parametrize("q_len", [1, 2])
def test_sparse_mla_matches_naive(use_sinks, q_len):
    kv_lens, rank, rope, k = [9, 20], 16, 4, 8
    qn, qp, kvs, kv, bt, sl, sinks = mla_case(10, batch=2, q_len=q_len, kv_lens=kv_lens, hq=2, rank=rank, rope=rope, page_size=4)
    g = _gen(11)
    rows = []
    for t in range(2 * q_len):
        n = kv_lens[t // q_len]
        picks = torch.randperm(n, generator=g)[: k - 2].tolist()
        rows.append(picks + [-1] * (k - len(picks)))
    rows[0] = [-1] * k  # a token that reads nothing
    topk = torch.tensor(rows, dtype=torch.int32)
    sinks = sinks if use_sinks else None
    out, lse = ref.sparse_mla_paged(qn, qp, kv, bt, sl, topk, sm_scale=0.3, sinks=sinks)
    want_o, want_l = naive_sparse(torch.cat([qn, qp], -1), kvs, topk, q_len, rank, sm_scale=0.3, sinks=sinks)
    assert_close(out, want_o)
    assert_lse_close(lse, want_l)


def test_sparse_mla_rejects_indices_outside_the_request():
    qn, qp, _, kv, bt, sl, _ = mla_case(12, batch=1, q_len=1, kv_lens=[5], hq=2, rank=16, rope=4, page_size=4)
    with pytest.raises(ValueError, match=r"topk_indices\[0, 1\] = 5 is outside 0\.\.4"):
        ref.sparse_mla_paged(qn, qp, kv, bt, sl, torch.tensor([[0, 5, -1, -1]], dtype=torch.int32), sm_scale=0.1)


def test_sparse_mla_with_all_positions_equals_dense_noncausal_mla():
    qn, qp, _, kv, bt, sl, _ = mla_case(13, batch=2, q_len=1, kv_lens=[6, 6], hq=2, rank=16, rope=4, page_size=4)
    topk = torch.arange(6, dtype=torch.int32).repeat(2, 1)
    sparse = ref.sparse_mla_paged(qn, qp, kv, bt, sl, topk, sm_scale=0.2)
    dense = ref.mla_paged(qn, qp, kv, bt, sl, sm_scale=0.2, causal=False)
    torch.testing.assert_close(sparse, dense)
