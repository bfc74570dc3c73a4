"""What one transformers attention layer asks of a kernel, read from its module (and, at run time, its call).

transformers' model files pass the facts of an attention layer as keyword arguments of the attention
function (``scaling``, ``sliding_window``, ``softcap``, ``s_aux``, ``dropout``, ``is_causal``) and as module
attributes (``is_causal``, ``sliding_window``, ``scaling``, ``sinks``, the MLA dimensions).  ``call_spec``
reads a call, ``module_spec`` the module alone (for ``explain_model``, which never runs one); both end in
the same ``LayerSpec`` so the kernel a layer gets is decided once, the same way for both.

Conventions translated here, once:

* transformers' ``sliding_window=W`` keeps keys in ``[p-W+1, p]`` (``masking_utils.sliding_window_overlay``:
  ``kv_idx > q_idx - W``); kernelsel's ``window_left`` is the distance to the oldest visible key, so
  ``window_left = W - 1``.
* ``scaling`` is always passed on as ``sm_scale`` (Gemma's ``query_pre_attn_scalar``, DeepSeek's yarn mscale);
  only a call without one gets ``registry.contracts.softmax_scale`` (sdpa's convention too).
* the soft cap (Gemma 2 ``softcap``) is applied after scaling, before masking, in both.
* sinks (GPT-OSS ``s_aux``, one logit per query head in the model's dtype) join the softmax denominator only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from registry.contracts import softmax_scale
from registry.errors import KernelselError


class LayerError(KernelselError):
    """A layer kernelsel cannot run as asked: names the layer, the feature and why (never a silent fallback)."""


def layer_name(module: Any) -> str:
    """``GptOssAttention layer 3``: how errors and stats name a layer."""
    idx = getattr(module, "layer_idx", None)
    return type(module).__name__ + (f" layer {idx}" if idx is not None else "")


def is_mla(module: Any) -> bool:
    """A DeepSeek-style multi-head latent attention module (a latent KV projection ``kv_b_proj``)."""
    return all(hasattr(module, a) for a in ("kv_b_proj", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim"))


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer's needs, in kernelsel's terms.

    For MLA layers the MHA fields describe the un-absorbed attention (``head_dim_qk = nope + rope``,
    ``head_dim_vo = v_head_dim``, one KV head per query head) that prefill runs; decode runs absorbed over
    the latent cache (``kv_lora_rank + qk_rope_head_dim`` per token).
    """

    num_qo_heads: int
    num_kv_heads: int
    head_dim_qk: int
    head_dim_vo: int
    sm_scale: float
    causal: bool = True
    window: Optional[int] = None  # transformers' sliding_window W: keys in [p-W+1, p]; None: every earlier key
    soft_cap: Optional[float] = None
    sinks: bool = False
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def window_left(self) -> int:
        """kernelsel's window: a query at ``p`` sees keys in ``[p - window_left, p]``; ``-1``: no window."""
        return -1 if self.window is None else self.window - 1

    def describe(self) -> str:
        """``32/8 heads, head_dim 128, sliding_window 4096, soft cap 50.0, sinks`` (explain's words)."""
        if self.mla:
            text = (f"MLA {self.num_qo_heads} heads, kv_lora_rank {self.kv_lora_rank}, rope {self.qk_rope_head_dim}, "
                    f"nope {self.qk_nope_head_dim}, v {self.head_dim_vo}")
        else:
            dims = str(self.head_dim_qk) if self.head_dim_qk == self.head_dim_vo else f"{self.head_dim_qk}/{self.head_dim_vo}"
            text = f"{self.num_qo_heads}/{self.num_kv_heads} heads, head_dim {dims}"
        text += f", sm_scale {self.sm_scale:.6g}"
        if self.window is not None:
            text += f", sliding_window {self.window} (window_left {self.window_left})"
        if self.soft_cap:
            text += f", soft cap {self.soft_cap:g}"
        if self.sinks:
            text += ", sinks"
        if not self.causal:
            text += ", non-causal"
        return text


def mha_spec(spec: LayerSpec) -> LayerSpec:
    """The un-absorbed MHA spec of a layer: an MLA prompt runs as MHA over keys expanded from the latent."""
    from dataclasses import replace

    return replace(spec, kv_lora_rank=None, qk_rope_head_dim=None, qk_nope_head_dim=None) if spec.mla else spec


