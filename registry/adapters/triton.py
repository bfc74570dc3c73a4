"""Adapters for kernelsel's own Triton kernels (``solution: triton``), the portable fallback.

One class per op; each translates the op contract of ``registry.contracts``
into a launch of a kernel from ``registry.adapters.triton_kernels``.
``plan()`` checks the metadata, reads ``seq_lens`` on the host to choose the
tile shape and the split-KV count, and carves the split partials out of the
shared workspace; ``run()`` checks the tensors, then launches without
allocating (when ``out=``/``lse=`` are given) or synchronising, so it can be
captured in a CUDA graph.  Triton and torch are imported on first use.

``tuning`` (constructor keyword) overrides the plan's heuristics --
``num_splits``, ``block_m``, ``block_n``, ``num_warps``, ``num_stages`` -- for
tests and benchmarks; it never changes what is computed.

``TritonMLADecode`` has two launch variants (``launch_variant``): the Gluon
sm_90 kernel and the portable one; ``planning.mla_variant`` decides, for
``plan()`` and for ``kernelsel explain`` alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from registry.adapters.base import Adapter, check_tensor, refuse_sparse_options, torch_dtype, workspace
from registry.adapters.paged import check_cu_seqlens, check_decode_seq_lens, check_extend_seq_lens, check_paged_metadata
from registry.adapters.triton_kernels import planning as launch_planning
from registry.contracts import AttentionResult, output_dtype, scale_arg
from registry.errors import AdapterInputError

if TYPE_CHECKING:
    import torch


def _kernels(name: str) -> Any:
    """Import a kernel module (and so triton) on first use, with the install hint if triton is missing."""
    from registry.adapters.base import import_library

    import_library("triton", "triton")
    return import_library(f"registry.adapters.triton_kernels.{name}", "triton")


class _TritonAdapter(Adapter):
    """Checks and plumbing shared by the Triton adapters."""

    libraries = ("torch", "triton")

    def __init__(self, spec: Any, request: Any, *, tuning: Optional[dict] = None) -> None:
        super().__init__(spec, request)
        self.tuning = dict(tuning or {})

    # ---------------------------------------------------------------- plan side

    def _feature(self, name: str) -> bool:
        return bool(getattr(self.request, name, False))

    def _plan_options(self, metadata: Any, *, causal: bool = True) -> None:
        self._check_options(metadata, causal=causal)
        if metadata.window_left < -1:
            raise AdapterInputError(f"window_left: {metadata.window_left}, expected -1 (off) or >= 0 ({self.op})")
        self.sm_scale = self._sm_scale(metadata)
        self.window_left = int(metadata.window_left)
        self.soft_cap = float(metadata.logits_soft_cap)
        self.causal = causal

    def _plan_paged(self, metadata: Any) -> None:
        self.batch = check_paged_metadata(
            metadata.block_table, metadata.seq_lens, self.request.page_size, contract=self.op
        )
        self.device = metadata.block_table.device
        self.block_table, self.seq_lens = metadata.block_table, metadata.seq_lens
        self.max_len = int(metadata.seq_lens.max()) if self.batch else 0

    def _plan_decode(self, metadata: Any) -> None:
        """The plan of the decode ops up to the kernel: ``q_len`` new tokens per request over the paged cache."""
        self._check_requested_q_len(metadata.q_len)
        self._plan_paged(metadata)
        self._plan_options(metadata)
        check_decode_seq_lens(metadata.seq_lens, metadata.q_len, contract=self.op)
        self.q_len, self.tokens = metadata.q_len, self.batch * metadata.q_len

    def _config(self, default: Any) -> Any:
        """``default`` with the tuning overrides; ``tuning["kernel"]`` goes through the variant decision instead."""
        return default.replace(**{k: v for k, v in self.tuning.items() if k != "kernel"})

    def _splits(self, planning: Any, work: int, keys: int, tokens: int, heads: int, dv: int, family: dict) -> int:
        if "num_splits" in self.tuning:
            return max(1, int(self.tuning["num_splits"]))
        if self.cfg.split_waves is not None:
            family = {**family, "waves": self.cfg.split_waves}
        return planning.kv_splits(
            work, keys, planning.num_sms(self.device), block_n=self.cfg.block_n,
            partial_bytes_per_split=4 * tokens * heads * (dv + 1), **family,
        )

    def _partials(self, splits: int, tokens: int, heads: int, dv: int) -> None:
        """fp32 split partials ``[splits, T, H, Dv]`` and ``[splits, T, H]`` from the shared workspace."""
        import torch

        if splits <= 1:
            self.o_part = self.lse_part = None
            return
        n_o, n_l = splits * tokens * heads * dv, splits * tokens * heads
        buf = workspace(self.device, 4 * (n_o + n_l), tag="triton-split-kv")
        flat = buf[: 4 * (n_o + n_l)].view(torch.float32)
        self.o_part = flat[:n_o].view(splits, tokens, heads, dv)
        self.lse_part = flat[n_o:].view(splits, tokens, heads)

    # ----------------------------------------------------------------- run side

    def _dtypes(self) -> tuple["torch.dtype", "torch.dtype", "torch.dtype"]:
        r = self.request
        out = output_dtype(r.q_dtype, getattr(r, "out_dtype", None))
        return torch_dtype(r.q_dtype), torch_dtype(r.kv_dtype), torch_dtype(out)

    def _check(self, name: str, t: Any, **kw: Any) -> None:
        check_tensor(name, t, device=self.device, contract=self.op, **kw)
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise AdapterInputError(
                f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()} ({self.op})"
            )

    def _scale(self, name: str, value: Any) -> tuple[float, Any]:
        """``(float factor, one-element tensor or None)``; the tensor is read by the kernel, not here."""
        value = scale_arg(name, value, device=self.device, contract=self.op)
        return (value, None) if isinstance(value, float) else (1.0, value)

    def _outputs(self, tokens: int, heads: int, dv: int, sinks: Any, out: Any, lse: Any) -> tuple[Any, Any]:
        import torch

        self._require_planned()
        self._refuse("sinks", sinks is not None and not self._feature("sinks"))
        self._refuse("return_lse", lse is not None and not self._feature("return_lse"))
        if sinks is not None:
            check_tensor("sinks", sinks, shape=[heads], dtype=torch.float32, device=self.device, contract=self.op)
        out_dtype = self._dtypes()[2]
        if out is None:
            out = torch.empty(tokens, heads, dv, dtype=out_dtype, device=self.device)
        else:
            self._check("out", out, shape=[tokens, heads, dv], dtype=out_dtype)
        if self._feature("return_lse"):
            if lse is None:
                lse = torch.empty(tokens, heads, dtype=torch.float32, device=self.device)
            else:
                check_tensor(  # any strides: the kernels take them
                    "lse", lse, shape=[tokens, heads], dtype=torch.float32, device=self.device, contract=self.op
                )
        return out, lse

    def _result(self, out: Any, lse: Any) -> AttentionResult:
        return AttentionResult(out, lse) if self._feature("return_lse") else AttentionResult(out)


# ------------------------------------------------------------------------ MHA


class _TritonPagedMHA(_TritonAdapter):
    """``mha_decode`` / ``mha_extend``: one kernel, uniform or ragged new tokens."""

    def _plan_kernel(self, rows_per_request: int, max_rows: int, num_tiles: Any) -> None:
        """Tile shape, split count and partials; ``num_tiles(block_m)`` counts the grid's tiles."""
        planning = _kernels("planning")
        r = self.request
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        kv_bytes = torch_dtype(r.kv_dtype).itemsize
        self.cfg = self._config(
            planning.mha_config(max_rows, d, dv, kv_bytes, work_items=lambda bm: num_tiles(bm) * r.num_kv_heads)
        )
        keys = self.max_len if self.window_left < 0 else min(self.max_len, self.window_left + rows_per_request)
        work = num_tiles(self.cfg.block_m) * r.num_kv_heads
        self.num_splits = self._splits(planning, work, keys, self.tokens, r.num_qo_heads, dv, planning.MHA_SPLITS)
        self._partials(self.num_splits, self.tokens, r.num_qo_heads, dv)

    def run(self, q, k_cache, v_cache, *, sinks=None, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=None, lse=None):
        self._require_planned()
        r = self.request
        d, dv = r.head_dim_qk, r.head_dim_vo or r.head_dim_qk
        hq, hkv, page = r.num_qo_heads, r.num_kv_heads, r.page_size
        q_dtype, kv_dtype, _ = self._dtypes()
        self._check("q", q, shape=[self.tokens, hq, d], dtype=q_dtype)
        self._check("k_cache", k_cache, shape=[None, page, hkv, d], dtype=kv_dtype)
        self._check("v_cache", v_cache, shape=[None, page, hkv, dv], dtype=kv_dtype)
        scales = [self._scale(n, s) for n, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale))]
        out, lse = self._outputs(self.tokens, hq, dv, sinks, out, lse)
        _kernels("paged_mha").paged_mha(
            q, k_cache, v_cache, self.block_table, self.seq_lens, out, lse, **self._layout(),
            causal=self.causal, sm_scale=self.sm_scale, window_left=self.window_left, soft_cap=self.soft_cap,
            sinks=sinks, q_scale=scales[0], k_scale=scales[1], v_scale=scales[2],
            o_part=self.o_part, lse_part=self.lse_part, block_m=self.cfg.block_m, block_n=self.cfg.block_n,
            num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages,
        )
        return self._result(out, lse)


