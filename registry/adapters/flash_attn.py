"""flash-attn's FlashAttention-4 (``flash_attn.cute``, PyPI ``flash-attn-4``) behind the op contracts.

FA4 is the CuTe-DSL FlashAttention of the flash-attn project (a different
kernel from FlashInfer's own CuTe-DSL attention).  Its public entry point is
``flash_attn.cute.flash_attn_varlen_func`` (``interface.py:3905-3941``):
ragged ``q``/``k``/``v`` ``[tokens, heads, dim]`` with ``cu_seqlens_q`` /
``cu_seqlens_k``, a float ``softmax_scale``, ``causal``; it returns
``(out, lse)`` and allocates ``out`` itself (the public API takes no
``out=``), so a caller's ``out`` receives a copy.

Only what the manifest declares for FA4 is translated; anything else is
refused before the library is imported (sinks, window, soft cap, LSE: FA4
has them, but their semantics against ``registry.contracts`` were not
verified here).  NOT executed in this project unless a GPU run says so
(``kernelsel explain`` shows the provenance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from registry.adapters.base import Adapter, check_tensor, import_library, torch_dtype
from registry.adapters.paged import check_cu_seqlens
from registry.contracts import AttentionResult, output_dtype, scale_arg, sm_scale
from registry.errors import AdapterInputError, UnsupportedFeatureError

if TYPE_CHECKING:
    import torch

_UNTRANSLATED = ("sinks", "sliding_window", "logits_soft_cap", "return_lse")
"""Features FA4's API has and this adapter does not translate (so no FA4 entry may declare them)."""


def _scale_parts(name: str, scale: Any, device: Any) -> tuple[float, Any]:
    """``(float part, tensor part or None)`` of a contract scale (``registry.contracts.scale_arg`` checks it)."""
    value = scale_arg(name, scale, device=device, contract="mha_prefill")
    return (value, None) if isinstance(value, float) else (1.0, value.view(1))


class FA4Prefill(Adapter):
    """``mha_prefill`` (postwrite) with ``flash_attn.cute.flash_attn_varlen_func``: fresh ragged Q/K/V.

    Scales: floats fold into ``softmax_scale`` (q, k) and multiply ``out``
    in place (v); one-element device tensors scale a planned copy of the
    query and ``out`` on the device, never read on the host.
    """

    op = "mha_prefill"
    libraries = ("torch", "flash_attn.cute")

    def __init__(self, spec: Any, request: Any) -> None:
        super().__init__(spec, request)
        for feature in _UNTRANSLATED:
            if getattr(request, feature, False):
                raise UnsupportedFeatureError(
                    f"{spec.name}: {feature} is not supported: this adapter does not translate FA4's {feature} "
                    "(not verified against the contract)"
                )
        self._fa = import_library("flash_attn.cute", "flash-attn")
        self.q_dtype = torch_dtype(request.q_dtype)
        self.kv_dtype = torch_dtype(request.kv_dtype)
        self.out_dtype = torch_dtype(output_dtype(request.q_dtype, request.out_dtype).value)
        self._q_buffer = None

    def plan(self, metadata: Any) -> None:
        self._check_options(metadata, causal=metadata.causal)
        cu_q, cu_k = metadata.cu_seqlens_q, metadata.cu_seqlens_kv
        self._bind_device(cu_q)
        self.tokens_q = check_cu_seqlens("cu_seqlens_q", cu_q, contract=self.op)
        batch = cu_q.shape[0] - 1
        self.tokens_k = check_cu_seqlens("cu_seqlens_kv", cu_k, batch, device=self._device, contract=self.op)
        self._cu_q, self._cu_k = cu_q, cu_k
        lens_q, lens_k = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
        self._max_q = int(lens_q.max()) if batch else 0
        self._max_k = int(lens_k.max()) if batch else 0
        self._causal = bool(metadata.causal)
        self._sm = sm_scale(metadata, self.request, kernel=self.spec.name)
        self._planned = True

    def _bind_device(self, t: Any) -> None:
        """Fix the device from the plan metadata; FA4 needs CUDA tensors."""
        if not getattr(t, "is_cuda", False):
            raise AdapterInputError(f"{self.spec.name}: plan metadata is on {getattr(t, 'device', '?')}; FA4 needs CUDA tensors")
        self._device, self._device_index = t.device, t.get_device()

    def run(self, q, k, v, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        self._require_planned()
        self._refuse("sinks", sinks is not None)
        self._refuse("return_lse (an lse= buffer)", lse is not None)
        r = self.request
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        dev = self._device
        check_tensor("q", q, shape=[self.tokens_q, r.num_qo_heads, d], dtype=self.q_dtype, device=dev, contract=self.op)
        check_tensor("k", k, shape=[self.tokens_k, r.num_kv_heads, d], dtype=self.kv_dtype, device=dev, contract=self.op)
        check_tensor("v", v, shape=[self.tokens_k, r.num_kv_heads, dv], dtype=self.kv_dtype, device=dev, contract=self.op)
        if out is not None:
            check_tensor("out", out, shape=[self.tokens_q, r.num_qo_heads, dv], dtype=self.out_dtype, device=dev,
                         contract=self.op)
        qf, qt = _scale_parts("q_scale", q_scale, dev)
        kf, kt = _scale_parts("k_scale", k_scale, dev)
        vf, vt = _scale_parts("v_scale", v_scale, dev)
        if qt is not None or kt is not None:
            q = self._scaled_query(q, [t for t in (qt, kt) if t is not None])
        res, _ = self._fa.flash_attn_varlen_func(
            q=q, k=k, v=v, cu_seqlens_q=self._cu_q, cu_seqlens_k=self._cu_k,
            max_seqlen_q=self._max_q, max_seqlen_k=self._max_k,
            softmax_scale=self._sm * qf * kf, causal=self._causal, return_lse=False,
        )
        if out is not None:
            out.copy_(res)
            res = out
        if vf != 1.0:
            res.mul_(vf)
        if vt is not None:
            res.mul_(vt)
        return AttentionResult(res)

    def _scaled_query(self, q: "torch.Tensor", tensors: list) -> "torch.Tensor":
        """``q * prod(tensors)`` into a buffer kept across calls (device math only)."""
        import torch

        if self._q_buffer is None or self._q_buffer.shape != q.shape:
            self._q_buffer = torch.empty_like(q)
        torch.mul(q, tensors[0], out=self._q_buffer)
        for t in tensors[1:]:
            self._q_buffer.mul_(t)
        return self._q_buffer
