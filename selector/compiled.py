"""The solver's compiled form: an op's constraints as bitmask indices, so a miss costs a few integer operations.

``reasons()`` (``selector.eligibility``) reads one kernel against one request
and words every failure: about 10 us per kernel.  Choosing needs only *which*
kernels are eligible and the best of them, so each op's kernels are compiled
once per manifest, platform libraries and overrides (``compiled()``, cached)
into indices that answer for every kernel at once:

* kernels are numbered in rank order (priority descending, then name): bit
  ``i`` of a mask is ``kernels[i]``, so the lowest set bit of the eligible mask
  is the best kernel by priority;
* a field with a closed vocabulary (arch, dtypes, feature flags) maps each of
  its values to the mask of kernels whose constraint rejects it -- each value
  checked once, at compile time, by the constraint's own ``check()``;
* an integer field keeps one-of sets as value -> mask, minimums and maximums
  as sorted thresholds (``bisect`` -> mask), one mask per ``multiple_of`` step
  and one for ``power_of_two``;
* an equals constraint groups kernels by (the field it equals, its ``or``
  values): one comparison per group, or -- that field unset -- the kernels' own
  constraint on it, compiled like a value constraint;
* exclusions are bits of their own, matched field by field the same way; a
  matched exclusion rejects its kernel;
* constant masks: disabled, missing library, reference, per solution and backend.

Unset request fields check nothing, as in ``reasons()``.  Reasons are never
computed here: ``CompiledOp.reasons()`` asks ``reasons()`` when explain or an
error needs them (a test checks on random requests and manifests that the
masks and the reasons agree).  Every structure is built once and only read
afterwards -- but for the per-field memos of integer values, whose every
write is one dict store -- so any number of threads may use one.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from itertools import compress
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional

from registry.constraints import Equals, IntRange, OneOf
from registry.priority import priority_rank_key
from registry.schema import FIELD_KINDS, KernelSpec, Manifest
from registry.vocab import Arch, Backend, DType, Op, Solution
from selector.eligibility import library_reason, reasons
from selector.overrides import Overrides
from selector.platform import Platform
from selector.request import KernelRequest

_VOCABULARY: dict[str, tuple[Any, ...]] = {"arch": tuple(Arch), "dtype": tuple(DType), "feature": (False, True)}
"""The values a request field of each closed kind can take (shape fields are open integers)."""

_NONE: Mapping[str, str] = MappingProxyType({})

Fails = Callable[[Any, str, Any], bool]
"""``fails(constraint, field, value)``: True when the constraint rejects the value."""


def _constraint_fails(constraint: Any, field: str, value: Any) -> bool:
    """A kernel's constraint, as ``reasons()`` reads it (value kinds do not look at the request)."""
    return constraint.check(field, value, None) is not None


def _exclusion_fails(constraint: Any, field: str, value: Any) -> bool:
    """One field of an exclusion's ``when``, as ``Exclusion.matches`` reads it."""
    return not constraint.allows(value)


_MEMO_LIMIT = 4096
"""Integer values remembered per field (a memo, cleared when full): hostile input cannot grow it without bound."""


