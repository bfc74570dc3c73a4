"""The decision object: request, platform, manifest, every verdict, the winner and why.

``explain()`` (text) and ``to_dict()`` (JSON) are two renderings of this one
object; the CLI, error messages and the Python API all go through them.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from registry.adapter_policy import ADAPTER_PACKAGE
from registry.errors import KernelselError
from registry.priority import band_name
from registry.provenance import provenance
from registry.schema import KernelSpec
from registry.variants import LaunchEnv, VariantChoice
from selector.availability import UnavailableKernels, adapter_class
from selector.platform import EVERYTHING
from selector.prediction import Prediction
from selector.ranking import NO_ESTIMATES, Estimates, Estimator, OtherArchTable

if TYPE_CHECKING:
    from registry.schema import Manifest
    from selector.platform import Platform
    from selector.request import KernelRequest

log = logging.getLogger("kernelsel")
_ADAPTER_LOCK = threading.RLock()  # one adapter per selection, however many threads ask at once

@dataclass(frozen=True)
class Verdict:
    """One kernel's outcome for one request: eligible when ``reasons`` is empty."""

    kernel: KernelSpec
    reasons: tuple[str, ...]

    @property
    def eligible(self) -> bool:
        return not self.reasons


def _kernel_dict(k: KernelSpec) -> dict[str, Any]:
    return {
        "name": k.name,
        "solution": k.solution.value,
        "backend": k.backend.value,
        "priority": k.priority,
        "band": band_name(k.priority),
        "origin": k.origin,
    }


