"""FlashInfer's TensorRT-LLM kernel family (XQA, trtllm-gen) behind the op contracts.

These entry points are stateless functions that take the engine's own
``block_table``/``seq_lens`` (no CSR), FP8 scales as ``bmm1_scale``
(``sm_scale * q_scale * k_scale``) and ``bmm2_scale`` (``v_scale``), and a
caller-owned workspace.  Every adapter passes the exact inner backend
(``backend="xqa"`` / ``"trtllm-gen"``), never ``"auto"``: FlashInfer's
``auto`` picks XQA on every non-sm_100 GPU, including ones XQA-MLA rejects
(vllm-project/vllm#43827, flashinfer-ai/flashinfer#2053).

What ``plan()`` prepares so ``run()`` neither synchronises nor allocates:

* the per-device workspace (``flashinfer_common``), zeroed once; XQA's first
  8 MiB are its semaphores, so XQA gets a buffer no other kernel writes;
* trtllm-gen's multi-CTA counter buffer, zeroed, passed explicitly (without
  it FlashInfer allocates a fresh one per call);
* one-element buffers that receive the product of tensor scales on the device.

Only XQA (mha_decode) runs on sm_90; the trtllm-gen kernels need sm_100-class
GPUs and XQA-MLA needs sm_120/121.  Those adapters are written to FlashInfer
0.7.2's source and were not executed in this project (see each class).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from registry.adapters.flashinfer_common import (
    TRTLLM_GEN_WORKSPACE_BYTES,
    XQA_WORKSPACE_BYTES,
    FlashInferAdapter,
    float_workspace,
    ln_lse_result,
    mul_out,
    new_tuple,
    scale_product,
)
from registry.adapters.paged import check_cu_seqlens, cu_seqlens_from_lens, logical_to_slot
from registry.contracts import AttentionResult, scale_arg
from registry.errors import AdapterInputError, UnsupportedFeatureError

if TYPE_CHECKING:
    import torch

_LOG2E = 1.0 / math.log(2.0)


class _TrtllmAdapter(FlashInferAdapter):
    """Shared plan state of the TRT-LLM family: metadata on the device, scale buffers, counters."""

    workspace_tag = ""
    workspace_bytes = TRTLLM_GEN_WORKSPACE_BYTES

    def _plan_common(self, metadata: Any, *, causal: Optional[bool] = None) -> int:
        """Validate the paged metadata, keep it for run(), size the scale buffers; return the batch."""
        import torch

        r = self.request
        batch = self._plan_paged(metadata, causal=causal)
        if r.cuda_graph:  # a captured run() reads fixed buffers; re-planning refills them
            self._block_table = self._graph_buffer("block_table", metadata.block_table)
            self._seq_lens = self._graph_buffer("seq_lens", metadata.seq_lens)
            self._max_seq_len = metadata.block_table.shape[1] * r.page_size
        else:  # stateless kernels: the engine's own tensors, read at run()
            self._block_table = metadata.block_table
            self._seq_lens = metadata.seq_lens
            self._max_seq_len = int(metadata.seq_lens.max()) if batch else 0
        self._window_left = metadata.window_left
        self._workspace = float_workspace(self._device, self.workspace_tag, self.workspace_bytes)
        self._plan_buffer("bmm1", (1,), torch.float32)
        self._plan_buffer("bmm2", (1,), torch.float32)
        return batch

    def _graph_buffer(self, slot: str, value: "torch.Tensor") -> "torch.Tensor":
        """Copy plan metadata into a buffer fixed by the first plan (CUDA-graph mode)."""
        buf = self._buffers.get(slot)
        if buf is None:
            buf = self._buffers[slot] = value.clone()
        elif buf.shape != value.shape:
            raise AdapterInputError(
                f"{self.spec.name}: CUDA-graph mode fixes {slot} at the first plan's shape {list(buf.shape)}; "
                f"got {list(value.shape)}. Use one adapter per captured shape."
            )
        else:
            buf.copy_(value)
        return buf

    def _plan_counter(self, batch: int) -> None:
        """trtllm-gen's multi-CTA semaphores: zeroed once, reset by the kernel after every launch."""
        import torch

        fi_utils = self._fi.utils
        nbytes = fi_utils.get_trtllm_gen_multi_ctas_kv_counter_bytes(
            batch, self.request.num_qo_heads, fi_utils.get_device_sm_count(self._device)
        )
        buf = self._buffers.get("counter")
        if buf is None or buf.numel() < nbytes:
            self._buffers["counter"] = torch.zeros(nbytes, dtype=torch.uint8, device=self._device)

    def _bmm_scales(self, sm_scale: float, qk: tuple, v: tuple) -> tuple:
        """``bmm1 = sm_scale * prod(qk)``, ``bmm2 = prod(v)``: floats, or planned device buffers."""
        qk_host, qk_dev = self._scales(qk[0], qk[1])
        v_host, v_dev = self._scales(v[0], v[1])
        bmm1 = scale_product(self._buffers["bmm1"], sm_scale * qk_host, qk_dev)
        bmm2 = scale_product(self._buffers["bmm2"], v_host, v_dev)
        return bmm1, bmm2

    def _check_q_len(self, q_len: int) -> None:
        """Refuse a ``q_len`` the kernel cannot serve (decode ops)."""

    def _plan_kernel_state(self, batch: int) -> None:
        """Plan what the kernel keeps between calls (decode ops)."""


