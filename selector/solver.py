"""The solver: the eligible kernels of the op, the best of them, and why; every reason on demand.

``solve(manifest, platform, request, overrides)`` is pure: it imports no
torch, reads no environment and returns a ``Selection`` (winner or not).
Eligibility is defined by one function, ``reasons()``
(``selector.eligibility``, re-exported here): a kernel is eligible when it
finds nothing against it.  A solve does not call it: it reads the op's
compiled masks (``selector.compiled``), which say the same for every kernel
at once, in a few integer operations; the selection asks ``reasons()`` for
the words only when explain, ``to_dict``, ``rejected``, ``verdicts`` or an
error needs them, and words ``why`` when it is read.  Then the eligible kernels are ranked -- a separate step:
by time where the perf table gives them one (measured in the request's
bucket, else predicted: ``selector.ranking``), else by priority and name (the
masks' bit order).  ``platform_reasons()`` (what
``kernelsel doctor`` lists) is made of the same checks with the same words.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from registry.errors import RequestError
from registry.perf import PerfTable
from registry.schema import KernelSpec, Manifest
from selector.availability import UnavailableKernels
from selector.compiled import CompiledOp, compiled
from selector.eligibility import DISABLED, REFERENCE_ONLY, library_reason, platform_reasons, reasons, restriction_reasons
from selector.overrides import ENV_DISABLE, Overrides, forced_kernel_problem
from selector.platform import Platform
from selector.ranking import NO_ESTIMATES, Estimator, OtherArchTable, estimator
from selector.request import KernelRequest
from selector.selection import Selection

__all__ = ["DISABLED", "REFERENCE_ONLY", "library_reason", "platform_reasons", "reasons", "restriction_reasons", "solve"]

_NONE: Mapping[str, str] = MappingProxyType({})


class Ranking:
    """How the eligible kernels are ordered: ``first`` (bits, fastest first) ahead of the rest in priority order."""

    __slots__ = ("first", "estimator")

    def __init__(self, first: tuple[int, ...] = (), estimator: "Estimator | OtherArchTable | None" = None):
        self.first = first  # the eligible kernels with a time, by (time, priority, name)
        self.estimator = estimator  # what timed them, to word their estimates when read (selector.ranking)


_BY_PRIORITY = Ranking()


def rank(op: CompiledOp, eligible: int, request: KernelRequest, perf: Optional[PerfTable], predict: bool = True) -> Ranking:
    """Order the ``eligible`` kernels (a mask of ``op``): time first, then priority, then name.

    Times are measured in the request's bucket of ``perf`` (a table for this
    arch), else predicted from its other buckets (``selector.ranking``).
    Priority and name are the masks' bit order, so without times nothing
    moves; times reorder only the kernels that have one (the others follow
    them): total and deterministic.
    """
    timer = estimator(perf, request, predict=predict)
    if timer is None or not eligible:
        return _BY_PRIORITY
    times = timer.times(request, op.names(eligible))  # none from a table of another arch: priority, said so
    return Ranking(tuple(b for _, b in sorted((us, op.bit[name]) for name, us in times.items())), timer)


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
    """Find the eligible kernels of ``request.op``; pick the forced or best-ranked one.

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
    recorded = record.reasons(request)
    unavailable = {**recorded, **unavailable} if (recorded or unavailable) else _NONE
    if request.arch is None:
        raise RequestError(
            "request.arch: not given and no CUDA device was detected; pass arch='sm_90' (or 9.0, sm90)"
        )
    if overrides.disable:  # a disabled name the manifest lacks fails every op
        for problem in overrides.problems(manifest):
            if problem.startswith(ENV_DISABLE):
                raise RequestError(problem)
    forced_name, forced_by = _forced(request, overrides)
    if forced_name is not None:
        problem = forced_kernel_problem(manifest, request.op, forced_name, forced_by)
        if problem:
            raise RequestError(problem)

    op = compiled(manifest, platform, overrides).op(request.op)
    eligible = op.eligible(request, forced_name, unavailable)
    ranking = rank(op, eligible, request, perf, overrides.predict)
    if forced_name is not None:
        eligible_forced = eligible >> op.bit[forced_name] & 1
        chosen: Optional[KernelSpec] = manifest.by_name[forced_name] if eligible_forced else None
    else:
        first, _ = op.leading(eligible, ranking.first)
        chosen = op.kernels[first] if first is not None else None
    return Selection(  # its why is worded when read, from what it keeps
        request=request,
        platform=platform,
        manifest=manifest,
        kernel=chosen,
        forced_by=forced_by if forced_name is not None else None,
        overrides=op.applied_overrides,
        estimates=ranking.estimator if ranking.estimator is not None else NO_ESTIMATES,
        unavailable_kernels=record,
        _op=op,
        _eligible=eligible,
        _first=ranking.first,
        _forced=forced_name,
        _unavailable=unavailable,
    )


def _forced(request: KernelRequest, overrides: Overrides) -> tuple[Optional[str], Optional[str]]:
    if request.kernel is not None:
        return request.kernel, f"request kernel={request.kernel}"
    return overrides.forced(request.op), overrides.forced_by(request.op)
