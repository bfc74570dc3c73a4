"""What every adapter shares: construction, input checks, workspaces, lazy imports.

An adapter translates the op contract (``registry.contracts``) into one
library call.  It *asserts* its contract; it never decides eligibility (the
manifest declares that) and reads no environment flags.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from registry.contracts import sm_scale
from registry.errors import AdapterInputError, MissingDependencyError, UnsupportedFeatureError

if TYPE_CHECKING:
    import torch


def import_library(module: str, extra: str) -> Any:
    """Import ``module``; on failure keep the original message and add the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{exc} -- this kernel needs {module!r}: pip install 'kernelsel[{extra}]'"
        ) from exc


def _torch_dtypes() -> dict:
    import torch

    return {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2,
    }


def torch_dtype(name: str) -> "torch.dtype":
    """Manifest dtype name -> torch dtype."""
    return _torch_dtypes()[str(name)]


def dtype_name(dtype: "torch.dtype") -> Optional[str]:
    """torch dtype -> manifest dtype name; None for a dtype the manifest has no name for."""
    return next((name for name, t in _torch_dtypes().items() if t == dtype), None)


def check_tensor(
    name: str,
    t: Any,
    *,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtype: Any = None,
    device: Any = None,
    contiguous: bool = False,
    contract: str = "",
) -> None:
    """Raise AdapterInputError naming the argument, what it got and what the contract wants.

    ``shape`` entries of ``None`` match any size.  ``dtype`` may be a torch
    dtype or a tuple of them.
    """
    import torch

    where = f" ({contract})" if contract else ""
    if not isinstance(t, torch.Tensor):
        raise AdapterInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}{where}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(w is None or w == g for w, g in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise AdapterInputError(f"{name}: shape {list(t.shape)} does not match {want}{where}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise AdapterInputError(
                f"{name}: dtype {str(t.dtype).removeprefix('torch.')} not in [{names}]{where}"
            )
    if device is not None and t.device != torch.device(device):
        raise AdapterInputError(f"{name}: on {t.device}, expected {device}{where}")
    if contiguous and not t.is_contiguous():
        raise AdapterInputError(f"{name}: must be contiguous{where}")


class Adapter:
    """Base of every adapter: holds the kernel spec and the request it was selected for.

    Subclasses set ``op`` and implement ``plan()`` / ``run()`` with the op's
    contract from ``registry.contracts``.
    """

    op: ClassVar[str] = ""
    libraries: ClassVar[tuple[str, ...]] = ("torch",)
    """Modules this adapter imports on first use: ``kernelsel doctor`` and the availability probe
    (``selector.availability``) import them to find an installed-but-broken library before it is used."""

    def __init__(self, spec: Any, request: Any) -> None:
        if self.op and str(spec.op) != self.op:
            raise AdapterInputError(
                f"{type(self).__name__} implements {self.op}, but kernel {spec.name!r} is {spec.op}"
            )
        self.spec = spec
        self.request = request
        self._planned = False

    @classmethod
    def launch_variant(cls, request: Any, env: Any) -> Any:
        """Which of the kernel's launches runs for ``request`` on ``env`` (a ``registry.variants.LaunchEnv``).

        None: the kernel has one launch.  An adapter with several returns its
        planner's ``VariantChoice``, so explain shows what ``plan()`` runs.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel={self.spec.name!r})"

    def _sm_scale(self, metadata: Any) -> float:
        """The plan's ``sm_scale``, or the op's default for the request (``registry.contracts.sm_scale``)."""
        return sm_scale(metadata, self.request, kernel=self.spec.name)

    def _require_planned(self) -> None:
        if not self._planned:
            raise AdapterInputError(f"{self!r}: run() before plan(); call plan(metadata) once per batch shape")

    def _refuse(self, feature: str, given: bool) -> None:
        """Raise if the caller passes a feature this kernel was not selected for."""
        if given:
            raise UnsupportedFeatureError(
                f"{self.spec.name}: {feature} was passed, but the request this adapter was "
                f"selected for did not ask for it; select with {feature}=True to get a kernel that supports it"
            )

    def _check_options(self, metadata: Any, *, causal: Optional[bool] = None) -> None:
        """Refuse plan options (window, soft cap, and with ``causal`` given non-causal) the request did not select."""
        r = self.request
        self._refuse("sliding_window", metadata.window_left >= 0 and not getattr(r, "sliding_window", False))
        self._refuse("logits_soft_cap", metadata.logits_soft_cap > 0 and not getattr(r, "logits_soft_cap", False))
        if causal is not None:
            self._refuse("non_causal", not causal and not getattr(r, "non_causal", False))

    def _check_requested_q_len(self, q_len: int) -> None:
        """A plan's ``q_len`` is at least 1 and at most the request's (when it names one)."""
        allowed = getattr(self.request, "q_len", None)
        if q_len < 1:
            raise AdapterInputError(f"q_len: {q_len}, expected >= 1 ({self.op})")
        if allowed is not None and q_len > allowed:
            raise UnsupportedFeatureError(
                f"{self.spec.name}: plan() got q_len={q_len} but the request was selected for q_len={allowed}; "
                f"select with q_len={q_len}"
            )


def refuse_sparse_options(kernel: str, metadata: Any) -> None:
    """``sparse_mla_decode`` reads the positions its indexer chose: refuse a window or a soft cap."""
    if metadata.window_left >= 0 or metadata.logits_soft_cap > 0:
        raise UnsupportedFeatureError(
            f"{kernel}: sparse_mla_decode takes no window_left or logits_soft_cap; "
            f"which positions are read is the indexer's choice (topk_indices)"
        )


_WORKSPACES: dict = {}


def workspace(device: Any, nbytes: int, tag: str = "float") -> "torch.Tensor":
    """A zero-initialised uint8 buffer of at least ``nbytes`` per (device, tag), reused across adapters."""
    import torch

    key = (str(torch.device(device)), tag)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        _WORKSPACES[key] = buf
    return buf
