"""Continuous batching (``generate_batch``): attention over transformers' paged KV cache.

transformers' continuous batching packs every scheduled request into one row: ``query [1, Hq, T, D]`` holds
the new tokens of all requests, delimited by ``cu_seq_lens_q``; each request's keys (cached and new) are
delimited by ``cu_seq_lens_k`` (a tensor, or a dict by layer type -- ``full_attention`` /
``sliding_attention`` -- for models with both).  Two protocols reach an attention function:

* **A** (transformers 5.17-5.18, ``paged|NAME`` registry entries): the attention function receives the
  ``PagedAttentionCache`` as ``cache=`` with ``read_index``/``write_index`` and calls ``cache.update`` itself,
  which writes the new keys and returns every key of every request, request after request
  (``[sum k, Hkv, D]``; for a sliding layer only the keys inside the window).
* **B** (transformers >= 5.19): the model calls ``cache.update`` before the attention function, which gets
  those gathered keys as ``key [1, Hkv, sum k, D]`` and ``cu_seq_lens_k`` already chosen for its layer.
  These releases' continuous batching only runs transformers' own implementations
  (``ContinuousBatchingManager.switch_to_cb_friendly_attn`` raises for any other name), so this path is
  reached only where that check is lifted; the dense ``kernelsel`` function sends such calls here rather
  than mistaking a packed batch for one sequence.

A decode step (one new token per request) of a full-attention layer under protocol A runs in place: the
attention function lets ``cache.update`` write the new keys with an empty read index (transformers' write-only
path: nothing is gathered), then hands ``mha_decode`` the layer's physical pages (``paged_cache.layer_pages``,
``[P, S, Hkv, D]`` views, ``S`` = transformers' block size) with a block table and ``seq_lens`` built once per
step (``paged_cache.block_table``); the kernel is selected for that page size.  Everything else reads the
gathered keys as one-token pages: request ``b``'s token ``t`` is row ``cu_k[b] + t`` (``block_table[b, t]``,
``page_size = 1``): sliding-window layers (whose ring buffer a block table cannot address; their gather holds
at most ``W`` keys per request), every call under protocol B (transformers gathered before calling), and
prompts and chunks, which run the attention plan (``mha_prefill`` on the ragged keys, or ``mha_extend`` over
the one-token pages): a prompt passes once, in a few chunks, where a request decodes once per new token, and a
step without cached keys (a request's first chunk) gathers nothing.  Causality is per request,
bottom-right aligned, exactly the mask transformers' own paged implementations build; a sliding layer's keys
are already cut to its window, and ``window_left = W - 1`` keeps the first prompt's queries to theirs.

MLA layers: under protocol B transformers' paged cache holds the latent (``MLACacheAllocator``), so decode
runs absorbed ``mla_decode`` over one-token pages of it and prompts run un-absorbed (``mla.py``).  Under
protocol A the paged cache is sized ``head_dim = qk_rope_head_dim`` per KV head and can hold neither the
latent nor expanded keys: refused.  Also refused, with the layer's name: the decode fast path that hands
``k_cache``/``block_table`` to the attention function to write itself (transformers enables it only for
flash attention).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from registry.contracts import DecodeMetadata, ExtendMetadata, PrefillMetadata
from registry.errors import KernelselError
from selector.integrations.transformers import mla, paged_cache
from selector.integrations.transformers.kernels import dtype_name
from selector.integrations.transformers.layers import LayerError, call_spec, is_mla, layer_name, mha_spec, refuse_unsupported

CONTINUOUS_BATCHING_KEYWORDS = ("cu_seq_lens_q", "read_index", "write_index")
"""Keywords only transformers' continuous batching passes to an attention function."""


def is_continuous_batching(kwargs: dict) -> bool:
    return "cache" in kwargs or any(k in kwargs for k in CONTINUOUS_BATCHING_KEYWORDS)


