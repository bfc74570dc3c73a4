"""Launch heuristics for the Triton kernels: tile shapes, split-KV counts, and which MLA kernel runs.

Pure Python (torch and triton only to read the device and the version, in
``num_sms`` and ``device_env``), called from ``plan()``; ``mla_variant`` is
also what ``kernelsel explain`` shows, so it imports nothing.
The numbers come from ``bench/triton_vs_flashinfer.py --sweep`` on an H200
(bench/results/triton_sweep-h200.json, and triton_fp8_sweep-h200.json for
FP8-KV decode); they are performance choices,
never capability facts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from registry.variants import Condition, LaunchEnv, Variant, VariantChoice, choose
from registry.vocab import Arch, DType, parse_arch

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
    split_waves: Optional[float] = None  # programs per SM the split count aims for; None: the op family's
    kernel: str = "portable"  # MLA: "hopper" runs the Gluon sm_90 kernel (mla_hopper), which fixes its own tile

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


FP8_SMALL_TILE_MIN_WORK = 64
"""(row tile, KV head) pairs from which FP8-KV decode switches to one warp per 16 rows."""


def mha_config(
    rows_per_request: int, head_dim: int, head_dim_vo: int, kv_bytes: int = 2,
    work_items: Callable[[int], int] = lambda block_m: 0,
) -> LaunchConfig:
    """Paged MHA: rows = (new tokens x query heads per KV head) of a request.

    ``work_items(block_m)`` counts (row tile, KV head) programs before splitting.

    H200 sweeps at head_dim 128 (bench/results/triton_sweep-h200.json, triton_fp8_sweep-h200.json):

    * 16-bit KV: 64 keys per step, 4 warps, 2 stages (B 64, context 4096: 4.05 TB/s).
    * 1-byte KV with enough work: one warp per 16 rows, 64 keys, one stage,
      splits for about 8 programs per SM (within 6% of the best split count on
      all 12 table shapes).  FP8 tiles are converted to fp16 as MMA operands
      held in registers (ptxas: 199-255 registers per thread), which caps
      occupancy well below what HBM needs; many small programs hide the latency
      best (B 64, context 4096: 0.191 ms against 0.228 ms
      with 4 warps x 128 keys; B 256: 0.70 against 0.87 ms).
    * 1-byte KV with little work (B 1): 4 warps, 128 keys (context 32768: 0.044 ms against 0.047 ms).
    """
    widest = max(head_dim, head_dim_vo)
    cap = 64 if widest <= 128 else 32
    block_m = min(cap, max(16, next_pow2(rows_per_request)))
    if kv_bytes == 1 and widest <= 128 and work_items(block_m) >= FP8_SMALL_TILE_MIN_WORK:
        return LaunchConfig(block_m=block_m, block_n=64, num_warps=block_m // 16, num_stages=1, split_waves=8)
    block_n = (128 if kv_bytes == 1 else 64) if widest <= 128 else 32
    return LaunchConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)


def mla_config(rows_per_request: int, *, hopper: bool = False) -> LaunchConfig:
    """Dense MLA: rows = (new tokens x heads); 64 rows fill a Hopper warpgroup MMA.

    ``hopper``: ``mla_variant`` chose the Gluon sm_90 kernel, which fixes its own tile.

    H200, 128 heads, context 8192 (bench/results/triton_vs_flashinfer-h200.json):
    the Gluon kernel, which splits each block's scores between the two
    warpgroups, took 0.41 ms at B 64 (0.12 ms at B 16) against the portable
    kernel's 0.65 ms (0.18 ms), whose layout makes both warpgroups compute
    all scores.  Portable sweep (B 64): 64 rows x 64 keys, 8 warps, 2 stages
    took 0.71 ms; 32 keys 0.97 ms; ``value_splits=2`` did not help.
    """
    if hopper:
        return LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=1, kernel="hopper")
    block_m = min(64, max(16, next_pow2(rows_per_request)))
    return LaunchConfig(block_m=block_m, block_n=64, num_warps=8 if block_m >= 64 else 4, num_stages=2)


HOPPER_MLA = Variant("hopper", "the Gluon sm_90 kernel, triton_kernels/mla_hopper.py")
PORTABLE_MLA = Variant("portable", "triton_kernels/mla.py")

HOPPER_MLA_MIN_ROWS = 64
"""Rows (new tokens x heads) per request from which the Gluon kernel runs: one of its 64-row tiles
(``mla_hopper.BLOCK_M``).  Below that the portable kernel's 16/32-row tiles waste less."""

