"""Priority is data with documented bands (adopted from tokenspeed-kernel's ``Priority``).

Priority only orders kernels that are already eligible; it never makes an
ineligible kernel win.  Pick the **lowest band that fits**: inflating a
kernel's band to win on one platform makes it win everywhere it is not
actually specialised.  A kernel that should win on one arch and not on
another gets two manifest entries with disjoint arch ranges, not an ``if``.

==============  =======  ===================================================
band            range    when to use
==============  =======  ===================================================
reference       0..3     correctness ground truth (torch); never chosen
                         automatically, only when asked for by solution or
                         name.
portable        4..7     generic implementation gated only by its op
                         contract, e.g. this project's Triton kernels.
performant      8..11    generally optimised vendor kernel over a broad arch
                         range, e.g. FlashInfer FA2.
specialized     12..15   highly optimised kernel narrowly gated on arch and
                         shape, e.g. FA3 on sm_90, trtllm-gen on sm_100,
                         XQA-MLA on sm_120.
plugin          16..19   reserved for out-of-tree overlays that must beat
                         the in-tree default; in-tree entries never use it.
==============  =======  ===================================================

Ties break by kernel name, so the order is total and identical everywhere.
"""

from __future__ import annotations

import functools
from enum import IntEnum
from typing import Any


class Band(IntEnum):
    REFERENCE = 0
    PORTABLE = 4
    PERFORMANT = 8
    SPECIALIZED = 12
    PLUGIN = 16


PRIORITY_MAX = 19


@functools.lru_cache(maxsize=64)
def band_of(priority: int) -> Band:
    """The band containing ``priority`` (largest band start <= priority)."""
    return max((b for b in Band if b <= priority), key=int)


@functools.lru_cache(maxsize=64)
def band_name(priority: int) -> str:
    return band_of(priority).name.lower()


def priority_rank_key(kernel: Any) -> tuple[int, str]:
    """How eligible kernels rank without measured times: priority descending, then name (a total order)."""
    return (-kernel.priority, kernel.name)