class PackedBatch:
    """One forward's requests in the packed row (built once per forward and layer type; one host read).

    Sequences with no new token (the padding of a static-shape batch) come last and are left out.
    """

    def __init__(self, cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int):
        if cu_q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise KernelselError("continuous batching under CUDA-graph capture is not supported: kernelsel plans each "
                                 "step on the host; set use_cuda_graph=False in the ContinuousBatchingConfig")
        starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
        counts_q = [b - a for a, b in zip(starts_q, starts_q[1:])]
        counts_k = [b - a for a, b in zip(starts_k, starts_k[1:])]
        batch = len(counts_q)
        while batch and counts_q[batch - 1] == 0:
            batch -= 1
        if starts_k[0] != 0 or any(counts_q[i] == 0 or counts_k[i] < counts_q[i] for i in range(batch)):
            raise KernelselError(f"continuous batching: cu_seq_lens_q {starts_q} / cu_seq_lens_k {starts_k} do not "
                                 f"describe requests whose keys include their new tokens")
        device = cu_q.device
        self.batch, self.total_q, self.tokens, self.keys = batch, total_q, starts_q[batch], starts_k[batch]
        self.decode = all(n == 1 for n in counts_q[:batch])
        self.max_keys = max(counts_k[:batch], default=1)
        self.cu_seqlens_q = cu_q[: batch + 1].to(torch.int32)
        self.cu_seqlens_kv = cu_k[: batch + 1].to(torch.int32)
        self.seq_lens = torch.tensor(counts_k[:batch], dtype=torch.int32, device=device)
        # one-token pages: request b's token t is gathered row cu_k[b] + t
        self.block_table = self.cu_seqlens_kv[:batch, None] + torch.arange(self.max_keys, dtype=torch.int32, device=device)
        self._in_place: dict[tuple, "InPlacePaging"] = {}
        self._no_reads: Any = None

    def in_place(self, read_index: torch.Tensor, page_size: int) -> "InPlacePaging":
        """The block table of this step over a group's physical pages (built once per step, group and page size)."""
        key = (id(read_index), page_size)
        paging = self._in_place.get(key)
        if paging is None or paging.read_index is not read_index:
            table = paged_cache.block_table(read_index, self.cu_seqlens_kv, self.max_keys, page_size)
            paging = self._in_place[key] = InPlacePaging(read_index, table, self.seq_lens)
        return paging

    def no_reads(self, read_index: list) -> list:
        """One empty read index per group: ``cache.update`` then only writes (transformers' write-only path)."""
        if self._no_reads is None or len(self._no_reads) != len(read_index):
            self._no_reads = [r.new_empty(0) for r in read_index]
        return self._no_reads


class InPlacePaging:
    """A step's block table over one group's physical pages; also the token that lets adapters plan once per step."""

    __slots__ = ("read_index", "block_table", "seq_lens")

    def __init__(self, read_index: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor):
        self.read_index, self.block_table, self.seq_lens = read_index, block_table, seq_lens


def paged_attention_function(backend: Any) -> Callable:
    """The ``paged|NAME`` attention function of ``backend`` (``register()`` installs it)."""

    def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if not is_continuous_batching(kwargs):
            raise LayerError(
                f"kernelsel: {layer_name(module)}: 'paged|{backend.name}' was called without transformers' paged "
                f"cache: it serves continuous batching (generate_batch); load the model with "
                f"attn_implementation='{backend.name}' for forward and generate"
            )
        return continuous_batching_attention(backend, module, query, key, value, kwargs), None

    paged_attention.__name__ = f"kernelsel_paged_attention_{backend.name}"
    return paged_attention


