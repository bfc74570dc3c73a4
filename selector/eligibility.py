"""Eligibility in words: every reason one kernel cannot serve one request.

``reasons()`` is the definition of eligibility: a kernel is eligible for a
request when it returns nothing.  Selection errors, explain and ``kernelsel
doctor`` read its words; the solver's compiled form (``selector.compiled``)
answers the same question for all kernels of an op at once, and a test checks
on random requests and manifests that the two never disagree.
``platform_reasons()`` is the part that holds for every request on a machine,
made of the same checks with the same words.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from registry.schema import KernelSpec, Manifest
from registry.vocab import Solution
from selector.overrides import ENV_DISABLE, Overrides
from selector.platform import Platform
from selector.request import KernelRequest

_NONE: Mapping[str, str] = MappingProxyType({})

DISABLED = f"disabled by {ENV_DISABLE}"
"""The reason for a kernel named in ``KERNELSEL_DISABLE``."""

REFERENCE_ONLY = "reference kernel: chosen only with solution=reference or kernel=<name>"
"""The reason a reference (plain torch) kernel is not chosen automatically."""


def reasons(
    kernel: KernelSpec,
    request: KernelRequest,
    manifest: Manifest,
    platform: Platform,
    overrides: Overrides = Overrides(),
    *,
    forced: bool = False,
    unavailable: Mapping[str, str] = _NONE,
) -> tuple[str, ...]:
    """Every reason ``kernel`` cannot serve ``request``; empty means eligible.

    ``unavailable`` maps kernel names to why their adapter cannot be used on
    this machine (found when one was built, see ``selector.availability``), or
    in a process group why another rank cannot run them; shown verbatim.
    """
    out: list[str] = []
    if kernel.name in overrides.disable:
        out.append(DISABLED)
    out += restriction_reasons(kernel, request, forced=forced)
    for field, constraint in kernel.constraints:
        value = getattr(request, field)
        if value is not None:
            problem = constraint.check(field, value, request)
            if problem:
                out.append(problem)
    for feature in kernel.unsupported_features:
        if getattr(request, feature):
            out.append(f"needs {feature}: unsupported")
    for exclusion in kernel.exclude:
        if exclusion.matches(request):
            out.append(f"excluded: {exclusion.reason} ({exclusion.ref})")
    out.extend(_availability_reasons(kernel, manifest, platform, unavailable))
    return tuple(out)


def _availability_reasons(kernel: KernelSpec, manifest: Manifest, platform: Platform,
                          unavailable: Mapping[str, str]) -> list[str]:
    """A required distribution not installed; the adapter failed to import or build (recorded earlier)."""
    missing = library_reason(kernel, manifest, platform)
    return ([missing] if missing else []) + ([unavailable[kernel.name]] if kernel.name in unavailable else [])


def restriction_reasons(kernel: KernelSpec, request: KernelRequest, *, forced: bool = False) -> list[str]:
    """Why the request's ``solution`` / ``backend`` restriction, or the reference rule, rules ``kernel`` out."""
    out = []
    if request.solution is not None and kernel.solution is not request.solution:
        out.append(f"solution {kernel.solution.value}, request restricted to {request.solution.value}")
    if request.backend is not None and kernel.backend is not request.backend:
        out.append(f"backend {kernel.backend.value}, request restricted to {request.backend.value}")
    if kernel.solution is Solution.REFERENCE and request.solution is not Solution.REFERENCE and not forced:
        out.append(REFERENCE_ONLY)
    return out


def platform_reasons(
    kernel: KernelSpec,
    manifest: Manifest,
    platform: Platform,
    overrides: Overrides = Overrides(),
    unavailable: Mapping[str, str] = _NONE,
) -> tuple[str, ...]:
    """The reasons of ``reasons()`` that hold for every request on ``platform``, worded the same.

    Disabled, the arch outside the kernel's range (when the platform's arch is
    known), a required distribution not installed, the adapter unavailable.
    What ``kernelsel doctor`` shows per kernel, without a request.
    """
    out: list[str] = []
    if kernel.name in overrides.disable:
        out.append(DISABLED)
    if platform.arch is not None:
        problem = kernel.arch.check("arch", platform.arch)
        if problem:
            out.append(problem)
    out.extend(_availability_reasons(kernel, manifest, platform, unavailable))
    return tuple(out)


def library_reason(kernel: KernelSpec, manifest: Manifest, platform: Platform) -> Optional[str]:
    """Why ``platform`` lacks a distribution ``kernel``'s solution requires (package metadata only), or None."""
    info = manifest.solutions[kernel.solution]
    missing = [d for d in info.requires if not platform.has(d)]
    return f"needs {', '.join(missing)}, not installed: {info.install}" if missing else None
