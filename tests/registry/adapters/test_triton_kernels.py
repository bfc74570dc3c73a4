"""kernelsel's Triton kernels against the torch reference, cases taken from the manifest.

Every ``solution: triton`` entry brings its own cases: each declared dtype,
head dim, group size, head count, page size, q_len, top-k and feature is
exercised at least once (one factor at a time from a base case, then all
features together with split-KV), on tiny shapes.  Without a GPU the kernels
run in Triton's interpreter on the CPU: ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before any test module imports triton (triton reads it
when a kernel is decorated).  With a GPU the same cases compile, and the ``gpu`` tests add
real sizes with the plan's own split-KV choice, CUDA-graph capture and the
no-allocation promise of ``run()``.

``KERNELSEL_MANIFEST`` selects another manifest or overlay, as for the
selector, so a proposed capability can be verified before it is merged.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
from typing import Any, Optional

import pytest

torch = pytest.importorskip("torch")
GPU = torch.cuda.is_available()
pytest.importorskip("triton")

from registry.adapters import reference as ref  # noqa: E402
from registry.adapters.base import torch_dtype  # noqa: E402
from registry.constraints import OneOf  # noqa: E402
from registry.contracts import DecodeMetadata, ExtendMetadata  # noqa: E402
from registry.errors import AdapterInputError, UnsupportedFeatureError  # noqa: E402
from registry.loader import load_manifest  # noqa: E402
from selector.overrides import Overrides  # noqa: E402
from selector.request import KernelRequest  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
MANIFEST = load_manifest(Overrides.from_env().manifest)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
RUNTIME_FEATURES = ("sinks", "sliding_window", "logits_soft_cap", "return_lse", "non_causal", "noncontiguous_kv")


def triton_kernels(op: str) -> list:
    return [k for k in MANIFEST.kernels if k.op.value == op and k.solution.value == "triton"]


# ----------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One run: request fields plus how to drive it (splits, tensor scales, sizes)."""

    q_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    head_dim: int = 128
    head_dim_vo: int = 128
    group: int = 4
    heads: int = 16  # MLA query heads
    page_size: int = 16
    q_len: int = 1
    topk: int = 8
    features: frozenset = frozenset()
    splits: Optional[int] = 1  # None: the plan's heuristic
    tensor_scales: bool = False
    value_splits: int = 1  # MLA launch option
    batch: int = 3
    context: int = 40
    new_tokens: int = 5  # mha_extend: new tokens of most requests
    min_len: int = 0  # shortest request (cache + new tokens)

    def id(self, op: str) -> str:
        if op.startswith("mha"):
            shape = [f"d{self.head_dim}" + (f"v{self.head_dim_vo}" if self.head_dim_vo != self.head_dim else ""), f"g{self.group}"]
        else:
            shape = [f"h{self.heads}"] + ([f"k{self.topk}"] if op == "sparse_mla_decode" else [])
        parts = [f"{self.q_dtype}-{self.kv_dtype}", *shape, f"p{self.page_size}"]
        parts += [f"q{self.q_len}"] if op != "mha_extend" else []
        parts += [f"split{self.splits}"] if self.splits != 1 else []
        parts += [f"vsplit{self.value_splits}"] if self.value_splits != 1 else []
        parts += [f"ctx{self.context}"] if self.context != 40 else []
        return "-".join(parts + sorted(self.features) + (["tscale"] if self.tensor_scales else []))


def _samples(constraint: Any, typical: tuple[int, ...]) -> list[int]:
    """Declared values of a shape constraint: a one-of's values, or typical values inside a range plus its ends."""
    if constraint is None:
        return list(typical)
    if isinstance(constraint, OneOf):
        return list(constraint.values)
    picks = {v for v in typical if constraint.allows(v)}
    picks |= {v for v in (constraint.min, constraint.max) if v is not None}
    return sorted(picks)


def _first(values: list, preferred: Any) -> Any:
    return preferred if preferred in values else values[0]


def _one_factor_cases(spec: Any, base: Case, factors: dict[str, list]) -> list[Case]:
    """Base case, every (q, kv) dtype pair, one case per declared value of each other factor,
    each feature alone, then all features together with fp8 KV, tensor scales and split-KV."""
    cases = [base]
    q_dtypes, kv_dtypes = factors.pop("q_dtype"), factors.pop("kv_dtype")
    cases += [dataclasses.replace(base, q_dtype=q, kv_dtype=kv) for q in q_dtypes for kv in kv_dtypes]
    for field, values in factors.items():
        for v in values:
            cases.append(dataclasses.replace(base, **{field: v}))
    features = [f for f in RUNTIME_FEATURES if getattr(spec.features, f)]
    for f in features:
        cases.append(dataclasses.replace(base, features=frozenset({f})))
    fp8 = [d.value for d in spec.dtypes.kv_dtype.values if torch_dtype(d.value) in FP8]
    cases.append(dataclasses.replace(
        base, features=frozenset(features) - {"non_causal"}, splits=3, tensor_scales=True,
        kv_dtype=fp8[0] if fp8 else base.kv_dtype, q_len=max(base.q_len, 2),
    ))
    cases.append(dataclasses.replace(base, splits=2, tensor_scales=True))
    return list(dict.fromkeys(cases))


