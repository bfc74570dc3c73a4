"""What each op means in terms of request fields: which shapes and features apply to it.

This is vocabulary, not capability: it says that ``kv_lora_rank`` means
nothing to an MHA op (so a manifest entry declaring it is a mistake), not
which ranks any kernel supports.
"""

from __future__ import annotations

from typing import Optional

from registry.vocab import Op

_MHA = frozenset({"head_dim_qk", "head_dim_vo", "num_qo_heads", "num_kv_heads", "gqa_group_size"})
_MLA = frozenset({"num_qo_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "page_size", "q_len"})

SHAPE_FIELDS_BY_OP: dict[Op, frozenset[str]] = {
    Op.MHA_DECODE: _MHA | {"page_size", "q_len"},
    Op.MHA_EXTEND: _MHA | {"page_size"},
    Op.MHA_PREFILL: _MHA,
    Op.MLA_DECODE: _MLA,
    Op.SPARSE_MLA_DECODE: _MLA | {"topk"},
}
"""Shape fields that mean something for each op."""

SHAPE_MINIMUM: dict[str, int] = {"qk_rope_head_dim": 0}
"""The smallest value a request may give a shape field, where it is not 1 (an MLA query may have no rope part)."""


SHAPE_MAXIMUM = 2**63 - 1
"""The largest value a request may give any shape field (an int64); a manifest value above it could never match."""


def shape_minimum(field: str) -> int:
    """The smallest value of ``field`` in any request: a manifest value below it could never match."""
    return SHAPE_MINIMUM.get(field, 1)

_ALL_FEATURES = frozenset(
    {"sinks", "sliding_window", "logits_soft_cap", "return_lse", "non_causal", "noncontiguous_kv", "cuda_graph"}
)

FEATURE_FIELDS_BY_OP: dict[Op, frozenset[str]] = {
    Op.MHA_DECODE: _ALL_FEATURES - {"non_causal"},
    Op.MHA_EXTEND: _ALL_FEATURES,
    Op.MHA_PREFILL: _ALL_FEATURES,
    Op.MLA_DECODE: _ALL_FEATURES - {"non_causal", "noncontiguous_kv"},
    Op.SPARSE_MLA_DECODE: _ALL_FEATURES - {"non_causal", "noncontiguous_kv"},
}
"""Feature flags that mean something for each op (decode is causal by construction)."""

PAGED_OPS = frozenset({Op.MHA_DECODE, Op.MHA_EXTEND, Op.MLA_DECODE, Op.SPARSE_MLA_DECODE})

MLA_OPS = frozenset(op for op, fields in SHAPE_FIELDS_BY_OP.items() if "kv_lora_rank" in fields)
"""Ops over a latent (MLA) cache: their head sizes are ``kv_lora_rank`` and ``qk_rope_head_dim``."""

_MLA_RULE = "absorbed MLA attends with a key of kv_lora_rank + qk_rope_head_dim and a value of kv_lora_rank"


def mla_dims_from_head_dims(
    head_dim_qk: Optional[int], head_dim_vo: Optional[int], kv_lora_rank: Optional[int], qk_rope_head_dim: Optional[int]
) -> tuple[Optional[int], Optional[int]]:
    """``(kv_lora_rank, qk_rope_head_dim)`` for an MLA request that gives head sizes the way vLLM does.

    vLLM passes an MLA layer's head size as 576 (kv_lora_rank 512 + rope 64)
    and its value head as 512: ``head_dim_qk = kv_lora_rank + qk_rope_head_dim``,
    ``head_dim_vo = kv_lora_rank``.  Values consistent with the MLA dims
    given (or the only ones given) are turned into them; an inconsistent or
    ambiguous one raises ValueError naming the field and the rule it breaks.
    """
    rank, rope = kv_lora_rank, qk_rope_head_dim
    if head_dim_vo is not None:
        if rank is not None and head_dim_vo != rank:
            raise ValueError(f"head_dim_vo {head_dim_vo} is not kv_lora_rank {rank}: {_MLA_RULE}")
        rank = head_dim_vo
    if head_dim_qk is not None:
        if rank is None:
            raise ValueError(
                f"head_dim_qk {head_dim_qk} alone does not say how it splits into kv_lora_rank + qk_rope_head_dim: "
                f"give head_dim_vo (the value head, = kv_lora_rank) or kv_lora_rank too"
            )
        if head_dim_qk < rank:
            raise ValueError(f"head_dim_qk {head_dim_qk} is below kv_lora_rank {rank}: {_MLA_RULE}")
        if rope is not None and head_dim_qk != rank + rope:
            raise ValueError(
                f"head_dim_qk {head_dim_qk} is not kv_lora_rank {rank} + qk_rope_head_dim {rope} = {rank + rope}: {_MLA_RULE}"
            )
        rope = head_dim_qk - rank
    return rank, rope


RAGGED_OPS = frozenset({Op.MHA_EXTEND, Op.MHA_PREFILL})
"""Ops whose requests give their new tokens per request as ``new_len`` (decode ops use ``q_len``)."""