GLUON_MIN_TRITON = (3, 6)
"""Gluon's Hopper API is experimental and moves between releases: run on 3.6, compiled offline with 3.9."""

hopper_mla_disabled: Optional[str] = None
"""Why the Gluon MLA kernel cannot be built or imported in this process (``disable_hopper_mla``); None while it can."""


def mla_variant(request: Any, env: LaunchEnv, *, q_len: Optional[int] = None, forced: Optional[str] = None) -> VariantChoice:
    """Which dense MLA kernel runs: ``hopper`` (``mla_hopper``) when every condition holds, else ``portable``.

    The one decision ``TritonMLADecode.plan()`` launches and explain shows.
    The Gluon kernel needs warpgroup MMA (sm_90), a 16-bit cache of the
    query's dtype, a power-of-two ``kv_lora_rank`` from 64 to 512 (half of it
    is one warpgroup MMA's width, at most 256) and a power-of-two
    ``qk_rope_head_dim`` from 16 -- the shapes its layouts and shared memory
    (227 KB at rank 512) were built for -- and Triton >= 3.6; it runs from
    one full row tile per request.  ``q_len``: the plan's new tokens per
    request (explain: None, any up to ``request.q_len``).  ``forced``: the
    adapter's ``tuning["kernel"]``.
    """
    conditions = [_arch_condition(env.arch), _dtype_condition(request), _shape_condition(request),
                  _triton_condition(env), _rows_condition(request, q_len)]
    if hopper_mla_disabled is not None:
        conditions.append(Condition(f"disabled in this process: {hopper_mla_disabled}", False))
    if forced not in (None, HOPPER_MLA.name):
        conditions.append(Condition(f"tuning kernel={forced!r}", False))
    return choose([(HOPPER_MLA, conditions), (PORTABLE_MLA, ())])


def _arch_condition(arch: Optional[Arch]) -> Condition:
    if arch is None:
        return Condition("no CUDA device (Triton's interpreter)", False)
    if arch is not Arch.SM_90:
        return Condition(f"arch {arch}: warpgroup MMA is sm_90 only", False)
    return Condition(str(arch), True)


def _dtype_condition(request: Any) -> Condition:
    q, kv = DType(str(request.q_dtype)), DType(str(request.kv_dtype))
    if q is kv and q in (DType.BF16, DType.FP16):
        return Condition(f"a {kv} cache of the query's dtype", True)
    return Condition(f"kv_dtype {kv}: needs a 16-bit cache of the query's dtype ({q})", False)


def _shape_condition(request: Any) -> Condition:
    rank, rope = getattr(request, "kv_lora_rank", None), getattr(request, "qk_rope_head_dim", None)
    unset = tuple(f for f, v in (("kv_lora_rank", rank), ("qk_rope_head_dim", rope)) if v is None)
    if unset:
        return Condition("kv_lora_rank a power of two in 64..512 and qk_rope_head_dim one >= 16", None, unset)
    text = f"kv_lora_rank {rank}, qk_rope_head_dim {rope}"
    if 64 <= rank <= 512 and not rank & (rank - 1) and rope >= 16 and not rope & (rope - 1):
        return Condition(f"{text} fit its layouts", True)
    return Condition(f"{text}: its layouts need a power-of-two rank in 64..512 and rope >= 16", False)


def _triton_condition(env: LaunchEnv) -> Condition:
    want = ".".join(map(str, GLUON_MIN_TRITON))
    version = env.versions.get("triton")
    if version is None:
        if env.assumed:
            return Condition(f"triton >= {want} assumed (hypothetical platform)", True)
        return Condition(f"triton >= {want}", None, ("the installed triton",))
    if triton_version(version) < GLUON_MIN_TRITON:
        return Condition(f"triton {version} < {want} (Gluon's Hopper API)", False)
    return Condition(f"triton {version} >= {want}", True)