def mha_cases(spec: Any) -> list[Case]:
    s, d = spec.shapes, spec.dtypes
    q_dtypes = [v.value for v in d.q_dtype.values]
    kv_dtypes = [v.value for v in d.kv_dtype.values]
    head_dims = _samples(s.head_dim_qk, (64, 128, 256))
    vo_dims = _samples(s.head_dim_vo, (64, 128, 256))
    q = _first(q_dtypes, "bf16")
    hd = _first(head_dims, 128)
    base = Case(
        q_dtype=q, kv_dtype=_first(kv_dtypes, q), head_dim=hd, head_dim_vo=_first(vo_dims, hd),
        group=_first(_samples(s.gqa_group_size, (1, 4, 6)), 4),
        page_size=_first(_samples(s.page_size, (1, 16)), 16),
        q_len=_first(_samples(s.q_len, (1, 3)), 3) if spec.op.value == "mha_decode" else 1,
    )
    factors = {
        "q_dtype": q_dtypes,
        "kv_dtype": kv_dtypes,
        "head_dim": head_dims,
        "group": _samples(s.gqa_group_size, (1, 4, 6)),
        "page_size": _samples(s.page_size, (1, 16, 24)),
    }
    if spec.op.value == "mha_decode":
        factors["q_len"] = _samples(s.q_len, (1, 3))
    cases = _one_factor_cases(spec, base, factors)
    # head_dim_vo follows head_dim_qk where declared, and differs from it once where declared
    cases = [dataclasses.replace(c, head_dim_vo=c.head_dim) if c.head_dim in vo_dims else c for c in cases]
    other_vo = [v for v in vo_dims if v != base.head_dim]
    if other_vo:
        cases.append(dataclasses.replace(base, head_dim_vo=other_vo[-1]))
    # contexts past two 64-key blocks: whole blocks take the kernel's unmasked path, the rest the masked one
    fp8 = [v for v in kv_dtypes if torch_dtype(v) in FP8]
    no_window = frozenset(f for f in RUNTIME_FEATURES if getattr(spec.features, f)) - {"sliding_window", "non_causal"}
    cases.append(dataclasses.replace(base, context=150, min_len=130))
    cases.append(dataclasses.replace(base, context=150, min_len=130, splits=2, kv_dtype=fp8[0] if fp8 else base.kv_dtype,
                                     features=no_window & {"sinks", "return_lse", "logits_soft_cap"}))
    return list(dict.fromkeys(cases))


def mla_cases(spec: Any) -> list[Case]:
    s, d = spec.shapes, spec.dtypes
    q_dtypes = [v.value for v in d.q_dtype.values]
    kv_dtypes = [v.value for v in d.kv_dtype.values]
    q = _first(q_dtypes, "bf16")
    sparse = spec.op.value == "sparse_mla_decode"
    base = Case(
        q_dtype=q, kv_dtype=_first(kv_dtypes, q), heads=_first(_samples(s.num_qo_heads, (16, 128)), 16),
        page_size=_first(_samples(s.page_size, (1, 16, 64)), 16),
        q_len=_first(_samples(s.q_len, (1, 2)), 2), batch=2,
        topk=_first(_samples(s.topk, (8, 20)), 20) if sparse else 0,
    )
    factors = {
        "q_dtype": q_dtypes,
        "kv_dtype": kv_dtypes,
        "heads": _samples(s.num_qo_heads, (16, 20, 128)),
        "page_size": _samples(s.page_size, (1, 16, 64)),
        "q_len": _samples(s.q_len, (1, 2)),
    }
    if sparse:
        factors["topk"] = _samples(s.topk, (8, 20))
        return _one_factor_cases(spec, base, factors)
    return _one_factor_cases(spec, base, factors) + [dataclasses.replace(base, splits=2, value_splits=2)]


def _params(op: str, make: Any) -> list:
    return [
        pytest.param(spec, case, id=f"{spec.name}-{case.id(spec.op.value)}")
        for spec in triton_kernels(op)
        for case in make(spec)
    ]


