"""Each fix of the FlashInfer 0.7.2 audit (docs/audit-flashinfer-0.7.2.md), through select_kernel.

Every test is the request that used to select a kernel whose library raises
(or computes something else) for it: the kernel must now be rejected with
the reason the source gives, or, for a capability the source has, selected.
"""

from __future__ import annotations

import pytest

import selector
from registry.loader import load_manifest
from selector import Platform, Selector, select_plan

MANIFEST = load_manifest()


def pick(**fields):
    return Selector(MANIFEST, Platform.hypothetical(fields["arch"])).solve(selector.KernelRequest(**fields))


def verdict(sel, name):
    return next(v for v in sel.verdicts if v.kernel.name == name)


def rejected(sel, name, *fragments):
    v = verdict(sel, name)
    assert not v.eligible, f"{name} should be rejected:\n{sel.explain()}"
    text = "\n".join(v.reasons)
    for f in fragments:
        assert f in text, f"{name}: {f!r} not in {v.reasons}"
    assert sel.kernel is None or sel.kernel.name != name


# ------------------------------------------------------------------ CuTe-DSL extend


def test_cute_dsl_extend_needs_a_page_of_8_to_128_tokens_dividing_128():
    # cute_dsl/attention/wrappers/batch_prefill.py:372-377: page_size >= 8 and divides the 128-token KV tile
    for page in (1, 4, 24, 256):
        sel = pick(op="mha_extend", arch="sm_100", q_dtype="bf16", head_dim_qk=128, page_size=page)
        rejected(sel, "flashinfer-cute-dsl-extend", f"page_size {page} not in")
    sel = pick(op="mha_extend", arch="sm_100", q_dtype="bf16", head_dim_qk=128, page_size=8)
    assert verdict(sel, "flashinfer-cute-dsl-extend").eligible


def test_cute_dsl_extend_serves_a_sliding_window():
    # prefill.py:3601-3618 passes window_left to the CuTe-DSL plan (a mask band)
    sel = pick(op="mha_extend", arch="sm_100", q_dtype="bf16", head_dim_qk=128, page_size=16, sliding_window=True)
    assert verdict(sel, "flashinfer-cute-dsl-extend").eligible


def test_cute_dsl_extend_cannot_fit_head_dim_256_and_carries_no_fa4_exclusion():
    # 2 Q + 3 K/V stages of 128 x 256 are 320 KiB of shared memory (cute_dsl/attention/mainloop_spec.py:57-58, 75);
    # TokenSpeed's FA4 finding belongs to flash-attn's kernel, not this one
    sel = pick(op="mha_extend", arch="sm_100", q_dtype="bf16", head_dim_qk=256, page_size=16)
    rejected(sel, "flashinfer-cute-dsl-extend", "head_dim_qk 256 not in [64, 128]")
    assert not any("tokenspeed#445" in e.ref for e in MANIFEST.by_name["flashinfer-cute-dsl-extend"].exclude)
    ok = pick(op="mha_extend", arch="sm_100", q_dtype="bf16", head_dim_qk=128, page_size=16, noncontiguous_kv=True)
    assert verdict(ok, "flashinfer-cute-dsl-extend").eligible


# ------------------------------------------------------------------ FA3


def test_fa3_paged_extend_needs_equal_head_dims():
    # hopper/prefill_sm90.cuh:578-615: the paged FA3 kernel returns cudaErrorNotSupported for qk != vo
    sel = pick(op="mha_extend", arch="sm_90", q_dtype="bf16", head_dim_qk=128, head_dim_vo=64, page_size=16)
    rejected(sel, "flashinfer-fa3-extend", "head_dim_vo")
    assert sel.kernel.name == "flashinfer-fa2-extend"