_NONE: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, eq=False, slots=True, init=False)
class Selection:
    """What ``select_kernel`` returns: the chosen kernel (or None), the ranked eligible kernels, every verdict.

    Small by design (a selection cache holds thousands): the eligible kernels
    are a bitmask over the op's compiled kernels (``selector.compiled``), and
    ``eligible``, ``verdicts`` and ``rejected`` are built from it when read --
    the verdicts by ``reasons()``, the one function that words eligibility --
    and not kept; so is ``why``, unless the maker gave its own (a process
    group's).
    """

    request: "KernelRequest"
    platform: "Platform"
    manifest: "Manifest"
    kernel: Optional[KernelSpec]
    forced_by: Optional[str] = None
    overrides: tuple[str, ...] = ()
    group: str = ""  # "N ranks of a process group" when the ranks agreed on the kernel (selector.distributed)
    unavailable_kernels: UnavailableKernels = field(default_factory=UnavailableKernels, repr=False)
    """Where adapter failures are recorded: the record of the Selector that made this selection, so its later
    selections reject the kernel.  Shared data, never the Selector itself."""
    _op: Any = field(default=None, repr=False)  # the op compiled for this manifest, platform and overrides
    _eligible: int = field(default=0, repr=False)  # bit i: _op.kernels[i] is eligible
    _first: tuple[int, ...] = field(default=(), repr=False)  # bits ranked ahead of the rest (timed, fastest first)
    _forced: Optional[str] = field(default=None, repr=False)  # the kernel forced by name, for its verdict
    _unavailable: Mapping[str, str] = field(default_factory=lambda: _NONE, repr=False)  # kernel -> why unusable
    _adapter: Any = field(default=None, repr=False)  # built on first use
    _fallback: tuple = field(default=(), repr=False)  # ((kernel, reason)..., used kernel) once one failed
    _why: Optional[str] = field(default=None, repr=False)  # the maker's own sentence; None: worded from the above
    _estimates: Any = field(default=NO_ESTIMATES, repr=False)  # Estimates, or the shared object that words them
    _timed: Optional[int] = field(default=None, repr=False)  # the mask the Estimator timed; None: _eligible

    def __init__(self, request: "KernelRequest", platform: "Platform", manifest: "Manifest", kernel: Optional[KernelSpec],
                 why: Optional[str] = None, forced_by: Optional[str] = None, overrides: tuple[str, ...] = (),
                 estimates: "Estimates | Estimator | OtherArchTable" = NO_ESTIMATES, group: str = "",
                 unavailable_kernels: Optional[UnavailableKernels] = None, _op: Any = None, _eligible: int = 0,
                 _first: tuple[int, ...] = (), _forced: Optional[str] = None, _unavailable: Mapping[str, str] = _NONE,
                 _adapter: Any = None, _fallback: tuple = (), _timed: Optional[int] = None):
        # written out (not the dataclass's): a miss builds one, and each frozen field costs a call
        put = object.__setattr__
        put(self, "request", request)
        put(self, "platform", platform)
        put(self, "manifest", manifest)
        put(self, "kernel", kernel)
        put(self, "_why", why)
        put(self, "forced_by", forced_by)
        put(self, "overrides", overrides)
        put(self, "_estimates", estimates)
        put(self, "group", group)
        put(self, "unavailable_kernels", unavailable_kernels if unavailable_kernels is not None else UnavailableKernels())
        put(self, "_op", _op)
        put(self, "_eligible", _eligible)
        put(self, "_first", _first)
        put(self, "_forced", _forced)
        put(self, "_unavailable", _unavailable)
        put(self, "_adapter", _adapter)
        put(self, "_fallback", _fallback)
        put(self, "_timed", _timed)

    def __getstate__(self) -> dict:
        """Pickled as the decision (a process pool, ``all_gather_object``): not the adapter built in this process."""
        state = {name: getattr(self, name) for name in self.__slots__}
        state["_adapter"] = None
        state["_unavailable"] = dict(self._unavailable)  # a read-only view does not pickle
        state["_estimates"], state["_timed"] = self.estimates, None  # the words, not the table behind them
        return state

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @classmethod
    def agreed(cls, local: "Selection", ranked: Sequence[KernelSpec], why: str, group: str, adapter: Any) -> "Selection":
        """The selection a process group agreed on (``selector.distributed``), as this rank keeps it.

        ``local`` is this rank's own selection (its verdicts, with the kernels
        other ranks lack already rejected); ``ranked`` the kernels usable on
        every rank in the group's order, the first one chosen; ``adapter`` that
        kernel's adapter, already built on every rank.  Such a selection never
        falls back to another kernel (the ranks would diverge).
        """
        order = tuple(local._op.bit[k.name] for k in ranked)
        return cls(
            request=local.request, platform=local.platform, manifest=local.manifest, kernel=ranked[0], why=why,
            forced_by=local.forced_by, overrides=local.overrides, estimates=local._estimates, group=group,
            unavailable_kernels=local.unavailable_kernels, _op=local._op, _eligible=sum(1 << b for b in order),
            _first=order, _forced=local._forced, _unavailable=local._unavailable, _adapter=adapter,
            _timed=local._eligible if local._timed is None else local._timed,
        )

    # ------------------------------------------------------------------ access
    @property
    def name(self) -> str:
        return self.kernel.name if self.kernel else ""

    @property
    def why(self) -> str:
        """One sentence on why this kernel (or none) was chosen, worded when read: a cached selection keeps no text."""
        return self._worded_why(None)

    def _worded_why(self, estimates: Optional[Estimates]) -> str:
        """``why``, from ``estimates`` when the caller has them already (None: read them if needed)."""
        if self._why is not None:
            return self._why
        op = self._op
        total = len(op.kernels)
        if self.forced_by is not None:
            return f"forced by {self.forced_by}" if self.kernel else f"forced by {self.forced_by}, but it is not eligible"
        if self.kernel is None:
            return f"no eligible kernel (0 of {total})"
        _, second = op.leading(self._eligible, self._first)
        runner_up = op.kernels[second] if second is not None else None
        return _why_chosen(self.kernel, runner_up, self._eligible.bit_count(), total,
                           self.estimates if estimates is None else estimates)

    @property
    def estimates(self) -> Estimates:
        """The measured and predicted times from the perf table that ranked the kernels, and why others have none
        (``selector.ranking``): worded on each read -- a cached selection keeps only the shared ``Estimator``."""
        e = self._estimates
        if isinstance(e, Estimates):
            return e
        return e.estimate(self.request, self._op.names(self._eligible if self._timed is None else self._timed))

    @property
    def measured(self) -> dict[str, float]:
        """Kernel name -> median us measured in the request's perf bucket."""
        return dict(self.estimates.measured)

    @property
    def predicted(self) -> dict[str, Prediction]:
        """Kernel name -> time predicted from the perf table's other buckets (``selector.prediction``)."""
        return dict(self.estimates.predicted)

    @property
    def perf_source(self) -> str:
        """``perf/<file>.yaml, <GPU>`` when measured or predicted times ranked the kernels, else ''."""
        e = self.estimates
        return e.source if e.times else ""

    @property
    def eligible(self) -> tuple[KernelSpec, ...]:
        """The eligible kernels, best first (built on each read)."""
        return self._op.ranked(self._eligible, self._first)

    @property
    def verdicts(self) -> tuple[Verdict, ...]:
        """Every kernel of the op in manifest order, with every reason it cannot serve (built on each read)."""
        op = self._op
        words = op.reasons(self.request, self.platform, self._forced, self._unavailable)
        return tuple(Verdict(k, r) for k, r in zip(op.in_manifest_order, words))

    @property
    def rejected(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.eligible)

    @property
    def variant(self) -> Optional[VariantChoice]:
        """Which launch of the chosen kernel runs for this request, and why; None when it has one launch.

        The adapter's own decision (``launch_variant``, the function its
        ``plan()`` follows) on this selection's arch and platform.  Imports the
        adapter's module (never its library) only when it is kernelsel's own:
        explain runs no code of an allowlisted package that is not loaded yet.
        """
        if self.kernel is None:
            return None
        module = self.kernel.adapter.split(":")[0]
        if not module.startswith(ADAPTER_PACKAGE + ".") and module not in sys.modules:
            return None
        try:
            cls = adapter_class(self.kernel.adapter)
        except (ImportError, AttributeError):  # explain --probe and doctor say why an adapter does not import
            return None
        decide = getattr(cls, "launch_variant", None)
        return decide(self.request, _launch_env(self.request.arch or self.platform.arch, self.platform)) if decide else None

    @property
    def settings(self) -> dict[str, Any]:
        """Settings the engine must adopt with this kernel (e.g. a KV-cache layout)."""
        return dict(self.kernel.settings) if self.kernel else {}

    @property
    def adapter(self) -> Any:
        """The adapter for the chosen kernel, built on first use (imports its library then).

        One instance per selection: every layer sharing this request shares one
        ``plan()`` per step.  Use ``make_adapter()`` for an independent one
        (e.g. one per CUDA-graph batch size).
        """
        if self._adapter is None:
            with _ADAPTER_LOCK:
                if self._adapter is None:
                    object.__setattr__(self, "_adapter", self.make_adapter())
        return self._adapter

    def make_adapter(self) -> Any:
        """A new adapter for the chosen kernel; if it cannot be used here, for the next eligible one.

        An adapter whose library does not import or whose constructor raises
        (a JIT or driver failure) makes its kernel *unavailable*: the reason is
        recorded in ``unavailable_kernels`` (later selections of the same
        Selector reject the kernel with it, and explain shows it), a warning
        goes to the ``kernelsel`` logger, and the next eligible kernel in rank
        order is tried.  No fallback for a forced kernel, for a kernel agreed
        by a process group (ranks would diverge), or to a kernel that needs
        other ``settings`` than the chosen one: those raise
        ``KernelUnavailableError``.
        """
        if self.kernel is None:
            raise NoKernelError(self)
        fixed = bool(self.forced_by or self.group)
        failures: list[tuple[str, str]] = []
        other_settings: list[KernelSpec] = []
        for spec in (self.kernel,) if fixed else self.eligible:
            if spec.settings != self.kernel.settings:  # the engine may have adopted the chosen kernel's already
                other_settings.append(spec)
                continue
            install = self.manifest.solutions[spec.solution].install
            adapter, reason = self.unavailable_kernels.build_adapter(spec, self.request, install)
            if adapter is not None:
                if failures:
                    object.__setattr__(self, "_fallback", (*failures, spec.name))
                    log.warning("kernelsel: %s for %s; using %s, the next eligible kernel",
                                "; ".join(f"{n} {r}" for n, r in failures), self.request.op.value, spec.name)
                return adapter
            failures.append((spec.name, reason))
        note = ""
        if other_settings:
            spec = other_settings[0]
            note = (f"the next eligible kernel, {spec.name}, needs settings {dict(spec.settings)} instead of "
                    f"{dict(self.kernel.settings)}: select again (select_kernel now returns it) and adopt them")
        raise KernelUnavailableError(self, failures, note)

    # --------------------------------------------------------------- rendering
    def to_dict(self) -> dict[str, Any]:
        m, e = self.manifest, self.estimates
        return {
            "manifest": {"path": m.path, "schema_version": m.schema_version, "kernels": len(m.kernels), "digest": m.digest},
            "platform": self.platform.to_dict(),
            "request": self.request.given(),
            "unchecked": self.request.unchecked(),
            "overrides": list(self.overrides),
            "selected": _kernel_dict(self.kernel) | {"settings": self.settings, "provenance": self._provenance(self.kernel)}
            | _variant_dict(self.variant)
            if self.kernel else None,
            "why": self._worded_why(e),
            "perf": _perf_dict(e),
            "eligible": [_kernel_dict(k) | {"provenance": self._provenance(k)} | _time_dict(e, k.name)
                         for k in self.eligible],
            "rejected": [
                {"name": v.kernel.name, "solution": v.kernel.solution.value, "backend": v.kernel.backend.value,
                 "origin": v.kernel.origin, "reasons": list(v.reasons)}
                for v in self.rejected
            ],
        } | ({"group": self.group} if self.group else {}) | ({"fallback": {
            "adapter_kernel": self._fallback[-1],
            "unavailable": [{"name": n, "reason": r} for n, r in self._fallback[:-1]],
        }} if self._fallback else {})

    def _provenance(self, k: KernelSpec) -> dict[str, Any]:
        """How ``k``'s claims are known (registry.provenance), for the request's arch."""
        known = provenance(k)
        return known.to_dict() | {"summary": known.summary(self.request.arch or self.platform.arch)}

    def explain(self) -> str:
        """The fixed-section text of ``kernelsel explain``."""
        m = self.manifest
        lines = [
            f"manifest  {m.path} (schema {m.schema_version}, {len(m.kernels)} kernels, sha {m.digest})",
            f"platform  {self.platform.describe()}",
            f"request   {self.request.describe()}",
        ]
        unchecked = self.request.unchecked()
        if unchecked:
            lines.append(f"unchecked {', '.join(unchecked)} (not given, so not checked)")
        for o in self.overrides:
            lines.append(f"override  {o}")
        e = self.estimates
        common = _common_missing(e)
        perf_line = _perf_line(e, common)
        if perf_line:
            lines.append(perf_line)
        if self.kernel:
            k = self.kernel
            known = provenance(k).summary(self.request.arch or self.platform.arch)
            lines.append(f"selected  {k.name} ({k.solution.value}/{k.backend.value}, priority {k.priority} "
                         f"{band_name(k.priority)}) — {known}")
            if k.settings:
                lines.append("settings  " + " ".join(f"{a}={b}" for a, b in k.settings.items()))
            variant = self.variant
            if variant is not None:
                lines.append(f"variant   {variant.describe()}")
        else:
            lines.append("selected  none")
        lines.append(f"why       {self._worded_why(e)}")
        if self.group:
            lines.append(f"group     agreed by {self.group}")
        if self._fallback:
            for name, reason in self._fallback[:-1]:
                lines.append(f"fallback  {name} {reason}")
            lines.append(f"adapter   {self._fallback[-1]} (the next eligible kernel; select again to get its selection)")
        verdicts, eligible = self.verdicts, self.eligible
        width = max((len(v.kernel.name) for v in verdicts), default=0)
        owidth = max((len(v.kernel.origin) for v in verdicts), default=0)
        rank = {k.name: i + 1 for i, k in enumerate(eligible)}
        by_name = {v.kernel.name: v for v in verdicts}
        ordered = [by_name[k.name] for k in eligible if k.name in by_name] + [v for v in verdicts if not v.eligible]
        for v in ordered:
            head = f"  {'ok' if v.eligible else 'no'}  {v.kernel.name:<{width}}  {v.kernel.origin:<{owidth}}"
            if v.eligible:
                timing = _timing(e, v.kernel.name, common)
                lines.append(f"{head}  #{rank[v.kernel.name]} priority {v.kernel.priority}{timing}".rstrip())
            else:
                lines.append(f"{head}  {v.reasons[0]}")
                pad = " " * len(head)
                lines.extend(f"{pad}  {r}" for r in v.reasons[1:])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _perf_dict(e: Estimates) -> Optional[dict[str, Any]]:
    if not e.source:
        return None
    return {"source": e.source, "ranked_by": e.kind or "priority", "median_us": dict(e.measured),
            "predicted": {k: _prediction_dict(p) for k, p in e.predicted.items()}, "no_time": dict(e.missing)}


