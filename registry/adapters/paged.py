"""Paged-KV layout conversions every library adapter needs.

Engines keep the cache as ``block_table`` + ``seq_lens`` (see
``registry.contracts``); FlashInfer wants CSR page lists, sparse kernels want
global slot numbers, ragged kernels want ``cu_seqlens``.  These helpers do
the translation with torch ops only.  Functions marked *plan-time* read
values on the host (a device sync) or produce a data-dependent size, so call
them from ``plan()``, never inside CUDA-graph capture; the others are
capturable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from registry.errors import AdapterInputError

if TYPE_CHECKING:
    import torch


def num_pages(seq_lens: "torch.Tensor", page_size: int) -> "torch.Tensor":
    """Pages each request occupies: ``ceil(seq_lens / page_size)`` (same dtype)."""
    return (seq_lens + (page_size - 1)) // page_size


def last_page_len(seq_lens: "torch.Tensor", page_size: int) -> "torch.Tensor":
    """Tokens in each request's last page, in ``1..page_size``; 0 for an empty request."""
    import torch

    return torch.where(seq_lens > 0, (seq_lens - 1) % page_size + 1, torch.zeros_like(seq_lens))


def block_table_to_csr(
    block_table: "torch.Tensor", seq_lens: "torch.Tensor", page_size: int
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Engine layout -> FlashInfer paged layout ``(kv_indptr, kv_indices, kv_last_page_len)``.

    ``kv_indptr`` int32 ``[B+1]`` delimits each request's used pages in
    ``kv_indices`` int32 ``[sum(num_pages)]`` (the first ``num_pages[b]``
    entries of ``block_table[b]``); ``kv_last_page_len`` int32 ``[B]``.
    *Plan-time*: the length of ``kv_indices`` depends on the data.
    """
    import torch

    seq_lens = seq_lens.to(torch.int32)
    pages = num_pages(seq_lens, page_size)
    kv_indptr = cu_seqlens_from_lens(pages)
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    used = cols[None, :] < pages[:, None]
    kv_indices = block_table[used].to(torch.int32)  # row-major: request by request
    return kv_indptr, kv_indices, last_page_len(seq_lens, page_size).to(torch.int32)


def logical_to_slot(
    indices: "torch.Tensor", block_table: "torch.Tensor", page_size: int, *, q_len: int = 1
) -> "torch.Tensor":
    """Per-token logical positions -> global cache slots ``page * page_size + offset``.

    ``indices`` ``[T, K]`` holds positions ``0..seq_lens[b]-1`` of the request
    that token ``t`` belongs to (``b = t // q_len``, the decode layout) and
    ``-1`` for unused entries, which stay ``-1``.  Returns int32 ``[T, K]``.
    Capturable: no host sync.  Positions beyond the block table are clamped
    to its last column instead of faulting; they break the contract, and
    ``check_topk_indices`` finds them at plan time.
    """
    import torch

    idx = indices.long()
    rows = torch.arange(idx.shape[0], device=idx.device) // q_len
    col = (idx.clamp(min=0) // page_size).clamp(max=block_table.shape[1] - 1)
    page = block_table.long()[rows[:, None], col]
    slot = page * page_size + idx.clamp(min=0) % page_size
    return torch.where(idx < 0, torch.full_like(slot, -1), slot).to(torch.int32)


def cu_seqlens_from_lens(lens: "torch.Tensor") -> "torch.Tensor":
    """Lengths ``[B]`` -> int32 offsets ``[B+1]`` starting at 0."""
    import torch

    out = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=lens.device)
    out[1:] = torch.cumsum(lens, 0)
    return out


def lens_from_cu_seqlens(cu_seqlens: "torch.Tensor") -> "torch.Tensor":
    """Offsets ``[B+1]`` -> lengths ``[B]`` (same dtype)."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def uniform_cu_seqlens(batch: int, q_len: int, device: Any = None) -> "torch.Tensor":
    """int32 ``[B+1]`` offsets for ``q_len`` tokens per request: the decode layout as ragged."""
    import torch

    return torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len


def request_of_token(cu_seqlens: "torch.Tensor", num_tokens: int) -> "torch.Tensor":
    """int64 ``[T]``: which request each of the ``T`` token rows belongs to."""
    import torch

    tokens = torch.arange(num_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)


# --- plan-time validation shared by adapters (each reads values on the host) ---


def _where(contract: str) -> str:
    return f" ({contract})" if contract else ""


def check_paged_metadata(
    block_table: Any,
    seq_lens: Any,
    page_size: Optional[int] = None,
    *,
    contract: str = "",
) -> int:
    """Validate ``block_table`` int32 ``[B, max_pages]`` and ``seq_lens`` int32 ``[B]``; return B.

    With ``page_size`` also checks that every request fits in its row of the
    block table.  *Plan-time* (reads ``seq_lens``).
    """
    import torch

    from registry.adapters.base import check_tensor

    check_tensor("block_table", block_table, dtype=torch.int32, contract=contract)
    if block_table.dim() != 2:
        raise AdapterInputError(
            f"block_table: shape {list(block_table.shape)} does not match [B, max_pages]{_where(contract)}"
        )
    batch = block_table.shape[0]
    check_tensor("seq_lens", seq_lens, shape=[batch], dtype=torch.int32, device=block_table.device, contract=contract)
    if batch and int(seq_lens.min()) < 0:
        raise AdapterInputError(f"seq_lens: negative length {int(seq_lens.min())}{_where(contract)}")
    if page_size is not None and batch:
        longest = int(seq_lens.max())
        capacity = block_table.shape[1] * page_size
        if longest > capacity:
            raise AdapterInputError(
                f"seq_lens: a request holds {longest} tokens but block_table rows address only "
                f"{block_table.shape[1]} pages x page_size {page_size} = {capacity}{_where(contract)}"
            )
    return batch


def check_cu_seqlens(name: str, cu_seqlens: Any, batch: Optional[int] = None, *, device: Any = None, contract: str = "") -> int:
    """Validate int32 offsets ``[B+1]``: start at 0, never decrease; return the total length.

    *Plan-time* (reads the offsets).
    """
    import torch

    from registry.adapters.base import check_tensor

    shape = [None if batch is None else batch + 1]
    check_tensor(name, cu_seqlens, shape=shape, dtype=torch.int32, device=device, contract=contract)
    if cu_seqlens.shape[0] < 1:
        raise AdapterInputError(f"{name}: needs at least one entry (B+1 offsets){_where(contract)}")
    if int(cu_seqlens[0]) != 0:
        raise AdapterInputError(f"{name}: must start at 0, starts at {int(cu_seqlens[0])}{_where(contract)}")
    if cu_seqlens.shape[0] > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise AdapterInputError(f"{name}: offsets decrease; expected monotone non-decreasing{_where(contract)}")
    return int(cu_seqlens[-1])


def check_decode_seq_lens(seq_lens: "torch.Tensor", q_len: int, *, contract: str = "") -> None:
    """Decode: every request's ``seq_lens`` counts its ``q_len`` new tokens.  *Plan-time*."""
    if seq_lens.shape[0] and int(seq_lens.min()) < q_len:
        raise AdapterInputError(f"seq_lens: every request must hold its {q_len} new tokens{_where(contract)}")


def check_extend_seq_lens(cu_seqlens_q: "torch.Tensor", seq_lens: "torch.Tensor", *, contract: str = "") -> None:
    """Extend: no request has more new tokens (``cu_seqlens_q``) than its ``seq_lens`` counts.  *Plan-time*."""
    if bool((lens_from_cu_seqlens(cu_seqlens_q) > seq_lens).any()):
        raise AdapterInputError(
            f"cu_seqlens_q: a request has more new tokens than seq_lens holds; the cache must "
            f"already contain the new tokens{_where(contract)}"
        )


def check_topk_indices(
    indices: Any, seq_lens: "torch.Tensor", *, q_len: int = 1, topk: Optional[int] = None, contract: str = ""
) -> None:
    """Validate int32 ``[T, K]`` logical positions: each ``-1`` or inside its request.

    Reads the indices on the host, so this is for references, tests and
    verification, not for ``run()`` on the hot path.
    """
    import torch

    from registry.adapters.base import check_tensor

    check_tensor(
        "topk_indices", indices, shape=[seq_lens.shape[0] * q_len, topk], dtype=torch.int32,
        device=seq_lens.device, contract=contract,
    )
    lens = seq_lens.long().repeat_interleave(q_len)[:, None]
    bad = (indices < -1) | (indices >= lens)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        raise AdapterInputError(
            f"topk_indices[{t}, {k}] = {int(indices[t, k])} is outside 0..{int(lens[t, 0]) - 1} "
            f"of its request (or -1 for unused){_where(contract)}"
        )
