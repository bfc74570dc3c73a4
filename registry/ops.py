"""What each op means in terms of request fields: which shapes and features apply to it.

This is vocabulary, not capability: it says that ``kv_lora_rank`` means
nothing to an MHA op (so a manifest entry declaring it is a mistake), not
which ranks any kernel supports.
"""

from __future__ import annotations

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