def continuous_batching_attention(backend: Any, module: Any, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``[1, T, Hq, Dv]``: the attention of one packed continuous-batching forward for one layer."""
    try:
        return _attention(backend, module, query, key, value, kwargs)
    except LayerError:
        raise
    except KernelselError as exc:
        raise LayerError(f"kernelsel: {layer_name(module)}: {exc}") from exc


def _attention(backend: Any, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               kwargs: dict) -> torch.Tensor:
    where = f"kernelsel: {layer_name(module)}"
    refuse_unsupported(module, kwargs)
    cache = kwargs.get("cache")
    if kwargs.get("k_cache") is not None or kwargs.get("block_table") is not None:
        raise LayerError(f"{where}: continuous batching's decode fast path (block_table=, k_cache=: the attention "
                         f"function writes the cache itself) is not supported; it is meant for flash attention")
    latent, mla_layer = False, is_mla(module)
    if mla_layer:
        if cache is not None:
            raise LayerError(
                f"{where}: continuous batching of an MLA layer is not supported with this transformers release: its "
                f"paged cache is sized head_dim = qk_rope_head_dim ({getattr(module, 'qk_rope_head_dim', '?')}) per KV "
                f"head and holds neither the latent kernelsel's mla_decode reads nor the expanded keys transformers' "
                f"own paged functions write; use generate()"
            )
        mla.route_latent(module)
        latent = mla.is_latent(module, key, value)
    spec = call_spec(module, query, key, value, kwargs, latent=latent)
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):
        cu_k = cu_k["sliding_attention" if spec.window is not None else "full_attention"]
    batch = backend.packed_batch(kwargs["cu_seq_lens_q"], cu_k, query.shape[2])
    rows = query[0].transpose(0, 1)[: batch.tokens]  # [T, Hq, D]
    sinks = None if kwargs.get("s_aux") is None else kwargs["s_aux"].detach().to(torch.float32).contiguous()
    extra = {} if sinks is None else {"sinks": sinks}
    options = {"sm_scale": spec.sm_scale, "window_left": spec.window_left, "logits_soft_cap": spec.soft_cap or 0.0}
    dtype, on_cuda = dtype_name(query.dtype), query.is_cuda
    perf = {"batch_size": batch.batch, "kv_len": batch.max_keys} if on_cuda else {}
    if cache is not None and batch.decode and not mla_layer:
        pages = paged_cache.layer_pages(cache, module.layer_idx)
        if pages is not None and kwargs["read_index"][pages.group].numel() >= batch.keys:
            return _decode_in_place(backend, module, spec, cache, pages, batch, rows, key, value, kwargs, options,
                                    extra, dtype, on_cuda, perf)
    if cache is not None:  # protocol A: write the new keys, read every request's keys back
        keys, values = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                                    read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    else:  # protocol B: the model did it (for MLA: the latent, [sum k, 1, kv_lora_rank] and [sum k, 1, rope])
        keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)
    decode_meta = lambda: DecodeMetadata(block_table=batch.block_table, seq_lens=batch.seq_lens, q_len=1, **options)  # noqa: E731
    if batch.decode and latent:  # absorbed MLA over one-token pages of the latent
        sel = backend.kernels.decode(spec, dtype, 1, on_cuda=on_cuda, **perf)
        w_uk, w_uv = mla.up_projections(module, spec.num_qo_heads)
        nope = spec.qk_nope_head_dim
        q_latent = torch.einsum("thd,hdr->thr", rows[..., :nope], w_uk)
        backend.plan_once(sel.adapter, batch, decode_meta())
        out = sel.adapter.run(q_latent, rows[..., nope:].contiguous(), torch.cat([keys, values], dim=-1), **extra).out
        out = torch.einsum("thr,hvr->thv", out, w_uv)
        op, name = "mla_decode", sel.name
    elif batch.decode and not mla_layer:
        sel = backend.kernels.decode(spec, dtype, 1, on_cuda=on_cuda, **perf)
        backend.plan_once(sel.adapter, batch, decode_meta())
        out = sel.adapter.run(rows.contiguous(), keys.unsqueeze(1), values.unsqueeze(1), **extra).out
        op, name = "mha_decode", sel.name
    else:  # prompts and chunks: the attention plan (an MLA layer un-absorbed)
        if latent:
            expanded_k, expanded_v = mla.expand(module, key, value)
            keys, values = expanded_k[0].transpose(0, 1), expanded_v[0].transpose(0, 1)
            spec = mha_spec(spec)
        choice = backend.kernels.prefill(spec, dtype, 1, on_cuda=on_cuda)
        adapter = choice.selection.adapter
        if choice.mode == "postwrite":
            backend.plan_once(adapter, batch, PrefillMetadata(cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_kv=batch.cu_seqlens_kv,
                                                              causal=spec.causal, **options))
            out = adapter.run(rows.contiguous(), keys.contiguous(), values.contiguous(), **extra).out
        else:
            backend.plan_once(adapter, batch, ExtendMetadata(block_table=batch.block_table, seq_lens=batch.seq_lens,
                                                             cu_seqlens_q=batch.cu_seqlens_q, causal=spec.causal, **options))
            out = adapter.run(rows.contiguous(), keys.unsqueeze(1), values.unsqueeze(1), **extra).out
        op, name = choice.selection.request.op.value, choice.selection.name
    backend.count(module, spec, op, name)
    return _packed_output(out, batch)


def _decode_in_place(backend: Any, module: Any, spec: Any, cache: Any, pages: "paged_cache.LayerPages",
                     batch: PackedBatch, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict,
                     options: dict, extra: dict, dtype: str, on_cuda: bool, perf: dict) -> torch.Tensor:
    """A decode step over the layer's physical pages: transformers writes the new keys (nothing read back), the
    kernel reads the cache where it is through this step's block table."""
    cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                 read_index=batch.no_reads(kwargs["read_index"]), write_index=kwargs["write_index"])
    paging = batch.in_place(kwargs["read_index"][pages.group], pages.page_size)
    sel = backend.kernels.decode(spec, dtype, pages.page_size, on_cuda=on_cuda, **perf)
    backend.plan_once(sel.adapter, paging, DecodeMetadata(block_table=paging.block_table, seq_lens=paging.seq_lens,
                                                          q_len=1, **options))
    out = sel.adapter.run(rows.contiguous(), pages.k_pages, pages.v_pages, **extra).out
    backend.count(module, spec, "mha_decode", sel.name)
    backend.in_place_calls[pages.page_size] += 1
    return _packed_output(out, batch)


def _packed_output(out: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``[T, Hq, Dv]`` -> ``[1, total_q, Hq, Dv]`` (padded query rows of a static-shape batch: zeros)."""
    if batch.tokens != batch.total_q:
        out = torch.cat([out, out.new_zeros(batch.total_q - batch.tokens, *out.shape[1:])])
    return out.unsqueeze(0)
