"""Tensor contracts: one per op, shared by every adapter of that op.

Every adapter of an op takes the same ``plan()`` metadata and the same
``run()`` arguments, so swapping kernels changes nothing for the caller.
Shapes use these letters:

    B   batch (requests)            T   query tokens in the batch
    Hq  query heads (num_qo_heads)  Hkv KV heads (num_kv_heads)
    D   head_dim_qk                 Dv  head_dim_vo
    P   pages in the cache pool     S   page_size (tokens per page)
    R   kv_lora_rank                Dr  qk_rope_head_dim
    K   topk (sparse MLA)

Layouts (the ones engines already keep; adapters convert for their library):

* paged KV cache, MHA: ``k_cache``/``v_cache`` are ``[P, S, Hkv, D]`` (NHD).
  ``block_table`` is int32 ``[B, max_pages]``, ``seq_lens`` is int32 ``[B]``:
  request ``b`` owns tokens ``0..seq_lens[b]-1`` stored at page
  ``block_table[b, t // S]``, slot ``t % S``.  ``seq_lens`` counts every token
  in the cache *including* the new tokens of this step.
* latent MLA cache: ``kv_cache`` is ``[P, S, R + Dr]`` (the nope latent then
  the rope part, one tensor, as trtllm-gen and XQA want; FlashInfer's FA
  wrappers get views of it).
* queries are token-major: ``q`` is ``[T, Hq, D]``; for decode ``T = B * q_len``
  and the ``q_len`` tokens of request ``b`` are rows ``b*q_len .. b*q_len+q_len-1``.

Semantics (what the torch reference computes; every kernel must match it):

* scores ``s = (q . k) * sm_scale``; ``sm_scale`` defaults to
  ``1/sqrt(D)`` for MHA and ``1/sqrt(qk_nope_head_dim + Dr)`` for MLA (the
  pre-absorption head dim: DeepSeek's 1/sqrt(192)); ``sm_scale()`` below.
* ``logits_soft_cap > 0``: ``s = cap * tanh(s / cap)`` (after scaling).
* causal: query token ``i`` of a request with ``q_len`` new tokens and
  ``kv_len`` cached tokens sits at position ``kv_len - q_len + i`` and sees
  keys at positions ``<=`` its own (bottom-right aligned).
* sliding window ``window_left = W >= 0``: a query at position ``p`` sees keys
  in ``[p - W, p]``; ``-1`` disables the window.
* sinks: one fp32 logit per query head added to the softmax denominator
  only: ``o = sum_j e^{s_j} v_j / (e^{sink} + sum_j e^{s_j})``.
* LSE (for decode-context-parallel merging): fp32 ``[T, Hq]``, **natural
  log** of the softmax denominator (including the sink term when sinks are
  given).  FlashInfer returns base 2 by default; adapters convert.
* FP8 inputs: the real value is ``stored * scale``; ``q_scale``, ``k_scale``,
  ``v_scale`` (MHA) and ``kv_scale`` (MLA) are Python floats or one-element
  fp32 tensors on the kernel's device, and both forms must give the same
  result (vllm-project/vllm#43827); ``scale_arg()`` below.
* the output has ``out_dtype`` (default: the query dtype; bf16 when the
  query is FP8); ``output_dtype()`` below.

``run()`` never allocates when ``out=`` (and ``lse=`` where an LSE is
returned) are given, never synchronises with the host, and is capturable in
a CUDA graph.  ``plan()`` runs once per batch shape outside graph capture;
it may read ``seq_lens`` on the host, build indices and size workspaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional, Protocol, Union

from registry.errors import AdapterInputError, brief
from registry.vocab import DType

if TYPE_CHECKING:  # torch is never imported by the registry itself
    import torch

    Scale = Union[float, "torch.Tensor"]
else:
    Scale = Any


@dataclass(frozen=True)
class AttentionOptions:
    """Per-model options fixed at plan time (FlashInfer bakes them into the plan)."""

    sm_scale: Optional[float] = None
    window_left: int = -1
    logits_soft_cap: float = 0.0


@dataclass(frozen=True)
class DecodeMetadata(AttentionOptions):
    """plan() input of ``mha_decode``, ``mla_decode`` and ``sparse_mla_decode``.

    ``q_len`` new tokens per request (uniform; 1 for plain decode, >1 for
    multi-token / speculative decode).  ``seq_lens`` includes them.
    """

    block_table: "torch.Tensor" = None  # int32 [B, max_pages]
    seq_lens: "torch.Tensor" = None  # int32 [B]
    q_len: int = 1


@dataclass(frozen=True)
class ExtendMetadata(AttentionOptions):
    """plan() input of ``mha_extend``: ragged new tokens over a paged cache.

    ``cu_seqlens_q`` int32 ``[B+1]`` delimits each request's new tokens in
    ``q``; the cache already holds prefix *and* new tokens (``seq_lens``).
    """

    block_table: "torch.Tensor" = None  # int32 [B, max_pages]
    seq_lens: "torch.Tensor" = None  # int32 [B]
    cu_seqlens_q: "torch.Tensor" = None  # int32 [B+1]
    causal: bool = True


@dataclass(frozen=True)
class PrefillMetadata(AttentionOptions):
    """plan() input of ``mha_prefill``: fresh ragged Q/K/V (postwrite)."""

    cu_seqlens_q: "torch.Tensor" = None  # int32 [B+1]
    cu_seqlens_kv: "torch.Tensor" = None  # int32 [B+1]
    causal: bool = True


class AttentionResult(NamedTuple):
    """What every ``run()`` returns: the output and, if requested, the LSE."""

    out: "torch.Tensor"
    lse: Optional["torch.Tensor"] = None


class MHADecode(Protocol):
    """``mha_decode``: q ``[B*q_len, Hq, D]``; k_cache/v_cache ``[P, S, Hkv, D|Dv]``."""

    def plan(self, metadata: DecodeMetadata) -> None: ...

    def run(
        self,
        q: "torch.Tensor",
        k_cache: "torch.Tensor",
        v_cache: "torch.Tensor",
        *,
        sinks: Optional["torch.Tensor"] = None,
        q_scale: Scale = 1.0,
        k_scale: Scale = 1.0,
        v_scale: Scale = 1.0,
        out: Optional["torch.Tensor"] = None,
        lse: Optional["torch.Tensor"] = None,
    ) -> AttentionResult: ...


class MHAExtend(Protocol):
    """``mha_extend``: q ``[T, Hq, D]`` (ragged, ``cu_seqlens_q``) over the paged cache."""

    def plan(self, metadata: ExtendMetadata) -> None: ...

    def run(
        self,
        q: "torch.Tensor",
        k_cache: "torch.Tensor",
        v_cache: "torch.Tensor",
        *,
        sinks: Optional["torch.Tensor"] = None,
        q_scale: Scale = 1.0,
        k_scale: Scale = 1.0,
        v_scale: Scale = 1.0,
        out: Optional["torch.Tensor"] = None,
        lse: Optional["torch.Tensor"] = None,
    ) -> AttentionResult: ...


class MHAPrefill(Protocol):
    """``mha_prefill``: q ``[Tq, Hq, D]``, k ``[Tk, Hkv, D]``, v ``[Tk, Hkv, Dv]``."""

    def plan(self, metadata: PrefillMetadata) -> None: ...

    def run(
        self,
        q: "torch.Tensor",
        k: "torch.Tensor",
        v: "torch.Tensor",
        *,
        sinks: Optional["torch.Tensor"] = None,
        q_scale: Scale = 1.0,
        k_scale: Scale = 1.0,
        v_scale: Scale = 1.0,
        out: Optional["torch.Tensor"] = None,
        lse: Optional["torch.Tensor"] = None,
    ) -> AttentionResult: ...


class MLADecode(Protocol):
    """``mla_decode``: q_nope ``[T, Hq, R]``, q_pe ``[T, Hq, Dr]``, kv_cache ``[P, S, R+Dr]``.

    Output ``[T, Hq, R]`` (latent space; the caller applies W_UV).
    """

    def plan(self, metadata: DecodeMetadata) -> None: ...

    def run(
        self,
        q_nope: "torch.Tensor",
        q_pe: "torch.Tensor",
        kv_cache: "torch.Tensor",
        *,
        q_scale: Scale = 1.0,
        kv_scale: Scale = 1.0,
        sinks: Optional["torch.Tensor"] = None,
        out: Optional["torch.Tensor"] = None,
        lse: Optional["torch.Tensor"] = None,
    ) -> AttentionResult: ...


class SparseMLADecode(Protocol):
    """``sparse_mla_decode``: MLA over the top-k selected cache positions only.

    ``topk_indices`` int32 ``[T, K]``: per query token, *logical* token
    positions ``0..seq_lens[b]-1`` of its request (translated through the
    block table by the adapter), ``-1`` for unused slots.  ``K`` is padded
    to a multiple of 4 (16-byte aligned rows, vllm-project/vllm#43827).  Causality and
    windows are the indexer's business: only the listed positions are read.
    """

    def plan(self, metadata: DecodeMetadata) -> None: ...

    def run(
        self,
        q_nope: "torch.Tensor",
        q_pe: "torch.Tensor",
        kv_cache: "torch.Tensor",
        topk_indices: "torch.Tensor",
        *,
        q_scale: Scale = 1.0,
        kv_scale: Scale = 1.0,
        sinks: Optional["torch.Tensor"] = None,
        out: Optional["torch.Tensor"] = None,
        lse: Optional["torch.Tensor"] = None,
    ) -> AttentionResult: ...


OP_CONTRACTS = {
    "mha_decode": MHADecode,
    "mha_extend": MHAExtend,
    "mha_prefill": MHAPrefill,
    "mla_decode": MLADecode,
    "sparse_mla_decode": SparseMLADecode,
}
"""Protocol per op name; every adapter of the op implements it."""


# ------------------------------------------------------------- facts of the contract
# Each rule below is decided here and nowhere else: the adapters, the request
# model, the workloads, the torch reference and the tools all call these.

SCALE_HEAD_DIMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "mha_decode": ("head_dim_qk",),
    "mha_extend": ("head_dim_qk",),
    "mha_prefill": ("head_dim_qk",),
    "mla_decode": ("qk_nope_head_dim", "qk_rope_head_dim"),
    "sparse_mla_decode": ("qk_nope_head_dim", "qk_rope_head_dim"),
})
"""Per op, the request fields whose sum is the head dim of the default ``sm_scale``.

For MLA that is the query/key head dim *before* absorption (DeepSeek:
128 + 64 = 192), not the width the absorbed kernels multiply
(``kv_lora_rank + qk_rope_head_dim``).
"""


def softmax_scale(head_dim: int) -> float:
    """``1/sqrt(head_dim)``: the default ``sm_scale`` of scores over ``head_dim`` channels."""
    return 1.0 / math.sqrt(head_dim)


def default_sm_scale(request: Any) -> Optional[float]:
    """The op's default ``sm_scale`` for ``request``; None when the request leaves a field it needs unset."""
    dims = [getattr(request, field, None) for field in SCALE_HEAD_DIMS[str(request.op)]]
    return None if None in dims else softmax_scale(sum(dims))


def sm_scale(options: AttentionOptions, request: Any, *, kernel: str) -> float:
    """The ``sm_scale`` a kernel applies: ``options.sm_scale`` when given, else the op's default.

    The rule for MLA's ``qk_nope_head_dim``, the same for every kernel: a
    request may leave it out, and then ``plan()`` needs an explicit
    ``sm_scale``.  The field enters no kernel's arithmetic -- the absorbed
    kernels multiply ``q_nope`` (width ``kv_lora_rank``) and ``q_pe`` with
    the latent cache, and FlashInfer's trtllm-gen/XQA MLA entry points take
    it only as an autotuner cache key (flashinfer/mla/_core.py:4863, 3496)
    -- so it matters only for this default.  Requiring it at selection would
    refuse engines that pass their own scale anyway (DeepSeek-V3's YaRN
    ``mscale`` multiplies ``1/sqrt(192)``); defaulting it would guess a
    model fact.  A plan without either raises ``AdapterInputError`` naming
    the request field and the metadata field that would fix it.
    """
    if options.sm_scale is not None:
        return float(options.sm_scale)
    scale = default_sm_scale(request)
    if scale is None:
        fields = SCALE_HEAD_DIMS[str(request.op)]
        missing = [f for f in fields if getattr(request, f, None) is None]
        meta = type(options).__name__
        raise AdapterInputError(
            f"{kernel}: {meta}.sm_scale is not set and its default 1/sqrt({' + '.join(fields)}) needs "
            f"{' and '.join('request.' + f for f in missing)}, which the request leaves unset; pass "
            f"{meta}(sm_scale=...) or select with {', '.join(f + '=...' for f in missing)}"
        )
    return scale


def output_dtype(q_dtype: Union[DType, str], out_dtype: Union[DType, str, None] = None) -> DType:
    """``out_dtype`` when given, else the query's dtype -- bf16 for an FP8 query (an FP8 output would need a scale)."""
    if out_dtype is not None:
        return DType(str(out_dtype))
    q = DType(str(q_dtype))
    return DType.BF16 if q.is_fp8 else q


def scale_arg(name: str, value: Any, *, device: Any = None, contract: str = "") -> Any:
    """An FP8 scale argument checked against the contract: a float, or the one-element fp32 tensor as given.

    A Python number (not a bool) comes back as a float; a one-element fp32
    tensor (on ``device`` when given) comes back unchanged, to be read on the
    device, never on the host.  Anything else raises ``AdapterInputError``
    naming the argument and what is accepted.
    """
    where = f" ({contract})" if contract else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    import torch

    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise AdapterInputError(f"{name}: expected a float or a one-element fp32 tensor, got {brief(value)}{where}")
    if value.dtype != torch.float32:
        raise AdapterInputError(f"{name}: dtype {str(value.dtype).removeprefix('torch.')} not in [float32]{where}")
    if device is not None and value.device != torch.device(device):
        raise AdapterInputError(f"{name}: on {value.device}, expected {device}{where}")
    return value
