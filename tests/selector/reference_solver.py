"""The straightforward solver the compiled one must equal: ``reasons()`` for every kernel, a sort, and the text.

This is the solver as it was before it was compiled into bitmasks
(``selector.compiled``), kept as an oracle: every kernel of the op is read by
``reasons()``, the eligible ones are sorted by (measured time, -priority,
name), and explain / ``to_dict`` are rendered from the full list of verdicts.
``tests/selector/test_compiled.py`` checks on random requests and manifests
that ``selector.solver.solve`` gives the same winner, ranking, ``why``,
verdicts, ``to_dict()`` and byte for byte the same ``explain()``.  When the
selection's behaviour changes on purpose, change it here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from registry.errors import RequestError
from registry.perf import PerfTable
from registry.priority import band_name
from registry.provenance import provenance
from registry.schema import KernelSpec, Manifest
from registry.vocab import did_you_mean
from selector.availability import UnavailableKernels
from selector.overrides import Overrides
from selector.platform import Platform
from selector.ranking import NO_ESTIMATES, Estimates, estimate
from selector.request import KernelRequest
from selector.selection import Verdict
from selector.solver import reasons


@dataclass(frozen=True)
class Reference:
    """What the straightforward solver decides, every verdict kept."""

    request: KernelRequest
    platform: Platform
    manifest: Manifest
    kernel: Optional[KernelSpec]
    eligible: tuple[KernelSpec, ...]
    verdicts: tuple[Verdict, ...]
    why: str
    forced_by: Optional[str] = None
    overrides: tuple[str, ...] = ()
    estimates: Estimates = NO_ESTIMATES

    @property
    def name(self) -> str:
        return self.kernel.name if self.kernel else ""

    @property
    def measured(self) -> dict[str, float]:
        return dict(self.estimates.measured)

    @property
    def perf_source(self) -> str:
        return self.estimates.source if self.estimates.times else ""

    @property
    def rejected(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.eligible)


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


def solve(manifest: Manifest, platform: Platform, request: KernelRequest, overrides: Overrides = Overrides(),
          perf: Optional[PerfTable] = None, unavailable: Mapping[str, str] = {},  # noqa: B006 - read only
          *, unavailable_kernels: Optional[UnavailableKernels] = None) -> Reference:
    record = unavailable_kernels if unavailable_kernels is not None else UnavailableKernels()
    unavailable = {**record.reasons(request), **unavailable}
    if request.arch is None:
        raise RequestError("request.arch: not given and no CUDA device was detected; pass arch='sm_90' (or 9.0, sm90)")
    kernels = manifest.by_op[request.op]
    for name in sorted(overrides.disable):
        if name not in manifest.by_name:
            raise RequestError(f"KERNELSEL_DISABLE: no kernel named {name!r}{did_you_mean(name, list(manifest.by_name))}")
    if request.kernel is not None:
        forced_name, forced_by = request.kernel, f"request kernel={request.kernel}"
    else:
        forced_name, forced_by = overrides.forced(request.op), overrides.forced_by(request.op)
    if forced_name is not None:
        spec = manifest.by_name.get(forced_name)
        if spec is None:
            raise RequestError(
                f"{forced_by}: no kernel named {forced_name!r}{did_you_mean(forced_name, list(manifest.by_name))}; "
                f"kernels for {request.op.value}: {', '.join(k.name for k in kernels)}"
            )
        if spec.op is not request.op:
            raise RequestError(f"{forced_by}: kernel {forced_name!r} implements {spec.op.value}, not {request.op.value}")

    verdicts = tuple(
        Verdict(k, reasons(k, request, manifest, platform, overrides, forced=(k.name == forced_name),
                           unavailable=unavailable))
        for k in kernels
    )
    eligible = [v.kernel for v in verdicts if v.eligible]
    estimates = estimate(perf, request, [k.name for k in eligible], predict=overrides.predict)
    times = estimates.times
    inf = float("inf")
    key = (lambda k: (times.get(k.name, inf), -k.priority, k.name)) if times else (lambda k: (-k.priority, k.name))
    ranked = sorted(eligible, key=key)
    if forced_name is not None:
        forced_verdict = next(v for v in verdicts if v.kernel.name == forced_name)
        chosen: Optional[KernelSpec] = forced_verdict.kernel if forced_verdict.eligible else None
        why = f"forced by {forced_by}" if chosen else f"forced by {forced_by}, but it is not eligible"
    else:
        chosen = ranked[0] if ranked else None
        why = _why(chosen, ranked, len(kernels), estimates) if chosen else f"no eligible kernel (0 of {len(kernels)})"
    return Reference(
        request=request, platform=platform, manifest=manifest, kernel=chosen, eligible=tuple(ranked), verdicts=verdicts,
        why=why, forced_by=forced_by if forced_name is not None else None, overrides=tuple(overrides.applied(request.op)),
        estimates=estimates,
    )


def _kernel_dict(k: KernelSpec) -> dict[str, Any]:
    return {"name": k.name, "solution": k.solution.value, "backend": k.backend.value, "priority": k.priority,
            "band": band_name(k.priority), "origin": k.origin}


def _provenance(s: Reference, k: KernelSpec) -> dict[str, Any]:
    known = provenance(k)
    return known.to_dict() | {"summary": known.summary(s.request.arch or s.platform.arch)}


def _prediction_dict(p: Any) -> dict[str, Any]:
    return {"us": round(p.us, 3), "buckets": p.buckets, "fit_error": round(p.error, 4)}


def _perf_dict(s: Reference) -> Optional[dict[str, Any]]:
    e = s.estimates
    if not e.source:
        return None
    return {"source": e.source, "ranked_by": e.kind or "priority", "median_us": dict(e.measured),
            "predicted": {k: _prediction_dict(p) for k, p in e.predicted.items()}, "no_time": dict(e.missing)}


def _time_dict(s: Reference, name: str) -> dict[str, Any]:
    e = s.estimates
    if name in e.measured:
        return {"median_us": e.measured[name]}
    if name in e.predicted:
        return {"predicted": _prediction_dict(e.predicted[name])}
    return {"no_time": e.missing[name]} if name in e.missing else {}


def _common_missing(s: Reference) -> Optional[str]:
    reasons_ = set(s.estimates.missing.values())
    return reasons_.pop() if len(reasons_) == 1 and not s.estimates.times else None


def _perf_line(s: Reference) -> Optional[str]:
    e = s.estimates
    if not e.source:
        return None
    if e.times:
        how = {"measured": "measured times rank the eligible kernels",
               "predicted": "bucket not measured: predicted times rank the eligible kernels"}
        return f"perf      {e.source} ({how.get(e.kind, 'measured and predicted times rank the eligible kernels')})"
    why = _common_missing(s) or "no eligible kernel measured or predicted here"
    return f"perf      {e.source} ({why}; priority ranks the eligible kernels)"


def _timing(s: Reference, name: str) -> str:
    e = s.estimates
    if name in e.measured:
        return f"  {e.measured[name]:.1f} us"
    if name in e.predicted:
        return f"  {e.predicted[name].describe()}"
    if name in e.missing and _common_missing(s) is None:
        return f"  ({e.missing[name]})"
    return ""


def to_dict(s: Reference, variant: Any) -> dict[str, Any]:
    """The JSON rendering (``variant``: the chosen kernel's launch variant, decided by its adapter)."""
    m = s.manifest
    settings = dict(s.kernel.settings) if s.kernel else {}
    return {
        "manifest": {"path": m.path, "schema_version": m.schema_version, "kernels": len(m.kernels), "digest": m.digest},
        "platform": s.platform.to_dict(),
        "request": s.request.given(),
        "unchecked": s.request.unchecked(),
        "overrides": list(s.overrides),
        "selected": _kernel_dict(s.kernel) | {"settings": settings, "provenance": _provenance(s, s.kernel)}
        | ({"variant": variant.to_dict()} if variant else {}) if s.kernel else None,
        "why": s.why,
        "perf": _perf_dict(s),
        "eligible": [_kernel_dict(k) | {"provenance": _provenance(s, k)} | _time_dict(s, k.name) for k in s.eligible],
        "rejected": [
            {"name": v.kernel.name, "solution": v.kernel.solution.value, "backend": v.kernel.backend.value,
             "origin": v.kernel.origin, "reasons": list(v.reasons)}
            for v in s.rejected
        ],
    }


def explain(s: Reference, variant: Any) -> str:
    """The text rendering, as ``Selection.explain`` wrote it from the full verdict list."""
    m = s.manifest
    lines = [
        f"manifest  {m.path} (schema {m.schema_version}, {len(m.kernels)} kernels, sha {m.digest})",
        f"platform  {s.platform.describe()}",
        f"request   {s.request.describe()}",
    ]
    unchecked = s.request.unchecked()
    if unchecked:
        lines.append(f"unchecked {', '.join(unchecked)} (not given, so not checked)")
    for o in s.overrides:
        lines.append(f"override  {o}")
    perf_line = _perf_line(s)
    if perf_line:
        lines.append(perf_line)
    if s.kernel:
        k = s.kernel
        known = provenance(k).summary(s.request.arch or s.platform.arch)
        lines.append(f"selected  {k.name} ({k.solution.value}/{k.backend.value}, priority {k.priority} "
                     f"{band_name(k.priority)}) — {known}")
        if k.settings:
            lines.append("settings  " + " ".join(f"{a}={b}" for a, b in k.settings.items()))
        if variant is not None:
            lines.append(f"variant   {variant.describe()}")
    else:
        lines.append("selected  none")
    lines.append(f"why       {s.why}")
    width = max((len(v.kernel.name) for v in s.verdicts), default=0)
    owidth = max((len(v.kernel.origin) for v in s.verdicts), default=0)
    rank = {k.name: i + 1 for i, k in enumerate(s.eligible)}
    ordered = [v for k in s.eligible for v in s.verdicts if v.kernel is k] + list(s.rejected)
    for v in ordered:
        head = f"  {'ok' if v.eligible else 'no'}  {v.kernel.name:<{width}}  {v.kernel.origin:<{owidth}}"
        if v.eligible:
            timing = _timing(s, v.kernel.name)
            lines.append(f"{head}  #{rank[v.kernel.name]} priority {v.kernel.priority}{timing}".rstrip())
        else:
            lines.append(f"{head}  {v.reasons[0]}")
            pad = " " * len(head)
            lines.extend(f"{pad}  {r}" for r in v.reasons[1:])
    return "\n".join(lines)
