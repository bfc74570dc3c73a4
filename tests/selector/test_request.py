"""KernelRequest: friendly spellings in, clear field-named errors out, hashable and equal by value."""

from __future__ import annotations

import pytest

from registry.errors import RequestError
from registry.vocab import Arch, DType
from selector import KernelRequest


def test_defaults_and_friendly_spellings():
    r = KernelRequest(op="mha_decode", arch="9.0", q_dtype="bfloat16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8)
    assert r.arch is Arch.SM_90 and r.q_dtype is DType.BF16
    assert r.kv_dtype is DType.BF16 and r.out_dtype is DType.BF16 and r.head_dim_vo == 128
    assert r.gqa_group_size == 4
    assert KernelRequest(op="mla_decode", arch="sm_120", q_dtype="fp8").out_dtype is DType.BF16


def test_equal_requests_hash_equal():
    a = KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16")
    b = KernelRequest(op="mha_decode", arch="sm90", q_dtype="bf16", kv_dtype="bf16")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != KernelRequest(op="mha_decode", arch="sm_90", q_dtype="fp16")


def test_requests_are_frozen():
    r = KernelRequest(op="mha_decode", arch="sm_90")
    with pytest.raises(Exception):
        r.arch = Arch.SM_100


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"op": "mha_decod"}, r"request\.op: 'mha_decod' is not one of .* \(did you mean 'mha_decode'\?\)"),
        ({"op": "mha_decode", "head_dim_qk": 0}, r"request\.head_dim_qk: must be >= 1, got 0"),
        ({"op": "mha_decode", "page_size": -16}, r"request\.page_size: must be >= 1, got -16"),
        ({"op": "mha_decode", "kv_dtype": "bf17"}, r"request\.kv_dtype: 'bf17' is not a dtype; expected one of bf16, .*\(did you mean 'bf16'\?\)"),
        ({"op": "mha_decode", "arch": "sm_95"}, r"request\.arch: 'sm_95' is not an SM like sm_90; expected one of "),
        ({"op": "mha_decode", "arch": "9" * 5000}, r"request\.arch: '9+\.\.\. is not an SM like sm_90; expected one of "),
        ({"op": "mha_decode", "arch": "sm_\u0669\u0660"}, r"request\.arch: .* is not an SM like sm_90"),  # Arabic-Indic 90
        ({"op": "mha_decode", "pagesize": 16}, r"request\.pagesize: unknown request field \(did you mean 'page_size'\?\)"),
        ({"op": "mha_decode", "kv_lora_rank": 512}, r"kv_lora_rank means nothing for op mha_decode"),
        ({"op": "mha_prefill", "q_len": 2}, r"q_len 2 means nothing for op mha_prefill"),
        ({"op": "mha_decode", "non_causal": True}, r"non_causal means nothing for op mha_decode"),
        ({"op": "mha_decode", "num_qo_heads": 30, "num_kv_heads": 8}, r"num_qo_heads 30 is not a multiple of num_kv_heads 8"),
        ({"op": "mha_decode", "solution": "flashinfr"}, r"request\.solution: 'flashinfr' is not one of .*\(did you mean 'flashinfer'\?\)"),
    ],
)
def test_bad_fields_are_named(fields, message):
    with pytest.raises(RequestError, match=message):
        KernelRequest(**fields)


def test_unchecked_lists_unset_shape_fields_of_the_op():
    r = KernelRequest(op="mla_decode", arch="sm_120", kv_lora_rank=512)
    assert "page_size" in r.unchecked() and "kv_lora_rank" not in r.unchecked() and "head_dim_qk" not in r.unchecked()


def test_mla_head_sizes_given_the_vllm_way_mean_the_latent_dims():
    # vLLM passes an MLA layer's head size as 576 (kv_lora_rank 512 + rope 64) and its value head as 512
    vllm = KernelRequest(op="mla_decode", arch="sm_120", head_dim_qk=576, head_dim_vo=512)
    latent = KernelRequest(op="mla_decode", arch="sm_120", kv_lora_rank=512, qk_rope_head_dim=64)
    assert vllm == latent and hash(vllm) == hash(latent)
    assert (vllm.kv_lora_rank, vllm.qk_rope_head_dim, vllm.head_dim_qk, vllm.head_dim_vo) == (512, 64, None, None)
    both = KernelRequest(op="mla_decode", head_dim_qk=576, kv_lora_rank=512, qk_rope_head_dim=64)
    assert both == KernelRequest(op="mla_decode", kv_lora_rank=512, qk_rope_head_dim=64)
    assert KernelRequest(op="sparse_mla_decode", head_dim_qk=512, head_dim_vo=512).qk_rope_head_dim == 0


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"head_dim_qk": 576}, r"request\.head_dim_qk: head_dim_qk 576 alone does not say how it splits into "
                               r"kv_lora_rank \+ qk_rope_head_dim: give head_dim_vo"),
        ({"head_dim_qk": 600, "kv_lora_rank": 512, "qk_rope_head_dim": 64},
         r"request\.head_dim_qk: head_dim_qk 600 is not kv_lora_rank 512 \+ qk_rope_head_dim 64 = 576: absorbed MLA"),
        ({"head_dim_vo": 500, "kv_lora_rank": 512}, r"request\.head_dim_vo: head_dim_vo 500 is not kv_lora_rank 512: "),
        ({"head_dim_qk": 256, "head_dim_vo": 512}, r"request\.head_dim_qk: head_dim_qk 256 is below kv_lora_rank 512: "),
    ],
)
def test_mla_head_sizes_that_disagree_with_the_latent_dims_name_the_rule(fields, message):
    with pytest.raises(RequestError, match=message):
        KernelRequest(op="mla_decode", **fields)


