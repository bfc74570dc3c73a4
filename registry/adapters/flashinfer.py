"""FlashInfer's FlashAttention paths (FA2, FA2 on tensor cores, FA3) behind the op contracts.

One class per (kernel, op).  Each calls the exact inner FlashInfer backend
(``backend="fa2"`` with or without tensor cores, ``backend="fa3"``,
``backend="cute-dsl"``), never ``backend="auto"``, whose choice changes with
the GPU and FlashInfer version.

Translation done here (the contract's layouts are in ``registry.contracts``):

* ``block_table`` + ``seq_lens`` -> FlashInfer's CSR ``indptr/indices/last_page_len``
  (``registry.adapters.paged``), once per ``plan()``;
* the NHD cache ``[P, S, Hkv, D]`` is FlashInfer's ``kv_layout="NHD"`` as is;
* FP8 scales: floats fold into FlashInfer's softmax scale or output scale;
  one-element device tensors scale the query on the device (or feed FA3's
  FP8 kernel as per-head arrays), so ``run()`` never reads them on the host;
* LSE: base 2 from the kernel, natural log out (``* ln 2``, in place).

With ``request.cuda_graph`` the wrappers are built in FlashInfer's CUDA-graph
mode on the first ``plan()``: the batch size and the block-table width of
that plan are then fixed for the adapter's life, and re-planning keeps the
device buffers a captured ``run()`` reads.
"""

from __future__ import annotations

from typing import Any, Optional

from registry.adapters.flashinfer_common import (
    FLOAT_WORKSPACE_BYTES,
    LN2,
    FlashInferAdapter,
    float_workspace,
    ln_lse_result,
    mul_out,
    new_tuple,
)
from registry.adapters.paged import block_table_to_csr, check_cu_seqlens, uniform_cu_seqlens
from registry.contracts import AttentionResult, scale_arg
from registry.errors import AdapterInputError, UnsupportedFeatureError

_SINKS_DROPPED = (
    "FlashInfer 0.7.2 accepts sinks= on this path and never passes it to the kernel "
    "(decode.py:3264-3310, prefill.py:836-931); a sink needs the AttentionSink JIT variant"
)


def _v_scale_arg(name: str, v_scale: Any, device: Any, contract: str) -> Any:
    """FlashInfer multiplies ``out`` by ``v_scale`` after the kernel (float or tensor); skip it at 1.0."""
    if isinstance(v_scale, float):
        return None if v_scale == 1.0 else v_scale
    return scale_arg(name, v_scale, device=device, contract=contract)


class _WrapperAdapter(FlashInferAdapter):
    """A FlashInfer wrapper object, built by the first ``plan()`` and planned again by each later one.

    Subclasses implement ``_make_wrapper(*shape)``.  In CUDA-graph mode the
    first plan's shape is final: the wrapper's index buffers are fixed.
    """

    def __init__(self, spec: Any, request: Any) -> None:
        super().__init__(spec, request)
        self._wrapper = None
        self._graph_shape: Optional[tuple] = None

    def _ensure_wrapper(self, shape: tuple, fixed: str) -> None:
        """Build the wrapper for ``shape`` once; a CUDA-graph adapter refuses another shape (``fixed`` says which)."""
        if self._wrapper is None or (self.request.cuda_graph and shape != self._graph_shape):
            if self._wrapper is not None:
                raise AdapterInputError(
                    f"{self.spec.name}: CUDA-graph mode fixes {fixed} at the first plan {self._graph_shape}; "
                    f"got {shape}. Use one adapter per captured shape."
                )
            self._wrapper, self._graph_shape = self._make_wrapper(*shape), shape

    def _new_wrapper(self, wrapper: Any, *args: Any, graph_buffers: dict, **kwargs: Any) -> Any:
        """``wrapper(workspace, *args, **kwargs)``; in CUDA-graph mode also ``use_cuda_graph=True`` and, per
        ``graph_buffers`` entry (keyword -> length), the int32 device buffer FlashInfer plans into."""
        import torch

        ws = float_workspace(self._device, "flashinfer-fa", FLOAT_WORKSPACE_BYTES)
        graph: dict = {}
        if self.request.cuda_graph:
            graph = dict(use_cuda_graph=True)
            for name, length in graph_buffers.items():
                graph[name] = torch.empty(length, dtype=torch.int32, device=self._device)
        return wrapper(ws, *args, **kwargs, **graph)


