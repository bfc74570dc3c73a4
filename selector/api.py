"""The runtime entry point: ``select_kernel()`` over a cached default context.

The default context is built on first use: the manifest (``KERNELSEL_MANIFEST``
or the bundled one), the installed libraries, and the environment overrides,
each read once.  Selections are cached per request, so a hit costs about a
dict lookup.  ``reset()`` drops the context (tests, or after changing the
environment).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any, Optional

from registry.errors import RequestError
from registry.loader import bundled_perf_dir, load_manifest, load_perf_table
from registry.perf import PerfTable
from registry.schema import Manifest
from registry.vocab import Arch
from selector.overrides import Overrides
from selector.platform import Platform, _cuda_device, installed_versions, required_distributions
from selector.request import KernelRequest
from selector.selection import NoKernelError, Selection
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
        try:
            return self._cache[request]
        except KeyError:
            pass
        full = request
        if request.arch is None:
            full = KernelRequest(**{**request.model_dump(exclude_defaults=True), "arch": self._device_arch()})
        if self._auto_perf and (request.arch is None or "torch" in sys.modules):
            self._auto_perf = False  # never import torch just for this: engines have it loaded already
            arch, name = _cuda_device()
            self.perf = find_perf_table(name, arch)
        selection = solve(self.manifest, self.platform, full, self.overrides, self.perf)
        self._cache[request] = selection
        return selection

    def select(self, request: KernelRequest) -> Selection:
        """Like ``solve`` but raises NoKernelError when nothing fits."""
        selection = self.solve(request)
        if selection.kernel is None:
            raise NoKernelError(selection)
        return selection


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
    """
    if request is not None and not fields and manifest is None and platform is None:
        selector = _DEFAULT or default_selector()
        hit = selector._cache.get(request)
        if hit is not None and hit.kernel is not None:
            return hit
        return selector.select(request)
    if request is None:
        request = KernelRequest(**fields)
    elif fields:
        raise RequestError(f"pass either a KernelRequest or keyword fields, not both (got {', '.join(fields)})")
    if manifest is None and platform is None:
        return default_selector().select(request)
    base = default_selector() if (manifest is None or platform is None) else None
    selector = Selector(
        manifest if manifest is not None else base.manifest,
        platform if platform is not None else base.platform,
        base.overrides if base is not None else Overrides(),
        base.perf if base is not None else None,
    )
    return selector.select(request)
