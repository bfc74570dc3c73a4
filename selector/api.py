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
lock.  A selection is stored only once complete.  The record of unavailable
kernels (``selector.availability.UnavailableKernels``) has its own lock; after
a change it drops the cached selections under the selector's lock, so a miss
that read the record before the change cannot leave a stale selection behind.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any, Mapping, Optional

from registry.errors import RequestError
from registry.loader import load_manifest
from registry.perf import PerfTable
from registry.perf_policy import choose_perf_table
from registry.schema import Manifest
from registry.vocab import Arch
from selector.availability import UNAVAILABLE, UnavailableKernels, probe
from selector.overrides import ENV_PERF, Overrides
from selector.platform import TORCH, Gpu, Platform, detect_gpus, installed_versions, required_distributions
from selector.request import KernelRequest
from selector.selection import KernelUnavailableError, NoKernelError, Selection
from selector.solver import solve


class Selector:
    """A manifest + platform + overrides, with a per-request cache of selections.

    It owns the record of kernels found unusable here (``unavailable_kernels``)
    and hands it to every selection it makes; a failure recorded there (by a
    selection building its adapter, or by ``mark_unavailable``) drops the cached
    selections, so the next one moves on.  A process group's selection
    (``select(request, group=...)``) goes through ``selector.distributed``,
    which uses only this class's public methods (its ``GroupMember`` protocol).
    """

    def __init__(self, manifest: Manifest, platform: Platform, overrides: Overrides = Overrides(),
                 perf: Optional[PerfTable] = None, *, auto_perf: bool = False):
        self.manifest = manifest
        self.platform = platform
        self.overrides = overrides
        self.perf = perf
        self._auto_perf = auto_perf and perf is None  # find the committed table for the GPU, once known
        self._gpu: Optional[Gpu] = None  # found through torch once, when needed
        self._gpu_detected = False
        self._cache: dict[KernelRequest, Selection] = {}
        self._lock = threading.RLock()  # the miss path: solve, arch detection, perf lookup, dropping the cache
        self.unavailable_kernels = UnavailableKernels()
        self.unavailable_kernels.subscribe(self._forget_selections)
        self._agreed: dict[Any, Selection] = {}  # (request, process group) -> the selection the group agreed on
        self._group_lock = threading.Lock()  # one group selection (a collective) at a time; misses go on meanwhile

    @classmethod
    def from_env(cls) -> "Selector":
        overrides = Overrides.from_env()
        manifest = load_manifest(overrides.manifest)
        libraries = installed_versions(required_distributions(manifest.solutions))
        # the arch (and the GPU's committed perf table) is found through torch only when needed: see solve()
        perf = choose_perf_table(overrides.perf, setting_name=ENV_PERF)
        return cls(manifest, Platform(arch=None, libraries=libraries, detected=True), overrides, perf.table,
                   auto_perf=perf.needs_gpu)

    def _detected_gpu(self) -> Optional[Gpu]:
        """This machine's current GPU through torch (imports it), asked once per selector."""
        with self._lock:
            if not self._gpu_detected:
                self._gpu = detect_gpus((TORCH,)).current
                self._gpu_detected = True
            return self._gpu

    def _device_arch(self) -> Arch:
        if self.platform.arch is None:
            gpu = self._detected_gpu()
            if gpu is None or gpu.arch is None:
                raise RequestError(
                    "request.arch: not given and no CUDA device was detected; pass arch='sm_90' (or 9.0, sm90)"
                )
            self.platform = dataclasses.replace(self.platform, arch=gpu.arch, device_name=gpu.name)
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
                gpu = self._detected_gpu()
                if gpu is not None:
                    self.perf = choose_perf_table(None, gpu.name, gpu.arch).table
            selection = self.solve_excluding(full, {})
            self._cache[request] = selection
            return selection

    def complete(self, request: KernelRequest) -> KernelRequest:
        """``request`` with the arch of this machine's GPU filled in when it has none."""
        if request.arch is not None:
            return request
        with self._lock:
            return KernelRequest(**{**request.model_dump(exclude_defaults=True), "arch": self._device_arch()})

    def solve_excluding(self, request: KernelRequest, excluded: Mapping[str, str]) -> Selection:
        """A fresh (uncached) selection for ``request`` with the ``excluded`` kernels rejected for the reasons given.

        A process group uses it for the selection it agreed on: this rank's
        verdicts, with the kernels another rank cannot run rejected and why.
        """
        full = self.complete(request)
        return solve(self.manifest, self.platform, full, self.overrides, self.perf, excluded,
                     unavailable_kernels=self.unavailable_kernels)

    def select(self, request: KernelRequest, *, group: Any = None) -> Selection:
        """Like ``solve`` but raises NoKernelError when nothing fits.

        With ``group`` (a ``torch.distributed`` process group) every rank of the
        group gets the same kernel: see ``selector.distributed``.  The agreed
        selection is cached per (request, group).
        """
        if group is not None:
            key = (request, group)
            hit = self._agreed.get(key)
            if hit is not None:
                return hit
            with self._group_lock:  # not self._lock: other threads' cache misses go on during the collective
                hit = self._agreed.get(key)
                if hit is None:
                    from selector.distributed import select_in_group

                    hit = self._agreed[key] = select_in_group(self, request, group)
            return hit
        selection = self.solve(request)
        if selection.kernel is None:
            raise self._no_kernel(selection)
        return selection

    def forced_kernel(self, request: KernelRequest) -> Optional[str]:
        """The kernel forced for ``request`` (its ``kernel=``, else ``KERNELSEL_FORCE_<OP>``), or None."""
        return request.kernel or self.overrides.forced(request.op)

    def _no_kernel(self, selection: Selection) -> NoKernelError:
        """NoKernelError, or KernelUnavailableError when a forced kernel is known to be unusable here."""
        if selection.forced_by:
            name = self.forced_kernel(selection.request)
            reason = self.unavailable_reason(name, selection.request)
            if reason is not None:
                return KernelUnavailableError(selection, [(name, reason)])
        return NoKernelError(selection)

    # ------------------------------------------------------------ availability
    def build_adapter(self, kernel: str, request: KernelRequest) -> tuple[Any, Optional[str]]:
        """``kernel``'s adapter for ``request`` (``(adapter, None)``), or ``(None, reason)``, recorded as unavailable.

        No fallback: a process group builds the kernel it agreed on this way on
        every rank, and drops it everywhere if any rank gets a reason.
        """
        spec = self.manifest.by_name[kernel]
        install = self.manifest.solutions[spec.solution].install
        return self.unavailable_kernels.build_adapter(spec, self.complete(request), install)

    def mark_unavailable(self, kernel: str, reason: str, request: Optional[KernelRequest] = None) -> None:
        """Record that ``kernel``'s adapter cannot be used here (for ``request`` only, or for every request).

        Later selections reject it with ``reason`` (explain shows it) and pick
        the next eligible kernel; cached selections are dropped so they do.
        ``Selection.adapter`` records failures the same way (in
        ``unavailable_kernels``); an engine may call this too (e.g. after a
        failed warm-up run).
        """
        if kernel not in self.manifest.by_name:
            raise RequestError(f"mark_unavailable: no kernel named {kernel!r}")
        self.unavailable_kernels.mark(kernel, reason, None if request is None else self.complete(request))

    def _forget_selections(self) -> None:
        """The unavailable-kernel record changed: cached selections may be stale (a hit stays one dict lookup)."""
        with self._lock:
            self._cache = {}

    def unavailable_reason(self, kernel: str, request: Optional[KernelRequest] = None) -> Optional[str]:
        """Why ``kernel`` cannot be used here (for ``request``), or None if nothing is recorded."""
        return self.unavailable_kernels.reason(kernel, request)

    @property
    def unavailable(self) -> dict[str, str]:
        """Kernels recorded as unusable here for every request: name -> reason."""
        return self.unavailable_kernels.kernel_wide

    def probe(self, request: KernelRequest) -> Selection:
        """Import every eligible kernel's adapter and libraries now; record the failures; solve again.

        The selection then rejects kernels whose library is installed but does
        not import (explain shows why).  Imports torch, flashinfer, triton.
        """
        for kernel in self.solve(request).eligible:
            _, reason = probe(kernel.adapter, self.manifest.solutions[kernel.solution].install)
            if reason is not None:
                self.mark_unavailable(kernel.name, UNAVAILABLE + reason)
        return self.solve(request)


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