# ---------------------------------------------------------------- mha_decode


class _PagedDecode(_WrapperAdapter):
    """``BatchDecodeWithPagedKVCacheWrapper`` with an explicit inner kernel."""

    op = "mha_decode"
    use_tensor_cores = False
    drops = {"sinks": _SINKS_DROPPED}

    def _make_wrapper(self, batch: int, max_pages: int) -> Any:
        # backend="fa2" with either kernel: "auto" may route a plan to cuDNN on sm_100 (decode.py:1433-1496)
        return self._new_wrapper(
            self._fi.BatchDecodeWithPagedKVCacheWrapper, "NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2",
            graph_buffers=dict(
                paged_kv_indptr_buffer=batch + 1,
                paged_kv_indices_buffer=max(1, batch * max_pages),
                paged_kv_last_page_len_buffer=batch,
            ),
        )

    def plan(self, metadata: Any) -> None:
        r = self.request
        batch = self._plan_paged(metadata)
        q_len = int(metadata.q_len)
        if q_len > 1 and not self.use_tensor_cores:
            raise UnsupportedFeatureError(
                f"{self.spec.name}: q_len={q_len}; the CUDA-core decode kernel takes one query token "
                "per request (decode.py:2089-2095); multi-token decode needs the tensor-core kernel"
            )
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        if dv != d:
            raise UnsupportedFeatureError(f"{self.spec.name}: head_dim_vo {dv} != head_dim_qk {d}; the decode wrapper has one head_dim")
        self._ensure_wrapper((batch, metadata.block_table.shape[1]), "batch and block_table width")
        indptr, indices, last = block_table_to_csr(metadata.block_table, metadata.seq_lens, r.page_size)
        extra = {"q_len_per_req": q_len} if self.use_tensor_cores else {}
        self._wrapper.plan(
            indptr, indices, last, r.num_qo_heads, r.num_kv_heads, d, r.page_size,
            window_left=metadata.window_left, logits_soft_cap=metadata.logits_soft_cap,
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, o_data_type=self.out_dtype,
            sm_scale=self._sm_scale(metadata), seq_lens=metadata.seq_lens, **extra,
        )
        t = batch * q_len
        self._plan_mha_io(t, d, d)
        if self._fp8_kv:
            self._plan_buffer("q", (t, r.num_qo_heads, d), self.q_dtype)
        self._planned = True

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        want = self._check_inputs(q, k_cache, v_cache, sinks, out, lse)
        if q_scale.__class__ is float and k_scale.__class__ is float and v_scale.__class__ is float:
            host = q_scale * k_scale
            if host == 1.0 and v_scale == 1.0:  # the common case, kept short: this is per layer
                res = self._wrapper.run(q, (k_cache, v_cache), out=out, lse=lse, return_lse=want, enable_pdl=self._pdl)
                if not want:  # ln_lse_result() written out: one Python frame less per layer
                    return new_tuple(AttentionResult, (res, None))
                res[1].mul_(LN2)
                return new_tuple(AttentionResult, res)
        else:
            host, dev = self._scales(("q_scale", "k_scale"), (q_scale, k_scale))
            if dev:
                q = self._prescaled(q, 1.0, dev)
        res = self._wrapper.run(
            q, (k_cache, v_cache),
            q_scale=None if host == 1.0 else host,
            v_scale=_v_scale_arg("v_scale", v_scale, self._device, self._contract),
            out=out, lse=lse, return_lse=want, enable_pdl=self._pdl,
        )
        return ln_lse_result(res, want)