def _window(value: Any, module: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayerError(f"kernelsel: {layer_name(module)}: sliding_window {value!r} is not a positive integer")
    return value


def _soft_cap(value: Any) -> Optional[float]:
    return float(value) if value else None


def _mla_dims(module: Any) -> dict[str, int]:
    return dict(
        kv_lora_rank=int(module.kv_lora_rank),
        qk_rope_head_dim=int(module.qk_rope_head_dim),
        qk_nope_head_dim=int(module.qk_nope_head_dim),
    )


def module_spec(module: Any) -> LayerSpec:
    """The spec of a layer from its module and config alone, for ``explain_model`` (no call, no tensors).

    The window is the module's ``sliding_window`` attribute (Qwen3, Gemma 2, GPT-OSS set it per layer);
    a module without one (Mistral) passes its config's ``sliding_window`` at call time, so that is used.
    """
    config = getattr(module, "config", None)
    window = getattr(module, "sliding_window", None) if hasattr(module, "sliding_window") else getattr(config, "sliding_window", None)
    if is_mla(module):
        heads = int(getattr(module, "num_heads", None) or config.num_attention_heads)
        nope, rope = int(module.qk_nope_head_dim), int(module.qk_rope_head_dim)
        d_qk, d_vo, kv_heads = nope + rope, int(module.v_head_dim), heads
    else:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        d_qk = d_vo = int(getattr(module, "head_dim", None) or config.hidden_size // heads)
    scale = getattr(module, "scaling", None)
    return LayerSpec(
        num_qo_heads=heads, num_kv_heads=kv_heads, head_dim_qk=d_qk, head_dim_vo=d_vo,
        sm_scale=float(scale) if scale is not None else softmax_scale(d_qk),
        causal=bool(getattr(module, "is_causal", True)),
        window=_window(window, module),
        soft_cap=_soft_cap(getattr(module, "attn_logit_softcapping", None)),
        sinks=getattr(module, "sinks", None) is not None,
        **(_mla_dims(module) if is_mla(module) else {}),
    )


def call_spec(module: Any, query: Any, key: Any, value: Any, kwargs: Mapping[str, Any], *, latent: bool) -> LayerSpec:
    """The spec of one attention call: heads and dims from the tensors, options from the call's keywords.

    ``latent``: for an MLA module, ``key``/``value`` are the latent cache (``[B, 1, L, kv_lora_rank]``,
    ``[B, 1, L, qk_rope_head_dim]``) rather than expanded keys and values.
    """
    heads, d_qk = int(query.shape[1]), int(query.shape[-1])
    if latent:
        dims = _mla_dims(module)
        kv_heads, d_vo = heads, int(module.v_head_dim)
    else:
        dims = {}
        kv_heads, d_vo = int(key.shape[1]), int(value.shape[-1])
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    return LayerSpec(
        num_qo_heads=heads, num_kv_heads=kv_heads, head_dim_qk=d_qk, head_dim_vo=d_vo,
        sm_scale=float(scale) if scale is not None else softmax_scale(d_qk),
        causal=bool(causal), window=_window(window, module), soft_cap=_soft_cap(kwargs.get("softcap")),
        sinks=kwargs.get("s_aux") is not None, **dims,
    )


def refuse_unsupported(module: Any, kwargs: Mapping[str, Any]) -> None:
    """Raise ``LayerError`` for what kernelsel's kernels cannot honour in this call, naming layer and feature."""
    where = f"kernelsel: {layer_name(module)}"
    dropout = kwargs.get("dropout") or 0.0
    if dropout > 0:
        raise LayerError(f"{where}: attention dropout {dropout} > 0: kernelsel's kernels compute inference "
                         f"attention without dropout; call model.eval() or set attention_dropout=0")
    if kwargs.get("indices") is not None:
        raise LayerError(f"{where}: top-k sparse attention (indices=, DeepSeek-V3.2's indexer) is not supported: "
                         f"kernelsel's sparse_mla_decode is not wired into transformers; use eager or sdpa")
    if getattr(module, "compressor", None) is not None:
        raise LayerError(f"{where}: compressed KV (DeepSeek-V4's {type(module.compressor).__name__} layers) is not "
                         f"supported: the compressed entries carry their own causality bias, which no kernelsel op takes")
    if kwargs.get("position_bias") is not None:
        raise LayerError(f"{where}: an additive position bias (position_bias=) is not supported by kernelsel's kernels")
    if kwargs.get("output_attentions"):
        raise LayerError(f"{where}: output_attentions=True: kernelsel's kernels never materialise attention "
                         f"weights; use attn_implementation='eager' to get them")
