"""Absorbed MLA: DeepSeek-style latent attention run the way serving engines run it.

transformers' MLA modules (DeepSeek-V3 and the models built on it) cache the compressed latent
(``kv_nope [B, 1, L, kv_lora_rank]`` and the shared rope key ``k_rot [B, 1, L, qk_rope_head_dim]``), then
call ``self.expand_kv`` to multiply it out into per-head keys (``nope + rope`` wide) and values, and hand
those to the attention function -- 192/128-dim MHA over an expanded copy of the whole cache.

kernelsel instead needs the latent itself.  The first time a kernelsel attention function sees an MLA module
(``is_mla``) it routes that class's ``expand_kv`` through ``latent_expand_kv``: for models whose attention
implementation is a kernelsel one, ``expand_kv`` returns the latent unchanged, so the attention function
receives ``key = kv_nope``, ``value = k_rot``; every other implementation still gets the original
``expand_kv``.  (The cache update happens before ``expand_kv``, so the cache holds the latent either way and
switching mid-generation is consistent.)  ``unregister()`` puts the original back.

With the latent, decode absorbs the key up-projection into the query and the value up-projection into the
output (``kv_b_proj.weight`` viewed ``[H, nope + v, kv_lora_rank]``)::

    q_lat[t, h, :] = q_nope[t, h, :] @ W_UK[h]          # [T, H, kv_lora_rank]
    o_lat          = mla_decode(q_lat, q_rope, latent cache [P, S, kv_lora_rank + rope])
    out[t, h, :]   = W_UV[h] @ o_lat[t, h, :]             # [T, H, v_head_dim]

which is the same attention (scores ``q_nope . (W_UK c) + q_rope . k_rot``, values ``W_UV c``) reordered.
Prompts run un-absorbed: ``expand`` calls the original ``expand_kv`` and the attention plan runs MHA.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

_ORIGINAL: dict[type, Callable] = {}
_NAMES: set[str] = set()
_LOCK = threading.Lock()


def set_latent_implementations(names: set[str]) -> None:
    """The attention implementations (``config._attn_implementation``) whose MLA modules pass the latent on."""
    _NAMES.clear()
    _NAMES.update(names)


def latent_expand_kv(self: Any, kv_nope: Any, k_rot: Any) -> Any:
    """``expand_kv`` of a routed MLA class: the latent for kernelsel implementations, else the original."""
    if getattr(self.config, "_attn_implementation", None) in _NAMES:
        return kv_nope, k_rot
    return original_expand_kv(type(self))(self, kv_nope, k_rot)


def original_expand_kv(cls: type) -> Callable:
    for klass in cls.__mro__:
        if klass in _ORIGINAL:
            return _ORIGINAL[klass]
    return cls.expand_kv


def route_latent(module: Any) -> bool:
    """Route ``type(module).expand_kv`` through ``latent_expand_kv`` (once per class); False if it has none."""
    cls = type(module)
    if not callable(getattr(cls, "expand_kv", None)):
        return False
    with _LOCK:
        if cls.__dict__.get("expand_kv") is not latent_expand_kv and cls not in _ORIGINAL:
            _ORIGINAL[cls] = cls.expand_kv
            cls.expand_kv = latent_expand_kv
    return True


def restore_all() -> None:
    """Put every routed class's own ``expand_kv`` back."""
    with _LOCK:
        for cls, fn in _ORIGINAL.items():
            cls.expand_kv = fn
        _ORIGINAL.clear()


def expand(module: Any, kv_nope: Any, k_rot: Any) -> tuple[Any, Any]:
    """Per-head keys ``[B, H, L, nope + rope]`` and values ``[B, H, L, v]`` from the latent: transformers' own
    ``expand_kv``, so a prompt's un-absorbed attention sees exactly what eager does."""
    return original_expand_kv(type(module))(module, kv_nope, k_rot)


def is_latent(module: Any, key: Any, value: Any) -> bool:
    """Whether ``key``/``value`` of an MLA call are the latent (one head, ``kv_lora_rank`` / rope wide)."""
    return (key.dim() == 4 and key.shape[1] == 1 and key.shape[-1] == module.kv_lora_rank
            and value.shape[-1] == module.qk_rope_head_dim and value.shape[1] == 1)


def up_projections(module: Any, heads: int) -> tuple[Any, Any]:
    """``(W_UK [H, nope, R], W_UV [H, v, R])``: views of ``kv_b_proj.weight`` (no copy)."""
    from selector.integrations.transformers.layers import LayerError, layer_name

    weight = getattr(module.kv_b_proj, "weight", None)
    nope, v, rank = int(module.qk_nope_head_dim), int(module.v_head_dim), int(module.kv_lora_rank)
    if weight is None or not weight.is_floating_point() or weight.numel() != heads * (nope + v) * rank or weight.element_size() < 2:
        raise LayerError(
            f"kernelsel: {layer_name(module)}: absorbed MLA needs kv_b_proj.weight as a plain bf16/fp16/fp32 "
            f"[{heads * (nope + v)}, {rank}] matrix (got {None if weight is None else (weight.dtype, tuple(weight.shape))}); "
            f"a quantized kv_b_proj is not supported"
        )
    w = weight.view(heads, nope + v, rank)
    return w[:, :nope], w[:, nope:]