# ---------------------------------------------------------------- mha_decode


class _MHADecode(_TrtllmAdapter):
    op = "mha_decode"
    backend = ""

    def plan(self, metadata: Any) -> None:
        r = self.request
        batch = self._plan_common(metadata)
        self._q_len = int(metadata.q_len)
        self._check_q_len(self._q_len)
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        self._sm = self._sm_scale(metadata)
        self._plan_mha_io(batch * self._q_len, d, dv)
        self._plan_kernel_state(batch)
        self._planned = True


class XQADecode(_MHADecode):
    """``trtllm_batch_decode_with_kv_cache(backend="xqa")``: paged GQA decode, one token per request.

    Runs on sm_90 (the Hopper GMMA kernel ``mha_sm90.cu`` serves FP8 KV with
    head_dim <= 256, the generic ``mha.cu`` kernel the rest; xqa.py:386-393).
    No LSE (decode.py:4162-4203), no soft cap (no parameter).  Multi-token
    decode exists in XQA but needs a bit-packed draft mask that this adapter
    does not build, so ``q_len > 1`` is refused.

    XQA applies its KV scale only to a quantized (FP8) cache (csrc/xqa/mha.cu:
    1586, 1817, 2614), while FlashInfer's wrapper divides ``bmm1_scale`` by
    ``bmm2_scale`` for it (decode.py:4741-4742): with a 16-bit cache a
    ``v_scale`` != 1 would be dropped and the logits mis-scaled (measured on
    H200).  So for a 16-bit cache this adapter passes ``bmm2_scale=1`` and
    scales the output itself.  With one-element tensor scales FlashInfer's
    wrapper derives XQA's scales with two 4-byte device temporaries per call.
    """

    backend = "xqa"
    workspace_tag = "xqa"
    workspace_bytes = XQA_WORKSPACE_BYTES
    drops = {
        "return_lse": "FlashInfer's XQA decode raises for lse/return_lse (decode.py:4162-4203)",
        "logits_soft_cap": "XQA has no soft-cap parameter (decode.py:3710-3742)",
    }

    def _check_q_len(self, q_len: int) -> None:
        if q_len != 1:
            raise UnsupportedFeatureError(
                f"{self.spec.name}: q_len={q_len}; XQA multi-token decode needs a bit-packed draft mask "
                "(xqa.py:417-429) that this adapter does not build"
            )

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        self._check_inputs(q, k_cache, v_cache, sinks, out, lse)
        fp8_kv = self._fp8_kv
        if q_scale.__class__ is float and k_scale.__class__ is float and v_scale.__class__ is float:
            bmm1, bmm2 = self._sm * q_scale * k_scale, v_scale if fp8_kv else 1.0
        else:
            v_in_kernel = (("v_scale",), (v_scale,)) if fp8_kv else ((), ())
            bmm1, bmm2 = self._bmm_scales(self._sm, (("q_scale", "k_scale"), (q_scale, k_scale)), v_in_kernel)
            if not fp8_kv and not isinstance(v_scale, (int, float)):
                scale_arg("v_scale", v_scale, device=self._device, contract=self._contract)
        out = self._fi.decode.trtllm_batch_decode_with_kv_cache(
            q, (k_cache, v_cache), self._workspace, self._block_table, self._seq_lens, self._max_seq_len,
            bmm1_scale=bmm1, bmm2_scale=bmm2, window_left=self._window_left, out=out,
            out_dtype=self.out_dtype, sinks=sinks, kv_layout="NHD", enable_pdl=self._pdl,
            backend="xqa", q_len_per_req=1,
        )
        if not fp8_kv and not (v_scale.__class__ is float and v_scale == 1.0):
            mul_out(out, v_scale)
        return new_tuple(AttentionResult, (out, None))