class FieldIndex:
    """For one request field: which numbered items (kernels or exclusions) reject a value.

    Built from ``(bit, constraint)`` pairs; ``reject(value)`` is the mask of
    the items whose constraint fails on ``value``.  ``memo`` maps values seen
    before to that mask: for a closed vocabulary every value, filled at
    compile time; for an integer field the values met so far.
    """

    __slots__ = ("field", "memo", "table", "oneof", "oneof_reject", "mins", "above_min", "maxes", "below_max",
                 "steps", "power_of_two", "other", "fails")

    def __init__(self, field: str, items: Iterable[tuple[int, Any]], fails: Fails):
        items = list(items)
        self.field, self.fails = field, fails
        self.table: Optional[dict[Any, int]] = None
        self.oneof, self.oneof_reject = 0, {}
        self.mins, self.above_min, self.maxes, self.below_max = [], [0], [], [0]
        self.steps: tuple[tuple[int, int], ...] = ()
        self.power_of_two = 0
        self.other: tuple[tuple[int, Any], ...] = ()
        members = _VOCABULARY.get(FIELD_KINDS.get(field, "shape"))
        if members is not None:  # a closed vocabulary: every value checked now
            self.other = tuple(items)
            self.table = {value: self._checked(value) for value in members}
            self.memo = self.table
            return
        self.memo: dict[Any, int] = {}
        admitted: dict[Any, int] = {}
        mins, maxes, steps, other = [], [], {}, []
        for bit, c in items:
            if type(c) is OneOf:
                self.oneof |= 1 << bit
                for value in c.values:
                    admitted[value] = admitted.get(value, 0) | 1 << bit
            elif type(c) is IntRange:
                if c.min is not None:
                    mins.append((c.min, bit))
                if c.max is not None:
                    maxes.append((c.max, bit))
                if c.multiple_of is not None:
                    steps[c.multiple_of] = steps.get(c.multiple_of, 0) | 1 << bit
                if c.power_of_two:
                    self.power_of_two |= 1 << bit
            else:  # a kind without a compiled form: its own check, on the kernels that declare it
                other.append((bit, c))
        self.oneof_reject = {value: self.oneof & ~mask for value, mask in admitted.items()}
        mins.sort()
        self.mins = [m for m, _ in mins]
        self.above_min = [0] * (len(mins) + 1)  # above_min[i]: the items of mins[i:], those above v at bisect_right
        for i in range(len(mins) - 1, -1, -1):
            self.above_min[i] = self.above_min[i + 1] | 1 << mins[i][1]
        maxes.sort()
        self.maxes = [m for m, _ in maxes]
        self.below_max = [0] * (len(maxes) + 1)  # below_max[i]: the items of maxes[:i], those below v at bisect_left
        for i, (_, bit) in enumerate(maxes):
            self.below_max[i + 1] = self.below_max[i] | 1 << bit
        self.steps = tuple(sorted(steps.items()))
        self.other = tuple(other)

    def _checked(self, value: Any) -> int:
        out = 0
        for bit, c in self.other:
            if self.fails(c, self.field, value):
                out |= 1 << bit
        return out

    def remember(self, value: Any) -> int:
        """``reject(value)``, remembered in ``memo`` for an integer (what ``memo`` lacked)."""
        out = self.reject(value)
        if type(value) is int and self.table is None:
            if len(self.memo) >= _MEMO_LIMIT:
                self.memo = {}  # a new dict: a thread reading the old one still reads a whole one
            self.memo[value] = out
        return out

    def reject(self, value: Any) -> int:
        table = self.table
        if table is not None:
            hit = table.get(value)
            return hit if hit is not None else self._checked(value)
        out = self.oneof_reject.get(value, self.oneof) if self.oneof else 0
        if self.mins:
            out |= self.above_min[bisect_right(self.mins, value)]
        if self.maxes:
            out |= self.below_max[bisect_left(self.maxes, value)]
        for step, mask in self.steps:
            if value % step:
                out |= mask
        if self.power_of_two and (value <= 0 or value & (value - 1)):
            out |= self.power_of_two
        if self.other:
            out |= self._checked(value)
        return out


class EqualsGroup:
    """Kernels whose constraint on ``field`` is ``{equals: other, or: alternatives}``, checked together."""

    __slots__ = ("field", "other", "alternatives", "mask", "unset")

    def __init__(self, field: str, other: str, alternatives: tuple, items: list[tuple[int, Equals]]):
        self.field, self.other, self.alternatives = field, other, alternatives
        self.mask = 0
        for bit, _ in items:
            self.mask |= 1 << bit
        # ``other`` unset: each kernel's own constraint on it decides (Equals.bound)
        targets = [(bit, c.target) for bit, c in items if c.target is not None]
        self.unset = FieldIndex(field, targets, _constraint_fails) if targets else None

    def reject(self, request: KernelRequest, value: Any) -> int:
        if value in self.alternatives:
            return 0
        other = getattr(request, self.other)
        if other is None:
            if self.unset is None:
                return 0
            hit = self.unset.memo.get(value)
            return hit if hit is not None else self.unset.remember(value)
        return 0 if value == other else self.mask