def _rows_condition(request: Any, q_len: Optional[int]) -> Condition:
    heads, least = getattr(request, "num_qo_heads", None), HOPPER_MLA_MIN_ROWS
    if heads is None:
        return Condition(f"q_len x num_qo_heads >= {least}", None, ("num_qo_heads",))
    lo, hi = (q_len, q_len) if q_len is not None else (1, request.q_len)
    if lo * heads >= least:
        return Condition(f"{lo * heads} rows per request (q_len {lo} x {heads} heads) >= {least}", True)
    if hi * heads < least:
        return Condition(f"{hi * heads} rows per request (q_len {hi} x {heads} heads) < {least}", False)
    need = -(-least // heads)
    return Condition(f"the plan's q_len >= {need} ({need} x {heads} heads >= {least} rows)", None, ("the plan's q_len",))


def triton_version(text: str) -> tuple[int, ...]:
    """``"3.9.0+git1a2b"`` -> ``(3, 9)``."""
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def device_env(device: Any) -> LaunchEnv:
    """The ``LaunchEnv`` of a torch device in this process: its arch (None off CUDA) and triton's version."""
    import torch
    import triton

    device = torch.device(device)
    arch = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        try:
            arch = parse_arch(f"{major}.{minor}")
        except ValueError:  # outside the vocabulary: not sm_90 either
            arch = None
    return LaunchEnv(arch=arch, versions={"triton": triton.__version__})


def plan_mla_variant(request: Any, device: Any, q_len: int, forced: Optional[str] = None) -> VariantChoice:
    """``mla_variant`` on ``device`` for a plan of ``q_len`` tokens per request; a Gluon module that does not
    import here disables the Hopper kernel for the process (explain shows why) and the portable one runs."""
    choice = mla_variant(request, device_env(device), q_len=q_len, forced=forced)
    if choice.variant is HOPPER_MLA:
        problem = _gluon_import_problem()
        if problem is not None:
            disable_hopper_mla(problem)
            logging.getLogger("kernelsel").warning(
                "triton-mla-decode: %s; using the portable Triton kernel from now on", problem)
            choice = mla_variant(request, device_env(device), q_len=q_len, forced=forced)
    return choice


def disable_hopper_mla(reason: str) -> None:
    """Route every later MLA plan in this process to the portable kernel (a build of the Gluon one failed)."""
    global hopper_mla_disabled
    hopper_mla_disabled = reason


@functools.lru_cache(maxsize=None)
def _gluon_import_problem() -> Optional[str]:
    try:
        from registry.adapters.triton_kernels import mla_hopper  # noqa: F401  (needs triton's Gluon Hopper API)
    except (ImportError, AttributeError) as exc:
        return f"the Gluon Hopper API does not import ({type(exc).__name__}: {exc})"
    return None


def sparse_mla_config(heads: int) -> LaunchConfig:
    """Sparse MLA: rows = heads of one token."""
    block_m = min(64, max(16, next_pow2(heads)))
    return LaunchConfig(block_m=block_m, block_n=32, num_warps=8 if block_m >= 64 else 4, num_stages=2)


def pow2_floor(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 1


def kv_splits(
    work_items: int, max_keys: int, sms: int, *, block_n: int, min_keys: int, waves: float,
    partial_bytes_per_split: int = 0,
) -> int:
    """Key-range splits: a power of two near ``waves x SMs / work_items`` programs per SM.

    Powers of two keep the last wave of programs full (H200, B 8, context
    32768: 8 splits 0.263 ms, 9 splits 0.360 ms).  Each split keeps at least
    ``min_keys`` keys and one block; ``MAX_SPLITS`` and the partial-buffer
    budget cap the count.  Memory-bound MHA wants about 4 waves, compute-bound
    MLA about 1 (H200: MLA B 16 context 8192, 4 splits 0.245 ms, 16 splits 0.280 ms).
    """
    if work_items <= 0 or max_keys <= 0:
        return 1
    want = pow2_floor(waves * sms / work_items)
    by_len = pow2_floor(max_keys / max(min_keys, block_n))
    splits = min(want, by_len, MAX_SPLITS)
    if partial_bytes_per_split and splits > 1:
        splits = pow2_floor(min(splits, PARTIAL_BYTES // partial_bytes_per_split))
    return max(1, splits)


MHA_SPLITS = dict(min_keys=64, waves=4)
"""Memory-bound paged MHA (H200: B 1 context 4096 best at 48-64 splits, B 64 at 1)."""

MLA_SPLITS = dict(min_keys=32, waves=1)
"""Compute-bound MLA (H200: B 1 context 1024 best at 32 splits, B 16 context 1024 at 4)."""
