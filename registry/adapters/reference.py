"""Torch reference for every op: float32 math, any device, the ground truth.

Tests and ``kernelsel verify`` compare every kernel against these functions,
so they implement ``registry.contracts`` literally and nothing more:
dequantise (``stored * scale``), score in float32, soft-cap, mask
(bottom-right causal, left window), softmax whose denominator includes the
sink, natural-log LSE.  One matmul per request (per chunk of tokens for
sparse MLA), so verification runs at real sizes on a GPU; the price is a
host read of ``seq_lens`` / ``cu_seqlens`` and allocation, so the reference
adapters are neither graph-capturable nor fast.

Empty rows: a query that sees no key (an empty request, or a causal query
placed before the first key when it has more new tokens than keys) gets
``out = 0`` and ``lse = log(denominator)``, which is ``-inf`` without sinks
and the head's sink logit with sinks.

The second half of the module wraps the functions in adapters, one per op,
for ``solution: reference`` manifest entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from registry.adapters.base import Adapter, check_tensor, dtype_name, refuse_sparse_options, torch_dtype
from registry.adapters.paged import (
    check_cu_seqlens,
    check_decode_seq_lens,
    check_extend_seq_lens,
    check_paged_metadata,
    check_topk_indices,
    logical_to_slot,
    num_pages,
    uniform_cu_seqlens,
)
from registry.contracts import SCALE_HEAD_DIMS, AttentionResult, output_dtype, scale_arg, softmax_scale
from registry.errors import AdapterInputError

if TYPE_CHECKING:
    import torch

_GATHER_BYTES = 1 << 28
"""Sparse MLA gathers top-k rows in chunks of about this many fp32 bytes (bounds GPU memory)."""


# --------------------------------------------------------------------------- math


def _dequant(x: "torch.Tensor", scale: Any) -> "torch.Tensor":
    """``x * scale`` in float32; a float and a one-element tensor take the same path."""
    import torch

    x = x.float()
    if isinstance(scale, (int, float)) and scale == 1.0:
        return x
    return x * torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())


def _default_out_dtype(q_dtype: "torch.dtype", out_dtype: Any) -> "torch.dtype":
    """``out_dtype`` if given (torch dtype or manifest name), else the contract's ``output_dtype`` for q's dtype."""
    import torch

    if isinstance(out_dtype, torch.dtype):
        return out_dtype
    q_name = dtype_name(q_dtype)
    if q_name is None:  # a dtype outside the manifest's vocabulary (float64 in tests) is its own output dtype
        return q_dtype if out_dtype is None else torch_dtype(out_dtype)
    return torch_dtype(output_dtype(q_name, out_dtype))


def _softmax(s: "torch.Tensor", sink: Optional["torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Probabilities over the last dim and the natural-log denominator, sink included.

    ``s`` holds masked scores (``-inf`` where hidden); ``sink`` has ``s``'s
    shape minus the last dim.  A fully hidden row without a sink gives
    probabilities 0 and LSE ``-inf`` instead of NaN.
    """
    import torch

    full = s if sink is None else torch.cat([s, sink.unsqueeze(-1)], dim=-1)
    lse = torch.logsumexp(full, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - finite.unsqueeze(-1)), lse


def _visible(q_pos: "torch.Tensor", k_pos: "torch.Tensor", causal: bool, window_left: int) -> "torch.Tensor":
    """``[Tq, Tk]`` bool: which keys each query sees (causal: ``k <= q``; window: ``k >= q - W``)."""
    import torch

    seen = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
    if causal:
        seen &= k_pos[None, :] <= q_pos[:, None]
    if window_left >= 0:
        seen &= k_pos[None, :] >= q_pos[:, None] - window_left
    return seen