def test_a_vllm_style_mla_request_selects_what_the_latent_one_does(pick):
    # it used to be refused: "head_dim_qk means nothing for op mla_decode"
    for arch, q in (("sm_120", "bf16"), ("sm_90", "bf16"), ("sm_100", "bf16")):
        vllm = pick(op="mla_decode", arch=arch, q_dtype=q, head_dim_qk=576, head_dim_vo=512, num_qo_heads=128)
        latent = pick(op="mla_decode", arch=arch, q_dtype=q, kv_lora_rank=512, qk_rope_head_dim=64, num_qo_heads=128)
        assert vllm.kernel is not None and vllm.kernel is latent.kernel
        assert "kv_lora_rank=512 qk_rope_head_dim=64" in vllm.explain()


def test_new_len_is_bucketed_and_part_of_the_ragged_ops_requests():
    extend = KernelRequest(op="mha_extend", arch="sm_90", kv_len=30000, new_len=100)
    assert (extend.kv_len, extend.new_len) == (32768, 128)
    assert extend == KernelRequest(op="mha_extend", arch="sm_90", kv_len=20000, new_len=65)  # one bucket, one cache entry
    assert extend != KernelRequest(op="mha_extend", arch="sm_90", kv_len=30000, new_len=1000)
    assert "new_len=128" in extend.describe()


def test_prefill_new_len_is_its_kv_len():
    by_kv = KernelRequest(op="mha_prefill", arch="sm_90", kv_len=3000)
    by_new = KernelRequest(op="mha_prefill", arch="sm_90", new_len=3000)
    assert by_kv == by_new and (by_kv.kv_len, by_kv.new_len) == (4096, 4096)
    assert KernelRequest(op="mha_prefill", arch="sm_90", kv_len=3000, new_len=4000) == by_kv  # same bucket


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"op": "mha_decode", "new_len": 4}, r"^invalid kernel request:\n  request\.new_len: new_len means nothing for op "
                                              r"mha_decode \(a decode step's new tokens per request are q_len\)$"),
        ({"op": "mla_decode", "new_len": 4}, r"request\.new_len: new_len means nothing for op mla_decode"),
        ({"op": "mha_extend", "kv_len": 100, "new_len": 200}, r"request\.new_len: new_len 256 exceeds kv_len 128 "
                                                                r"\(kv_len counts the new tokens too\)$"),
        ({"op": "mha_prefill", "kv_len": 100, "new_len": 200}, r"request\.new_len: new_len 256 and kv_len 128 differ "
                                                                 r"after bucketing: for mha_prefill every token is new"),
        ({"op": "mha_extend", "new_len": 0}, r"request\.new_len: must be >= 1, got 0"),
    ],
)
def test_bad_new_len_is_named(fields, message):
    with pytest.raises(RequestError, match=message):
        KernelRequest(arch="sm_90", **fields)


def test_requests_that_gave_the_same_fields_share_one_set_even_after_thousands_of_other_combinations():
    """A cached request keeps pydantic's set of given fields (~700 bytes); alike requests share one.  The
    shared table is bounded, oldest dropped first, so a process that once built many combinations (a fuzzer,
    ``kernelsel diff``) still shares the ones it uses now."""
    base = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128)
    optional = dict(sinks=False, sliding_window=False, logits_soft_cap=False, return_lse=False, non_causal=False,
                    noncontiguous_kv=False, cuda_graph=False, page_size=16, q_len=1, num_qo_heads=32,
                    num_kv_heads=8, batch_size=2, kv_len=100)
    names = list(optional)
    for mask in range(1 << len(names)):  # 8,192 combinations of given fields: twice the table's bound
        KernelRequest(**base, **{n: optional[n] for i, n in enumerate(names) if mask >> i & 1})
    a, b = KernelRequest(**base, batch_size=3, kv_len=7), KernelRequest(**base, batch_size=5, kv_len=9)
    assert a.model_fields_set == {*base, "batch_size", "kv_len"}
    assert a.model_fields_set is b.model_fields_set