class FA2Decode(_PagedDecode):
    """FlashInfer's CUDA-core decode kernel (``use_tensor_cores=False, backend="fa2"``): one token per request.

    ``backend="fa2"`` keeps FlashInfer from resolving the plan to cuDNN, as
    ``"auto"`` may (decode.py:1433-1496); with ``use_tensor_cores=False`` it
    runs the CUDA-core kernel (decode.py:2437-2468).  GQA group sizes are a
    compile-time dispatch in FlashInfer (``data/include/flashinfer/utils.cuh:142-168``).
    """

    use_tensor_cores = False


class FA2TCDecode(_PagedDecode):
    """FlashInfer's FA2 prefill kernel used for decode (``use_tensor_cores=True, backend="fa2"``).

    Serves ``q_len > 1`` (MTP / speculative verification) through
    ``plan(q_len_per_req=q_len)``: causal inside each request's block.
    """

    use_tensor_cores = True
    backend = "fa2"


# ---------------------------------------------------------------- mha_extend


class _PagedPrefill(_WrapperAdapter):
    """``BatchPrefillWithPagedKVCacheWrapper`` (``mha_extend``) on an explicit FA backend."""

    op = "mha_extend"
    backend = ""
    drops = {"sinks": _SINKS_DROPPED}

    def _make_wrapper(self, batch: int, max_pages: int) -> Any:
        return self._new_wrapper(
            self._fi.BatchPrefillWithPagedKVCacheWrapper, "NHD", backend=self.backend,
            graph_buffers=dict(
                qo_indptr_buf=batch + 1,
                paged_kv_indptr_buf=batch + 1,
                paged_kv_indices_buf=max(1, batch * max_pages),
                paged_kv_last_page_len_buf=batch,
            ),
        )

    def plan(self, metadata: Any) -> None:
        r = self.request
        batch = self._plan_paged(metadata, causal=metadata.causal)
        total = check_cu_seqlens(
            "cu_seqlens_q", metadata.cu_seqlens_q, batch, device=self._device, contract=self._contract
        )
        self._ensure_wrapper((batch, metadata.block_table.shape[1]), "batch and block_table width")
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        indptr, indices, last = block_table_to_csr(metadata.block_table, metadata.seq_lens, r.page_size)
        self._wrapper.plan(
            metadata.cu_seqlens_q, indptr, indices, last, r.num_qo_heads, r.num_kv_heads, d, r.page_size,
            head_dim_vo=dv, causal=metadata.causal, sm_scale=self._sm_scale(metadata),
            window_left=metadata.window_left, logits_soft_cap=metadata.logits_soft_cap,
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, o_data_type=self.out_dtype,
            seq_lens=metadata.seq_lens,
        )
        self._plan_mha_io(total, d, dv)
        self._plan_scale_buffers((total, r.num_qo_heads, d))
        self._planned = True

    def _check_options(self, metadata: Any, *, causal: Optional[bool] = None) -> None:
        super()._check_options(metadata, causal=causal)
        if self._fp8_q and metadata.logits_soft_cap > 0:
            raise UnsupportedFeatureError(
                f"{self.spec.name}: logits_soft_cap with an FP8 query: FA3's FP8 variant has no soft cap "
                "and would ignore it (jit/attention/modules.py:1093-1107, hopper/variants.cuh DefaultFP8Attention)"
            )

    def _plan_scale_buffers(self, q_shape: tuple) -> None:
        """Plan the buffers run() writes tensor scales into.

        FA3's FP8 kernel reads scale tensors per head (hopper/variants.cuh
        get_q_scale/get_k_scale); a 16-bit query over an FP8 cache is scaled
        into a copy of the query.
        """
        import torch

        r = self.request
        if self._fp8_q:
            self._plan_buffer("scale_q", (r.num_qo_heads,), torch.float32)
            self._plan_buffer("scale_k", (r.num_kv_heads,), torch.float32)
            self._plan_buffer("scale_v", (r.num_kv_heads,), torch.float32)
        elif self._fp8_kv:
            self._plan_buffer("q", q_shape, self.q_dtype)

    def _fp8_args(self, q_scale: Any, k_scale: Any, v_scale: Any) -> tuple:
        """FA3 FP8 scale arguments: floats as they are, tensors broadcast into the planned per-head buffers."""
        args = []
        for name, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
            if isinstance(s, (int, float)):
                args.append(float(s))
            else:
                scale_arg(name, s, device=self._device, contract=self._contract)
                buf = self._buffers["scale_" + name[0]]
                buf.copy_(s.view(1).expand(buf.shape[0]))
                args.append(buf)
        return tuple(args)

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        want = self._check_inputs(q, k_cache, v_cache, sinks, out, lse)
        if (
            not self._fp8_q and q_scale.__class__ is float and k_scale.__class__ is float
            and v_scale.__class__ is float and q_scale * k_scale == 1.0 and v_scale == 1.0
        ):  # the common case, kept short
            res = self._wrapper.run(
                q, (k_cache, v_cache), out=out, lse=lse, return_lse=want, lse_base="ln", enable_pdl=self._pdl
            )
            return new_tuple(AttentionResult, res if want else (res, None))
        if self._fp8_q:
            args, host, v_arg = self._fp8_args(q_scale, k_scale, v_scale), 1.0, None
        else:
            host, dev = self._scales(("q_scale", "k_scale"), (q_scale, k_scale))
            if dev:
                q = self._prescaled(q, 1.0, dev)
            args, v_arg = (), _v_scale_arg("v_scale", v_scale, self._device, self._contract)
        res = self._wrapper.run(
            q, (k_cache, v_cache), *args,
            q_scale=None if host == 1.0 else host, v_scale=v_arg,
            out=out, lse=lse, return_lse=want, lse_base="ln", enable_pdl=self._pdl,
        )
        return AttentionResult(*res) if want else AttentionResult(res)


