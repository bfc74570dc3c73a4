"""The runtime entry point: ``select_kernel()`` over a cached default context.

The default context is built on first use: the manifest (``KERNELSEL_MANIFEST``
or the bundled one), the installed libraries, and the environment overrides,
each read once.  Selections are cached per request, so a hit costs about a
dict lookup.  ``reset()`` drops the context (tests, or after changing the
environment).

Thread safety: a cache hit is one ``dict.get`` and takes no lock (a dict read
is atomic under the GIL, and free-threaded CPython 3.13t guards each dict with
its own lock).  A miss takes the selector's lock, looks again, and only then
detects the arch, finds the perf table and solves: so a request is solved
once however many threads miss at the same time, every caller gets the same
``Selection`` object, and the platform and perf table change only under the
lock.  A selection is stored only once complete.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any, Mapping, Optional

from registry.errors import RequestError
from registry.loader import bundled_perf_dir, load_manifest, load_perf_table
from registry.perf import PerfTable
from registry.schema import Manifest
from registry.vocab import Arch
from selector.overrides import Overrides
from selector.platform import Platform, _cuda_device, installed_versions, required_distributions
from selector.request import KernelRequest
from selector.selection import KernelUnavailableError, NoKernelError, Selection
from selector.solver import solve


class Selector:
    """A manifest + platform + overrides, with a per-request cache of selections."""

    def __init__(self, manifest: Manifest, platform: Platform, overrides: Overrides = Overrides(),
                 perf: Optional[PerfTable] = None, *, auto_perf: bool = False):
        self.manifest = manifest
        self.platform = platform
        self.overrides = overrides
        self.perf = perf
        self._auto_perf = auto_perf and perf is None  # find the committed table for the GPU, once known
        self._cache: dict[KernelRequest, Selection] = {}
        self._lock = threading.RLock()  # the miss path: solve, arch detection, perf lookup, unavailability
        self._unavailable: dict[str, str] = {}  # kernel -> reason, for every request (an import failure)
        self._unavailable_for: dict[KernelRequest, dict[str, str]] = {}  # request -> kernel -> reason (a constructor)
        self._agreed: dict[Any, Selection] = {}  # (request, process group) -> the selection the group agreed on
        self._group_lock = threading.Lock()  # one group selection (a collective) at a time; misses go on meanwhile

    @classmethod
    def from_env(cls) -> "Selector":
        overrides = Overrides.from_env()
        manifest = load_manifest(overrides.manifest)
        libraries = installed_versions(required_distributions(manifest.solutions))
        perf = None
        if overrides.perf and overrides.perf.lower() != "off":
            perf = load_perf_table(overrides.perf)
        # the arch is detected (through torch) only when a request arrives without one
        return cls(manifest, Platform(arch=None, libraries=libraries, detected=True), overrides, perf,
                   auto_perf=overrides.perf is None)

    def _device_arch(self) -> Arch:
        if self.platform.arch is None:
            arch, name = _cuda_device()
            if arch is None:
                raise RequestError(
                    "request.arch: not given and no CUDA device was detected; pass arch='sm_90' (or 9.0, sm90)"
                )
            self.platform = dataclasses.replace(self.platform, arch=arch, device_name=name)
        return self.platform.arch

    def solve(self, request: KernelRequest) -> Selection:
        """The selection for ``request`` (cached), whether or not a kernel was found."""
        hit = self._cache.get(request)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._cache.get(request)
            if hit is not None:  # another thread solved it while this one waited
                return hit
            full = self.complete(request)
            if self._auto_perf and (request.arch is None or "torch" in sys.modules):
                self._auto_perf = False  # never import torch just for this: engines have it loaded already
                arch, name = _cuda_device()
                self.perf = find_perf_table(name, arch)
            selection = self._solve(full)
            self._cache[request] = selection
            return selection

    def complete(self, request: KernelRequest) -> KernelRequest:
        """``request`` with the arch of this machine's GPU filled in when it has none."""
        if request.arch is not None:
            return request
        with self._lock:
            return KernelRequest(**{**request.model_dump(exclude_defaults=True), "arch": self._device_arch()})

    def _solve(self, full: KernelRequest, extra: Optional[Mapping[str, str]] = None) -> Selection:
        """solve() with this selector's context and unavailable kernels (plus ``extra``), owned by it."""
        unavailable = {**self._unavailable, **self._unavailable_for.get(full, {}), **(extra or {})}
        selection = solve(self.manifest, self.platform, full, self.overrides, self.perf, unavailable)
        object.__setattr__(selection, "_owner", self)  # before it is published: records adapter failures here
        return selection

    def select(self, request: KernelRequest, *, group: Any = None) -> Selection:
        """Like ``solve`` but raises NoKernelError when nothing fits.

        With ``group`` (a ``torch.distributed`` process group) every rank of the
        group gets the same kernel: see ``selector.distributed``.
        """
        if group is not None:
            from selector.distributed import select_in_group

            return select_in_group(self, request, group)
        selection = self.solve(request)
        if selection.kernel is None:
            raise self._no_kernel(selection)
        return selection

    def _no_kernel(self, selection: Selection) -> NoKernelError:
        """NoKernelError, or KernelUnavailableError when a forced kernel is known to be unusable here."""
        if selection.forced_by:
            name = selection.request.kernel or self.overrides.forced(selection.request.op)
            reason = self.unavailable_reason(name, selection.request)
            if reason is not None:
                return KernelUnavailableError(selection, [(name, reason)])
        return NoKernelError(selection)

    # ------------------------------------------------------------ availability
    def mark_unavailable(self, kernel: str, reason: str, request: Optional[KernelRequest] = None) -> None:
        """Record that ``kernel``'s adapter cannot be used here (for ``request`` only, or for every request).

        Later selections reject it with ``reason`` (explain shows it) and pick
        the next eligible kernel; cached selections are dropped so they do.
        ``Selection.adapter`` calls this when an adapter fails to import or
        build; an engine may call it too (e.g. after a failed warm-up run).
        """
        if kernel not in self.manifest.by_name:
            raise RequestError(f"mark_unavailable: no kernel named {kernel!r}")
        with self._lock:
            if request is None:
                self._unavailable[kernel] = reason
            else:
                self._unavailable_for.setdefault(self.complete(request), {})[kernel] = reason
            self._cache = {}

    def unavailable_reason(self, kernel: str, request: Optional[KernelRequest] = None) -> Optional[str]:
        """Why ``kernel`` cannot be used here (for ``request``), or None if nothing is recorded."""
        reason = self._unavailable.get(kernel)
        if reason is None and request is not None:
            reason = self._unavailable_for.get(request, {}).get(kernel)
        return reason

    @property
    def unavailable(self) -> dict[str, str]:
        """Kernels recorded as unusable here for every request: name -> reason."""
        return dict(self._unavailable)

    def probe(self, request: KernelRequest) -> Selection:
        """Import every eligible kernel's adapter and libraries now; record the failures; solve again.

        The selection then rejects kernels whose library is installed but does
        not import (explain shows why).  Imports torch, flashinfer, triton.
        """
        from selector.availability import UNAVAILABLE, probe
        from selector.selection import _adapter_class

        for kernel in self.solve(request).eligible:
            _, reason = probe(kernel.adapter, _adapter_class, self.manifest.solutions[kernel.solution].install)
            if reason is not None:
                self.mark_unavailable(kernel.name, UNAVAILABLE + reason)
        return self.solve(request)


