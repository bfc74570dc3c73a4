"""Which kernel serves each op of a layer: the requests a ``LayerSpec`` makes, selected once and cached.

One resolver per registered backend.  It turns a layer's spec, dtype and page size into kernelsel requests
and keeps the answers, so an attention call costs one dict lookup here (and the selector's own cache is
hit once per new shape).  ``explain_model`` asks the same resolver, so what it prints is what runs.

* decode (one new token per sequence): ``mha_decode``, or ``mla_decode`` (absorbed) for an MLA layer;
* a prompt or a chunk: the attention plan (``selector.select_plan``): postwrite ``mha_prefill`` on the fresh
  keys or prewrite ``mha_extend`` over the paged cache.  MLA prompts run un-absorbed (keys and values
  expanded from the latent, ``head_dim_qk = nope + rope``), as the engines that serve DeepSeek do.

The platform: with a CUDA device, the device's arch (or ``arch=``) and every kernel available there.
Without one, ``arch`` is nominal (default ``sm_90``: it only has to lie inside the arch range of the kernels
that can run on a CPU) and the solution defaults to ``reference`` -- the torch reference kernels, fp32 math,
which run anywhere.  ``solution="triton"`` on a CPU runs kernelsel's Triton kernels in Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before triton is imported): slow, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from registry.errors import KernelselError
from registry.perf import bucket
from selector.api import select_kernel
from selector.plan import select_plan
from selector.selection import Selection

NOMINAL_CPU_ARCH = "sm_90"
"""Arch used to select for a machine without a CUDA device (only the solution restriction matters there)."""

DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def dtype_name(dtype: Any) -> str:
    """A torch dtype in the manifest's spelling (``bf16``); anything else is an error naming it."""
    name = DTYPE_NAMES.get(str(dtype))
    if name is None:
        raise KernelselError(f"kernelsel: attention in {dtype} is not supported; use bf16, fp16 or fp32")
    return name


@dataclass(frozen=True)
class BackendOptions:
    """How the registered backend selects: fixed at ``register()``.

    ``arch``: the GPU arch to select for (default: the CUDA device's; ``sm_90`` without one).
    ``solution``: restrict every op to one solution (default: the best kernel; ``reference`` without CUDA).
    ``kernels``: force a kernel per op, ``{"mha_decode": "triton-mha-decode"}`` (a forced op ignores
    ``solution``; a forced kernel that cannot serve a layer is an error, never a fallback).
    ``page_size``: tokens per page of the paged view a dense ``forward``/``generate`` call builds.
    """

    arch: Optional[str] = None
    solution: Optional[str] = None
    kernels: tuple[tuple[str, str], ...] = ()
    page_size: int = 16

    @classmethod
    def make(cls, *, arch: Optional[str] = None, solution: Optional[str] = None,
             kernels: Optional[Mapping[str, str]] = None, page_size: int = 16) -> "BackendOptions":
        from registry.vocab import Op

        forced = dict(kernels or {})
        for op in forced:
            if op not in Op.values():
                raise KernelselError(f"kernelsel: kernels: {op!r} is not an op; one of {', '.join(Op.values())}")
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise KernelselError(f"kernelsel: page_size {page_size!r} is not a positive integer")
        return cls(arch=arch, solution=solution, kernels=tuple(sorted(forced.items())), page_size=page_size)

    def forced(self, op: str) -> Optional[str]:
        return dict(self.kernels).get(op)

    def platform(self, on_cuda: bool) -> tuple[Optional[str], Optional[str]]:
        """``(arch, solution)`` for a call on a CUDA device or not."""
        if on_cuda:
            return self.arch, self.solution
        return self.arch or NOMINAL_CPU_ARCH, self.solution or "reference"


@dataclass(frozen=True)
class PrefillChoice:
    """The kernel of a prompt/chunk step: ``postwrite`` (``mha_prefill``) or ``prewrite`` (``mha_extend``)."""

    mode: str
    selection: Selection
    why: str


