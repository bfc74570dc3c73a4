"""transformers' paged KV cache read in place: a layer's physical pages and a step's block table, no copy.

transformers' continuous batching stores each layer's keys and values in physical cache tensors whose token
rows are ``[Hkv, D]`` and whose pages are ``S`` consecutive rows -- kernelsel's paged NHD layout
``[P, S, Hkv, D]`` already (``registry.contracts``).  Where those tensors sit depends on the release:

* 5.17: ``PagedAttentionCache.key_cache[j]`` / ``value_cache[j]`` (``[(blocks + 2) * S, Hkv, D]``, ``j`` the
  layer's place in its group, ``cache.layer_index_to_group_indices``), ``S = cache.block_size``; viewed as pages
  the way transformers' own flash decode path does (``integrations/flash_paged.py`` ``_paged_decode_forward``).
* 5.18 and later: the layer's cache allocator (``cache.layer_to_allocator``) hands out those page views itself
  (``get_cache_for_block_table``), ``S = allocator.tokens_per_page``; its pages interleave the keys and values of
  every layer of the group, and its read indices count token rows of the same views.

The block table: transformers gives every step, per group, the physical row of every key of every request
(``read_index``, request after request, delimited by ``cu_seq_lens_k``).  A full-attention request's keys run
page after page, so its page ``j`` is ``read_index[cu_k[b] + j * S] // S`` -- a few device ops once per step
and group (``block_table``), no host read beyond the lengths the step already read.

A sliding-window group's cache is a ring of ``W`` slots indexed modulo ``W`` (not modulo the page), so a
window's keys are in page order only by accident: ``layer_pages`` returns None for it, and those layers keep
transformers' gather (``cache.update``), at most ``W`` keys per request.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class LayerPages:
    """One layer's physical cache as kernelsel's paged layout (views of transformers' tensors, never copies)."""

    k_pages: torch.Tensor  # [P, S, Hkv, D]
    v_pages: torch.Tensor  # [P, S, Hkv, Dv]
    group: int  # the index of the layer's group in read_index / write_index
    page_size: int  # S: transformers' block size (5.17) / tokens per page (5.18 and later)


_LAYERS: "weakref.WeakKeyDictionary[Any, dict[int, Optional[LayerPages]]]" = weakref.WeakKeyDictionary()


def layer_pages(cache: Any, layer_idx: int) -> Optional[LayerPages]:
    """The physical pages of ``layer_idx`` in ``cache`` (found once per cache and layer), or None where a block
    table cannot address them (a sliding-window group's ring buffer, or a cache this module does not know)."""
    try:
        layers = _LAYERS[cache]
    except KeyError:
        layers = _LAYERS.setdefault(cache, {})
    except TypeError:  # not weak-referenceable: look it up every time
        return _find(cache, layer_idx)
    if layer_idx not in layers:
        layers[layer_idx] = _find(cache, layer_idx)
    return layers[layer_idx]


def _find(cache: Any, layer_idx: int) -> Optional[LayerPages]:
    allocators = getattr(cache, "layer_to_allocator", None)
    if allocators is not None:  # 5.18 and later
        allocator = allocators.get(layer_idx)
        if allocator is None:
            return None
        if not getattr(allocator, "supports_block_table", False):
            return None
        k_pages, v_pages = allocator.get_cache_for_block_table(layer_idx)
        return LayerPages(k_pages, v_pages, int(allocator.index), int(allocator.tokens_per_page))
    groups = getattr(cache, "layer_index_to_group_indices", None)
    if groups is None or layer_idx not in groups or not hasattr(cache, "key_cache"):
        return None
    if getattr(cache, "sliding_windows", {}).get(layer_idx, 1) != 1:  # 5.17 marks full attention with 1
        return None
    group, place = groups[layer_idx]
    size = int(cache.block_size)
    k, v = cache.key_cache[place], cache.value_cache[place]
    return LayerPages(k.view(-1, size, *k.shape[1:]), v.view(-1, size, *v.shape[1:]), int(group), size)


def block_table(read_index: torch.Tensor, cu_seqlens_k: torch.Tensor, max_keys: int, page_size: int) -> torch.Tensor:
    """int32 ``[B, ceil(max_keys / S)]``: page ``j`` of request ``b`` is the page of its key ``j * S``.

    ``read_index`` holds the physical row of every key, request ``b``'s at ``cu_seqlens_k[b] ..
    cu_seqlens_k[b+1] - 1``; columns past a request's last page repeat that page (``seq_lens`` bounds them).
    """
    pages = -(-max(1, max_keys) // page_size)
    starts = cu_seqlens_k[:-1].long()
    last = cu_seqlens_k[1:].long() - 1
    first_keys = starts[:, None] + torch.arange(pages, device=read_index.device) * page_size
    rows = read_index[torch.minimum(first_keys, last[:, None])]
    return torch.div(rows, page_size, rounding_mode="floor").to(torch.int32)
