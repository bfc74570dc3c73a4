"""The attention shapes of a Hugging Face ``config.json``, as kernelsel request fields (no transformers needed).

``kernelsel tune --model`` pre-tunes the buckets a deployment will hit; it
needs only what a config says about attention: query and KV heads (per GPU,
after tensor parallelism), head dim, a sliding window, a logit soft cap,
attention sinks, MLA's latent dims, and which layers use which.  Read from the
keys transformers uses (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``sliding_window`` / ``use_sliding_window``, ``layer_types``,
``attn_logit_softcapping``, ``kv_lora_rank``, ``qk_rope_head_dim``,
``qk_nope_head_dim``; a multimodal config's ``text_config``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import KernelselError

SINKS_MODEL_TYPES = frozenset({"gpt_oss"})
"""Model types whose attention has learned sinks, a parameter and not a config key (transformers'
``models/gpt_oss/modeling_gpt_oss.py``: ``self.sinks``)."""


@dataclass(frozen=True)
class LayerKind:
    """One kind of attention layer of a model: its request fields and which layers have it."""

    name: str  # "full attention", "sliding window", "MLA"
    mla: bool
    fields: dict[str, Any] = field(default_factory=dict)
    layers: int = 0


@dataclass(frozen=True)
class ModelAttention:
    model_type: str
    kinds: tuple[LayerKind, ...]


def _int(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KernelselError(f"{path}: {key}: expected a positive integer, got {value!r}")
    return value


def read_model_config(path: Path, *, tp: int = 1) -> ModelAttention:
    """The attention layer kinds of the model ``path`` (a ``config.json``) describes, heads divided by ``tp``."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KernelselError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise KernelselError(f"{path}: not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise KernelselError(f"{path}: expected a Hugging Face config.json (an object)")
    if isinstance(config.get("text_config"), dict):  # multimodal: the language model's attention
        config = {**config, **config["text_config"]}
    model_type = str(config.get("model_type", ""))
    heads = _int(config, "num_attention_heads", path)
    layers = config.get("num_hidden_layers") if isinstance(config.get("num_hidden_layers"), int) else 0
    if tp < 1 or heads % tp:
        raise KernelselError(f"--tp {tp}: {heads} query heads do not split evenly over {tp} GPUs")
    if config.get("kv_lora_rank"):
        fields = {"num_qo_heads": heads // tp, "kv_lora_rank": _int(config, "kv_lora_rank", path),
                  "qk_rope_head_dim": _int(config, "qk_rope_head_dim", path),
                  "qk_nope_head_dim": _int(config, "qk_nope_head_dim", path)}
        return ModelAttention(model_type, (LayerKind("MLA", True, fields, layers),))
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise KernelselError(f"{path}: num_key_value_heads: {kv_heads!r} does not divide num_attention_heads {heads}")
    head_dim = config.get("head_dim") or (_int(config, "hidden_size", path) // heads)
    fields: dict[str, Any] = {"head_dim_qk": head_dim, "num_qo_heads": heads // tp,
                              "num_kv_heads": max(1, kv_heads // tp)}  # fewer KV heads than GPUs: replicated
    if config.get("attn_logit_softcapping"):
        fields["logits_soft_cap"] = True
    if model_type in SINKS_MODEL_TYPES:
        fields["sinks"] = True
    window = config.get("sliding_window") and config.get("use_sliding_window", True)
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        counts = {t: types.count(t) for t in dict.fromkeys(types)}
        kinds = [LayerKind("sliding window" if "sliding" in t else "full attention", False,
                           {**fields, **({"sliding_window": True} if "sliding" in t and window else {})}, n)
                 for t, n in counts.items()]
    elif window:  # no layer list: the window may cover every layer or alternate with full ones; tune both
        kinds = [LayerKind("sliding window", False, {**fields, "sliding_window": True}, layers),
                 LayerKind("full attention", False, fields, layers)]
    else:
        kinds = [LayerKind("full attention", False, fields, layers)]
    return ModelAttention(model_type, tuple(kinds))