class KernelResolver:
    """Requests per layer spec, selected and cached (a hit is one dict lookup).

    ``selector``: select against this ``Selector`` (a manifest and platform, e.g. a hypothetical GPU for
    ``kernelsel model --arch``); default: the process's default selector, as ``select_kernel`` does.
    """

    def __init__(self, options: BackendOptions, selector: Any = None):
        self.options = options
        self.selector = selector
        self._cache: dict[tuple, Any] = {}

    def _select(self, fields: dict[str, Any]) -> Selection:
        if self.selector is None:
            return select_kernel(**fields)
        from selector.request import KernelRequest

        return self.selector.select(KernelRequest(**fields))

    def _fields(self, op: str, on_cuda: bool) -> dict[str, Any]:
        arch, solution = self.options.platform(on_cuda)
        forced = self.options.forced(op)
        fields: dict[str, Any] = {"arch": arch}
        if forced:
            fields["kernel"] = forced
        elif solution:
            fields["solution"] = solution
        return fields

    @staticmethod
    def _features(spec: Any) -> dict[str, Any]:
        return {"sinks": spec.sinks, "sliding_window": spec.window is not None, "logits_soft_cap": bool(spec.soft_cap)}

    def decode(self, spec: Any, dtype: str, page_size: int, *, on_cuda: bool,
               batch_size: Optional[int] = None, kv_len: Optional[int] = None) -> Selection:
        """The ``mha_decode`` (or, for MLA, ``mla_decode``) kernel of one decode step.

        ``batch_size`` and ``kv_len`` (perf-table ranking) are bucketed here as the request buckets them, so a
        growing context costs one entry per power of two, not one per step.
        """
        batch_size, kv_len = bucket(batch_size), bucket(kv_len)
        key = ("decode", spec, dtype, page_size, on_cuda, batch_size, kv_len)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._select(self.decode_request(spec, dtype, page_size, on_cuda=on_cuda,
                                                                      batch_size=batch_size, kv_len=kv_len))
        return hit

    def decode_request(self, spec: Any, dtype: str, page_size: int, *, on_cuda: bool,
                       batch_size: Optional[int] = None, kv_len: Optional[int] = None) -> dict[str, Any]:
        perf = {k: v for k, v in (("batch_size", batch_size), ("kv_len", kv_len)) if v is not None}
        if spec.mla:
            return dict(
                op="mla_decode", q_dtype=dtype, kv_dtype=dtype, num_qo_heads=spec.num_qo_heads,
                kv_lora_rank=spec.kv_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim,
                qk_nope_head_dim=spec.qk_nope_head_dim, page_size=page_size, q_len=1,
                **self._features(spec), **perf, **self._fields("mla_decode", on_cuda),
            )
        return dict(
            op="mha_decode", q_dtype=dtype, kv_dtype=dtype, head_dim_qk=spec.head_dim_qk, head_dim_vo=spec.head_dim_vo,
            num_qo_heads=spec.num_qo_heads, num_kv_heads=spec.num_kv_heads, page_size=page_size, q_len=1,
            **self._features(spec), **perf, **self._fields("mha_decode", on_cuda),
        )

    def prefill(self, spec: Any, dtype: str, page_size: int, *, on_cuda: bool) -> PrefillChoice:
        """The kernel of a prompt or chunk: the attention plan, or the op a forced kernel belongs to."""
        key = ("prefill", spec, dtype, page_size, on_cuda)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._prefill(spec, dtype, page_size, on_cuda)
        return hit

    def prefill_fields(self, spec: Any, dtype: str, page_size: int) -> dict[str, Any]:
        return dict(
            q_dtype=dtype, kv_dtype=dtype, head_dim_qk=spec.head_dim_qk, head_dim_vo=spec.head_dim_vo,
            num_qo_heads=spec.num_qo_heads, num_kv_heads=spec.num_kv_heads, page_size=page_size,
            non_causal=not spec.causal, **self._features(spec),
        )

    def eligible(self, op: str, spec: Any, dtype: str, page_size: int, *, on_cuda: bool) -> list[str]:
        """Every kernel of ``op`` that could serve this layer here, in rank order (no solution restriction, nothing
        forced): what ``kernelsel verify-model --each-kernel`` forces in turn."""
        from selector.api import default_selector
        from selector.request import KernelRequest

        if op in ("mha_decode", "mla_decode"):
            fields = self.decode_request(spec, dtype, page_size, on_cuda=on_cuda)
            fields = {k: v for k, v in fields.items() if k not in ("solution", "kernel")}
        else:
            fields = dict(op=op, **self.prefill_fields(spec, dtype, page_size), arch=self.options.platform(on_cuda)[0])
            if op == "mha_prefill":
                fields.pop("page_size")
        selector = self.selector or default_selector()
        return [k.name for k in selector.solve(KernelRequest(**fields)).eligible]

    def _prefill(self, spec: Any, dtype: str, page_size: int, on_cuda: bool) -> PrefillChoice:
        fields = self.prefill_fields(spec, dtype, page_size)
        for op, mode in (("mha_prefill", "postwrite"), ("mha_extend", "prewrite")):
            if self.options.forced(op):
                if op == "mha_prefill":
                    fields.pop("page_size")
                sel = self._select(dict(op=op, **fields, **self._fields(op, on_cuda)))
                return PrefillChoice(mode, sel, f"{op} kernel {sel.name} forced")
        arch, solution = self.options.platform(on_cuda)
        if arch is not None:
            fields["arch"] = arch
        if solution:
            fields["solution"] = solution
        plan = select_plan(selector=self.selector, **fields)
        return PrefillChoice(plan.mode, plan.selection, plan.why)