def _attend(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    *,
    causal: bool,
    window_left: int,
    sm_scale: float,
    logits_soft_cap: float,
    sinks: Optional["torch.Tensor"],
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One request, float32: q ``[Tq, Hq, D]``, k ``[Tk, Hkv, D]``, v ``[Tk, Hkv, Dv]``.

    Query ``i`` sits at position ``Tk - Tq + i`` (bottom-right alignment);
    query head ``h`` reads KV head ``h // (Hq / Hkv)``.
    """
    import torch

    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    group = hq // hkv
    s = torch.einsum("qhgd,khd->hgqk", q.reshape(tq, hkv, group, d), k) * sm_scale
    if logits_soft_cap > 0:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    q_pos = torch.arange(tk - tq, tk, device=q.device)
    k_pos = torch.arange(tk, device=q.device)
    s = s.masked_fill(~_visible(q_pos, k_pos, causal, window_left), float("-inf"))
    sink = None if sinks is None else sinks.float().reshape(hkv, group, 1).expand(hkv, group, tq)
    p, lse = _softmax(s, sink)
    out = torch.einsum("hgqk,khd->qhgd", p, v).reshape(tq, hq, dv)
    return out, lse.permute(2, 0, 1).reshape(tq, hq)


def _check_heads(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv:
        raise AdapterInputError(f"num_qo_heads {hq} must be a multiple of num_kv_heads {hkv} (GQA)")


def _paged_fp32(
    q: "torch.Tensor",
    k_cache: "torch.Tensor",
    v_cache: "torch.Tensor",
    block_table: "torch.Tensor",
    seq_lens: "torch.Tensor",
    cu_seqlens_q: "torch.Tensor",
    *,
    k_scale: Any,
    v_scale: Any,
    **options: Any,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Float32 q over a paged cache, request by request; returns fp32 out and LSE."""
    import torch

    t, hq, _ = q.shape
    page_size, hkv, dv = v_cache.shape[1:]
    _check_heads(hq, hkv)
    if seq_lens.numel() and int(seq_lens.max()) > block_table.shape[1] * page_size:
        raise AdapterInputError(
            f"seq_lens: {int(seq_lens.max())} tokens do not fit in {block_table.shape[1]} pages of {page_size}"
        )
    out = torch.zeros(t, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    starts = cu_seqlens_q.tolist()
    pages_used = num_pages(seq_lens, page_size).tolist()
    for b, kv_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        pages = block_table[b, : pages_used[b]].long()
        k = _dequant(k_cache[pages].flatten(0, 1)[:kv_len], k_scale)
        v = _dequant(v_cache[pages].flatten(0, 1)[:kv_len], v_scale)
        out[q0:q1], lse[q0:q1] = _attend(q[q0:q1], k, v, **options)
    return out, lse


# ------------------------------------------------------------ public reference


def mha_paged(
    q: "torch.Tensor",
    k_cache: "torch.Tensor",
    v_cache: "torch.Tensor",
    block_table: "torch.Tensor",
    seq_lens: "torch.Tensor",
    cu_seqlens_q: "torch.Tensor",
    *,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    sinks: Optional["torch.Tensor"] = None,
    q_scale: Any = 1.0,
    k_scale: Any = 1.0,
    v_scale: Any = 1.0,
    out_dtype: Any = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """MHA/GQA of ragged queries ``q [T, Hq, D]`` over a paged cache ``[P, S, Hkv, D|Dv]``.

    ``cu_seqlens_q`` ``[B+1]`` delimits each request's new tokens;
    ``seq_lens`` counts every cached token including them.  ``mha_extend``
    is this function; ``mha_decode`` is it with ``uniform_cu_seqlens(B, q_len)``.
    Returns ``(out [T, Hq, Dv], lse fp32 [T, Hq])``.
    """
    out, lse = _paged_fp32(
        _dequant(q, q_scale), k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
        k_scale=k_scale, v_scale=v_scale, causal=causal, window_left=window_left,
        sm_scale=softmax_scale(q.shape[-1]) if sm_scale is None else sm_scale,
        logits_soft_cap=logits_soft_cap, sinks=sinks,
    )
    return out.to(_default_out_dtype(q.dtype, out_dtype)), lse


def mha_ragged(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    cu_seqlens_q: "torch.Tensor",
    cu_seqlens_kv: "torch.Tensor",
    *,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    sinks: Optional["torch.Tensor"] = None,
    q_scale: Any = 1.0,
    k_scale: Any = 1.0,
    v_scale: Any = 1.0,
    out_dtype: Any = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``mha_prefill``: ragged ``q [Tq, Hq, D]``, ``k [Tk, Hkv, D]``, ``v [Tk, Hkv, Dv]``.

    Returns ``(out [Tq, Hq, Dv], lse fp32 [Tq, Hq])``.
    """
    import torch

    tq, hq, d = q.shape
    hkv, dv = v.shape[1:]
    _check_heads(hq, hkv)
    qf = _dequant(q, q_scale)
    options = dict(
        causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap, sinks=sinks,
        sm_scale=softmax_scale(d) if sm_scale is None else sm_scale,
    )
    out = torch.zeros(tq, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    qo, kvo = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
    for b in range(len(qo) - 1):
        q0, q1, k0, k1 = qo[b], qo[b + 1], kvo[b], kvo[b + 1]
        if q1 == q0:
            continue
        kb, vb = _dequant(k[k0:k1], k_scale), _dequant(v[k0:k1], v_scale)
        out[q0:q1], lse[q0:q1] = _attend(qf[q0:q1], kb, vb, **options)
    return out.to(_default_out_dtype(q.dtype, out_dtype)), lse


def mla_paged(
    q_nope: "torch.Tensor",
    q_pe: "torch.Tensor",
    kv_cache: "torch.Tensor",
    block_table: "torch.Tensor",
    seq_lens: "torch.Tensor",
    *,
    q_len: int = 1,
    sm_scale: float,
    causal: bool = True,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    sinks: Optional["torch.Tensor"] = None,
    q_scale: Any = 1.0,
    kv_scale: Any = 1.0,
    out_dtype: Any = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Absorbed MLA: ``q_nope [T, Hq, R]``, ``q_pe [T, Hq, Dr]`` over ``kv_cache [P, S, R+Dr]``.

    Keys are the whole latent row, values its first ``R`` columns; one
    shared KV head.  Returns ``(out [T, Hq, R], lse fp32 [T, Hq])``.
    """
    import torch

    rank = q_nope.shape[-1]
    q = torch.cat([_dequant(q_nope, q_scale), _dequant(q_pe, q_scale)], dim=-1)
    cu = uniform_cu_seqlens(block_table.shape[0], q_len, device=q.device)
    out, lse = _paged_fp32(
        q, kv_cache.unsqueeze(2), kv_cache[..., :rank].unsqueeze(2), block_table, seq_lens, cu,
        k_scale=kv_scale, v_scale=kv_scale, causal=causal, window_left=window_left,
        sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
    )
    return out.to(_default_out_dtype(q_nope.dtype, out_dtype)), lse


def sparse_mla_paged(
    q_nope: "torch.Tensor",
    q_pe: "torch.Tensor",
    kv_cache: "torch.Tensor",
    block_table: "torch.Tensor",
    seq_lens: "torch.Tensor",
    topk_indices: "torch.Tensor",
    *,
    sm_scale: float,
    sinks: Optional["torch.Tensor"] = None,
    q_scale: Any = 1.0,
    kv_scale: Any = 1.0,
    out_dtype: Any = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """MLA over the listed positions only: ``topk_indices [T, K]`` logical, ``-1`` unused.

    ``q_len = T / B`` tokens per request (decode layout).  No causal mask or
    window: the indexer chose the positions.  A position listed twice
    counts twice.  Returns ``(out [T, Hq, R], lse fp32 [T, Hq])``.
    """
    import torch

    t, hq, rank = q_nope.shape
    batch = block_table.shape[0]
    if batch == 0 or t % batch:
        raise AdapterInputError(f"q_nope: {t} tokens is not a whole number of tokens per request for {batch} requests")
    q_len = t // batch
    check_topk_indices(topk_indices, seq_lens, q_len=q_len)
    page_size = kv_cache.shape[1]
    slots = logical_to_slot(topk_indices, block_table, page_size, q_len=q_len).long()
    rows = kv_cache.flatten(0, 1)
    q = torch.cat([_dequant(q_nope, q_scale), _dequant(q_pe, q_scale)], dim=-1)
    out = torch.zeros(t, hq, rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    k = max(1, topk_indices.shape[1])
    chunk = max(1, _GATHER_BYTES // (4 * k * rows.shape[-1]))
    for t0 in range(0, t, chunk):
        sl = slots[t0 : t0 + chunk]
        kv = _dequant(rows[sl.clamp(min=0)], kv_scale)  # [t, K, R+Dr]
        s = torch.einsum("thd,tkd->thk", q[t0 : t0 + chunk], kv) * sm_scale
        s = s.masked_fill((sl < 0)[:, None, :], float("-inf"))
        sink = None if sinks is None else sinks.float()[None, :].expand(s.shape[:-1])
        p, lse[t0 : t0 + chunk] = _softmax(s, sink)
        out[t0 : t0 + chunk] = torch.einsum("thk,tkr->thr", p, kv[..., :rank])
    return out.to(_default_out_dtype(q_nope.dtype, out_dtype)), lse


# --------------------------------------------------------------------- adapters




class _TorchAdapter(Adapter):
    """Shared checks of the reference adapters: features, dtypes, shapes, outputs.

    The reference computes any feature, but an adapter still refuses one the
    request did not select for, exactly as a library adapter must, so tests
    against it exercise the same contract.  Request fields left unset (a
    request need not name every shape) match any size; the tensors decide.
    """

    def _r(self, field: str) -> Any:
        return getattr(self.request, field, None)

    def _plan_options(self, metadata: Any, *, causal: bool = True) -> None:
        self._check_options(metadata, causal=causal)
        self.sm_scale = self._plan_sm_scale(metadata)
        self.window_left = metadata.window_left
        self.logits_soft_cap = metadata.logits_soft_cap
        self.causal = causal

    def _plan_sm_scale(self, metadata: Any) -> Optional[float]:
        """The contract's ``sm_scale``; for MHA without ``head_dim_qk``, None: the reference takes q's last dim."""
        if metadata.sm_scale is None and SCALE_HEAD_DIMS[self.op] == ("head_dim_qk",) and self._r("head_dim_qk") is None:
            return None
        return self._sm_scale(metadata)

    def _dtypes(self) -> tuple["torch.dtype", "torch.dtype", "torch.dtype"]:
        q_dtype = torch_dtype(self.request.q_dtype)
        kv = self._r("kv_dtype")
        return q_dtype, q_dtype if kv is None else torch_dtype(kv), _default_out_dtype(q_dtype, self._r("out_dtype"))

    def _check(self, name: str, t: Any, shape: list, dtype: Any) -> None:
        check_tensor(name, t, shape=shape, dtype=dtype, device=self.device, contract=self.op)

    def _check_extras(self, rows: int, heads: int, dv: int, sinks: Any, out: Any, lse: Any, **scales: Any) -> dict:
        """Refuse unrequested sinks / LSE, check sinks, out, lse; return the scale values."""
        import torch

        self._refuse("sinks", sinks is not None and not self._r("sinks"))
        self._refuse("return_lse", lse is not None and not self._r("return_lse"))
        if sinks is not None:
            self._check("sinks", sinks, [heads], torch.float32)
        if out is not None:
            self._check("out", out, [rows, heads, dv], self._dtypes()[2])
        if lse is not None:
            self._check("lse", lse, [rows, heads], torch.float32)
        return {name: scale_arg(name, value, device=self.device, contract=self.op) for name, value in scales.items()}

    def _result(self, o: "torch.Tensor", l: "torch.Tensor", out: Any, lse: Any) -> AttentionResult:
        """Copy into the caller's buffers if given; the LSE only when the request asked for it."""
        if out is not None:
            o = out.copy_(o)
        if not self._r("return_lse"):
            return AttentionResult(o)
        return AttentionResult(o, l if lse is None else lse.copy_(l))


class _TorchPagedMHA(_TorchAdapter):
    """``mha_decode`` / ``mha_extend`` share the paged-cache checks and the call."""

    def _plan_paged(self, metadata: Any) -> None:
        self.batch = check_paged_metadata(metadata.block_table, metadata.seq_lens, self._r("page_size"), contract=self.op)
        self.device = metadata.block_table.device
        self.block_table, self.seq_lens = metadata.block_table, metadata.seq_lens

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        self._require_planned()
        q_dtype, kv_dtype, out_dtype = self._dtypes()
        d = self._r("head_dim_qk")
        self._check("q", q, [self.tokens, self._r("num_qo_heads"), d], q_dtype)
        self._check("k_cache", k_cache, [None, self._r("page_size"), self._r("num_kv_heads"), q.shape[2]], kv_dtype)
        self._check("v_cache", v_cache, [*k_cache.shape[:3], self._r("head_dim_vo") or d], kv_dtype)
        scales = self._check_extras(
            self.tokens, q.shape[1], v_cache.shape[3], sinks, out, lse, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale
        )
        o, l = mha_paged(
            q, k_cache, v_cache, self.block_table, self.seq_lens, self.cu_seqlens_q, causal=self.causal,
            sm_scale=self.sm_scale, window_left=self.window_left, logits_soft_cap=self.logits_soft_cap,
            sinks=sinks, out_dtype=out_dtype, **scales,
        )
        return self._result(o, l, out, lse)


class TorchMHADecode(_TorchPagedMHA):
    """``mha_decode`` in torch: ``q_len`` tokens per request over the paged cache."""

    op = "mha_decode"

    def plan(self, metadata) -> None:
        self._check_requested_q_len(metadata.q_len)
        self._plan_paged(metadata)
        self._plan_options(metadata)
        check_decode_seq_lens(metadata.seq_lens, metadata.q_len, contract=self.op)
        self.cu_seqlens_q = uniform_cu_seqlens(self.batch, metadata.q_len, device=self.device)
        self.tokens = self.batch * metadata.q_len
        self._planned = True


class TorchMHAExtend(_TorchPagedMHA):
    """``mha_extend`` in torch: ragged new tokens over a cache that already holds them."""

    op = "mha_extend"

    def plan(self, metadata) -> None:
        self._plan_paged(metadata)
        self._plan_options(metadata, causal=metadata.causal)
        cu = metadata.cu_seqlens_q
        self.tokens = check_cu_seqlens("cu_seqlens_q", cu, self.batch, device=self.device, contract=self.op)
        check_extend_seq_lens(cu, metadata.seq_lens, contract=self.op)
        self.cu_seqlens_q = cu
        self._planned = True


class TorchMHAPrefill(_TorchAdapter):
    """``mha_prefill`` in torch: fresh ragged Q/K/V."""

    op = "mha_prefill"

    def plan(self, metadata) -> None:
        cu_q, cu_kv = metadata.cu_seqlens_q, metadata.cu_seqlens_kv
        self.tokens_q = check_cu_seqlens("cu_seqlens_q", cu_q, contract=self.op)
        self.device = cu_q.device
        self.tokens_kv = check_cu_seqlens("cu_seqlens_kv", cu_kv, cu_q.shape[0] - 1, device=self.device, contract=self.op)
        self._plan_options(metadata, causal=metadata.causal)
        self.cu_seqlens_q, self.cu_seqlens_kv = cu_q, cu_kv
        self._planned = True

    def run(self, q, k, v, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        self._require_planned()
        q_dtype, kv_dtype, out_dtype = self._dtypes()
        d = self._r("head_dim_qk")
        self._check("q", q, [self.tokens_q, self._r("num_qo_heads"), d], q_dtype)
        self._check("k", k, [self.tokens_kv, self._r("num_kv_heads"), q.shape[2]], kv_dtype)
        self._check("v", v, [*k.shape[:2], self._r("head_dim_vo") or d], kv_dtype)
        scales = self._check_extras(
            self.tokens_q, q.shape[1], v.shape[2], sinks, out, lse, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale
        )
        o, l = mha_ragged(
            q, k, v, self.cu_seqlens_q, self.cu_seqlens_kv, causal=self.causal, sm_scale=self.sm_scale,
            window_left=self.window_left, logits_soft_cap=self.logits_soft_cap, sinks=sinks,
            out_dtype=out_dtype, **scales,
        )
        return self._result(o, l, out, lse)


class _TorchMLA(_TorchAdapter):
    """MLA shapes and the decode plan shared by dense and sparse MLA."""

    def plan(self, metadata) -> None:
        self._check_requested_q_len(metadata.q_len)
        self.batch = check_paged_metadata(metadata.block_table, metadata.seq_lens, self._r("page_size"), contract=self.op)
        self._plan_options(metadata)
        self.device = metadata.block_table.device
        self.block_table, self.seq_lens, self.q_len = metadata.block_table, metadata.seq_lens, metadata.q_len
        self.tokens = self.batch * metadata.q_len
        self._planned = True

    def _check_mla(self, q_nope, q_pe, kv_cache, sinks, out, lse, q_scale, kv_scale) -> dict[str, Any]:
        self._require_planned()
        q_dtype, kv_dtype, _ = self._dtypes()
        self._check("q_nope", q_nope, [self.tokens, self._r("num_qo_heads"), self._r("kv_lora_rank")], q_dtype)
        self._check("q_pe", q_pe, [*q_nope.shape[:2], self._r("qk_rope_head_dim")], q_dtype)
        width = q_nope.shape[2] + q_pe.shape[2]
        self._check("kv_cache", kv_cache, [None, self._r("page_size"), width], kv_dtype)
        return self._check_extras(
            self.tokens, q_nope.shape[1], q_nope.shape[2], sinks, out, lse, q_scale=q_scale, kv_scale=kv_scale
        )


class TorchMLADecode(_TorchMLA):
    """``mla_decode`` in torch over the latent cache."""

    op = "mla_decode"

    def run(self, q_nope, q_pe, kv_cache, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        scales = self._check_mla(q_nope, q_pe, kv_cache, sinks, out, lse, q_scale, kv_scale)
        o, l = mla_paged(
            q_nope, q_pe, kv_cache, self.block_table, self.seq_lens, q_len=self.q_len, sm_scale=self.sm_scale,
            causal=self.causal, window_left=self.window_left, logits_soft_cap=self.logits_soft_cap, sinks=sinks,
            out_dtype=self._dtypes()[2], **scales,
        )
        return self._result(o, l, out, lse)


class TorchSparseMLADecode(_TorchMLA):
    """``sparse_mla_decode`` in torch: only the top-k listed positions are read."""

    op = "sparse_mla_decode"

    def _plan_options(self, metadata: Any, *, causal: bool = True) -> None:
        refuse_sparse_options(self.spec.name, metadata)
        super()._plan_options(metadata, causal=causal)

    def run(self, q_nope, q_pe, kv_cache, topk_indices, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        import torch

        scales = self._check_mla(q_nope, q_pe, kv_cache, sinks, out, lse, q_scale, kv_scale)
        self._check("topk_indices", topk_indices, [self.tokens, self._r("topk")], torch.int32)
        o, l = sparse_mla_paged(
            q_nope, q_pe, kv_cache, self.block_table, self.seq_lens, topk_indices, sm_scale=self.sm_scale,
            sinks=sinks, out_dtype=self._dtypes()[2], **scales,
        )
        return self._result(o, l, out, lse)
