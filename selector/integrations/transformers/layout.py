"""Where each sequence's keys and queries sit in the tensors of one dense forward call, and its paged view.

transformers hands an attention function padded, batch-major tensors (``query [B, Hq, Lq, D]``, keys and
values ``[B, Hkv, Lk, D]``) and a 4-D mask.  kernelsel's ops take ragged, token-major queries and a paged
cache with per-sequence lengths.  This module is the translation, and the only place that knows it:

* ``mask_layout`` reads transformers' mask for a forward call (built by ``masking_utils.sdpa_mask`` from the
  very mask functions the model asked for) and accepts it only if kernelsel reproduces it exactly: sequence
  ``b`` owns keys ``[key_start[b], key_end[b])`` (left padding before them; a static cache's unused slots
  after), its last ``queries[b]`` query rows are real and sit at the last positions of those keys
  (bottom-right aligned), each seeing the keys at or before its position (causal) or all of them, limited to
  ``[p - W + 1, p]`` when the mask was built with a sliding window ``W``.  Anything else -- a custom mask
  function, packed sequences, chunked or bidirectional-window attention, right padding in the middle of a
  sequence -- is refused with what differs, never approximated.
* ``Paging`` builds, once per forward and page size, the block table, sequence lengths, ``cu_seqlens`` and
  the gather indices that turn dense keys into the paged NHD cache of ``registry.contracts`` (one gather per
  layer) and queries into ragged rows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

LAYOUT_ATTRIBUTE = "_kernelsel_layout"
"""The attribute of the mask tensor that carries its ``SequenceLayout`` (or its refusal) to the attention calls."""


@dataclass
class SequenceLayout:
    """Which keys and query rows of the dense tensors belong to each sequence, and the masking rule."""

    key_start: list[int]
    key_end: list[int]
    queries: list[int]
    q_length: int
    kv_length: int
    causal: bool
    window: Optional[int]
    device: torch.device
    _paging: dict = field(default_factory=dict, repr=False)

    @classmethod
    def unmasked(cls, batch: int, q_length: int, kv_length: int, causal: bool, device: torch.device) -> "SequenceLayout":
        """No mask given: every key of every sequence, every query row real (what sdpa does with ``is_causal``)."""
        return cls([0] * batch, [kv_length] * batch, [q_length] * batch, q_length, kv_length, causal, None, device)

    @property
    def batch(self) -> int:
        return len(self.key_start)

    @property
    def decode(self) -> bool:
        """One new token per sequence: the step runs ``mha_decode`` / ``mla_decode``."""
        return self.q_length == 1

    def paging(self, page_size: int) -> "Paging":
        """The paged view of this layout (built once per forward and page size, shared by every layer)."""
        paging = self._paging.get(page_size)
        if paging is None:
            paging = self._paging[page_size] = Paging(self, page_size)
        return paging


class Paging:
    """Block table, lengths and gather indices for one layout and page size (host work once per forward).

    Sequence ``b`` gets pages ``b*P .. b*P+P-1`` of a per-layer pool (``P`` = pages of the longest sequence);
    its token ``t`` is dense key ``key_start[b] + t``.  Queries are the last ``queries[b]`` rows of sequence
    ``b``, in batch order.
    """

    def __init__(self, layout: SequenceLayout, page_size: int):
        self.layout, self.page_size = layout, page_size
        device, batch, lk = layout.device, layout.batch, layout.kv_length
        lengths = [e - s for s, e in zip(layout.key_start, layout.key_end)]
        self.max_pages = max(1, max(-(-n // page_size) for n in lengths))
        slots = self.max_pages * page_size
        as_int32 = dict(dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor(lengths, **as_int32)
        self.block_table = (torch.arange(batch * self.max_pages, **as_int32)).view(batch, self.max_pages)
        start = torch.tensor(layout.key_start, dtype=torch.long, device=device)
        self._page_batch = torch.arange(batch, device=device).unsqueeze(1)  # [B, 1]
        self._page_token = (start.unsqueeze(1) + torch.arange(slots, device=device)).clamp_(max=max(lk - 1, 0))
        q_counts = layout.queries
        self.cu_seqlens_q = torch.tensor([0] + _cumsum(q_counts), **as_int32)
        self.cu_seqlens_kv = torch.tensor([0] + _cumsum(lengths), **as_int32)
        lq = layout.q_length
        rows_b = [b for b, n in enumerate(q_counts) for _ in range(n)]
        rows_i = [lq - n + i for n in q_counts for i in range(n)]
        self._row_batch = torch.tensor(rows_b, dtype=torch.long, device=device)
        self._row_index = torch.tensor(rows_i, dtype=torch.long, device=device)
        keys_b = [b for b, n in enumerate(lengths) for _ in range(n)]
        keys_t = [s + t for s, n in zip(layout.key_start, lengths) for t in range(n)]
        self._key_batch = torch.tensor(keys_b, dtype=torch.long, device=device)
        self._key_token = torch.tensor(keys_t, dtype=torch.long, device=device)
        self.tokens = len(rows_b)
        self.every_row = self.tokens == batch * lq  # no padded query rows: outputs need no scatter

    def pages(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, Lk, D]`` dense keys or values -> ``[B*P, S, H, D]`` paged cache (one gather)."""
        paged = x.transpose(1, 2)[self._page_batch, self._page_token]  # [B, P*S, H, D]
        return paged.reshape(-1, self.page_size, *paged.shape[2:])

    def ragged_keys(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, Lk, D]`` -> ``[sum(lengths), H, D]`` (each sequence's keys, in order)."""
        return x.transpose(1, 2)[self._key_batch, self._key_token]

    def query_rows(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, H, Lq, D]`` -> ``[T, H, D]``: the real query rows, token-major."""
        if self.every_row:
            return q.transpose(1, 2).reshape(-1, *q.shape[1:2], q.shape[-1])
        return q.transpose(1, 2)[self._row_batch, self._row_index]

    def dense_output(self, out: torch.Tensor) -> torch.Tensor:
        """``[T, H, Dv]`` kernel output -> ``[B, Lq, H, Dv]`` (padded query rows are zero)."""
        layout = self.layout
        if self.every_row:
            return out.view(layout.batch, layout.q_length, *out.shape[1:])
        dense = out.new_zeros(layout.batch, layout.q_length, *out.shape[1:])
        dense[self._row_batch, self._row_index] = out
        return dense


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


# ------------------------------------------------------------------ the mask function


def _sdpa_mask_keywords() -> frozenset[str]:
    from transformers.masking_utils import sdpa_mask

    return frozenset(inspect.signature(sdpa_mask).parameters)


_SDPA_KEYWORDS: Optional[frozenset[str]] = None


def full_boolean_mask(**kwargs: Any) -> torch.Tensor:
    """transformers' own boolean mask ``[B, 1, Lq, Lk]`` for these mask-interface arguments, never skipped.

    ``sdpa_mask`` builds it from the mask functions the model combined (causal, sliding window, padding, any
    overlay), so what kernelsel checks is exactly what eager and sdpa attend with.  Its shortcuts (None for a
    plain causal or bidirectional mask) are turned off.
    """
    global _SDPA_KEYWORDS
    from transformers.masking_utils import sdpa_mask

    if _SDPA_KEYWORDS is None:
        _SDPA_KEYWORDS = _sdpa_mask_keywords()
    call = {k: v for k, v in kwargs.items() if k in _SDPA_KEYWORDS or k in ("use_vmap", "device")}
    call.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    mask = sdpa_mask(**call)
    if mask is None:  # not expected with both skips off; kept as an explicit error rather than a silent path
        raise RuntimeError("transformers' sdpa_mask returned no mask with allow_is_*_skip=False")
    return mask


def mask_layout(mask: torch.Tensor, window: Optional[int]) -> tuple[Optional[SequenceLayout], str]:
    """The layout a boolean ``[B, 1, Lq, Lk]`` mask describes, or ``(None, what differs)`` if kernelsel cannot
    reproduce it exactly (see the module docstring).  One host read of three ``[B]`` vectors."""
    visible = mask[:, 0].to(torch.bool)
    batch, lq, lk = visible.shape
    device = visible.device
    keys = torch.arange(lk, device=device)
    seen = visible.any(-1)  # [B, Lq]
    first = torch.where(visible, keys, lk).amin(-1)
    last = torch.where(visible, keys, -1).amax(-1)
    start = torch.where(seen, first, lk).amin(-1)
    end = last.amax(-1) + 1
    queries = seen.sum(-1)
    key_start, key_end, query_count = torch.stack([start, end, queries]).tolist()
    for b in range(batch):
        if key_end[b] <= key_start[b]:
            return None, f"sequence {b} of the batch sees no key at all"
    s, e, q = (torch.tensor(v, device=device).view(batch, 1, 1) for v in (key_start, key_end, query_count))
    row = torch.arange(lq, device=device).view(1, lq, 1)
    col = keys.view(1, 1, lk)
    position = e - lq + row  # bottom-right: the last query row sits at the last key
    inside = (row >= lq - q) & (col >= s) & (col < e)
    windowed = inside if window is None else inside & (col > position - window)
    if torch.equal(visible, windowed & (col <= position)):
        causal = True
    elif window is None and torch.equal(visible, inside):
        causal = False
    else:
        what = "causal" if window is None else f"causal with sliding_window {window}"
        return None, (f"the attention mask is not {what} over left-padded sequences: transformers' mask "
                      f"functions combined something kernelsel's kernels cannot reproduce (a custom or "
                      f"bidirectional overlay, packed sequences, chunked attention, or padding inside a sequence)")
    layout = SequenceLayout(key_start, key_end, query_count, lq, lk, causal, window, device)
    return layout, ""


def kernelsel_mask(**kwargs: Any) -> torch.Tensor:
    """transformers' ``AttentionMaskInterface`` function for kernelsel.

    Returns the full boolean mask (so model code that reads the mask keeps working), carrying its
    ``SequenceLayout`` as an attribute -- or the reason it cannot be reproduced, which the attention
    function raises naming the layer.  ``local_size`` is the sliding window transformers built the mask with.
    """
    mask = full_boolean_mask(**kwargs)
    layout, refusal = mask_layout(mask, kwargs.get("local_size"))
    setattr(mask, LAYOUT_ATTRIBUTE, layout if layout is not None else refusal)
    return mask
