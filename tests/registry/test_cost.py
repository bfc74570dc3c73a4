"""registry.cost: bytes and FLOPs of a request, counted once for bench, predictions and plots."""

from __future__ import annotations

import pytest

from registry.cost import kv_bytes_per_token, request_cost, visited_pairs
from registry.errors import RequestError
from selector import KernelRequest

MHA = dict(arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8, page_size=16)
MLA = dict(arch="sm_90", q_dtype="bf16", num_qo_heads=128, kv_lora_rank=512, qk_rope_head_dim=64, page_size=64)


def test_kv_bytes_per_token_follow_heads_dims_and_dtype():
    assert kv_bytes_per_token(KernelRequest(op="mha_decode", **MHA)) == 8 * (128 + 128) * 2
    assert kv_bytes_per_token(KernelRequest(op="mha_decode", **{**MHA, "kv_dtype": "fp8_e4m3"})) == 8 * 256
    assert kv_bytes_per_token(KernelRequest(op="mha_prefill", **{**MHA, "head_dim_vo": 64, "page_size": None})) == 8 * 192 * 2
    assert kv_bytes_per_token(KernelRequest(op="mla_decode", **MLA)) == (512 + 64) * 2


def test_causal_pairs_are_bottom_right_aligned():
    assert visited_pairs(1, 100) == 100  # decode: the new token sees everything
    assert visited_pairs(4, 4) == 4 + 3 + 2 + 1  # prefill: a triangle
    assert visited_pairs(2, 10) == 9 + 10
    assert visited_pairs(4, 4, causal=False) == 16


def test_request_cost_of_decode_extend_and_mla():
    decode = request_cost(KernelRequest(op="mha_decode", **MHA, batch_size=8, kv_len=4096))
    assert decode.kv_bytes == 8 * 4096 * 8 * 256 * 2
    assert decode.flops == 2 * 8 * 32 * 4096 * 256 and decode.units == 8 * 8
    assert decode.io_bytes == 8 * 1 * 32 * 256 * 2 and decode.bytes == decode.kv_bytes + decode.io_bytes
    extend = request_cost(KernelRequest(op="mha_extend", **MHA, batch_size=2, kv_len=1024, new_len=64))
    assert extend.flops == 2 * 2 * 32 * visited_pairs(64, 1024) * 256
    assert extend.io_bytes == 2 * 64 * 32 * 256 * 2
    mla = request_cost(KernelRequest(op="mla_decode", **MLA, batch_size=4, kv_len=8192))
    assert mla.kv_bytes == 4 * 8192 * 576 * 2 and mla.flops == 2 * 4 * 128 * 8192 * (512 + 576) and mla.units == 4
    sparse = request_cost(KernelRequest(op="sparse_mla_decode", **MLA, topk=2048, batch_size=4, kv_len=8192))
    assert sparse.kv_bytes == 4 * 2048 * 576 * 2


def test_explicit_sizes_override_the_buckets():
    r = KernelRequest(op="mha_decode", **MHA, batch_size=8, kv_len=4096)
    assert request_cost(r, batch=3, kv_len=1000).kv_bytes == 3 * 1000 * 8 * 256 * 2


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(op="mha_decode", **MHA), r"^the cost of mha_decode needs batch_size, kv_len$"),
        (dict(op="mha_extend", **MHA, batch_size=1, kv_len=64), r"^the cost of mha_extend needs new_len$"),
        (dict(op="mha_decode", arch="sm_90", batch_size=1, kv_len=64), r"^the cost of mha_decode needs head_dim_qk, num_kv_heads$"),
    ],
)
def test_a_cost_names_what_it_lacks(fields, message):
    with pytest.raises(RequestError, match=message):
        request_cost(KernelRequest(**fields))
