"""What every FlashInfer adapter shares: request facts, workspaces, scales, LSE base, plan and run checks.

FlashInfer's entry points differ in how they take FP8 scales (host floats
folded into ``sm_scale``, device tensors, per-head arrays, ``bmm1``/``bmm2``
products) and in which LSE base they return.  The adapters in
``flashinfer`` and ``flashinfer_trtllm`` translate the op contract into each
of them with these helpers, so the rules live in one place:

* a Python float scale goes to the library as a float (no kernel launch);
* a one-element fp32 device tensor is applied on the device, never read on
  the host (``run()`` must not synchronise), either by the library itself or
  by scaling the query into a buffer planned for it;
* FlashInfer's base-2 LSE is turned into the contract's natural log.

torch is imported inside functions only: importing this module is free.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

from registry.adapters.base import Adapter, check_tensor, import_library, torch_dtype, workspace
from registry.adapters.paged import check_paged_metadata
from registry.contracts import AttentionResult, output_dtype, scale_arg
from registry.errors import AdapterInputError, UnsupportedFeatureError

if TYPE_CHECKING:
    import torch

LN2 = math.log(2.0)
"""FlashInfer's LSE is ``log2`` of the softmax denominator; ``ln x = log2 x * ln 2``."""

FLOAT_WORKSPACE_BYTES = 128 << 20
"""Split-KV scratch of FlashInfer's FA wrappers (the size FlashInfer's docs recommend)."""

XQA_WORKSPACE_BYTES = 256 << 20
"""XQA: the first 8 MiB are semaphores that must start at zero, the rest is scratch (XQA-MLA wants >= 128 MiB)."""

TRTLLM_GEN_WORKSPACE_BYTES = 256 << 20
"""trtllm-gen: multi-CTA partial outputs and softmax statistics."""

new_tuple = tuple.__new__
"""``new_tuple(AttentionResult, (out, lse))``: the result without NamedTuple.__new__'s Python frame, on the hot path."""


def flashinfer() -> Any:
    """``import flashinfer`` with the install hint on failure."""
    return import_library("flashinfer", "flashinfer")


def float_workspace(device: Any, tag: str, nbytes: int) -> "torch.Tensor":
    """A zeroed per-device scratch buffer; each ``tag`` is a separate buffer (their contents differ)."""
    return workspace(device, nbytes, tag=tag)


def split_scales(*scales: Any) -> tuple[float, list]:
    """Multiply the float scales together; return the product and the tensor scales left over."""
    host, dev = 1.0, []
    for s in scales:
        if isinstance(s, float):
            host *= s
        elif isinstance(s, int) and not isinstance(s, bool):
            host *= float(s)
        else:
            dev.append(s)
    return host, dev


def scale_product(buf: "torch.Tensor", host: float, dev: Sequence["torch.Tensor"]) -> Any:
    """``host * prod(dev)`` as a float when ``dev`` is empty, else written into the 1-element ``buf``.

    Capturable: no host read, no allocation (``buf`` is planned).
    """
    import torch

    if not dev:
        return host
    torch.mul(dev[0].view(1), host, out=buf)
    for t in dev[1:]:
        buf.mul_(t.view(1))
    return buf


def _matches(t: Any, sig: tuple) -> bool:
    try:
        return (t.dtype, t.shape, t.get_device()) == sig
    except AttributeError:
        return False


def ln_lse_result(res: Any, want: bool) -> AttentionResult:
    """The result of a kernel that returns ``out``, or ``(out, lse)`` with a base-2 LSE when ``want``.

    The LSE is turned into the contract's natural log in place.
    """
    if not want:
        return new_tuple(AttentionResult, (res, None))
    res[1].mul_(LN2)
    return new_tuple(AttentionResult, (res[0], res[1]))


def mul_out(out: "torch.Tensor", scale: Any) -> None:
    """``out *= scale`` for a non-unit number or a one-element tensor (in place, capturable)."""
    if isinstance(scale, (int, float)):
        if scale != 1.0:
            out.mul_(float(scale))
    else:
        out.mul_(scale.view(1))