class TrtllmGenDecode(_MHADecode):
    """``trtllm_batch_decode_with_kv_cache(backend="trtllm-gen")``: sm_100-class cubins.

    NOT executed in this project (no sm_100 GPU): written to FlashInfer
    0.7.2's source (decode.py:3710-4588).  The NHD cache is passed with
    ``kv_layout="NHD"`` (FlashInfer transposes the view to HND, no copy);
    ``q_len`` tokens per request via ``q_len_per_req``; LSE base 2 -> ln.
    A tensor ``bmm1`` goes in as ``bmm1_scale_log2`` (already times log2 e),
    so FlashInfer launches no scale kernel.
    """

    backend = "trtllm-gen"
    workspace_tag = "trtllm-gen"
    drops = {"logits_soft_cap": "trtllm-gen decode has no soft-cap parameter (decode.py:3710-3742)"}

    def _plan_kernel_state(self, batch: int) -> None:
        self._plan_counter(batch)

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        want = self._check_inputs(q, k_cache, v_cache, sinks, out, lse)
        bmm1, bmm2 = self._bmm_scales(self._sm, (("q_scale", "k_scale"), (q_scale, k_scale)), (("v_scale",), (v_scale,)))
        log2 = None
        if not isinstance(bmm1, float):
            bmm1.mul_(_LOG2E)
            log2, bmm1 = bmm1, 1.0
        res = self._fi.decode.trtllm_batch_decode_with_kv_cache(
            q, (k_cache, v_cache), self._workspace, self._block_table, self._seq_lens, self._max_seq_len,
            bmm1_scale=bmm1, bmm2_scale=bmm2, bmm1_scale_log2=log2, window_left=self._window_left,
            out=out, out_dtype=self.out_dtype, sinks=sinks, kv_layout="NHD", enable_pdl=self._pdl,
            backend="trtllm-gen", q_len_per_req=self._q_len, lse=lse, return_lse=want,
            multi_ctas_kv_counter_buffer=self._buffers["counter"],
        )
        return ln_lse_result(res, want)


# ---------------------------------------------------------------- mha_extend