def find_perf_table(gpu: str, arch: Optional[Arch]) -> Optional[PerfTable]:
    """The committed perf table for this GPU model and arch, if there is one."""
    if not gpu or arch is None:
        return None
    directory = bundled_perf_dir()
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        table = load_perf_table(path)
        if table.matches(gpu, arch):
            return table
    return None


_DEFAULT: Optional[Selector] = None
_LOCK = threading.Lock()


def default_selector() -> Selector:
    global _DEFAULT
    if _DEFAULT is None:
        with _LOCK:
            if _DEFAULT is None:
                _DEFAULT = Selector.from_env()
    return _DEFAULT


def reset() -> None:
    """Forget the default context: the manifest, platform and environment are read again on next use."""
    global _DEFAULT
    _DEFAULT = None


def select_kernel(
    request: Optional[KernelRequest] = None,
    /,
    *,
    manifest: Optional[Manifest] = None,
    platform: Optional[Platform] = None,
    **fields: Any,
) -> Selection:
    """Resolve a request to a kernel.  ``select_kernel(req)`` or ``select_kernel(op=..., arch=..., ...)``.

    Raises ``RequestError`` for a bad field and ``NoKernelError`` (listing every
    kernel with its reasons) when nothing fits or a forced kernel cannot serve.
    Safe to call from many threads at once.

    ``group=`` (keyword; a ``torch.distributed`` process group) makes it a
    collective: call it on every rank of the group; all ranks get the best
    kernel eligible (and whose adapter builds) on every rank, or all raise
    the same ``GroupSelectionError``.  See ``selector.distributed``.  (It
    travels in ``fields`` so that the cached path stays one dict lookup.)
    """
    if request is not None and not fields and manifest is None and platform is None:
        selector = _DEFAULT or default_selector()
        hit = selector._cache.get(request)
        if hit is not None and hit.kernel is not None:
            return hit
        return selector.select(request)
    group = fields.pop("group", None)
    if request is None:
        request = KernelRequest(**fields)
    elif fields:
        raise RequestError(f"pass either a KernelRequest or keyword fields, not both (got {', '.join(fields)})")
    if manifest is None and platform is None:
        return default_selector().select(request, group=group)
    base = default_selector() if (manifest is None or platform is None) else None
    selector = Selector(
        manifest if manifest is not None else base.manifest,
        platform if platform is not None else base.platform,
        base.overrides if base is not None else Overrides(),
        base.perf if base is not None else None,
    )
    return selector.select(request, group=group)
