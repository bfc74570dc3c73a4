"""The five reference systems the manifest was built from, by pull request: each resolves as its engine decided by hand.

lightseekorg/tokenspeed#445 (TokenSpeed MHA, attention plan, FA4 numerics), vllm-project/vllm#43827 (DeepSeek-V4
sparse MLA), flashinfer-ai/flashinfer#2053 (XQA MLA), NVIDIA/TensorRT-LLM#12606 (trtllm-gen MLA without a window),
vllm-project/vllm#36322 (FA2 MLA on sm_120).
"""

from __future__ import annotations


from registry.vocab import Solution
from selector import select_plan


def test_vllm_36322_sm120_bf16_mla_picks_flashinfer_fa2_above_triton(pick):
    sel = pick(op="mla_decode", arch="sm_120", q_dtype="bf16", kv_dtype="bf16", q_len=1)
    assert sel.kernel.solution is Solution.FLASHINFER and sel.kernel.backend.value == "fa2"
    ranked = [k.solution for k in sel.eligible]
    assert ranked.index(Solution.FLASHINFER) < ranked.index(Solution.TRITON)


def test_vllm_36322_sm120_fp8_kv_mla_falls_back_to_triton_and_says_why(pick):
    sel = pick(op="mla_decode", arch="sm_120", q_dtype="bf16", kv_dtype="fp8_e4m3")
    assert sel.kernel.solution is Solution.TRITON
    fa2 = next(v for v in sel.verdicts if v.kernel.solution is Solution.FLASHINFER and v.kernel.backend.value == "fa2")
    assert "kv_dtype fp8_e4m3 must equal q_dtype bf16" in fa2.reasons


def test_flashinfer_2053_sm120_fp8_mla_one_token_picks_xqa_mla(pick):
    sel = pick(op="mla_decode", arch="sm_120", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", q_len=1, num_qo_heads=128)
    assert sel.kernel.solution is Solution.XQA


def test_flashinfer_2053_xqa_mla_is_never_chosen_where_its_arch_excludes_the_request(pick):
    # FlashInfer's own `auto` picked XQA on sm_90, then failed its check (reviewed in flashinfer-ai/flashinfer#2053)
    for arch in ("sm_90", "sm_100"):
        sel = pick(op="mla_decode", arch=arch, q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3")
        xqa = next(v for v in sel.verdicts if v.kernel.solution is Solution.XQA)
        assert any(r.startswith(f"arch {arch} not in") for r in xqa.reasons)
        assert sel.kernel is None or sel.kernel.solution is not Solution.XQA


def test_flashinfer_2053_xqa_mla_rejects_two_query_tokens(pick):
    sel = pick(op="mla_decode", arch="sm_120", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", q_len=2)
    xqa = next(v for v in sel.verdicts if v.kernel.solution is Solution.XQA)
    assert "q_len 2 above maximum 1" in xqa.reasons


def test_sm100_bf16_mla_picks_trtllm_gen(pick):
    assert pick(op="mla_decode", arch="sm_100", q_dtype="bf16").kernel.solution is Solution.TRTLLM_GEN


def test_tensorrt_llm_12606_trtllm_gen_mla_refuses_sliding_window_with_a_reason(pick):
    sel = pick(op="mla_decode", arch="sm_100", q_dtype="bf16", sliding_window=True)
    gen = next(v for v in sel.verdicts if v.kernel.solution is Solution.TRTLLM_GEN)
    assert "needs sliding_window: unsupported" in gen.reasons


def test_tokenspeed_445_hopper_restricted_to_flashinfer_still_resolves(pick):
    sel = pick(op="mha_decode", arch="sm_90", q_dtype="bf16", solution="flashinfer")
    assert sel.kernel is not None and sel.kernel.solution is Solution.FLASHINFER


def test_tokenspeed_445_sm100_fp8_attention_picks_trtllm_gen(pick):
    sel = pick(op="mha_decode", arch="sm_100", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3")
    assert sel.kernel.solution is Solution.TRTLLM_GEN


def test_tokenspeed_445_fp8_attention_prefill_plan_prewrites(manifest):
    from selector import Platform, Selector

    plan = select_plan(selector=Selector(manifest, Platform.hypothetical("sm_100")), arch="sm_100", q_dtype="fp8_e4m3")
    assert plan.mode == "prewrite" and plan.selection.request.op.value == "mha_extend"
    assert "FP8" in plan.why


def test_tokenspeed_445_postwrite_needs_a_high_priority_prefill_kernel(manifest):
    from selector import Platform, Selector

    threshold = manifest.attention_plan.postwrite_min_priority
    for arch in ("sm_80", "sm_90", "sm_120"):
        plan = select_plan(selector=Selector(manifest, Platform.hypothetical(arch)), arch=arch, q_dtype="bf16", head_dim_qk=128)
        best = plan.prefill.kernel
        assert plan.mode == ("postwrite" if best is not None and best.priority >= threshold else "prewrite"), plan.why


def test_tokenspeed_445_fa4_style_exclusion_rejects_head_dim_256_with_noncontiguous_kv(pick, manifest):
    # the exclusion mechanism: a declared known-bad combination is a rejection with reason + ref
    excluded = [(k, e) for k in manifest.kernels for e in k.exclude if "noncontiguous_kv" in e.when]
    assert excluded, "lightseekorg/tokenspeed#445's FA4 numerics bug is declared as an exclusion"
    for kernel, exclusion in excluded:
        fields = {"op": kernel.op.value, "arch": kernel.arch.members()[0].value,
                  "q_dtype": kernel.dtypes.q_dtype.values[0].value, "head_dim_qk": 256, "noncontiguous_kv": True}
        sel = pick(**fields)
        verdict = next(v for v in sel.verdicts if v.kernel is kernel)
        assert f"excluded: {exclusion.reason} ({exclusion.ref})" in verdict.reasons


def test_vllm_43827_dsv4_sparse_mla_records_both_block_sizes_and_carries_settings(pick, manifest):
    sparse = [k for k in manifest.by_op[manifest.kernels[0].op.__class__("sparse_mla_decode")] if k.solution is Solution.TRTLLM_GEN]
    assert sparse, "the DeepSeek-V4 trtllm-gen sparse MLA path is in the manifest"
    k = sparse[0]
    assert set(k.shapes.page_size.values) == {256, 512}
    assert k.shapes.topk.multiple_of == 4
    # an fp8 cache comes with an fp8 query: FlashInfer needs both pools in the query's dtype (mla/_core.py:1170-1198)
    sel = pick(op="sparse_mla_decode", arch="sm_100", q_dtype="fp8_e4m3", kv_dtype="fp8_e4m3", page_size=256,
               topk=2048, kv_lora_rank=512, qk_rope_head_dim=0)
    assert sel.kernel is k and sel.settings == dict(k.settings)
    assert pick(op="sparse_mla_decode", arch="sm_100", q_dtype="bf16", page_size=512, topk=2048,
                kv_lora_rank=512, qk_rope_head_dim=0).kernel is k
    misaligned = pick(op="sparse_mla_decode", arch="sm_100", q_dtype="bf16", topk=2047)
    assert "topk 2047 not a multiple of 4" in next(v for v in misaligned.verdicts if v.kernel is k).reasons