class TrtllmGenExtend(_TrtllmAdapter):
    """``trtllm_batch_context_with_kv_cache`` (trtllm-gen): new tokens over the paged cache.

    NOT executed in this project (no sm_100 GPU): written to FlashInfer
    0.7.2's source (prefill.py:7510-7935).  Causal or not; a window only
    with causal (prefill.py:7693-7697); no soft cap; LSE base 2 -> ln.
    A tensor ``bmm1`` makes FlashInfer launch one scale kernel per call
    (prefill.py:7812-7814: the context API has no ``bmm1_scale_log2``).
    """

    op = "mha_extend"
    backend = "trtllm-gen"
    workspace_tag = "trtllm-gen"
    drops = {"logits_soft_cap": "trtllm-gen context has no soft-cap parameter (prefill.py:7510-7540)"}

    def plan(self, metadata: Any) -> None:
        r = self.request
        batch = self._plan_common(metadata, causal=metadata.causal)
        if not metadata.causal and metadata.window_left >= 0:
            raise UnsupportedFeatureError(
                f"{self.spec.name}: a sliding window without causal masking is not supported (prefill.py:7693-7697)"
            )
        total = check_cu_seqlens(
            "cu_seqlens_q", metadata.cu_seqlens_q, batch, device=self._device, contract=self._contract
        )
        self._causal = bool(metadata.causal)
        self._batch = batch
        lens_q = metadata.cu_seqlens_q[1:] - metadata.cu_seqlens_q[:-1]
        max_q_len = int(lens_q.max()) if batch else 0
        if r.cuda_graph:
            self._cu_q = self._graph_buffer("cu_seqlens_q", metadata.cu_seqlens_q)
            self._cu_kv = self._graph_buffer("cu_seqlens_kv", cu_seqlens_from_lens(metadata.seq_lens))
            if self._planned and max_q_len > self._max_q_len:
                raise AdapterInputError(
                    f"{self.spec.name}: CUDA-graph mode fixes the longest query at the first plan "
                    f"({self._max_q_len} tokens); got {max_q_len}"
                )
            self._max_q_len = max(max_q_len, getattr(self, "_max_q_len", 0))
        else:
            self._cu_q = metadata.cu_seqlens_q
            self._cu_kv = cu_seqlens_from_lens(metadata.seq_lens)
            self._max_q_len = max_q_len
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        self._sm = self._sm_scale(metadata)
        self._plan_mha_io(total, d, dv)
        self._plan_counter(batch)
        self._planned = True

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        want = self._check_inputs(q, k_cache, v_cache, sinks, out, lse)
        bmm1, bmm2 = self._bmm_scales(self._sm, (("q_scale", "k_scale"), (q_scale, k_scale)), (("v_scale",), (v_scale,)))
        res = self._fi.prefill.trtllm_batch_context_with_kv_cache(
            q, (k_cache, v_cache), self._workspace, self._block_table, self._seq_lens,
            self._max_q_len, self._max_seq_len, bmm1, bmm2, self._batch, self._cu_q, self._cu_kv,
            window_left=self._window_left, out=out, out_dtype=self.out_dtype, kv_layout="NHD",
            enable_pdl=self._pdl, sinks=sinks, causal=self._causal, lse=lse, return_lse=want,
            multi_ctas_kv_counter_buffer=self._buffers["counter"], backend="trtllm-gen",
        )
        return ln_lse_result(res, want)


# ---------------------------------------------------------------- mla_decode


def _adjacent(left: "torch.Tensor", right: "torch.Tensor") -> bool:
    """``right`` continues ``left`` along the last dim in one buffer (a packed row split in two views)."""
    return (
        left.dtype == right.dtype
        and left.shape[:-1] == right.shape[:-1]
        and left.stride() == right.stride()
        and left.stride(-1) == 1
        and right.data_ptr() == left.data_ptr() + left.shape[-1] * left.element_size()
    )


class _MLADecode(_TrtllmAdapter):
    """``trtllm_batch_decode_with_kv_cache_mla``: packed query ``[B, q_len, H, R+Dr]``, latent cache as is."""

    op = "mla_decode"
    backend = ""

    def plan(self, metadata: Any) -> None:
        r = self.request
        self._sm = self._sm_scale(metadata)
        batch = self._plan_common(metadata)
        self._batch, self._q_len = batch, int(metadata.q_len)
        self._check_q_len(self._q_len)
        rank, rope = r.kv_lora_rank, r.qk_rope_head_dim
        t = batch * self._q_len
        self._plan_mla_io(t, rank, rope)
        self._plan_buffer("query", (t, r.num_qo_heads, rank + rope), self.q_dtype)
        self._plan_kernel_state(batch)
        self._planned = True

    def _packed_query(self, q_nope: "torch.Tensor", q_pe: "torch.Tensor") -> "torch.Tensor":
        """One ``[B, q_len, H, R+Dr]`` query: a view when q_nope/q_pe are halves of one row, else a copy."""
        if _adjacent(q_nope, q_pe):
            packed = q_nope.as_strided(q_nope.shape[:-1] + (q_nope.shape[-1] + q_pe.shape[-1],), q_nope.stride())
        else:
            packed = self._buffers["query"]
            rank = q_nope.shape[-1]
            packed[..., :rank].copy_(q_nope)
            packed[..., rank:].copy_(q_pe)
        return packed.unflatten(0, (self._batch, self._q_len))

    def _mla_call(self, query, kv_cache, block_table, out, bmm1, bmm2, **extra) -> Any:
        """``trtllm_batch_decode_with_kv_cache_mla`` with the planned state and ``self.backend``."""
        r = self.request
        return self._fi.mla.trtllm_batch_decode_with_kv_cache_mla(
            query, kv_cache, self._workspace, r.qk_nope_head_dim, r.kv_lora_rank, r.qk_rope_head_dim,
            block_table, self._seq_lens, self._max_seq_len, out=out, bmm1_scale=bmm1, bmm2_scale=bmm2,
            enable_pdl=self._pdl, backend=self.backend, **extra,
        )