class TritonMHADecode(_TritonPagedMHA):
    """``mha_decode``: ``q_len`` new tokens per request, causal among them, split-KV."""

    op = "mha_decode"

    def plan(self, metadata) -> None:
        self._plan_decode(metadata)
        r = self.request
        self._check_heads()
        rows = self.q_len * (r.num_qo_heads // r.num_kv_heads)
        self._plan_kernel(self.q_len, rows, lambda bm: self.batch * -(-rows // bm))
        self._planned = True

    def _check_heads(self) -> None:
        r = self.request
        if r.num_kv_heads < 1 or r.num_qo_heads % r.num_kv_heads:
            raise AdapterInputError(
                f"num_qo_heads {r.num_qo_heads} must be a multiple of num_kv_heads {r.num_kv_heads} ({self.op})"
            )

    def _layout(self) -> dict:
        return {"q_len": self.q_len}


class TritonMHAExtend(TritonMHADecode):
    """``mha_extend``: ragged new tokens (``cu_seqlens_q``) over a cache that already holds them."""

    op = "mha_extend"

    def plan(self, metadata) -> None:
        import torch

        self._plan_paged(metadata)
        self._plan_options(metadata, causal=metadata.causal)
        self._check_heads()
        r = self.request
        self.tokens = check_cu_seqlens(
            "cu_seqlens_q", metadata.cu_seqlens_q, self.batch, device=self.device, contract=self.op
        )
        check_extend_seq_lens(metadata.cu_seqlens_q, metadata.seq_lens, contract=self.op)
        new = (metadata.cu_seqlens_q[1:] - metadata.cu_seqlens_q[:-1]).cpu().long()
        self.cu_seqlens_q = metadata.cu_seqlens_q
        group = r.num_qo_heads // r.num_kv_heads
        longest = int(new.max()) if self.batch else 0
        counts_of = lambda bm: (new * group + bm - 1) // bm  # noqa: E731 - tiles per request
        self._plan_kernel(longest, longest * group, lambda bm: int(counts_of(bm).sum()))
        counts = counts_of(self.cfg.block_m)
        tile_req = torch.repeat_interleave(torch.arange(self.batch), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tile_row = (torch.arange(tile_req.shape[0]) - first) * self.cfg.block_m
        self.tile_req = tile_req.to(device=self.device, dtype=torch.int32)
        self.tile_row = tile_row.to(device=self.device, dtype=torch.int32)
        self._planned = True

    def _layout(self) -> dict:
        return {"cu_seqlens_q": self.cu_seqlens_q, "tile_req": self.tile_req, "tile_row": self.tile_row}


# ------------------------------------------------------------------------ MLA


class _TritonMLA(_TritonAdapter):
    """Latent-cache checks shared by dense and sparse MLA."""

    def _check_mla(self, q_nope, q_pe, kv_cache, sinks, out, lse, q_scale, kv_scale):
        self._require_planned()
        r = self.request
        rank, rope, hq = r.kv_lora_rank, r.qk_rope_head_dim, r.num_qo_heads
        q_dtype, kv_dtype, _ = self._dtypes()
        self._check("q_nope", q_nope, shape=[self.tokens, hq, rank], dtype=q_dtype)
        self._check("q_pe", q_pe, shape=[self.tokens, hq, rope], dtype=q_dtype)
        self._check("kv_cache", kv_cache, shape=[None, r.page_size, rank + rope], dtype=kv_dtype)
        out, lse = self._outputs(self.tokens, hq, rank, sinks, out, lse)
        return out, lse, self._scale("q_scale", q_scale), self._scale("kv_scale", kv_scale)

    def _launch_options(self) -> dict:
        return dict(
            o_part=self.o_part, lse_part=self.lse_part, block_m=self.cfg.block_m, block_n=self.cfg.block_n,
            num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages,
        )


class TritonMLADecode(_TritonMLA):
    """``mla_decode``: absorbed MLA over the latent cache, causal within ``q_len``, split-KV."""

    op = "mla_decode"

    @classmethod
    def launch_variant(cls, request: Any, env: Any) -> Any:
        """``planning.mla_variant``: the Gluon sm_90 kernel or the portable one (what explain shows)."""
        return launch_planning.mla_variant(request, env)

    def plan(self, metadata) -> None:
        self._plan_decode(metadata)
        planning = _kernels("planning")
        r = self.request
        rows = self.q_len * r.num_qo_heads
        self.variant = planning.plan_mla_variant(r, self.device, self.q_len, forced=self.tuning.get("kernel"))
        self.cfg = self._config(planning.mla_config(rows, hopper=self.variant.variant is planning.HOPPER_MLA))
        keys = self.max_len if self.window_left < 0 else min(self.max_len, self.window_left + self.q_len)
        work = self.batch * -(-rows // self.cfg.block_m) * self.cfg.value_splits
        self.num_splits = self._splits(
            planning, work, keys, self.tokens, r.num_qo_heads, r.kv_lora_rank, planning.MLA_SPLITS
        )
        self._partials(self.num_splits, self.tokens, r.num_qo_heads, r.kv_lora_rank)
        self._planned = True

    def run(self, q_nope, q_pe, kv_cache, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        out, lse, qs, kvs = self._check_mla(q_nope, q_pe, kv_cache, sinks, out, lse, q_scale, kv_scale)
        _kernels("mla").mla_decode(
            q_nope, q_pe, kv_cache, self.block_table, self.seq_lens, out, lse, q_len=self.q_len,
            sm_scale=self.sm_scale, window_left=self.window_left, soft_cap=self.soft_cap, sinks=sinks,
            q_scale=qs, kv_scale=kvs, value_splits=self.cfg.value_splits, kernel=self.cfg.kernel,
            **self._launch_options(),
        )
        return self._result(out, lse)


class TritonSparseMLADecode(_TritonMLA):
    """``sparse_mla_decode``: MLA over each token's top-k positions only, split over ``K``."""

    op = "sparse_mla_decode"

    def _plan_options(self, metadata: Any, *, causal: bool = True) -> None:
        refuse_sparse_options(self.spec.name, metadata)
        super()._plan_options(metadata, causal=causal)

    def plan(self, metadata) -> None:
        self._plan_decode(metadata)
        planning = _kernels("planning")
        r = self.request
        topk = getattr(r, "topk", None) or self.max_len
        self.cfg = self._config(planning.sparse_mla_config(r.num_qo_heads))
        work = self.tokens * -(-r.num_qo_heads // self.cfg.block_m)
        self.num_splits = self._splits(
            planning, work, topk, self.tokens, r.num_qo_heads, r.kv_lora_rank, planning.MLA_SPLITS
        )
        self._partials(self.num_splits, self.tokens, r.num_qo_heads, r.kv_lora_rank)
        self._planned = True

    def run(self, q_nope, q_pe, kv_cache, topk_indices, *, q_scale=1.0, kv_scale=1.0, sinks=None, out=None, lse=None):
        import torch

        out, lse, qs, kvs = self._check_mla(q_nope, q_pe, kv_cache, sinks, out, lse, q_scale, kv_scale)
        topk = getattr(self.request, "topk", None)
        self._check("topk_indices", topk_indices, shape=[self.tokens, topk], dtype=torch.int32)
        _kernels("sparse_mla").sparse_mla_decode(
            q_nope, q_pe, kv_cache, self.block_table, self.seq_lens, topk_indices, out, lse, q_len=self.q_len,
            sm_scale=self.sm_scale, sinks=sinks, q_scale=qs, kv_scale=kvs, **self._launch_options(),
        )
        return self._result(out, lse)