class CompiledOp:
    """The kernels of one op, compiled against one manifest, platform and overrides."""

    def __init__(self, op: Op, manifest: Manifest, platform: Platform, overrides: Overrides):
        self.op, self.manifest, self.platform, self.overrides = op, manifest, platform, overrides
        self.in_manifest_order: tuple[KernelSpec, ...] = manifest.by_op[op]
        self.kernels: tuple[KernelSpec, ...] = tuple(sorted(self.in_manifest_order, key=priority_rank_key))
        self.bit: dict[str, int] = {k.name: i for i, k in enumerate(self.kernels)}
        self.all = (1 << len(self.kernels)) - 1
        self.applied_overrides: tuple[str, ...] = tuple(overrides.applied(op))
        ks = list(enumerate(self.kernels))

        def mask(pred: Callable[[KernelSpec], bool]) -> int:
            return sum(1 << i for i, k in ks if pred(k))

        self.constant = mask(lambda k: k.name in overrides.disable or library_reason(k, manifest, platform) is not None)
        self.reference = mask(lambda k: k.solution is Solution.REFERENCE)
        self.not_solution = {s: self.all & ~mask(lambda k, s=s: k.solution is s) for s in Solution}
        self.not_backend = {b: self.all & ~mask(lambda k, b=b: k.backend is b) for b in Backend}

        by_field: dict[str, list[tuple[int, Any]]] = {}
        equals: dict[tuple, list[tuple[int, Equals]]] = {}
        for i, k in ks:
            for field, c in k.constraints:
                if isinstance(c, Equals):
                    equals.setdefault((field, c.equals, c.alternatives), []).append((i, c))
                else:
                    by_field.setdefault(field, []).append((i, c))
        self.fields = tuple(FieldIndex(f, items, _constraint_fails) for f, items in by_field.items())
        self.equals = tuple(EqualsGroup(f, other, alts, items) for (f, other, alts), items in equals.items())
        features: dict[str, int] = {}
        for i, k in ks:
            for feature in k.unsupported_features:
                features[feature] = features.get(feature, 0) | 1 << i
        self.features = tuple(features.items())

        # exclusions: bit j is exclusion j; excluded[j] the mask of its kernel
        self.excluded: list[int] = []
        when: dict[str, list[tuple[int, Any]]] = {}
        for i, k in ks:
            for exclusion in k.exclude:
                j = len(self.excluded)
                self.excluded.append(1 << i)
                for field, c in exclusion.when.items():
                    when.setdefault(field, []).append((j, c))
        self.exclusions_all = (1 << len(self.excluded)) - 1
        self.exclusion_fields = tuple(
            (FieldIndex(f, items, _exclusion_fails), sum(1 << j for j, _ in items)) for f, items in when.items()
        )

    def __reduce__(self) -> tuple:
        """Pickled as what it was compiled from (a selection sent to a process pool): compiled again there, once."""
        return (_compiled_op, (self.manifest, self.platform, self.overrides, self.op))

    # ------------------------------------------------------------------ eligibility
    def eligible(self, request: KernelRequest, forced: Optional[str] = None,
                 unavailable: Mapping[str, str] = _NONE) -> int:
        """The mask of the kernels ``reasons()`` finds nothing against (``forced``: the kernel forced by name)."""
        rejected = self.constant
        solution = request.solution
        if solution is not None:
            rejected |= self.not_solution[solution]
        if request.backend is not None:
            rejected |= self.not_backend[request.backend]
        if self.reference and solution is not Solution.REFERENCE:
            reference = self.reference
            if forced is not None and forced in self.bit:
                reference &= ~(1 << self.bit[forced])
            rejected |= reference
        for index in self.fields:
            value = getattr(request, index.field)
            if value is not None:
                hit = index.memo.get(value)
                rejected |= hit if hit is not None else index.remember(value)
        for group in self.equals:
            value = getattr(request, group.field)
            if value is not None:
                rejected |= group.reject(request, value)
        for feature, mask in self.features:
            if getattr(request, feature):
                rejected |= mask
        if self.excluded:
            rejected |= self._excluded(request)
        for name in unavailable:
            bit = self.bit.get(name)
            if bit is not None:
                rejected |= 1 << bit
        return self.all & ~rejected

    def _excluded(self, request: KernelRequest) -> int:
        """The kernels one of whose exclusions matches: every field of its ``when`` given and matching."""
        unmatched = 0
        for index, mentioned in self.exclusion_fields:
            value = getattr(request, index.field, None)
            if value is None:
                unmatched |= mentioned
            else:
                hit = index.memo.get(value)
                unmatched |= hit if hit is not None else index.remember(value)
        matched = self.exclusions_all & ~unmatched
        out = 0
        while matched:
            low = matched & -matched
            out |= self.excluded[low.bit_length() - 1]
            matched ^= low
        return out

    # ------------------------------------------------------------------ reading a mask
    def ranked(self, mask: int, first: tuple[int, ...] = ()) -> tuple[KernelSpec, ...]:
        """The kernels of ``mask``: ``first`` (bits, in that order), then the others in rank order."""
        kernels = self.kernels
        rest = mask
        for bit in first:
            rest &= ~(1 << bit)
        head = tuple(kernels[b] for b in first)
        return head + tuple(compress(kernels, map("1".__eq__, bin(rest)[:1:-1])))

    def names(self, mask: int) -> list[str]:
        """The names of the kernels of ``mask``, in manifest order (what a perf table's estimates are listed in)."""
        bit = self.bit
        return [k.name for k in self.in_manifest_order if mask >> bit[k.name] & 1]

    @staticmethod
    def leading(mask: int, first: tuple[int, ...] = ()) -> tuple[Optional[int], Optional[int]]:
        """The first two bits of ``ranked(mask, first)`` (None where there are fewer), without listing the rest."""
        if first:
            rest = mask
            for bit in first:
                rest &= ~(1 << bit)
            if len(first) >= 2:
                return first[0], first[1]
            return first[0], ((rest & -rest).bit_length() - 1 if rest else None)
        if not mask:
            return None, None
        low = mask & -mask
        rest = mask ^ low
        return low.bit_length() - 1, ((rest & -rest).bit_length() - 1 if rest else None)

    def reasons(self, request: KernelRequest, platform: Platform, forced: Optional[str],
                unavailable: Mapping[str, str]) -> tuple[tuple[str, ...], ...]:
        """``reasons()`` of every kernel of the op, in manifest order: what explain and errors show."""
        return tuple(
            reasons(k, request, self.manifest, platform, self.overrides, forced=(k.name == forced), unavailable=unavailable)
            for k in self.in_manifest_order
        )