# ----------------------------------------------------------------- inputs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def request_for(spec: Any, case: Case, **extra: Any) -> KernelRequest:
    fields = dict(
        op=spec.op.value, arch="sm_90", q_dtype=case.q_dtype, kv_dtype=case.kv_dtype,
        **{f: True for f in case.features if f != "noncontiguous_kv" or spec.features.noncontiguous_kv},
    )
    if spec.op.value.startswith("mha"):
        fields.update(head_dim_qk=case.head_dim, head_dim_vo=case.head_dim_vo, page_size=case.page_size,
                      num_kv_heads=2 if case.group < 16 else 1)
        fields["num_qo_heads"] = fields["num_kv_heads"] * case.group
        if spec.op.value == "mha_decode":
            fields["q_len"] = case.q_len
    else:
        fields.update(num_qo_heads=case.heads, page_size=case.page_size, q_len=case.q_len,
                      kv_lora_rank=spec.shapes.kv_lora_rank.values[0] if spec.shapes.kv_lora_rank else 512,
                      qk_rope_head_dim=spec.shapes.qk_rope_head_dim.values[0] if spec.shapes.qk_rope_head_dim else 64,
                      qk_nope_head_dim=128)
        if spec.op.value == "sparse_mla_decode":
            fields["topk"] = case.topk
    fields.update(extra)
    return KernelRequest(**fields)


def make_adapter(spec: Any, request: Any, case: Case) -> Any:
    module, name = spec.adapter.split(":")
    cls = getattr(importlib.import_module(module), name)
    tuning = {} if case.splits is None else {"num_splits": case.splits}
    if case.value_splits != 1:
        tuning["value_splits"] = case.value_splits
    return cls(spec, request, tuning=tuning)


def paged_cache(lens: list[int], page_size: int, row_shape: tuple, dtype: torch.dtype, gen, *, scale=1.0, copies=1):
    """Shuffled pages holding ``lens`` tokens per request; spare pages and slots hold garbage.

    Returns ``(caches, block_table, seq_lens)``; ``copies=2`` gives K and V,
    and with ``interleaved`` callers can view them out of one tensor.
    """
    pages = [max(1, math.ceil(n / page_size)) for n in lens]
    total = sum(pages) + 3
    perm = torch.randperm(total, generator=gen)
    block_table = torch.full((len(lens), max(pages) + 1), total - 1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[at : at + n].int()
        at += n
    caches = [(torch.randn((total, page_size) + row_shape, generator=gen) / scale).to(dtype) for _ in range(copies)]
    return caches, block_table, torch.tensor(lens, dtype=torch.int32)


def _lens(case: Case, gen, *, minimum: int) -> list[int]:
    top = case.context
    low = max(minimum, case.min_len)
    return [max(low, int(v)) for v in torch.randint(low, top + 1, (case.batch,), generator=gen)]


def _scales(case: Case, kv_dtype: torch.dtype) -> dict[str, Any]:
    """fp8 KV gets non-trivial scales; tensor form where the case asks for it."""
    values = {"q_scale": 1.0, "k_scale": 0.75 if kv_dtype in FP8 else 1.0, "v_scale": 1.5 if kv_dtype in FP8 else 1.0}
    if case.tensor_scales:
        return {k: torch.tensor([v], dtype=torch.float32, device=DEVICE) for k, v in values.items()}
    return values


def _to(x: Any) -> Any:
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def assert_matches(out, lse, ref_out, ref_lse, *, want_lse: bool) -> None:
    assert torch.isfinite(out.float()).all(), "non-finite output"
    err = (out.float() - ref_out.float()).norm() / ref_out.float().norm().clamp_min(1e-6)
    assert err < 1e-2, f"relative error {err:.2e}"
    torch.testing.assert_close(out.float(), ref_out.float(), atol=4e-2, rtol=4e-2)
    if want_lse:
        assert lse is not None and lse.dtype == torch.float32
        torch.testing.assert_close(lse, ref_lse.to(lse.device), atol=2e-3, rtol=1e-4)
    else:
        assert lse is None


# ----------------------------------------------------------------- runners


def run_mha(spec: Any, case: Case, seed: int = 0) -> Any:
    """Run ``spec``'s adapter on ``case`` against the reference; returns the planned adapter."""
    gen = _gen(seed)
    decode = spec.op.value == "mha_decode"
    request = request_for(spec, case)
    hkv, hq = request.num_kv_heads, request.num_qo_heads
    q_dtype, kv_dtype = torch_dtype(case.q_dtype), torch_dtype(case.kv_dtype)
    if decode:
        lens = _lens(case, gen, minimum=case.q_len)
        new = [case.q_len] * case.batch
    else:  # ragged: new_tokens per request, except one without new tokens and one that is all new tokens
        lens = _lens(case, gen, minimum=1)
        pattern = [case.new_tokens, 0, None]
        new = [n if p is None else min(n, p) for n, p in zip(lens, itertools.cycle(pattern))]
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    if "noncontiguous_kv" in case.features:  # K and V interleaved per page: [P, 2, S, Hkv, D]
        (kv,), block_table, seq_lens = paged_cache(lens, case.page_size, (2, hkv, case.head_dim), kv_dtype, gen)
        kv = kv.transpose(1, 2).contiguous()
        k_cache, v_cache = kv[:, 0], kv[:, 1]
        assert case.head_dim == case.head_dim_vo and not k_cache.is_contiguous()
    else:
        (k_cache,), block_table, seq_lens = paged_cache(lens, case.page_size, (hkv, case.head_dim), kv_dtype, gen)
        (v_cache,), _, _ = paged_cache(lens, case.page_size, (hkv, case.head_dim_vo), kv_dtype, gen)
        v_cache = v_cache[: k_cache.shape[0]]
    q = torch.randn(int(cu[-1]), hq, case.head_dim, generator=gen).to(q_dtype)
    sinks = torch.randn(hq, generator=gen) * 2 if "sinks" in case.features else None
    options = dict(
        window_left=5 if "sliding_window" in case.features else -1,
        logits_soft_cap=8.0 if "logits_soft_cap" in case.features else 0.0,
    )
    scales = _scales(case, kv_dtype)
    adapter = make_adapter(spec, request, case)
    block_table, seq_lens, cu_dev = _to(block_table), _to(seq_lens), _to(cu)
    if decode:
        adapter.plan(DecodeMetadata(block_table=block_table, seq_lens=seq_lens, q_len=case.q_len, **options))
        causal = True
    else:
        causal = "non_causal" not in case.features
        adapter.plan(ExtendMetadata(block_table=block_table, seq_lens=seq_lens, cu_seqlens_q=cu_dev, causal=causal, **options))
    out, lse = adapter.run(_to(q), _to(k_cache), _to(v_cache), sinks=_to(sinks), **scales)
    ref_out, ref_lse = ref.mha_paged(
        q, k_cache, v_cache, block_table.cpu(), seq_lens.cpu(), cu, causal=causal, sinks=sinks,
        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in scales.items()}, **options,
    )
    assert out.dtype == q_dtype
    assert_matches(out.cpu(), None if lse is None else lse.cpu(), ref_out, ref_lse, want_lse="return_lse" in case.features)
    return adapter