def _time_dict(e: Estimates, name: str) -> dict[str, Any]:
    if name in e.measured:
        return {"median_us": e.measured[name]}
    if name in e.predicted:
        return {"predicted": _prediction_dict(e.predicted[name])}
    return {"no_time": e.missing[name]} if name in e.missing else {}


def _perf_line(e: Estimates, common: Optional[str]) -> Optional[str]:
    if not e.source:
        return None
    if e.times:
        how = {"measured": "measured times rank the eligible kernels",
               "predicted": "bucket not measured: predicted times rank the eligible kernels"}
        return f"perf      {e.source} ({how.get(e.kind, 'measured and predicted times rank the eligible kernels')})"
    why = common or "no eligible kernel measured or predicted here"
    return f"perf      {e.source} ({why}; priority ranks the eligible kernels)"


def _common_missing(e: Estimates) -> Optional[str]:
    """The one reason every eligible kernel lacks a time, when nothing has one (shown once, on the perf line)."""
    reasons = set(e.missing.values())
    return reasons.pop() if len(reasons) == 1 and not e.times else None


def _timing(e: Estimates, name: str, common: Optional[str]) -> str:
    """What explain prints after an eligible kernel: its measured time, its prediction, or why it has none
    (``common``: the reason every eligible kernel shares, shown once on the perf line instead)."""
    if name in e.measured:
        return f"  {e.measured[name]:.1f} us"
    if name in e.predicted:
        return f"  {e.predicted[name].describe()}"
    if name in e.missing and common is None:
        return f"  ({e.missing[name]})"
    return ""