class FA2Extend(_PagedPrefill):
    """FlashInfer paged prefill, ``backend="fa2"``: new tokens over a paged cache (prewrite)."""

    backend = "fa2"


class FA3Extend(_PagedPrefill):
    """FlashInfer paged prefill, ``backend="fa3"`` (Hopper only: built for sm_90a).

    An FP8 query (with FP8 KV) runs FA3's FP8 kernel: output bf16/fp16, no soft cap.
    """

    backend = "fa3"


class CuteDSLExtend(_PagedPrefill):
    """FlashInfer paged prefill, ``backend="cute-dsl"``: the CuTe-DSL (FA4-lineage) kernel for sm_100+.

    NOT executed here: the verification GPU is sm_90.  Written to
    ``prefill.py:3551-3620`` (plan: q dtype == kv dtype, head_dim_vo ==
    head_dim_qk) and ``:4185-4230`` (run: no q/k/v scales, no run-time sinks).
    FP8 scales are refused rather than dropped.
    """

    backend = "cute-dsl"

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        for name, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
            if not (isinstance(s, (int, float)) and float(s) == 1.0):
                raise UnsupportedFeatureError(
                    f"{self.spec.name}: {name} is not supported by FlashInfer's cute-dsl paged route "
                    "(prefill.py:4186-4189); select another kernel for scaled inputs"
                )
        return super().run(q, k_cache, v_cache, sinks=sinks, out=out, lse=lse)


# --------------------------------------------------------------- mha_prefill