def _mla_inputs(spec: Any, case: Case, gen) -> dict[str, Any]:
    request = request_for(spec, case)
    rank, rope = request.kv_lora_rank, request.qk_rope_head_dim
    q_dtype, kv_dtype = torch_dtype(case.q_dtype), torch_dtype(case.kv_dtype)
    lens = _lens(case, gen, minimum=max(case.q_len, 1))
    (kv,), block_table, seq_lens = paged_cache(lens, case.page_size, (rank + rope,), kv_dtype, gen)
    tokens = case.batch * case.q_len
    return dict(
        request=request, lens=lens, kv=kv, block_table=block_table, seq_lens=seq_lens,
        q_nope=torch.randn(tokens, case.heads, rank, generator=gen).to(q_dtype),
        q_pe=torch.randn(tokens, case.heads, rope, generator=gen).to(q_dtype),
        sinks=torch.randn(case.heads, generator=gen) * 2 if "sinks" in case.features else None,
        scales={"q_scale": 1.0, "kv_scale": 0.5 if kv_dtype in FP8 else 1.0},
    )


def _scale_form(case: Case, scales: dict) -> dict:
    if case.tensor_scales:
        return {k: torch.tensor([v], dtype=torch.float32, device=DEVICE) for k, v in scales.items()}
    return scales


def run_mla(spec: Any, case: Case, seed: int = 0) -> None:
    gen = _gen(seed)
    x = _mla_inputs(spec, case, gen)
    r = x["request"]
    sm_scale = 1.0 / math.sqrt(r.qk_nope_head_dim + r.qk_rope_head_dim)
    options = dict(
        window_left=6 if "sliding_window" in case.features else -1,
        logits_soft_cap=20.0 if "logits_soft_cap" in case.features else 0.0,
    )
    adapter = make_adapter(spec, r, case)
    adapter.plan(DecodeMetadata(block_table=_to(x["block_table"]), seq_lens=_to(x["seq_lens"]), q_len=case.q_len, **options))
    out, lse = adapter.run(_to(x["q_nope"]), _to(x["q_pe"]), _to(x["kv"]), sinks=_to(x["sinks"]), **_scale_form(case, x["scales"]))
    ref_out, ref_lse = ref.mla_paged(
        x["q_nope"], x["q_pe"], x["kv"], x["block_table"], x["seq_lens"], q_len=case.q_len, sm_scale=sm_scale,
        sinks=x["sinks"], **x["scales"], **options,
    )
    assert_matches(out.cpu(), None if lse is None else lse.cpu(), ref_out, ref_lse, want_lse="return_lse" in case.features)
    return adapter