class FlashInferAdapter(Adapter):
    """Shared by every FlashInfer adapter: request facts, feature refusals, buffers, fast input checks.

    Subclasses set ``op`` and the class flags below (what their FlashInfer
    path cannot do, so a request for it is refused instead of dropped), and
    implement ``plan()`` / ``run()``.
    """

    libraries = ("torch", "flashinfer")

    drops: dict = {}
    """feature -> why: request features this FlashInfer path would accept and silently ignore,
    or not do at all; the adapter raises instead (the manifest must not declare them)."""

    def __init__(self, spec: Any, request: Any) -> None:
        super().__init__(spec, request)
        for feature, why in self.drops.items():
            if getattr(request, feature, False):
                raise UnsupportedFeatureError(f"{spec.name}: {feature} is not supported: {why}")
        self._fi = flashinfer()
        self.q_dtype = torch_dtype(request.q_dtype)
        self.kv_dtype = torch_dtype(request.kv_dtype)
        self._fp8_q = self.q_dtype.itemsize == 1
        self._fp8_kv = self.kv_dtype.itemsize == 1
        self.out_dtype = torch_dtype(output_dtype(request.q_dtype, getattr(request, "out_dtype", None)))
        self._device = None
        self._device_index = -1
        self._pdl = False
        self._buffers: dict = {}
        self._want_lse = bool(request.return_lse)
        self._want_sinks = bool(getattr(request, "sinks", False))
        self._sig: tuple = ()  # the last run() input signature that passed; () matches nothing

    @property
    def _contract(self) -> str:
        """Names the kernel and op in input errors."""
        return f"{self.spec.name}, {self.op}"

    # -- plan-time helpers --------------------------------------------------

    def _plan_paged(self, metadata: Any, *, causal: Optional[bool] = None) -> int:
        """Refuse unselected plan options, fix the device, validate ``block_table``/``seq_lens``; return the batch."""
        self._check_options(metadata, causal=causal)
        self._bind_device(metadata.block_table)
        return check_paged_metadata(
            metadata.block_table, metadata.seq_lens, self.request.page_size, contract=self._contract
        )

    def _bind_device(self, t: "torch.Tensor") -> None:
        """Fix the device from the plan metadata; FlashInfer needs CUDA tensors."""
        if not t.is_cuda:
            raise AdapterInputError(f"{self.spec.name}: plan metadata is on {t.device}; FlashInfer kernels need CUDA tensors")
        self._device = t.device
        self._device_index = t.get_device()
        self._pdl = bool(self._fi.utils.device_support_pdl(t.device))

    def _plan_io(self, inputs: tuple, out_shape: tuple, lse_shape: tuple) -> None:
        """Fix run()'s tensors at plan time: ``(name, shape, dtype, tail)`` per input, in call order.

        ``tail`` inputs (paged caches) are checked on ``shape[1:]``: the pool
        size is the engine's.  run() compares one tuple of (dtype, shape,
        device) per input with the last signature that passed (``_sig``); only
        a new signature pays for the per-argument check in ``_learn_inputs``.
        """
        import torch

        dev = self._device_index
        self._inputs = inputs
        self._sig = ()
        self._out_sig = (self.out_dtype, torch.Size(out_shape), dev)
        self._lse_sig = (torch.float32, torch.Size(lse_shape), dev)

    def _plan_mha_io(self, tokens: int, d: int, dv: int) -> None:
        """``_plan_io`` of MHA over the paged cache: q ``[tokens, Hq, D]``, k/v caches ``[*, S, Hkv, D|Dv]``."""
        r = self.request
        self._plan_io(
            (("q", (tokens, r.num_qo_heads, d), self.q_dtype, False),
             ("k_cache", (r.page_size, r.num_kv_heads, d), self.kv_dtype, True),
             ("v_cache", (r.page_size, r.num_kv_heads, dv), self.kv_dtype, True)),
            out_shape=(tokens, r.num_qo_heads, dv), lse_shape=(tokens, r.num_qo_heads),
        )

    def _plan_mla_io(self, tokens: int, rank: int, rope: int) -> None:
        """``_plan_io`` of MLA: q_nope ``[tokens, Hq, R]``, q_pe ``[tokens, Hq, Dr]``, the latent cache ``[*, S, R+Dr]``."""
        r = self.request
        nope_shape = (tokens, r.num_qo_heads, rank)
        self._plan_io(
            (("q_nope", nope_shape, self.q_dtype, False), ("q_pe", (tokens, r.num_qo_heads, rope), self.q_dtype, False),
             ("kv_cache", (r.page_size, rank + rope), self.kv_dtype, True)),
            out_shape=nope_shape, lse_shape=(tokens, r.num_qo_heads),
        )

    # -- run-time helpers (hot path: keep them cheap) ----------------------

    def _check_inputs(self, a: Any, b: Any, c: Any, sinks: Any, out: Any, lse: Any) -> bool:
        """run()'s checks of its three tensors, ``sinks`` and ``out``/``lse``; return whether the LSE is wanted.

        The tensors' signature is compared with the last one that passed; the
        other checks run only when an argument is given (or sinks requested).
        """
        try:
            sig = (a.dtype, a.shape, a.get_device(), b.dtype, b.shape, b.get_device(), c.dtype, c.shape, c.get_device())
        except AttributeError:
            sig = None
        if sig != self._sig:
            self._learn_inputs(sig, a, b, c)
        if sinks is not None or self._want_sinks:
            self._check_sinks(sinks)
        return self._want_lse if out is None and lse is None else self._outputs(out, lse)

    def _learn_inputs(self, sig: Optional[tuple], *tensors: Any) -> None:
        """A signature run() has not seen since plan(): check every argument, then remember it.

        Raises naming the first argument that breaks the contract.
        """
        if not self._planned:
            self._require_planned()
        for (name, shape, dtype, tail), t in zip(self._inputs, tensors):
            self._expect(name, t, shape, dtype, tail=tail)
        self._sig = sig

    def _outputs(self, out: Any, lse: Any) -> bool:
        """Check caller-owned ``out``/``lse`` against the plan; return whether the LSE is wanted."""
        if out is not None:
            try:
                ok = (out.dtype, out.shape, out.get_device()) == self._out_sig
            except AttributeError:
                ok = False
            if not ok:
                self._expect("out", out, self._out_sig[1], self.out_dtype)
        if lse is not None:
            if not self._want_lse:
                self._refuse("return_lse (an lse= buffer)", True)
            if not _matches(lse, self._lse_sig):
                self._expect("lse", lse, self._lse_sig[1], self._lse_sig[0])
        return self._want_lse

    def _check_sinks(self, sinks: Any) -> None:
        """``sinks`` (fp32 ``[num_qo_heads]``) is passed exactly when the request asked for sinks."""
        import torch

        if sinks is None:
            if self._want_sinks:
                raise AdapterInputError(f"{self.spec.name}: the request has sinks=True; pass sinks= (fp32 [num_qo_heads])")
            return
        self._refuse("sinks", not self._want_sinks)
        self._expect("sinks", sinks, (self.request.num_qo_heads,), torch.float32)

    def _expect(self, name: str, t: Any, shape: tuple, dtype: "torch.dtype", *, tail: bool = False) -> None:
        """Cheap check of shape (or ``shape[1:]`` with ``tail``), dtype and device; the slow path explains."""
        try:
            ok = (
                t.dtype == dtype
                and (t.shape[1:] if tail else t.shape) == shape
                and t.get_device() == self._device_index
            )
        except AttributeError:
            ok = False
        if not ok:
            want = ((None,) + tuple(shape)) if tail else shape
            check_tensor(name, t, shape=want, dtype=dtype, contract=self._contract)
            raise AdapterInputError(f"{name}: on {t.device}, expected {self._device} ({self._contract})")

    def _scales(self, names: tuple, scales: tuple) -> tuple[float, list]:
        """Validate scales (floats skip the checks) and split them into a host product and tensors."""
        host, dev = split_scales(*scales)
        for name, s in zip(names, scales):
            if not isinstance(s, float):
                scale_arg(name, s, device=self._device, contract=self._contract)
        return host, dev

    def _prescaled(self, q: "torch.Tensor", host: float, dev: Sequence["torch.Tensor"], slot: str = "q") -> "torch.Tensor":
        """``q * host * prod(dev)`` into a buffer planned for it (for scales a library cannot take).

        The buffer is allocated by ``plan()`` when the request's dtypes make
        scales likely (FP8), else on first use.
        """
        import torch

        buf = self._buffers.get(slot)
        if buf is None or buf.shape != q.shape or buf.dtype != q.dtype:
            buf = self._buffers[slot] = torch.empty_like(q)
        if dev:
            torch.mul(q, dev[0].view(1), out=buf)
            for t in dev[1:]:
                buf.mul_(t.view(1))
            if host != 1.0:
                buf.mul_(host)
        else:
            torch.mul(q, host, out=buf)
        return buf

    def _plan_buffer(self, slot: str, shape: tuple, dtype: "torch.dtype") -> None:
        import torch

        buf = self._buffers.get(slot)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            self._buffers[slot] = torch.empty(shape, dtype=dtype, device=self._device)