class _RaggedPrefill(_PagedPrefill):
    """``BatchPrefillWithRaggedKVCacheWrapper`` (``mha_prefill``, postwrite) on an explicit FA backend.

    The ragged wrapper ignores ``q_scale``/``k_scale``/``v_scale`` for a 16-bit
    query unless K is FP8 (prefill.py:5998-6004, 6467-6469), so this adapter
    applies them itself: the query is scaled into a planned buffer and the
    output in place.
    """

    op = "mha_prefill"

    def _make_wrapper(self, batch: int) -> Any:
        return self._new_wrapper(
            self._fi.BatchPrefillWithRaggedKVCacheWrapper, "NHD", backend=self.backend,
            graph_buffers=dict(qo_indptr_buf=batch + 1, kv_indptr_buf=batch + 1),
        )

    def plan(self, metadata: Any) -> None:
        r = self.request
        self._check_options(metadata, causal=metadata.causal)
        self._bind_device(metadata.cu_seqlens_q)
        tq = check_cu_seqlens("cu_seqlens_q", metadata.cu_seqlens_q, contract=self._contract)
        batch = metadata.cu_seqlens_q.shape[0] - 1
        tk = check_cu_seqlens(
            "cu_seqlens_kv", metadata.cu_seqlens_kv, batch, device=self._device, contract=self._contract
        )
        self._ensure_wrapper((batch,), "the batch")
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        self._wrapper.plan(
            metadata.cu_seqlens_q, metadata.cu_seqlens_kv, r.num_qo_heads, r.num_kv_heads, d,
            head_dim_vo=dv, causal=metadata.causal, sm_scale=self._sm_scale(metadata),
            window_left=metadata.window_left, logits_soft_cap=metadata.logits_soft_cap,
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, o_data_type=self.out_dtype,
        )
        q_shape = (tq, r.num_qo_heads, d)
        self._plan_io(
            (("q", q_shape, self.q_dtype, False), ("k", (tk, r.num_kv_heads, d), self.kv_dtype, False),
             ("v", (tk, r.num_kv_heads, dv), self.kv_dtype, False)),
            out_shape=(tq, r.num_qo_heads, dv), lse_shape=(tq, r.num_qo_heads),
        )
        self._plan_scale_buffers(q_shape)
        self._planned = True

    def run(self, q, k, v, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        want = self._check_inputs(q, k, v, sinks, out, lse)
        if self._fp8_q:
            args = self._fp8_args(q_scale, k_scale, v_scale)
        else:
            args = ()
            host, dev = self._scales(("q_scale", "k_scale"), (q_scale, k_scale))
            if dev or host != 1.0:
                q = self._prescaled(q, host, dev)
            if not isinstance(v_scale, float):
                scale_arg("v_scale", v_scale, device=self._device, contract=self._contract)
        res = self._wrapper.run(
            q, k, v, *args, out=out, lse=lse, return_lse=want, lse_base="ln", enable_pdl=self._pdl
        )
        out, lse = res if want else (res, None)
        if not self._fp8_q:
            mul_out(out, v_scale)
        return AttentionResult(out, lse)


class FA2Prefill(_RaggedPrefill):
    """FlashInfer ragged prefill, ``backend="fa2"``: fresh Q/K/V, causal or not (postwrite)."""

    backend = "fa2"


class FA3Prefill(_RaggedPrefill):
    """FlashInfer ragged prefill, ``backend="fa3"`` (Hopper only: built for sm_90a).

    An FP8 query (with FP8 K/V) runs FA3's FP8 kernel: output bf16/fp16, no soft cap.
    """

    backend = "fa3"


# ---------------------------------------------------------------- mla_decode


class _MLADecode(_WrapperAdapter):
    """``BatchMLAPagedAttentionWrapper`` with its keyword API: ``plan(metadata=MLAPlanMetadata.csr(...))``.

    The query goes in split (``query=(q_nope, q_pe)``), the latent cache packed
    (``kv_cache=[P, S, R+Dr]``; FlashInfer takes views of it).  The LSE comes
    back in natural log from the kernel (``lse_mode="basee"``).  FP8 KV takes
    a float ``kv_scale`` as FlashInfer's ``ckv_scale``/``kpe_scale``; a tensor
    ``kv_scale`` scales the query on the device and the output in place.
    """

    op = "mla_decode"
    backend = ""
    drops = {
        "sinks": "FlashInfer's FA MLA backends reject sinks (mla/_batch_mla/_backends/_fa_common.py:985-993)",
        "sliding_window": "FlashInfer's FA MLA backends have no window (fa2_backend.py:21-28 capabilities)",
        "logits_soft_cap": "FlashInfer's FA MLA backends have no soft cap (fa2_backend.py:21-28 capabilities)",
    }

    def _make_wrapper(self, batch: int, max_pages: int) -> Any:
        return self._new_wrapper(
            self._fi.mla.BatchMLAPagedAttentionWrapper, backend=self.backend,
            graph_buffers=dict(
                qo_indptr=batch + 1, kv_indptr=batch + 1, kv_indices=max(1, batch * max_pages), kv_len_arr=batch
            ),
        )

    def plan(self, metadata: Any) -> None:
        r = self.request
        sm_scale = self._sm_scale(metadata)
        batch = self._plan_paged(metadata)
        q_len = int(metadata.q_len)
        self._ensure_wrapper((batch, metadata.block_table.shape[1]), "batch and block_table width")
        rank, rope = r.kv_lora_rank, r.qk_rope_head_dim
        kv_indptr, kv_indices, _ = block_table_to_csr(metadata.block_table, metadata.seq_lens, r.page_size)
        qo_indptr = uniform_cu_seqlens(batch, q_len, device=self._device)
        want = bool(r.return_lse)
        self._wrapper.plan(
            metadata=self._fi.mla.MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, metadata.seq_lens),
            num_heads=r.num_qo_heads, head_dim_ckv=rank, head_dim_kpe=rope, page_size=r.page_size,
            causal=q_len > 1, sm_scale=sm_scale, q_data_type=self.q_dtype, kv_data_type=self.kv_dtype,
            query_layout="split", kv_cache_layout="packed",
            lse_mode="basee" if want else "none", output_dtype=self.out_dtype,
            scale_mode="kv-per-tensor" if self._fp8_kv else "default",
        )  # no enable_pdl: the FA MLA backends refuse enable_pdl=True (_capabilities.py plan check)
        t = batch * q_len
        self._plan_mla_io(t, rank, rope)
        if self._fp8_kv:
            self._plan_buffer("q_nope", (t, r.num_qo_heads, rank), self.q_dtype)
            self._plan_buffer("q_pe", (t, r.num_qo_heads, rope), self.q_dtype)
        self._planned = True

    def run(self, q_nope, q_pe, kv_cache, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        want = self._check_inputs(q_nope, q_pe, kv_cache, sinks, out, lse)
        if q_scale.__class__ is float and kv_scale.__class__ is float and q_scale == 1.0 and (
            kv_scale == 1.0 or self._fp8_kv
        ):  # the common case: nothing to apply outside the kernel
            fp8_args = dict(ckv_scale=kv_scale, kpe_scale=kv_scale) if self._fp8_kv else {}
            res = self._wrapper.run(
                query=(q_nope, q_pe), kv_cache=kv_cache, out=out, lse=lse,
                return_lse=want, return_lse_base_on_e=want, **fp8_args,
            )
            return new_tuple(AttentionResult, res if want else (res, None))
        kv_in_kernel = self._fp8_kv and isinstance(kv_scale, (int, float))
        if kv_in_kernel:  # FlashInfer dequantises FP8 KV with a host float (mla.cuh:312-377)
            host, dev = self._scales(("q_scale",), (q_scale,))
        else:  # the KV scale moves to q (scores) and to out (values)
            host, dev = self._scales(("q_scale", "kv_scale"), (q_scale, kv_scale))
        if dev or host != 1.0:
            q_nope = self._prescaled(q_nope, host, dev, "q_nope")
            q_pe = self._prescaled(q_pe, host, dev, "q_pe")
        fp8_args = {}
        if self._fp8_kv:
            s = float(kv_scale) if kv_in_kernel else 1.0
            fp8_args = dict(ckv_scale=s, kpe_scale=s)
        res = self._wrapper.run(
            query=(q_nope, q_pe), kv_cache=kv_cache, out=out, lse=lse,
            return_lse=want, return_lse_base_on_e=want, **fp8_args,
        )
        out, lse = res if want else (res, None)
        if not kv_in_kernel:
            mul_out(out, kv_scale)
        return AttentionResult(out, lse)


class FA2MLADecode(_MLADecode):
    """FlashInfer MLA decode, ``backend="fa2"`` (absorbed MLA over the latent cache; MTP via q_len)."""

    backend = "fa2"


class FA3MLADecode(_MLADecode):
    """FlashInfer MLA decode, ``backend="fa3"`` (Hopper only: needs sm_90a)."""

    backend = "fa3"