def topk_for(lens: list[int], q_len: int, k: int, gen) -> torch.Tensor:
    """Per token: distinct positions of its request, one repeated, a tail of -1 (unused)."""
    rows = []
    for n in lens:
        for _ in range(q_len):
            take = min(n, max(1, k - 3))
            row = torch.randperm(n, generator=gen)[:take].tolist()
            row += row[:1]  # a position listed twice counts twice
            rows.append((row + [-1] * k)[:k])
    return torch.tensor(rows, dtype=torch.int32)


def run_sparse_mla(spec: Any, case: Case, seed: int = 0) -> None:
    gen = _gen(seed)
    x = _mla_inputs(spec, case, gen)
    r = x["request"]
    topk = topk_for(x["lens"], case.q_len, case.topk, gen)
    sm_scale = 1.0 / math.sqrt(r.qk_nope_head_dim + r.qk_rope_head_dim)
    adapter = make_adapter(spec, r, case)
    adapter.plan(DecodeMetadata(block_table=_to(x["block_table"]), seq_lens=_to(x["seq_lens"]), q_len=case.q_len))
    out, lse = adapter.run(
        _to(x["q_nope"]), _to(x["q_pe"]), _to(x["kv"]), _to(topk), sinks=_to(x["sinks"]), **_scale_form(case, x["scales"])
    )
    ref_out, ref_lse = ref.sparse_mla_paged(
        x["q_nope"], x["q_pe"], x["kv"], x["block_table"], x["seq_lens"], topk, sm_scale=sm_scale,
        sinks=x["sinks"], **x["scales"],
    )
    assert_matches(out.cpu(), None if lse is None else lse.cpu(), ref_out, ref_lse, want_lse="return_lse" in case.features)


# ----------------------------------------------------------------- the manifest's claims, tiny shapes


@pytest.mark.parametrize("spec, case", _params("mha_decode", mha_cases))
def test_mha_decode_matches_reference(spec, case):
    run_mha(spec, case)


@pytest.mark.parametrize("spec, case", _params("mha_extend", mha_cases))
def test_mha_extend_matches_reference(spec, case):
    run_mha(spec, case if case.min_len else dataclasses.replace(case, context=24))  # short unless a case asks


@pytest.mark.parametrize("spec, case", _params("mla_decode", mla_cases))
def test_mla_decode_matches_reference(spec, case):
    run_mla(spec, case)


@pytest.mark.parametrize("spec, case", _params("sparse_mla_decode", mla_cases))
def test_sparse_mla_decode_matches_reference(spec, case):
    run_sparse_mla(spec, case)


# ----------------------------------------------------------------- contract details


def _fp8_kv(spec: Any) -> str:
    fp8 = [d.value for d in spec.dtypes.kv_dtype.values if torch_dtype(d.value) in FP8]
    if not fp8:
        pytest.skip(f"{spec.name} declares no fp8 KV")
    return fp8[0]


@pytest.mark.parametrize("spec", triton_kernels("mha_decode"), ids=lambda s: s.name)
def test_float_and_tensor_scales_give_identical_results(spec):
    case = Case(kv_dtype=_fp8_kv(spec), q_len=1, splits=2)
    gen = _gen(3)
    request = request_for(spec, case)
    (k, v), bt, sl = paged_cache([33, 9, 20], case.page_size, (2, 128), torch_dtype(case.kv_dtype), gen, copies=2)
    q = torch.randn(3, 8, 128, generator=gen).to(torch.bfloat16)
    results = []
    for tensor in (False, True):
        adapter = make_adapter(spec, request, case)
        adapter.plan(DecodeMetadata(block_table=_to(bt), seq_lens=_to(sl)))
        scales = _scales(dataclasses.replace(case, tensor_scales=tensor), torch_dtype(case.kv_dtype))
        results.append(adapter.run(_to(q), _to(k), _to(v), **scales).out)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("spec", triton_kernels("mha_decode"), ids=lambda s: s.name)
