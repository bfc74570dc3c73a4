"""Plan-time checks the reference and Triton adapters share: the same metadata errors, word for word.

Cases come from the manifest's ``reference`` and ``triton`` kernels; no GPU
is needed (every check raises before a kernel is planned).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from registry.contracts import DecodeMetadata, ExtendMetadata  # noqa: E402
from registry.errors import AdapterInputError, UnsupportedFeatureError  # noqa: E402
from registry.loader import load_manifest  # noqa: E402

KERNELS = [k for k in load_manifest().kernels if k.solution.value in ("reference", "triton")]
DECODE_OPS = ("mha_decode", "mla_decode", "sparse_mla_decode")
FEATURES = ("sinks", "sliding_window", "logits_soft_cap", "return_lse", "non_causal")


def of(*ops: str) -> list:
    return [pytest.param(k, id=k.name) for k in KERNELS if k.op.value in ops]


def adapter(spec, **fields):
    """The kernel's adapter for a request with every field the adapters read."""
    module, name = spec.adapter.split(":")
    request = dict(
        op=spec.op.value, arch="sm_90", q_dtype="bf16", kv_dtype="bf16", out_dtype=None, head_dim_qk=16,
        head_dim_vo=None, num_qo_heads=4, num_kv_heads=2, page_size=4, q_len=1, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, topk=4, **{f: False for f in FEATURES},
    )
    request.update(fields)
    return getattr(importlib.import_module(module), name)(spec, SimpleNamespace(**request))


def decode_metadata(seq_lens=(5, 9), **options):
    block_table = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    return DecodeMetadata(block_table=block_table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), **options)


@pytest.mark.parametrize("spec", of(*DECODE_OPS))
def test_a_q_len_below_one_is_an_input_error(spec):
    with pytest.raises(AdapterInputError, match=rf"^q_len: 0, expected >= 1 \({spec.op.value}\)$"):
        adapter(spec).plan(decode_metadata(q_len=0))


@pytest.mark.parametrize("spec", of(*DECODE_OPS))
def test_more_new_tokens_than_the_request_selected_for_are_refused(spec):
    message = rf"^{spec.name}: plan\(\) got q_len=2 but the request was selected for q_len=1; select with q_len=2$"
    with pytest.raises(UnsupportedFeatureError, match=message):
        adapter(spec).plan(decode_metadata(q_len=2))


@pytest.mark.parametrize("spec", of("mha_decode"))
def test_every_request_must_hold_its_new_tokens(spec):
    with pytest.raises(AdapterInputError, match=r"^seq_lens: every request must hold its 2 new tokens \(mha_decode\)$"):
        adapter(spec, q_len=2).plan(decode_metadata(seq_lens=(1, 9), q_len=2))


@pytest.mark.parametrize("spec", of("mha_extend"))
def test_an_extend_needs_its_new_tokens_in_the_cache(spec):
    paged = decode_metadata(seq_lens=(5, 1))
    metadata = ExtendMetadata(
        block_table=paged.block_table, seq_lens=paged.seq_lens, cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32)
    )
    message = r"^cu_seqlens_q: a request has more new tokens than seq_lens holds; the cache must already contain"
    with pytest.raises(AdapterInputError, match=message + r" the new tokens \(mha_extend\)$"):
        adapter(spec).plan(metadata)


@pytest.mark.parametrize("spec", of("mha_decode", "mla_decode", "mha_extend"))
@pytest.mark.parametrize("option,feature", [(dict(window_left=3), "sliding_window"), (dict(logits_soft_cap=5.0), "logits_soft_cap")])
def test_plan_options_the_request_did_not_select_are_refused(spec, option, feature):
    metadata = decode_metadata(**option)
    if spec.op.value == "mha_extend":
        metadata = ExtendMetadata(
            block_table=metadata.block_table, seq_lens=metadata.seq_lens,
            cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32), **option,
        )
    with pytest.raises(UnsupportedFeatureError, match=rf"^{spec.name}: {feature} was passed, but the request"):
        adapter(spec).plan(metadata)


@pytest.mark.parametrize("spec", of("sparse_mla_decode"))
@pytest.mark.parametrize("option", [dict(window_left=3), dict(logits_soft_cap=5.0)], ids=["window", "soft_cap"])
def test_sparse_mla_takes_no_window_or_soft_cap_even_when_requested(spec, option):
    message = rf"^{spec.name}: sparse_mla_decode takes no window_left or logits_soft_cap; which positions are read"
    with pytest.raises(UnsupportedFeatureError, match=message):
        adapter(spec, sliding_window=True, logits_soft_cap=True).plan(decode_metadata(**option))