def _why_chosen(winner: KernelSpec, runner_up: Optional[KernelSpec], count: int, total: int,
                estimates: Estimates = NO_ESTIMATES) -> str:
    """One sentence on why ``winner`` (first of ``count`` eligible; ``runner_up`` second) was chosen."""
    if runner_up is None:
        return f"only eligible kernel (1 of {total})"
    times, source = estimates.times, estimates.source
    if winner.name in times:
        how = "measured" if winner.name in estimates.measured else "predicted"
        if runner_up.name in times:
            ratio = times[runner_up.name] / times[winner.name]
            kind = estimates.kind.replace(" and ", " or ")
            return (
                f"fastest {kind} of {count} eligible: {times[winner.name]:.1f} us vs "
                f"{runner_up.name} {times[runner_up.name]:.1f} us ({ratio:.2f}x) [{source}]"
            )
        return f"only eligible kernel {how} ({times[winner.name]:.1f} us) [{source}]"
    if runner_up.priority == winner.priority:
        return (
            f"tied at priority {winner.priority} with {runner_up.name}; the name breaks the tie "
            f"({count} of {total} eligible)"
        )
    return (
        f"highest priority {winner.priority} ({band_name(winner.priority)}) of {count} eligible; "
        f"next {runner_up.name} at {runner_up.priority} ({band_name(runner_up.priority)})"
    )