def test_fa3_fp8_ragged_prefill_has_one_head_dim():
    # hopper/quantization/prefill_sm90.cuh:558: one HEAD_DIM in {64, 128, 256}; no (192, 128)
    sel = pick(op="mha_prefill", arch="sm_90", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", head_dim_qk=192, head_dim_vo=128)
    rejected(sel, "flashinfer-fa3-prefill")
    ok = pick(op="mha_prefill", arch="sm_90", q_dtype="bf16", head_dim_qk=192, head_dim_vo=128)
    assert ok.kernel.name == "flashinfer-fa3-prefill"


# ------------------------------------------------------------------ trtllm-gen MHA


@pytest.mark.parametrize("q,kv", [("bf16", "fp16"), ("fp16", "bf16"), ("fp8_e4m3", "bf16"), ("fp8_e4m3", "fp16")])
def test_trtllm_gen_decode_has_no_kernel_for_these_dtype_pairs(q, kv):
    sel = pick(op="mha_decode", arch="sm_100", q_dtype=q, kv_dtype=kv, head_dim_qk=128, page_size=16)
    rejected(sel, "trtllm-gen-decode")


def test_bf16_query_over_an_fp8_cache_is_a_generation_only_pair():
    # TensorRT-LLM's checker: (bf16, e4m3, bf16) in SUPPORTED_DTYPE_COMBOS_GENERATION, not in ..._CONTEXT
    decode = pick(op="mha_decode", arch="sm_100", q_dtype="bf16", kv_dtype="fp8_e4m3", head_dim_qk=128, page_size=16)
    assert decode.kernel.name == "trtllm-gen-decode"
    extend = pick(op="mha_extend", arch="sm_100", q_dtype="bf16", kv_dtype="fp8_e4m3", head_dim_qk=128, page_size=16)
    rejected(extend, "trtllm-gen-extend")


def test_fp8_attention_still_selects_trtllm_gen_for_decode_and_extend():
    for op in ("mha_decode", "mha_extend"):
        sel = pick(op=op, arch="sm_100", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", head_dim_qk=128, page_size=16)
        assert sel.kernel.name == f"trtllm-gen-{op.split('_')[1]}"


@pytest.mark.parametrize("op", ["mha_decode", "mha_extend"])
def test_a_16_bit_query_gets_no_trtllm_gen_kernel_with_another_output_dtype(op):
    sel = pick(op=op, arch="sm_100", q_dtype="bf16", out_dtype="fp16", head_dim_qk=128, page_size=16)
    rejected(sel, f"trtllm-gen-{op.split('_')[1]}")


@pytest.mark.parametrize("op", ["mha_decode", "mha_extend"])
def test_trtllm_gen_pages_are_powers_of_two_from_16(op):
    # 16/32/64: TensorRT-LLM's SUPPORTED_TOKENS_PER_BLOCK; >= 128: the dynamic-page kernels (fmhaKernels.cuh:538-560)
    name = f"trtllm-gen-{op.split('_')[1]}"
    for page in (16, 64, 128, 1024):
        sel = pick(op=op, arch="sm_100", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", head_dim_qk=128, page_size=page)
        assert sel.kernel.name == name
    rejected(pick(op=op, arch="sm_100", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", head_dim_qk=128, page_size=48),
             name, "page_size 48 not a power of two")


def test_trtllm_gen_decode_groups_stop_at_32():
    sel = pick(op="mha_decode", arch="sm_100", q_dtype="bf16", head_dim_qk=128, page_size=16,
               num_qo_heads=48, num_kv_heads=1)
    rejected(sel, "trtllm-gen-decode", "gqa_group_size 48 above maximum 32")


def test_trtllm_gen_extend_needs_equal_head_dims():
    # prefill.py:7808: out is checked against query.shape, so V's head dim must be q's
    sel = pick(op="mha_extend", arch="sm_100", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", head_dim_qk=128,
               head_dim_vo=64, page_size=16)
    rejected(sel, "trtllm-gen-extend", "head_dim_vo")


# ------------------------------------------------------------------ XQA


def test_xqa_decode_writes_the_query_dtype_only():
    # xqa.py:370-375: out must be the query's dtype (or fp8 with an fp8 cache)
    sel = pick(op="mha_decode", arch="sm_90", q_dtype="bf16", out_dtype="fp16", head_dim_qk=128, page_size=16)
    rejected(sel, "xqa-decode", "out_dtype")


# ------------------------------------------------------------------ GQA groups


@pytest.mark.parametrize("group,heads", [(48, 48), (71, 71)])
def test_multi_query_models_get_kernels_on_sm_90(group, heads):
    # FA2's tensor-core path takes the group as a runtime divisor (data/csrc/batch_prefill.cu:166)
    sel = pick(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, page_size=16,
               num_qo_heads=heads, num_kv_heads=1)
    assert sel.kernel is not None
    eligible = {k.name for k in sel.eligible}
    assert {"flashinfer-fa2-tc-decode", "triton-mha-decode"} <= eligible
    rejected(sel, "flashinfer-fa2-decode", f"gqa_group_size {group} not in")  # the CUDA-core dispatch table
    extend = pick(op="mha_extend", arch="sm_90", q_dtype="bf16", head_dim_qk=128, page_size=16,
                  num_qo_heads=heads, num_kv_heads=1)
    assert extend.kernel is not None


# ------------------------------------------------------------------ MLA


def test_trtllm_gen_mla_has_no_rank_512_kernel_at_page_32():
    # TensorRT-LLM's checker: MISSING_MLA_GENERATION_KERNELS = {(576, 512, 32)}
    sel = pick(op="mla_decode", arch="sm_100", q_dtype="bf16", kv_lora_rank=512, qk_rope_head_dim=64, page_size=32,
               num_qo_heads=128)
    rejected(sel, "trtllm-gen-mla-decode")
    ok = pick(op="mla_decode", arch="sm_100", q_dtype="bf16", kv_lora_rank=512, qk_rope_head_dim=64, page_size=64,
              num_qo_heads=128)
    assert ok.kernel.name == "trtllm-gen-mla-decode"


def test_trtllm_gen_mla_generation_asks_the_engine_for_fused_qkv():
    # NVIDIA/TensorRT-LLM#12606: MLA generation on trtllm-gen supports fused QKV input only
    sel = pick(op="mla_decode", arch="sm_100", q_dtype="bf16", kv_lora_rank=512, qk_rope_head_dim=64, page_size=64)
    assert sel.kernel.name == "trtllm-gen-mla-decode"
    assert sel.settings.get("qkv_input") == "fused"
    assert "settings  " in sel.explain() and "qkv_input=fused" in sel.explain()


# ------------------------------------------------------------------ DeepSeek-V4 sparse MLA


DSV4 = dict(op="sparse_mla_decode", arch="sm_100", kv_lora_rank=512, qk_rope_head_dim=0, page_size=256, topk=8,
            num_qo_heads=64)


def test_dsv4_sparse_mla_needs_the_cache_in_the_querys_dtype():
    # mla/_core.py:1170-1174, 1194-1198: both pools must have the query's dtype
    rejected(pick(**DSV4, q_dtype="bf16", kv_dtype="fp8_e4m3"), "trtllm-gen-dsv4-sparse-mla-decode")
    for dtype in ("bf16", "fp8_e4m3"):  # the FP8 path (mla/_core.py:1100-1104) is now reachable
        assert pick(**DSV4, q_dtype=dtype, kv_dtype=dtype).kernel.name == "trtllm-gen-dsv4-sparse-mla-decode"


def test_dsv4_sparse_mla_takes_8_to_128_query_heads_and_sinks():
    rejected(pick(**(DSV4 | {"num_qo_heads": 12}), q_dtype="bf16"), "trtllm-gen-dsv4-sparse-mla-decode", "num_qo_heads")
    assert pick(**DSV4, q_dtype="bf16", sinks=True).kernel.name == "trtllm-gen-dsv4-sparse-mla-decode"


def test_dsv4_block_size_disagreement_keeps_both_values_and_both_refs():
    spec = MANIFEST.by_name["trtllm-gen-dsv4-sparse-mla-decode"]
    assert spec.shapes.page_size.allows(256) and spec.shapes.page_size.allows(512)
    cited = " ".join(spec.refs)
    assert cited.count("vllm-project/vllm#43827") >= 2 and "256" in cited and "512" in cited


# ------------------------------------------------------------------ flash-attn FA4


def test_fa4_is_the_blackwell_prefill_kernel_and_makes_the_plan_postwrite():
    sel = pick(op="mha_prefill", arch="sm_100", q_dtype="bf16", head_dim_qk=128)
    assert sel.kernel.name == "flash-attn-fa4-prefill"
    plan = select_plan(selector=Selector(MANIFEST, Platform.hypothetical("sm_100")), arch="sm_100", q_dtype="bf16",
                       head_dim_qk=128)
    assert plan.mode == "postwrite" and plan.selection.kernel.name == "flash-attn-fa4-prefill"
    fp8 = select_plan(selector=Selector(MANIFEST, Platform.hypothetical("sm_100")), arch="sm_100",
                      q_dtype="fp8_e4m3", head_dim_qk=128)
    assert fp8.mode == "prewrite"


def test_fa4_head_dim_256_with_non_contiguous_kv_is_excluded():
    # lightseekorg/tokenspeed#445: FA4 gives wrong numerics for head_dim 256 with non-contiguous KV
    sel = pick(op="mha_prefill", arch="sm_100", q_dtype="bf16", head_dim_qk=256, noncontiguous_kv=True)
    rejected(sel, "flash-attn-fa4-prefill", "excluded:", "lightseekorg/tokenspeed#445")
    assert pick(op="mha_prefill", arch="sm_100", q_dtype="bf16", head_dim_qk=256).kernel.name == "flash-attn-fa4-prefill"


def test_fa4_is_registered_on_sm_100_and_on_sm_90_as_its_own_entry():
    for arch in ("sm_90", "sm_103", "sm_120"):
        rejected(pick(op="mha_prefill", arch=arch, q_dtype="bf16", head_dim_qk=128), "flash-attn-fa4-prefill", "arch")
    for arch in ("sm_100", "sm_103", "sm_120"):
        rejected(pick(op="mha_prefill", arch=arch, q_dtype="bf16", head_dim_qk=128), "flash-attn-fa4-prefill-sm90",
                 "arch")


def test_fa4_on_sm_90_is_eligible_below_fa3_and_shown_as_verified_on_the_h200():
    """flash-attn-4's Hopper kernel passed kernelsel verify on the H200 but ran slower than FlashInfer FA3 at
    head_dim 128 (bench/results/fa4-sm90-prefill-h200.json): eligible, second, and forced by name it runs."""
    sel = pick(op="mha_prefill", arch="sm_90", q_dtype="bf16", head_dim_qk=128)
    assert sel.kernel.name == "flashinfer-fa3-prefill"
    assert [k.name for k in sel.eligible][:2] == ["flashinfer-fa3-prefill",
                                                    "flash-attn-fa4-prefill-sm90"]
    forced = pick(op="mha_prefill", arch="sm_90", q_dtype="fp16", head_dim_qk=256, kernel="flash-attn-fa4-prefill-sm90")
    assert forced.kernel.name == "flash-attn-fa4-prefill-sm90"
    text = forced.explain()
    assert "verified by kernelsel verify on NVIDIA H200 (sm_90)" in text and "verify-h200-fa4-sm90" in text
    rejected(pick(op="mha_prefill", arch="sm_90", q_dtype="bf16", head_dim_qk=256, noncontiguous_kv=True),
             "flash-attn-fa4-prefill-sm90", "excluded:", "lightseekorg/tokenspeed#445")
    rejected(pick(op="mha_prefill", arch="sm_90", q_dtype="fp8_e4m3", head_dim_qk=128),
             "flash-attn-fa4-prefill-sm90", "q_dtype")
