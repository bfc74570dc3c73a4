"""The solver: every kernel of the op against every declared constraint, all reasons kept.

``solve(manifest, platform, request, overrides)`` is pure: it imports no
torch, reads no environment and returns a ``Selection`` (winner or not)
holding every verdict.  One function, ``reasons()``, decides eligibility;
selection, errors and explain all read its output, and ``platform_reasons()``
(the part that holds for every request on a machine, which ``kernelsel
doctor`` lists) is made of the same checks with the same words.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from registry.errors import RequestError
from registry.priority import band_name
from registry.perf import PerfTable
from registry.schema import KernelSpec, Manifest
from registry.vocab import Solution
from selector.availability import UnavailableKernels
from selector.overrides import ENV_DISABLE, Overrides, forced_kernel_problem
from selector.platform import Platform
from selector.ranking import NO_ESTIMATES, Estimates, estimate
from selector.request import KernelRequest
from selector.selection import Selection, Verdict

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
    missing = library_reason(kernel, manifest, platform)
    if missing:
        out.append(missing)
    if kernel.name in unavailable:
        out.append(unavailable[kernel.name])
    return tuple(out)


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
    missing = library_reason(kernel, manifest, platform)
    if missing:
        out.append(missing)
    if kernel.name in unavailable:
        out.append(unavailable[kernel.name])
    return tuple(out)


def library_reason(kernel: KernelSpec, manifest: Manifest, platform: Platform) -> Optional[str]:
    """Why ``platform`` lacks a distribution ``kernel``'s solution requires (package metadata only), or None."""
    info = manifest.solutions[kernel.solution]
    missing = [d for d in info.requires if not platform.has(d)]
    return f"needs {', '.join(missing)}, not installed: {info.install}" if missing else None


def priority_rank_key(kernel: KernelSpec) -> tuple[int, str]:
    """How eligible kernels rank without measured times: priority, then name (a total order)."""
    return (-kernel.priority, kernel.name)


def _timed_rank_key(times: dict[str, float]):
    """Measured or predicted time first (kernels with neither last), then priority, then name: total, deterministic."""
    inf = float("inf")
    return lambda k: (times.get(k.name, inf), -k.priority, k.name)


def _why(winner: KernelSpec, ranked: list[KernelSpec], total: int, estimates: Estimates = NO_ESTIMATES) -> str:
    if len(ranked) == 1:
        return f"only eligible kernel (1 of {total})"
    times, source = estimates.times, estimates.source
    if winner.name in times:
        runner_up = ranked[1]
        how = "measured" if winner.name in estimates.measured else "predicted"
        if runner_up.name in times:
            ratio = times[runner_up.name] / times[winner.name]
            kind = estimates.kind.replace(" and ", " or ")
            return (
                f"fastest {kind} of {len(ranked)} eligible: {times[winner.name]:.1f} us vs "
                f"{runner_up.name} {times[runner_up.name]:.1f} us ({ratio:.2f}x) [{source}]"
            )
        return f"only eligible kernel {how} ({times[winner.name]:.1f} us) [{source}]"
    runner_up = ranked[1]
    if runner_up.priority == winner.priority:
        return (
            f"tied at priority {winner.priority} with {runner_up.name}; the name breaks the tie "
            f"({len(ranked)} of {total} eligible)"
        )
    return (
        f"highest priority {winner.priority} ({band_name(winner.priority)}) of {len(ranked)} eligible; "
        f"next {runner_up.name} at {runner_up.priority} ({band_name(runner_up.priority)})"
    )


def solve(
    manifest: Manifest,
    platform: Platform,
    request: KernelRequest,
    overrides: Overrides = Overrides(),
    perf: Optional[PerfTable] = None,
    unavailable: Mapping[str, str] = _NONE,
    *,
    unavailable_kernels: Optional[UnavailableKernels] = None,
) -> Selection:
    """Evaluate every kernel of ``request.op``; pick the forced or best-ranked eligible one.

    Eligible kernels rank by time when ``perf`` (a table for this arch) gives
    them one -- measured in the request's bucket, else predicted from its other
    buckets (``selector.ranking``) -- kernels without one after; ties by
    priority, then name.  Without times, by priority.
    ``unavailable_kernels`` is the record of kernels whose adapter cannot be
    used here (a ``Selector``'s): its reasons for the request reject kernels,
    and the selection records adapter failures there.  ``unavailable``
    (kernel name -> reason) rejects more, overriding the record's reason for
    the same kernel (a process group: why another rank cannot run it).
    """
    record = unavailable_kernels if unavailable_kernels is not None else UnavailableKernels()
    unavailable = {**record.reasons(request), **unavailable}
    if request.arch is None:
        raise RequestError(
            "request.arch: not given and no CUDA device was detected; pass arch='sm_90' (or 9.0, sm90)"
        )
    kernels = manifest.by_op[request.op]
    for problem in overrides.problems(manifest):
        if problem.startswith(ENV_DISABLE):  # a disabled name the manifest lacks fails every op
            raise RequestError(problem)
    forced_name, forced_by = _forced(request, overrides)
    if forced_name is not None:
        problem = forced_kernel_problem(manifest, request.op, forced_name, forced_by)
        if problem:
            raise RequestError(problem)

    verdicts = tuple(
        Verdict(k, reasons(k, request, manifest, platform, overrides, forced=(k.name == forced_name),
                           unavailable=unavailable))
        for k in kernels
    )
    eligible = [v.kernel for v in verdicts if v.eligible]
    estimates = estimate(perf, request, [k.name for k in eligible], predict=overrides.predict)
    times = estimates.times
    ranked = sorted(eligible, key=_timed_rank_key(times) if times else priority_rank_key)
    if forced_name is not None:
        forced_verdict = next(v for v in verdicts if v.kernel.name == forced_name)
        chosen: Optional[KernelSpec] = forced_verdict.kernel if forced_verdict.eligible else None
        why = f"forced by {forced_by}" if chosen else f"forced by {forced_by}, but it is not eligible"
    else:
        chosen = ranked[0] if ranked else None
        why = _why(chosen, ranked, len(kernels), estimates) if chosen else f"no eligible kernel (0 of {len(kernels)})"
    return Selection(
        request=request,
        platform=platform,
        manifest=manifest,
        kernel=chosen,
        eligible=tuple(ranked),
        verdicts=verdicts,
        why=why,
        forced_by=forced_by if forced_name is not None else None,
        overrides=tuple(overrides.applied(request.op)),
        estimates=estimates,
        unavailable_kernels=record,
    )


def _forced(request: KernelRequest, overrides: Overrides) -> tuple[Optional[str], Optional[str]]:
    if request.kernel is not None:
        return request.kernel, f"request kernel={request.kernel}"
    return overrides.forced(request.op), overrides.forced_by(request.op)