class CompiledManifest:
    """A manifest compiled for one platform's libraries and one set of overrides; ops compiled on first use."""

    def __init__(self, manifest: Manifest, platform: Platform, overrides: Overrides):
        self.manifest, self.platform, self.overrides = manifest, platform, overrides
        self._ops: dict[Op, CompiledOp] = {}
        self._lock = threading.Lock()

    def op(self, op: Op) -> CompiledOp:
        hit = self._ops.get(op)
        if hit is None:
            with self._lock:
                hit = self._ops.get(op)
                if hit is None:
                    hit = self._ops[op] = CompiledOp(op, self.manifest, self.platform, self.overrides)
        return hit


_COMPILED: dict[tuple, CompiledManifest] = {}
_COMPILED_LIMIT = 16
_COMPILED_LOCK = threading.Lock()


def compiled(manifest: Manifest, platform: Platform, overrides: Overrides = Overrides()) -> CompiledManifest:
    """``manifest`` compiled for ``platform``'s libraries and ``overrides`` (cached: the last 16 combinations).

    The platform's arch plays no part (requests carry theirs); its libraries
    decide which kernels miss one.
    """
    global _COMPILED
    key = (id(manifest), platform.libraries, overrides)
    hit = _COMPILED.get(key)
    if hit is not None and hit.manifest is manifest:
        return hit
    with _COMPILED_LOCK:
        hit = _COMPILED.get(key)
        if hit is None or hit.manifest is not manifest:
            if len(_COMPILED) >= _COMPILED_LIMIT:  # drop the older half; readers keep the dict they hold
                _COMPILED = dict(list(_COMPILED.items())[_COMPILED_LIMIT // 2:])
            hit = _COMPILED[key] = CompiledManifest(manifest, platform, overrides)
    return hit


def _compiled_op(manifest: Manifest, platform: Platform, overrides: Overrides, op: Op) -> CompiledOp:
    """The compiled op an unpickled selection reads (``CompiledOp.__reduce__``)."""
    return compiled(manifest, platform, overrides).op(op)
