"""The attention functions transformers calls: every layer through the kernel kernelsel selects for it.

``Backend`` is one registered kernelsel backend (``register()`` makes it): its options, its kernel resolver
and the count of what ran.  ``Backend.attention`` is the ``AttentionInterface`` function of dense
``forward``/``generate`` calls; ``Backend.paged_attention`` (``paged.py``) that of continuous batching.

A dense call, per layer: refuse what cannot be honoured (``layers.refuse_unsupported``); read the sequence
layout from the mask kernelsel's mask function built (``layout.py``); the layer's spec from the call
(``layers.call_spec``); then

* one new token per sequence: ``mha_decode`` over the paged view of the keys (for MLA: ``mla_decode`` over the
  paged latent, absorbed -- ``mla.py``);
* otherwise the attention plan: ``mha_prefill`` on the ragged keys (postwrite) or ``mha_extend`` over the
  paged view (prewrite).

Each adapter is planned once per forward: layers that share a kernel and a layout share the plan.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Optional

import torch

from registry.contracts import DecodeMetadata, ExtendMetadata, PrefillMetadata
from registry.errors import KernelselError
from selector.integrations.transformers import mla, paged
from selector.integrations.transformers.kernels import BackendOptions, KernelResolver, dtype_name
from selector.integrations.transformers.layers import (
    LayerError, LayerSpec, call_spec, is_mla, layer_name, mha_spec, refuse_unsupported,
)
from selector.integrations.transformers.layout import LAYOUT_ATTRIBUTE, Paging, SequenceLayout


class Backend:
    """One registered kernelsel attention backend for transformers."""

    def __init__(self, name: str, options: BackendOptions):
        self.name = name
        self.options = options
        self.kernels = KernelResolver(options)
        self.calls: Counter = Counter()  # (layer label, op, kernel) -> attention calls
        self.layer_calls: Counter = Counter()  # (layer_idx, op, kernel) -> attention calls
        self.in_place_calls: Counter = Counter()  # page size -> decode calls that read transformers' cache in place
        self._planned: dict[int, tuple] = {}  # id(adapter) -> (token, options) it was last planned for
        self._unmasked: dict[tuple, SequenceLayout] = {}
        self._packed: tuple = ()  # ((cu_seq_lens_q, cu_seq_lens_k, PackedBatch), ...) of the current forward
        self._lock = threading.Lock()

    # ------------------------------------------------------------ what ran
    def kernels_used(self) -> dict[str, dict[str, int]]:
        """``{op: {kernel: calls}}`` over every layer since registration (or ``reset_counts()``)."""
        used: dict[str, dict[str, int]] = {}
        for (_, op, kernel), n in sorted(self.calls.items()):
            used.setdefault(op, {}).setdefault(kernel, 0)
            used[op][kernel] += n
        return used

    def kernels_by_layer(self) -> dict[int, dict[str, dict[str, int]]]:
        """``{layer_idx: {op: {kernel: calls}}}``: which kernel ran in each layer (``-1``: a module without index)."""
        used: dict[int, dict[str, dict[str, int]]] = {}
        for (layer, op, kernel), n in sorted(self.layer_calls.items()):
            used.setdefault(layer, {}).setdefault(op, {})[kernel] = n
        return used

    def in_place_decodes(self) -> dict[int, int]:
        """``{page_size: calls}``: continuous-batching decode calls that read transformers' paged cache in place
        (``paged.py``); the other decode calls read the keys ``cache.update`` gathered."""
        return dict(sorted(self.in_place_calls.items()))

    def reset_counts(self) -> None:
        self.calls.clear()
        self.layer_calls.clear()
        self.in_place_calls.clear()

    # ------------------------------------------------------------ dense forward / generate
    def attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """``AttentionInterface`` function: ``query [B, Hq, Lq, D]``, keys/values ``[B, Hkv, Lk, D]`` (for MLA
        the latent, see ``mla.py``) -> ``([B, Lq, Hq, Dv], None)``."""
        try:
            return self._attention(module, query, key, value, attention_mask, kwargs), None
        except LayerError:
            raise
        except KernelselError as exc:
            raise LayerError(f"kernelsel: {layer_name(module)}: {exc}") from exc

    def _attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Any, kwargs: dict) -> torch.Tensor:
        if paged.is_continuous_batching(kwargs):  # a packed batch must never be read as one sequence
            return paged.continuous_batching_attention(self, module, query, key, value, kwargs)
        refuse_unsupported(module, kwargs)
        latent = False
        if is_mla(module):
            mla.route_latent(module)  # from the next call on, the latent arrives (see mla.py)
            latent = mla.is_latent(module, key, value)
        spec = call_spec(module, query, key, value, kwargs, latent=latent)
        layout = self._layout(module, attention_mask, query, key, spec)
        paging = layout.paging(self.options.page_size)
        sinks = _sinks(kwargs)
        if layout.decode and latent:
            out = self._mla_decode(module, spec, query, key, value, paging, sinks)
        elif layout.decode and not is_mla(module):
            out = self._mha_decode(module, spec, query, key, value, paging, sinks)
        else:  # a prompt or chunk (and an MLA decode step whose keys arrived expanded: the first call only)
            if latent:
                key, value = mla.expand(module, key, value)
            out = self._prefill(module, spec, query, key, value, paging, sinks)
        return paging.dense_output(out)

    def _layout(self, module: Any, mask: Any, query: torch.Tensor, key: torch.Tensor, spec: LayerSpec) -> SequenceLayout:
        where = f"kernelsel: {layer_name(module)}"
        batch, lq, lk = query.shape[0], query.shape[2], key.shape[2]
        if mask is None:
            shape = (batch, lq, lk, spec.causal, query.device)
            layout = self._unmasked.get(shape)
            if layout is None:
                with self._lock:
                    layout = self._unmasked.setdefault(shape, SequenceLayout.unmasked(batch, lq, lk, spec.causal, query.device))
            if spec.window is not None and lk > spec.window:
                raise LayerError(f"{where}: sliding_window {spec.window} without an attention mask: transformers "
                                 f"built none, so the window's extent over {lk} keys is unknown")
            return layout
        layout = getattr(mask, LAYOUT_ATTRIBUTE, None)
        if layout is None:
            raise LayerError(
                f"{where}: an attention mask kernelsel's mask function did not build ({type(mask).__name__} "
                f"{tuple(getattr(mask, 'shape', ()))}): an arbitrary 4-D mask (passed by the caller, or changed by "
                f"the model) can hide any key, which kernelsel's kernels cannot reproduce; pass the 2-D padding "
                f"mask instead, or use attn_implementation='eager'"
            )
        if isinstance(layout, str):
            raise LayerError(f"{where}: {layout}")
        if (layout.batch, layout.q_length, layout.kv_length) != (batch, lq, lk):
            raise LayerError(f"{where}: the attention mask was built for {layout.batch} sequences of {layout.q_length} "
                             f"queries over {layout.kv_length} keys, the call has {batch}, {lq}, {lk}")
        if layout.window != spec.window:
            raise LayerError(f"{where}: the layer asks for sliding_window {spec.window}, its attention mask was built "
                             f"with {layout.window}: kernelsel will not pick one of the two")
        if layout.causal != spec.causal and not layout.decode:
            raise LayerError(f"{where}: the layer is {'causal' if spec.causal else 'non-causal'} (is_causal), its "
                             f"attention mask is {'causal' if layout.causal else 'bidirectional'}")
        return layout

    # ------------------------------------------------------------ the three kinds of step
    def _mha_decode(self, module: Any, spec: LayerSpec, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, paging: Paging, sinks: Optional[torch.Tensor]) -> torch.Tensor:
        sel = self._decode_selection(module, spec, query, paging)
        adapter = sel.adapter
        self.plan_once(adapter, paging, DecodeMetadata(block_table=paging.block_table, seq_lens=paging.seq_lens, q_len=1,
                                                   **_options(spec)))
        out = adapter.run(paging.query_rows(query), paging.pages(key), paging.pages(value), **sinks_kw(sinks)).out
        self.count(module, spec, "mha_decode", sel.name)
        return out

    def _mla_decode(self, module: Any, spec: LayerSpec, query: torch.Tensor, kv_nope: torch.Tensor,
                    k_rot: torch.Tensor, paging: Paging, sinks: Optional[torch.Tensor]) -> torch.Tensor:
        sel = self._decode_selection(module, spec, query, paging)
        adapter = sel.adapter
        w_uk, w_uv = mla.up_projections(module, spec.num_qo_heads)
        nope = spec.qk_nope_head_dim
        rows = paging.query_rows(query)  # [T, H, nope + rope]
        q_latent = torch.einsum("thd,hdr->thr", rows[..., :nope], w_uk)
        q_rope = rows[..., nope:].contiguous()
        cache = paging.pages(torch.cat([kv_nope, k_rot], dim=-1)).squeeze(2)  # [P, S, kv_lora_rank + rope]
        self.plan_once(adapter, paging, DecodeMetadata(block_table=paging.block_table, seq_lens=paging.seq_lens, q_len=1,
                                                   **_options(spec)))
        out = adapter.run(q_latent, q_rope, cache, **sinks_kw(sinks)).out  # [T, H, kv_lora_rank]
        self.count(module, spec, "mla_decode", sel.name)
        return torch.einsum("thr,hvr->thv", out, w_uv)

    def _prefill(self, module: Any, spec: LayerSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 paging: Paging, sinks: Optional[torch.Tensor]) -> torch.Tensor:
        choice = self.kernels.prefill(mha_spec(spec), dtype_name(query.dtype), self.options.page_size, on_cuda=query.is_cuda)
        adapter = choice.selection.adapter
        rows = paging.query_rows(query)
        if choice.mode == "postwrite":
            self.plan_once(adapter, paging, PrefillMetadata(cu_seqlens_q=paging.cu_seqlens_q, cu_seqlens_kv=paging.cu_seqlens_kv,
                                                        causal=spec.causal, **_options(spec)))
            out = adapter.run(rows, paging.ragged_keys(key), paging.ragged_keys(value), **sinks_kw(sinks)).out
        else:
            self.plan_once(adapter, paging, ExtendMetadata(block_table=paging.block_table, seq_lens=paging.seq_lens,
                                                       cu_seqlens_q=paging.cu_seqlens_q, causal=spec.causal, **_options(spec)))
            out = adapter.run(rows, paging.pages(key), paging.pages(value), **sinks_kw(sinks)).out
        self.count(module, spec, choice.selection.request.op.value, choice.selection.name)
        return out

    # ------------------------------------------------------------ shared plumbing
    def _decode_selection(self, module: Any, spec: LayerSpec, query: torch.Tensor, paging: Paging) -> Any:
        on_cuda = query.is_cuda
        perf = {}
        if on_cuda:  # measured perf tables rank by batch and context (bucketed: a handful of cache entries)
            perf = {"batch_size": paging.layout.batch, "kv_len": max(1, int(max(paging.layout.key_end)))}
        return self.kernels.decode(spec, dtype_name(query.dtype), self.options.page_size, on_cuda=on_cuda, **perf)

    def plan_once(self, adapter: Any, token: Any, metadata: Any) -> None:
        """``adapter.plan(metadata)`` unless it was last planned for this same batch (``token``) and options."""
        options = (type(metadata), metadata.sm_scale, metadata.window_left, metadata.logits_soft_cap,
                   getattr(metadata, "causal", True))
        last = self._planned.get(id(adapter))
        if last is not None and last[0] is token and last[1] == options:
            return
        adapter.plan(metadata)
        self._planned[id(adapter)] = (token, options)

    def packed_batch(self, cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int) -> "paged.PackedBatch":
        """The continuous-batching layout of this forward for one layer type, built once (keyed on the very
        ``cu_seq_lens`` tensors transformers passes every layer of one forward)."""
        for q_obj, k_obj, batch in self._packed:
            if q_obj is cu_q and k_obj is cu_k:
                return batch
        batch = paged.PackedBatch(cu_q, cu_k, total_q)
        self._packed = tuple(m for m in self._packed if m[0] is cu_q)[:3] + ((cu_q, cu_k, batch),)
        return batch

    def count(self, module: Any, spec: LayerSpec, op: str, kernel: str) -> None:
        label = type(module).__name__ + (f" sliding_window={spec.window}" if spec.window is not None else "")
        self.calls[(label, op, kernel)] += 1
        layer = getattr(module, "layer_idx", None)
        self.layer_calls[(-1 if layer is None else int(layer), op, kernel)] += 1


def _options(spec: LayerSpec) -> dict[str, Any]:
    return {"sm_scale": spec.sm_scale, "window_left": spec.window_left, "logits_soft_cap": spec.soft_cap or 0.0}


def _sinks(kwargs: dict) -> Optional[torch.Tensor]:
    """GPT-OSS's ``s_aux`` (one logit per query head, the model's dtype) as kernelsel's fp32 sinks."""
    s_aux = kwargs.get("s_aux")
    return None if s_aux is None else s_aux.detach().to(torch.float32).contiguous()


def sinks_kw(sinks: Optional[torch.Tensor]) -> dict[str, Any]:
    return {} if sinks is None else {"sinks": sinks}
