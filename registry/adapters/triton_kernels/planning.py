"""Launch heuristics for the Triton kernels: tile shapes and split-KV counts.

Pure Python (torch only to read the SM count), called from ``plan()``.
The numbers were tuned on an H200 with ``bench/triton_vs_flashinfer.py``;
they are performance choices, never capability facts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

MAX_SPLITS = 64
"""Upper bound on key-range splits (the merge kernel reads all of them per row)."""

PARTIAL_BYTES = 1 << 28
"""Cap on the fp32 split partials; beyond it the split count is reduced."""


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and Triton launch options of one stage-1 kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    value_splits: int = 1  # MLA: programs sharing one row tile's output columns

    def replace(self, **changes: Any) -> "LaunchConfig":
        fields = {**self.__dict__, **{k: v for k, v in changes.items() if k in self.__dict__}}
        return LaunchConfig(**fields)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: Any) -> int:
    """Multiprocessors of ``device`` (a CUDA device), or a small stand-in for the CPU interpreter."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def mha_config(rows_per_request: int, head_dim: int, head_dim_vo: int) -> LaunchConfig:
    """Paged MHA: rows = (new tokens x query heads per KV head) of a request."""
    widest = max(head_dim, head_dim_vo)
    cap = 64 if widest <= 128 else 32
    block_m = min(cap, max(16, next_pow2(rows_per_request)))
    block_n = 64 if widest <= 128 else 32
    return LaunchConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=3)


def mla_config(rows_per_request: int) -> LaunchConfig:
    """Dense MLA: rows = (new tokens x heads); 64 rows fill a Hopper warpgroup MMA."""
    block_m = min(64, max(16, next_pow2(rows_per_request)))
    return LaunchConfig(block_m=block_m, block_n=32, num_warps=8 if block_m >= 64 else 4, num_stages=2)


def sparse_mla_config(heads: int) -> LaunchConfig:
    """Sparse MLA: rows = heads of one token."""
    block_m = min(64, max(16, next_pow2(heads)))
    return LaunchConfig(block_m=block_m, block_n=32, num_warps=8 if block_m >= 64 else 4, num_stages=2)


def kv_splits(
    work_items: int, max_keys: int, sms: int, *, block_n: int, min_keys: int = 256, waves: int = 4,
    partial_bytes_per_split: int = 0,
) -> int:
    """Key-range splits so ``work_items x splits`` programs cover ``waves`` x the SMs.

    Each split keeps at least ``min_keys`` keys (and one block), the count is
    capped by ``MAX_SPLITS`` and by the partial-buffer budget.
    """
    if work_items <= 0 or max_keys <= 0:
        return 1
    want = -(-waves * sms // work_items)
    by_len = max(1, max_keys // max(min_keys, block_n))
    splits = max(1, min(want, by_len, MAX_SPLITS))
    if partial_bytes_per_split and splits > 1:
        splits = max(1, min(splits, PARTIAL_BYTES // partial_bytes_per_split))
    return splits