def test_out_and_lse_are_written_in_place(spec):
    if not spec.features.return_lse:
        pytest.skip("no LSE declared")
    case = Case(features=frozenset({"return_lse"}), q_len=1, splits=2)
    gen = _gen(4)
    request = request_for(spec, case)
    (k, v), bt, sl = paged_cache([17, 30, 5], case.page_size, (2, 128), torch.bfloat16, gen, copies=2)
    q = _to(torch.randn(3, 8, 128, generator=gen).to(torch.bfloat16))
    out = torch.full((3, 8, 128), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    lse = torch.full((3, 8), float("nan"), device=DEVICE)
    adapter = make_adapter(spec, request, case)
    adapter.plan(DecodeMetadata(block_table=_to(bt), seq_lens=_to(sl)))
    result = adapter.run(q, _to(k), _to(v), out=out, lse=lse)
    assert result.out is out and result.lse is lse
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


def _decode_adapter(**request_fields: Any) -> tuple[Any, Any]:
    spec = triton_kernels("mha_decode")[0]
    case = Case(q_len=1)
    adapter = make_adapter(spec, request_for(spec, case, **request_fields), case)
    gen = _gen(5)
    (k, v), bt, sl = paged_cache([12, 7, 3], 16, (2, 128), torch.bfloat16, gen, copies=2)
    return adapter, (_to(bt), _to(sl), _to(k), _to(v))


def test_features_not_selected_are_refused():
    adapter, (bt, sl, k, v) = _decode_adapter()
    with pytest.raises(UnsupportedFeatureError, match=r"sliding_window was passed"):
        adapter.plan(DecodeMetadata(block_table=bt, seq_lens=sl, window_left=4))
    with pytest.raises(UnsupportedFeatureError, match=r"logits_soft_cap was passed"):
        adapter.plan(DecodeMetadata(block_table=bt, seq_lens=sl, logits_soft_cap=10.0))
    adapter.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    q = _to(torch.randn(3, 8, 128).to(torch.bfloat16))
    with pytest.raises(UnsupportedFeatureError, match=r"sinks was passed"):
        adapter.run(q, k, v, sinks=_to(torch.zeros(8)))
    with pytest.raises(UnsupportedFeatureError, match=r"return_lse was passed"):
        adapter.run(q, k, v, lse=_to(torch.zeros(3, 8)))
    with pytest.raises(UnsupportedFeatureError, match=r"q_len=2 but the request was selected for q_len=1"):
        adapter.plan(DecodeMetadata(block_table=bt, seq_lens=sl, q_len=2))


def test_bad_inputs_name_the_argument():
    adapter, (bt, sl, k, v) = _decode_adapter()
    q = _to(torch.randn(3, 8, 128).to(torch.bfloat16))
    with pytest.raises(AdapterInputError, match=r"run\(\) before plan\(\)"):
        adapter.run(q, k, v)
    adapter.plan(DecodeMetadata(block_table=bt, seq_lens=sl))
    with pytest.raises(AdapterInputError, match=r"^q: dtype float16 not in \[bfloat16\] \(mha_decode\)"):
        adapter.run(q.half(), k, v)
    with pytest.raises(AdapterInputError, match=r"^k_cache: shape \[\d+, 16, 2, 64\] does not match \[\*, 16, 2, 128\]"):
        adapter.run(q, k[..., :64], v)
    with pytest.raises(AdapterInputError, match=r"^q: last dimension must be contiguous"):
        adapter.run(q.transpose(0, 2).contiguous().transpose(0, 2), k, v)
    with pytest.raises(AdapterInputError, match=r"^k_scale: expected a float or a one-element fp32 tensor"):
        adapter.run(q, k, v, k_scale=_to(torch.ones(2)))


def test_selected_through_the_selector():
    from selector import Platform, select_kernel

    spec = triton_kernels("mha_decode")[0]
    case = Case(q_len=1)
    request = request_for(spec, case, kernel=spec.name)
    selection = select_kernel(request, manifest=MANIFEST, platform=Platform.hypothetical("sm_90"))
    adapter = selection.make_adapter()
    assert type(adapter).__name__ == spec.adapter.split(":")[1]
    gen = _gen(6)
    (k, v), bt, sl = paged_cache([21, 4, 9], 16, (2, 128), torch.bfloat16, gen, copies=2)
    q = torch.randn(3, 8, 128, generator=gen).to(torch.bfloat16)
    adapter.plan(DecodeMetadata(block_table=_to(bt), seq_lens=_to(sl)))
    out = adapter.run(_to(q), _to(k), _to(v)).out
    ref_out, _ = ref.mha_paged(q, k, v, bt, sl, torch.arange(4, dtype=torch.int32))
    assert_matches(out.cpu(), None, ref_out, None, want_lse=False)


# ----------------------------------------------------------------- any GQA group

MQA_GROUPS = (1, 3, 48, 71)
"""Query heads per KV head, including multi-query models' 48 (StarCoder) and 71 (Falcon-7B)."""


@pytest.mark.parametrize("op", ["mha_decode", "mha_extend"])
@pytest.mark.parametrize("group", MQA_GROUPS)
def test_any_gqa_group_matches_reference(op, group):
    # rows are (token, query head) pairs tiled by the plan, so no group is special; a group above a tile
    # (64 rows) spans two tiles of one request
    for spec in triton_kernels(op):
        assert spec.shapes.gqa_group_size is None or spec.shapes.gqa_group_size.allows(group), (
            f"{spec.name} does not declare GQA group {group}"
        )
        extra = {"q_len": 2} if op == "mha_decode" else {"new_tokens": 3, "context": 24}
        run_mha(spec, Case(head_dim=64, head_dim_vo=64, group=group, batch=2, splits=2, **extra))


# ----------------------------------------------------------------- real sizes on the GPU

GPU_DECODE = [
    # (batch, context, group, head_dim, kv dtype, q_len): the plan picks the split count
    (1, 32768, 4, 128, "bf16", 1),
    (8, 4096, 4, 128, "fp8_e4m3", 1),
    (64, 1024, 8, 64, "fp16", 4),
    (4, 8000, 16, 256, "bf16", 8),
    (16, 3000, 1, 128, "fp8_e5m2", 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch, context, group, head_dim, kv, q_len", GPU_DECODE)
def test_mha_decode_real_sizes(batch, context, group, head_dim, kv, q_len):
    for spec in triton_kernels("mha_decode"):
        q_dtype = "fp16" if kv == "fp16" else "bf16"
        feats = frozenset(f for f in ("sinks", "return_lse") if getattr(spec.features, f))
        case = Case(q_dtype=q_dtype, kv_dtype=kv, head_dim=head_dim, head_dim_vo=head_dim, group=group, q_len=q_len,
                    batch=batch, context=context, splits=None, features=feats)
        run_mha(spec, case, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, context, new", [(4, 6000, 700), (32, 2000, 64)])
def test_mha_extend_real_sizes(batch, context, new):
    for spec in triton_kernels("mha_extend"):
        feats = frozenset(f for f in ("sliding_window", "return_lse") if getattr(spec.features, f))
        case = Case(group=4, batch=batch, context=context, new_tokens=new, splits=None, features=feats)
        run_mha(spec, case, seed=new)


GPU_MQA = [
    # (op, batch, context, group, head_dim, kv dtype, q_len or new tokens): one KV head, Falcon-7B (71 x 64)
    # and StarCoder (48 x 128) shapes; the plan picks tiles and splits
    ("mha_decode", 16, 4096, 71, 64, "bf16", 1),
    ("mha_decode", 8, 2048, 48, 128, "fp8_e4m3", 2),
    ("mha_extend", 4, 3000, 71, 64, "bf16", 300),
    ("mha_extend", 8, 1500, 48, 128, "fp8_e4m3", 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("op, batch, context, group, head_dim, kv, new", GPU_MQA)
def test_mqa_groups_real_sizes(op, batch, context, group, head_dim, kv, new):
    for spec in triton_kernels(op):
        feats = frozenset(f for f in ("sinks", "return_lse") if getattr(spec.features, f))
        case = Case(kv_dtype=kv, head_dim=head_dim, head_dim_vo=head_dim, group=group, batch=batch, context=context,
                    splits=None, features=feats, **({"q_len": new} if op == "mha_decode" else {"new_tokens": new}))
        run_mha(spec, case, seed=group)


FP8_SMALL_TILES = [
    # (op, batch, context, group, kv dtype, q_len or new tokens): enough programs for planning.mha_config's
    # FP8 launch shape (one warp per 16 rows, 64 keys, one stage, ~8 programs per SM)
    ("mha_decode", 64, 2048, 4, "fp8_e4m3", 1),
    ("mha_decode", 32, 1500, 4, "fp8_e4m3", 4),
    ("mha_decode", 48, 1000, 8, "fp8_e5m2", 4),
    ("mha_extend", 32, 2000, 4, "fp8_e4m3", 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("op, batch, context, group, kv, new", FP8_SMALL_TILES)
def test_fp8_small_tile_launch_matches_reference(op, batch, context, group, kv, new):
    for spec in triton_kernels(op):
        if kv not in [d.value for d in spec.dtypes.kv_dtype.values]:
            continue
        feats = frozenset(f for f in ("sinks", "return_lse") if getattr(spec.features, f))
        case = Case(kv_dtype=kv, group=group, batch=batch, context=context, splits=None, features=feats,
                    **({"q_len": new} if op == "mha_decode" else {"new_tokens": new}))
        adapter = run_mha(spec, case, seed=batch)
        assert adapter.cfg.split_waves == 8 and adapter.cfg.num_warps == adapter.cfg.block_m // 16, adapter.cfg


@pytest.mark.gpu
@pytest.mark.parametrize("batch, context, heads, kv, q_len", [(1, 16384, 128, "bf16", 1), (16, 2000, 16, "fp8_e4m3", 4), (64, 1024, 128, "bf16", 2)])
def test_mla_decode_real_sizes(batch, context, heads, kv, q_len):
    for spec in triton_kernels("mla_decode"):
        if kv not in [d.value for d in spec.dtypes.kv_dtype.values]:
            continue
        feats = frozenset(f for f in ("return_lse",) if getattr(spec.features, f))
        case = Case(kv_dtype=kv, heads=heads, page_size=64, q_len=q_len, batch=batch, context=context,
                    splits=None, features=feats)
        run_mla(spec, case, seed=batch)


HOPPER_MLA = [
    # (heads, q_len, page, dtype, features, splits, tensor scales): the Gluon sm_90 kernel (mla_hopper)
    (128, 1, 64, "bf16", (), None, False),
    (128, 2, 16, "bf16", ("return_lse", "sinks"), 3, False),
    (64, 4, 1, "fp16", ("sliding_window", "logits_soft_cap"), 1, True),
    (128, 3, 64, "bf16", ("return_lse", "sinks", "sliding_window", "logits_soft_cap"), 2, True),
    (32, 2, 64, "bf16", ("return_lse",), None, False),  # 64 rows from 2 tokens x 32 heads
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads, q_len, page, dtype, features, splits, tensor_scales", HOPPER_MLA)
def test_mla_hopper_kernel_matches_reference(heads, q_len, page, dtype, features, splits, tensor_scales):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLA kernel runs on sm_90 only")
    for spec in triton_kernels("mla_decode"):
        feats = frozenset(f for f in features if getattr(spec.features, f))
        case = Case(q_dtype=dtype, kv_dtype=dtype, heads=heads, page_size=page, q_len=q_len, batch=5, context=900,
                    splits=splits, features=feats, tensor_scales=tensor_scales)
        adapter = run_mla(spec, case, seed=heads + q_len)
        assert adapter.cfg.kernel == "hopper", adapter.cfg


@pytest.mark.gpu
@pytest.mark.parametrize("batch, context, heads, topk, kv", [(2, 8192, 128, 2048, "bf16"), (8, 4096, 64, 512, "fp8_e4m3")])
def test_sparse_mla_decode_real_sizes(batch, context, heads, topk, kv):
    for spec in triton_kernels("sparse_mla_decode"):
        if kv not in [d.value for d in spec.dtypes.kv_dtype.values]:
            continue
        feats = frozenset(f for f in ("return_lse",) if getattr(spec.features, f))
        case = Case(kv_dtype=kv, heads=heads, page_size=64, q_len=1, topk=topk, batch=batch, context=context,
                    splits=None, features=feats)
        run_sparse_mla(spec, case, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", triton_kernels("mha_decode"), ids=lambda s: s.name)
def test_run_is_graph_capturable_and_allocation_free(spec):
    """Capture run() with out=/lse=, replay over new query values: same as eager, no allocation inside run."""
    if not spec.features.cuda_graph:
        pytest.skip("cuda_graph not declared")
    case = Case(kv_dtype=_fp8_kv(spec), q_len=2, splits=None, features=frozenset({"return_lse", "sinks"}), tensor_scales=True)
    gen = _gen(7)
    request = request_for(spec, case)
    (k, v), bt, sl = paged_cache([3000, 17, 900, 5000], 16, (2, 128), torch_dtype(case.kv_dtype), gen, copies=2)
    k, v, bt, sl = _to(k), _to(v), _to(bt), _to(sl)
    q = torch.randn(8, 8, 128, device=DEVICE).to(torch.bfloat16)
    sinks = torch.randn(8, device=DEVICE)
    scales = _scales(case, k.dtype)
    out = torch.empty(8, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.empty(8, 8, device=DEVICE)
    adapter = make_adapter(spec, request, case)
    adapter.plan(DecodeMetadata(block_table=bt, seq_lens=sl, q_len=2))
    assert adapter.num_splits > 1, "this shape should use split-KV"
    adapter.run(q, k, v, sinks=sinks, out=out, lse=lse, **scales)  # compile outside capture
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    adapter.run(q, k, v, sinks=sinks, out=out, lse=lse, **scales)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "run() allocated"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        adapter.run(q, k, v, sinks=sinks, out=out, lse=lse, **scales)
    q.copy_(torch.randn(8, 8, 128, device=DEVICE).to(torch.bfloat16))
    scales["k_scale"].fill_(0.5)  # a tensor scale is read on the device at replay
    graph.replay()
    torch.cuda.synchronize()
    eager = adapter.run(q, k, v, sinks=sinks, **scales)
    assert torch.equal(out, eager.out) and torch.equal(lse, eager.lse)
