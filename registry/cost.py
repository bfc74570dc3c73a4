"""What a request costs: the bytes it moves and the FLOPs it computes, from its op's tensor contract.

One owner for these counts (``registry.contracts`` fixes the layouts they count):
the bench workloads divide by them for achieved bandwidth, the perf-table
predictions use them as the terms of a cost model, the plots draw them.

* KV bytes: every cached token of every request is read once -- per token
  ``num_kv_heads * (head_dim_qk + head_dim_vo)`` elements for MHA,
  ``kv_lora_rank + qk_rope_head_dim`` for an MLA latent cache; a sparse MLA
  query reads ``min(topk, kv_len)`` tokens.
* Query/output bytes: the new tokens' queries read and outputs written.
* FLOPs: two per multiply-add of ``Q K^T`` and ``P V`` over the (query, key)
  pairs attention visits: causal, bottom-right aligned, so ``N`` new tokens
  over ``L`` tokens visit ``N*L - N*(N-1)/2`` pairs (``N*L`` when not causal).
  A sliding window is not counted (it is a feature, not part of a bucket).
* Units: work items a kernel can spread over the SMs without splitting a
  request's cache: requests x KV heads for MHA, requests for MLA (one latent head).

Sizes are per request and uniform over the batch (``batch_size``, ``kv_len``,
new tokens: ``q_len`` for the decode ops, ``new_len`` for ``mha_extend`` and
``mha_prefill``), as perf buckets are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from registry.errors import RequestError
from registry.ops import MLA_OPS, RAGGED_OPS
from registry.vocab import DType, Op


@dataclass(frozen=True)
class Cost:
    """The work of one batch: bytes read and written, FLOPs, independent work units."""

    kv_bytes: float
    io_bytes: float
    flops: float
    units: int

    @property
    def bytes(self) -> float:
        return self.kv_bytes + self.io_bytes


def _dtype(value: Any) -> DType:
    return value if isinstance(value, DType) else DType(value)


def _need(request: Any, *fields: str) -> list[int]:
    missing = [f for f in fields if getattr(request, f, None) is None]
    if missing:
        raise RequestError(f"the cost of {request.op.value} needs {', '.join(missing)}")
    return [getattr(request, f) for f in fields]


def kv_bytes_per_token(request: Any) -> int:
    """Cache bytes of one token of one request (all KV heads; K and V, or the latent row)."""
    itemsize = _dtype(request.kv_dtype).itemsize
    if request.op in MLA_OPS:
        rank, rope = _need(request, "kv_lora_rank", "qk_rope_head_dim")
        return (rank + rope) * itemsize
    d, hkv = _need(request, "head_dim_qk", "num_kv_heads")
    return hkv * (d + (request.head_dim_vo or d)) * itemsize


def new_tokens(request: Any) -> Optional[int]:
    """Query tokens per request: ``new_len`` for the ragged ops, ``q_len`` for decode."""
    return request.new_len if request.op in RAGGED_OPS else request.q_len


def visited_pairs(new: int, kv_len: int, causal: bool = True) -> float:
    """(query, key) pairs ``new`` tokens at the end of ``kv_len`` tokens attend to."""
    new = min(new, kv_len)
    return new * kv_len - (new * (new - 1) / 2 if causal else 0)


def request_cost(request: Any, *, batch: Optional[int] = None, kv_len: Optional[int] = None,
                 new: Optional[int] = None) -> Cost:
    """The cost of ``request`` (its ``batch_size``, ``kv_len`` and new tokens, unless given).

    Raises ``RequestError`` naming the fields it lacks.
    """
    batch = batch if batch is not None else request.batch_size
    kv_len = kv_len if kv_len is not None else request.kv_len
    new = new if new is not None else new_tokens(request)
    if batch is None or kv_len is None or new is None:
        lacking = [name for name, v in (("batch_size", batch), ("kv_len", kv_len), ("new_len", new)) if v is None]
        raise RequestError(f"the cost of {request.op.value} needs {', '.join(lacking)}")
    q_size, out_size = _dtype(request.q_dtype).itemsize, _dtype(request.out_dtype or request.q_dtype).itemsize
    per_token = kv_bytes_per_token(request)
    if request.op in MLA_OPS:
        rank, rope, heads = _need(request, "kv_lora_rank", "qk_rope_head_dim", "num_qo_heads")
        if request.op is Op.SPARSE_MLA_DECODE:
            (topk,) = _need(request, "topk")
            pairs = new * min(topk, kv_len)
            kv_bytes = batch * pairs * per_token
        else:
            pairs = visited_pairs(new, kv_len)
            kv_bytes = batch * kv_len * per_token
        io = batch * new * heads * ((rank + rope) * q_size + rank * out_size)
        return Cost(kv_bytes, io, 2.0 * batch * heads * pairs * (2 * rank + rope), batch)
    d, hkv = _need(request, "head_dim_qk", "num_kv_heads")
    dv = request.head_dim_vo or d
    hq = request.num_qo_heads or hkv
    pairs = visited_pairs(new, kv_len, causal=not getattr(request, "non_causal", False))
    io = batch * new * hq * (d * q_size + dv * out_size)
    return Cost(batch * kv_len * per_token, io, 2.0 * batch * hq * pairs * (d + dv), batch * hkv)