class TrtllmGenMLADecode(_MLADecode):
    """trtllm-gen MLA decode (``backend="trtllm-gen"``), sm_100-class cubins; MTP via q_len.

    NOT executed in this project (no sm_100 GPU): written to FlashInfer
    0.7.2's source (mla/_core.py:3811-4856).  Sinks yes; no sliding window
    (NVIDIA/TensorRT-LLM#12606) and no soft cap; LSE requested in
    natural log (``return_lse_base="basee"``).  Output is bf16, shaped like
    the query ``[B, q_len, H, R]`` (mla/_core.py:4661-4671).  Scales in
    trtllm-gen's convention: ``bmm1 = sm_scale * q_scale * kv_scale`` on the
    logits, ``bmm2 = kv_scale`` on the output (a tensor ``bmm1`` is turned
    into log2 form by FlashInfer, mla/_core.py:4392-4393).
    """

    backend = "trtllm-gen"
    workspace_tag = "trtllm-gen"
    drops = {
        "sliding_window": "trtllm-gen MLA decode has no window (NVIDIA/TensorRT-LLM#12606 asks it to fail fast)",
        "logits_soft_cap": "trtllm-gen MLA decode has no soft-cap parameter (mla/_core.py:4858-4893)",
    }

    def _plan_kernel_state(self, batch: int) -> None:
        self._plan_counter(batch)

    def run(self, q_nope, q_pe, kv_cache, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        want = self._check_inputs(q_nope, q_pe, kv_cache, sinks, out, lse)
        bmm1, bmm2 = self._bmm_scales(self._sm, (("q_scale", "kv_scale"), (q_scale, kv_scale)), (("kv_scale",), (kv_scale,)))
        lse_args = dict(lse=lse, return_lse=True, return_lse_base="basee") if want else {}
        res = self._mla_call(
            self._packed_query(q_nope, q_pe), kv_cache, self._block_table,
            None if out is None else out.unflatten(0, (self._batch, self._q_len)), bmm1, bmm2,
            sinks=sinks, multi_ctas_kv_counter_buffer=self._buffers["counter"], **lse_args,
        )
        out, lse = res if want else (res, None)
        return AttentionResult(out.flatten(0, 1), lse)


class XQAMLADecode(_MLADecode):
    """XQA MLA decode (``backend="xqa"``): sm_120/121 only, one token per request.

    NOT executed in this project (no sm_120 GPU): written to FlashInfer
    0.7.2's source (mla/_core.py:4291-4345 and 5310-5469, xqa.py:543-659,
    csrc/xqa/mla_sm120.cu).  FlashInfer accepts (fp8, fp8) or (bf16, bf16)
    query/cache there; 128 heads, ranks 512/64, pages 16..128; no LSE, no
    sinks.  What differs from trtllm-gen MLA, and is translated here:

    * scales: FlashInfer hands ``bmm1_scale`` to the kernel as its
      ``q_scale`` and ``bmm2_scale`` as its ``kv_scale`` (mla/_core.py:5463-5464);
      the kernel scales the logits by ``q_scale * kv_scale`` and nothing
      else (mla_sm120.cu:464) and the output by ``kv_scale``
      (mla_sm120.cu:1319).  So ``bmm1 = sm_scale * q_scale`` (the KV scale
      must not be folded in, or the logits get it twice) and ``bmm2 = kv_scale``;
    * output: a caller's ``out`` must be ``[B, H, R]`` (mla/_core.py:5433-5445),
      which is the contract's ``[T, H, R]`` at one token per request;
    * block table: its width must be a multiple of ``128 / page_size``
      (mla/_core.py:831-834, required on this path); ``plan()`` copies it
      into a zero-padded table.  The kernel reads only the pages a sequence
      covers (mla_sm120.cu:153-155), so the padding is never dereferenced.
    """

    backend = "xqa"
    workspace_tag = "xqa"
    workspace_bytes = XQA_WORKSPACE_BYTES
    drops = {
        "return_lse": "XQA MLA raises for lse/return_lse (mla/_core.py:4330-4333)",
        "sinks": "XQA MLA raises for sinks (mla/_core.py:4314-4315)",
        "sliding_window": "XQA MLA has no window parameter (mla/_core.py:5310-5325)",
        "logits_soft_cap": "XQA MLA has no soft-cap parameter (mla/_core.py:5310-5325)",
    }
    _TABLE_TOKENS = 128
    """The block table covers a multiple of 128 tokens (mla/_core.py:831-834)."""

    def _check_q_len(self, q_len: int) -> None:
        if q_len != 1:
            raise UnsupportedFeatureError(f"{self.spec.name}: q_len={q_len}; XQA MLA serves one token per request (mla/_core.py:4316-4319)")

    def _plan_kernel_state(self, batch: int) -> None:
        """The block table padded to a multiple of ``128 / page_size`` columns (zeros past the engine's)."""
        import torch

        table = self._block_table
        step = max(1, self._TABLE_TOKENS // self.request.page_size)
        width = -(-table.shape[1] // step) * step
        if width == table.shape[1]:
            self._padded_table = table
            return
        self._plan_buffer("padded_block_table", (table.shape[0], width), torch.int32)
        padded = self._buffers["padded_block_table"]
        padded[:, table.shape[1]:].zero_()
        padded[:, :table.shape[1]].copy_(table)
        self._padded_table = padded

    def run(self, q_nope, q_pe, kv_cache, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        self._check_inputs(q_nope, q_pe, kv_cache, sinks, out, lse)
        bmm1, bmm2 = self._bmm_scales(self._sm, (("q_scale",), (q_scale,)), (("kv_scale",), (kv_scale,)))
        res = self._mla_call(self._packed_query(q_nope, q_pe), kv_cache, self._padded_table, out, bmm1, bmm2)
        return new_tuple(AttentionResult, (res if out is not None else res.flatten(0, 1), None))


# --------------------------------------------------------- sparse_mla_decode


class TrtllmGenSparseMLADecode(_TrtllmAdapter):
    """DeepSeek-V4 sparse MLA, ``trtllm_batch_decode_sparse_mla_dsv4(backend="trtllm-gen")``.

    NOT executed in this project (no sm_100 GPU): written to FlashInfer
    0.7.2's source (mla/_core.py:1889-2820).  The kernel's head is 512 wide
    and its value is the whole key row, so the request must read
    ``kv_lora_rank=512, qk_rope_head_dim=0`` (q_pe is ``[T, H, 0]``); bf16 or
    per-tensor FP8 cache; sinks yes; no LSE, window or soft cap.

    The kernel reads two pools through one table whose first 128 columns
    index a sliding-window pool.  This adapter passes the contract's cache as
    both pools, fills the 128 window columns with ``-1`` and passes zero
    window lengths (``seq_lens`` of zeros: the kernel attends
    ``clamp(seq_len - (q_len-1-i), 0, 128)`` window columns), and puts the
    translated top-k slots in the remaining columns with length ``128 + K``.
    That ``-1`` top-k entries are skipped, as the contract requires, is
    FlashInfer's documented behaviour for its ``cake`` route; for the
    trtllm-gen cubin it is unverified.  ``K`` must be a multiple of 4
    (16-byte rows, vllm-project/vllm#43827).  Float and one-element-tensor scales take
    different FlashInfer code paths (tensor: a per-call scale kernel,
    mla/_core.py:2443-2456); both are passed through as the contract says.
    """

    op = "sparse_mla_decode"
    backend = "trtllm-gen"
    workspace_tag = "trtllm-gen"
    drops = {
        "return_lse": "the DSv4 sparse MLA entry point returns no LSE (mla/_core.py:1889-1921)",
        "sliding_window": "no window parameter: the indexer chose the positions",
        "logits_soft_cap": "no soft-cap parameter (mla/_core.py:1889-1921)",
    }
    _SWA_COLUMNS = 128

    def plan(self, metadata: Any) -> None:
        import torch

        r = self.request
        self._sm = self._sm_scale(metadata)
        if r.kv_lora_rank + r.qk_rope_head_dim != 512 or r.qk_rope_head_dim != 0:
            raise AdapterInputError(
                f"{self.spec.name}: the DSv4 kernel's key and value are one 512-wide row; request "
                f"kv_lora_rank=512, qk_rope_head_dim=0 (got {r.kv_lora_rank}, {r.qk_rope_head_dim})"
            )
        batch = self._plan_common(metadata)
        self._batch, self._q_len = batch, int(metadata.q_len)
        t, k = batch * self._q_len, int(r.topk)
        if k % 4:
            raise AdapterInputError(f"{self.spec.name}: topk={k}; rows must be 16-byte aligned (a multiple of 4 int32)")
        self._plan_buffer("indices", (t, self._SWA_COLUMNS + k), torch.int32)
        self._plan_buffer("topk_lens", (t,), torch.int32)
        self._plan_buffer("no_window", (batch,), torch.int32)
        self._indices = self._buffers["indices"].fill_(-1)
        self._topk_lens = self._buffers["topk_lens"].fill_(self._SWA_COLUMNS + k)
        self._no_window = self._buffers["no_window"].zero_()
        nope_shape = (t, r.num_qo_heads, r.kv_lora_rank)
        self._plan_io(
            (("q_nope", nope_shape, self.q_dtype, False), ("q_pe", (t, r.num_qo_heads, 0), self.q_dtype, False),
             ("kv_cache", (r.page_size, r.kv_lora_rank), self.kv_dtype, True),
             ("topk_indices", (t, k), torch.int32, False)),
            out_shape=nope_shape, lse_shape=(t, r.num_qo_heads),
        )
        self._plan_counter(batch)
        self._planned = True

    def run(self, q_nope, q_pe, kv_cache, topk_indices, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        try:
            sig = (q_nope.dtype, q_nope.shape, q_nope.get_device(), q_pe.dtype, q_pe.shape, q_pe.get_device(),
                   kv_cache.dtype, kv_cache.shape, kv_cache.get_device(),
                   topk_indices.dtype, topk_indices.shape, topk_indices.get_device())
        except AttributeError:
            sig = None
        if sig != self._sig:
            self._learn_inputs(sig, q_nope, q_pe, kv_cache, topk_indices)
        self._check_sinks(sinks)
        self._outputs(out, lse)
        self._indices[:, self._SWA_COLUMNS:].copy_(
            logical_to_slot(topk_indices, self._block_table, self.request.page_size, q_len=self._q_len)
        )
        bmm1, bmm2 = self._bmm_scales(self._sm, (("q_scale", "kv_scale"), (q_scale, kv_scale)), (("kv_scale",), (kv_scale,)))
        pool = kv_cache.unsqueeze(1)  # [P, 1, S, 512]: HND with one KV head
        res = self._fi.mla.trtllm_batch_decode_sparse_mla_dsv4(
            q_nope.unflatten(0, (self._batch, self._q_len)), pool, self._workspace,
            sparse_indices=self._indices, compressed_kv_cache=pool, sparse_topk_lens=self._topk_lens,
            seq_lens=self._no_window,
            out=None if out is None else out.unflatten(0, (self._batch, self._q_len)),
            bmm1_scale=bmm1, bmm2_scale=bmm2, sinks=sinks, kv_layout="HND", enable_pdl=self._pdl,
            backend="trtllm-gen", multi_ctas_kv_counter_buffer=self._buffers["counter"],
        )
        return AttentionResult(res.flatten(0, 1))