def _variant_dict(variant: Optional[VariantChoice]) -> dict[str, Any]:
    return {"variant": variant.to_dict()} if variant is not None else {}


def _launch_env(arch: Any, platform: "Platform") -> LaunchEnv:
    """The platform as a launch-variant decision sees it; a hypothetical one's library versions are assumed."""
    return LaunchEnv(
        arch=arch,
        versions={name: version for name, version in platform.libraries if name != EVERYTHING},
        assumed=any(name == EVERYTHING for name, _ in platform.libraries),
    )


def _prediction_dict(p: Prediction) -> dict[str, Any]:
    return {"us": round(p.us, 3), "buckets": p.buckets, "fit_error": round(p.error, 4)}


class NoKernelError(KernelselError, LookupError):
    """No kernel can serve the request (or the forced one cannot); lists every kernel and why."""

    def __init__(self, selection: Selection):
        self.selection = selection
        head = (
            f"kernel forced by {selection.forced_by} cannot serve this request"
            if selection.forced_by
            else f"no kernel can serve {selection.request.op.value}"
        )
        body = [f"  {v.kernel.name} ({v.kernel.origin}): {'; '.join(v.reasons)}" for v in selection.rejected]
        super().__init__(f"{head}\nrequest: {selection.request.describe()}\n" + "\n".join(body))

    def __reduce__(self) -> tuple:  # rebuilt from its selection (the default would pass the message as one)
        return (type(self), (self.selection,))


class KernelUnavailableError(NoKernelError):
    """The kernel to run cannot be used on this machine: its library does not import or its adapter does not build.

    Raised for a forced kernel (never a silent fallback), for a kernel agreed
    by a process group (a local fallback would make the ranks run different
    kernels), when a fallback would need other ``settings``, and when no
    eligible kernel's adapter can be used.  ``failures`` holds ``(kernel,
    reason)`` pairs, ``note`` what stopped a fallback.
    """

    def __init__(self, selection: Selection, failures: list[tuple[str, str]], note: str = ""):
        self.selection = selection
        self.failures = tuple(failures)
        self.note = note
        op = selection.request.op.value
        if selection.forced_by and failures:
            name, reason = failures[0]
            head = f"kernel {name} (forced by {selection.forced_by}) cannot be used on this machine: {reason}"
        elif selection.group and failures:
            name, reason = failures[0]
            head = f"kernel {name} (agreed by {selection.group}) cannot be used on this rank: {reason}"
        else:
            head = f"no eligible kernel for {op} can be used on this machine"
        lines = [head, f"request: {selection.request.describe()}"]
        if not (selection.forced_by or selection.group):
            lines += [f"  {n}: {r}" for n, r in failures]
        if note:
            lines.append(note)
        KernelselError.__init__(self, "\n".join(lines))

    def __reduce__(self) -> tuple:
        return (type(self), (self.selection, list(self.failures), self.note))
