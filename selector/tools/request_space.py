"""The request space of an op: one request per distinct outcome the kernels of two manifests can produce.

``kernelsel diff`` solves these requests in both manifests; tests and the concurrency check use them as
every request class an op has.

How the request space is enumerated (exact for the values probed, no blind
cross product):

1. Per op, the kernels of that op in *both* manifests are pooled.  An op whose
   kernels (and solutions) are identical in both is skipped: the solver is a
   pure function of them, so no request of that op can change.
2. Request fields are split into groups that are set together because one
   defaults from another: ``arch``; ``q_dtype/kv_dtype/out_dtype``;
   ``num_qo_heads/num_kv_heads`` (with the derived ``gqa_group_size``);
   ``head_dim_qk/head_dim_vo``; then every other shape field and every
   feature flag alone.  Groups joined by an equals constraint (``page_size:
   {equals: topk}``) are one group, so the relation is checked on whole
   assignments.  A group takes part only when some pooled kernel constrains
   one of its fields (a declared constraint, the field an equals constraint
   names, an undeclared feature, or an exclusion's ``when``); the others stay
   unset.
3. Candidate values come from the constraints: every arch and dtype of the
   vocabulary; for an int field, each listed value and its neighbours, each
   range's min-1/min/max/max+1, a multiple and a non-multiple of each step,
   powers of two and a non-power; a field related by an equals constraint
   also takes the other field's values and each ``or`` value, so equal and
   unequal combinations are both probed.  Each candidate gets a *profile*: for every
   pooled kernel, whether its constraints on the group's fields allow it, and
   for every exclusion, whether its ``when`` fields in the group match.
   Candidates with equal profiles are one equivalence class (one
   representative, e.g. sm_80/sm_86/sm_89 when every arch bound agrees);
   a class that no pooled kernel allows is dropped.
4. The classes are combined group by group, merging partial requests whose
   combined profile is equal (a kernel is eligible iff every group allows it
   and no exclusion matches in every group).  The result is one request per
   distinct (arch class, eligible kernels in BASE, eligible kernels in HEAD)
   -- every reachable outcome, each solved once -- times the ``solution``
   restriction (none, then each solution with a kernel of the op).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from registry.constraints import Equals, IntRange, OneOf
from registry.errors import KernelselError
from registry.ops import FEATURE_FIELDS_BY_OP, SHAPE_FIELDS_BY_OP
from registry.schema import Features, KernelSpec, Manifest, Shapes
from registry.vocab import Arch, DType, Op
from selector.request import KernelRequest

_JOINT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_dtype", "kv_dtype", "out_dtype"),
    ("num_qo_heads", "num_kv_heads", "gqa_group_size"),
    ("head_dim_qk", "head_dim_vo"),
)
"""Fields set together because one defaults from (or is derived from) another."""


@dataclass(frozen=True)
class _Constraint:
    """One pooled check on one request field: a kernel constraint or a feature flag."""

    field: str
    allows: Any  # (value, request) -> bool; an equals constraint reads the request's other field


@dataclass
class _Pool:
    """The kernels of one op in both manifests, flattened to what the enumeration checks."""

    op: Op
    kernels: list[KernelSpec]
    checks: list[list[_Constraint]]  # per kernel
    exclusions: list[tuple[int, dict[str, Any]]]  # (kernel index, when)

    @classmethod
    def of(cls, op: Op, manifests: Iterable[Manifest]) -> "_Pool":
        kernels = [k for m in manifests for k in m.by_op[op]]
        features = FEATURE_FIELDS_BY_OP[op]
        checks = []
        for k in kernels:
            cs = [_Constraint(f, c.allows) for f, c in k.constraints]  # c.allows(value, request)
            cs += [_Constraint(f, _false) for f in k.unsupported_features if f in features]
            checks.append(cs)
        # an exclusion clause on a field this op cannot take is decided by the field's fixed default
        settable = {"arch", "q_dtype", "kv_dtype", "out_dtype"} | SHAPE_FIELDS_BY_OP[op] | features
        fixed = KernelRequest(op=op)
        exclusions = []
        for i, k in enumerate(kernels):
            for e in k.exclude:
                when = {f: c for f, c in e.when.items() if f in settable}
                constant = [getattr(fixed, f) is not None and c.allows(getattr(fixed, f))
                            for f, c in e.when.items() if f not in settable]
                if all(constant):
                    exclusions.append((i, when))
        return cls(op, kernels, checks, exclusions)

    def relations(self) -> set[tuple[str, str]]:
        """(field, the field it must equal) for every equals constraint of the pooled kernels."""
        return {(f, c.equals) for k in self.kernels for f, c in k.constraints if isinstance(c, Equals)}

    def constrained(self) -> set[str]:
        out = {c.field for cs in self.checks for c in cs} | {b for _, b in self.relations()}
        return out | {f for _, when in self.exclusions for f in when}

    def values_for(self, name: str) -> list[Any]:
        """The constraint objects (kernel and exclusion) that mention a field or a field it is related to by equals."""
        related = {name} | {b for a, b in self.relations() if a == name} | {a for a, b in self.relations() if b == name}
        found = [c for k in self.kernels for f, c in k.constraints if f in related]
        return found + [when[name] for _, when in self.exclusions if name in when]


def _false(value: Any, request: Any = None) -> bool:  # an undeclared feature allows only "not needed"
    return not value


def _int_points(constraints: list[Any]) -> list[int]:
    """Probe values for an int field: declared values and bounds first, then their neighbours."""
    declared: list[int] = []
    probes: list[int] = []
    top = 1
    for c in constraints:
        if isinstance(c, OneOf):
            ints = [v for v in c.values if isinstance(v, int) and not isinstance(v, bool)]
            declared += ints
            probes += [v + d for v in ints for d in (-1, 1)]
            top = max([top, *ints])
        elif isinstance(c, Equals):
            ints = [v for v in c.alternatives if isinstance(v, int) and not isinstance(v, bool)]
            declared += ints
            probes += [v + d for v in ints for d in (-1, 1)]
            top = max([top, *ints])
        elif isinstance(c, IntRange):
            for bound in (c.min, c.max):
                if bound is not None:
                    declared.append(bound)
                    probes += [bound - 1, bound + 1]
                    top = max(top, bound)
            if c.multiple_of:
                m = c.multiple_of
                base = m * max(1, -(-(c.min or m) // m))
                declared += [base, base + m]
                probes += [base + 1]
                top = max(top, base + m)
    if any(isinstance(c, IntRange) and c.power_of_two for c in constraints):
        powers = [1 << i for i in range(0, (2 * top).bit_length() + 1)]
        declared += powers
        probes += [3 * p for p in powers if p > 1]
    probes.append(2 * top + 1)  # above everything, odd, not a power of two
    out: list[int] = []
    for v in declared + probes:
        if v >= 0 and v not in out:
            out.append(v)
    return out


@dataclass(frozen=True)
class _Class:
    """An equivalence class of one field group: the fields to set and its profile."""

    assignment: tuple[tuple[str, Any], ...]
    passes: tuple[bool, ...]
    matches: tuple[bool, ...]
    members: tuple[Any, ...] = ()


def _candidates(pool: _Pool, group: tuple[str, ...], constrained: set[str]) -> list[dict[str, Any]]:
    """Field assignments to probe for one group (settable fields only)."""
    op_fields = SHAPE_FIELDS_BY_OP[pool.op] | FEATURE_FIELDS_BY_OP[pool.op]

    def ints(name: str) -> list[Optional[int]]:
        return _int_points(pool.values_for(name)) if name in constrained else [None]

    if group == ("arch",):
        return [{"arch": a} for a in Arch]
    if group == _JOINT_GROUPS[0]:
        # defaulted kv/out first, so a class is represented by the plainest request in it
        qs = [DType.BF16] + [d for d in DType if d is not DType.BF16]
        kvs = [None] + list(DType) if "kv_dtype" in constrained else [None]
        outs = [None] + list(DType) if "out_dtype" in constrained else [None]
        return [{"q_dtype": q, "kv_dtype": kv, "out_dtype": o} for o, kv, q in itertools.product(outs, kvs, qs)]
    if group == _JOINT_GROUPS[1]:
        qos = [v for v in ints("num_qo_heads") if v]
        if "num_kv_heads" not in op_fields:
            return [{"num_qo_heads": qo} for qo in qos]
        kvs = [v for v in ints("num_kv_heads") if v] or [1]
        gs = [v for v in ints("gqa_group_size") if v] or [1]
        pairs = [(kv * g, kv) for kv in kvs for g in gs]
        pairs += [(qo, kv) for qo in qos for kv in kvs if qo % kv == 0]
        pairs += [(qo, qo // g) for qo in qos for g in gs if qo % g == 0]
        return [{"num_qo_heads": qo, "num_kv_heads": kv} for qo, kv in pairs]
    if group == _JOINT_GROUPS[2]:
        vos = [None] + [v for v in ints("head_dim_vo") if v is not None]
        return [{"head_dim_qk": qk, "head_dim_vo": vo} for qk in ints("head_dim_qk") for vo in vos]
    (name,) = group
    if name in Features.model_fields:
        return [{name: False}, {name: True}]
    return [{name: v} for v in ints(name)]


_Unit = tuple[tuple[str, ...], ...]
"""Field groups enumerated together: one group, or several joined by equals constraints."""

_ARCH: _Unit = (("arch",),)


def _units(groups: list[tuple[str, ...]], relations: set[tuple[str, str]]) -> list[_Unit]:
    """Join the groups that an equals constraint relates (transitively), keeping their order."""
    units: list[list[tuple[str, ...]]] = [[g] for g in groups]
    for a, b in sorted(relations):
        ua = next((u for u in units if any(a in g for g in u)), None)
        ub = next((u for u in units if any(b in g for g in u)), None)
        if ua is not None and ub is not None and ua is not ub:
            ua += ub
            units.remove(ub)
    return [tuple(u) for u in units]


def _unit_candidates(pool: _Pool, unit: _Unit, constrained: set[str]) -> list[dict[str, Any]]:
    """Every combination of the unit's groups' candidates."""
    per_group = [_candidates(pool, g, constrained) for g in unit]
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*per_group)]


def _classes(pool: _Pool, unit: _Unit, constrained: set[str]) -> list[_Class]:
    """The unit's candidates reduced to equivalence classes (equal profiles), none that no kernel allows."""
    found: dict[tuple, _Class] = {}
    fields = [f for g in unit for f in g]
    for assignment in _unit_candidates(pool, unit, constrained):
        assignment = {k: v for k, v in assignment.items() if v is not None}
        if not assignment:
            continue
        try:
            request = KernelRequest(op=pool.op, **assignment)
        except KernelselError:
            continue  # not a valid request (e.g. head dim 0): nobody can send it
        values = {f: getattr(request, f) for f in fields}
        passes = tuple(
            all(values[c.field] is None or c.allows(values[c.field], request) for c in cs if c.field in values)
            for cs in pool.checks
        )
        matches = tuple(
            all(values[f] is not None and c.allows(values[f]) for f, c in when.items() if f in values)
            for _, when in pool.exclusions
        )
        if not any(passes):
            continue
        key = (passes, matches)
        if key in found:
            if unit == _ARCH:
                prev = found[key]
                found[key] = _Class(prev.assignment, passes, matches, prev.members + (assignment["arch"],))
            continue
        members = (assignment["arch"],) if unit == _ARCH else ()
        found[key] = _Class(tuple(assignment.items()), passes, matches, members)
    return list(found.values())


@dataclass(frozen=True)
class Probe:
    """One representative request, the arch class it stands for, and the kernels expected eligible.

    ``expected`` holds, per manifest (base, head), the kernel names whose
    constraints, features and exclusions admit the request -- before the
    solution restriction and the reference rule, which the solver applies.
    """

    request: KernelRequest
    archs: tuple[Arch, ...]
    expected: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())


@dataclass(frozen=True)
class RequestSpace:
    """The probes of an op, and whether they are all of its outcomes (see ``enumerate_requests``)."""

    probes: list[Probe]
    complete: bool = True
    limit: Optional[int] = None  # the partial request classes kept per arch class, when that cut the enumeration


def request_space(op: Op, base: Manifest, head: Manifest) -> list[Probe]:
    """One request per distinct outcome the pooled kernels of ``op`` can produce (see the module docstring)."""
    return enumerate_requests(op, base, head).probes


def enumerate_requests(op: Op, base: Manifest, head: Manifest, *, max_states: Optional[int] = None) -> RequestSpace:
    """``request_space``, bounded: at most ``max_states`` partial request classes per arch class at every step.

    The distinct outcomes of an op can grow exponentially with its kernels (independent constraints on
    many fields: 48 random kernels gave 12,392 classes).  With ``max_states`` the enumeration keeps the
    first classes of each arch class in a fixed order and says it is not complete (``complete=False``);
    every arch class keeps its share, so none is dropped whole.
    """
    pool = _Pool.of(op, (base, head))
    if not pool.kernels:
        return RequestSpace([])
    constrained = pool.constrained()
    joint = {f for g in _JOINT_GROUPS for f in g}
    groups: list[tuple[str, ...]] = [g for g in _JOINT_GROUPS if constrained & set(g)]
    groups += [(f,) for f in Shapes.model_fields if f in constrained and f not in joint]
    groups += [(f,) for f in Features.model_fields if f in constrained]
    units = _units(groups, pool.relations())
    n_excl = len(pool.exclusions)

    def owner(i: int) -> int:
        return pool.exclusions[i][0]

    # arch classes start the states; states never merge across arch classes
    states: dict[tuple, tuple[int, dict[str, Any]]] = {}
    arch_classes = _classes(pool, _ARCH, constrained)
    for ai, cls in enumerate(arch_classes):
        states.setdefault((ai, cls.passes, cls.matches), (ai, dict(cls.assignment)))
    complete = True
    for unit in units:
        classes = _classes(pool, unit, constrained)
        merged: dict[tuple, tuple[int, dict[str, Any]]] = {}
        kept: dict[int, int] = {}  # arch class -> partial classes kept
        for (ai, passes, matches), (_, assignment) in states.items():
            for cls in classes:
                p2 = tuple(a and b for a, b in zip(passes, cls.passes))
                if not any(p2):
                    continue
                m2 = tuple(matches[i] and cls.matches[i] and p2[owner(i)] for i in range(n_excl))
                key = (ai, p2, m2)
                if key in merged:
                    continue
                if max_states is not None and kept.get(ai, 0) >= max_states:
                    complete = False
                    continue
                kept[ai] = kept.get(ai, 0) + 1
                merged[key] = (ai, assignment | dict(cls.assignment))
        states = merged
    outcomes: dict[tuple, tuple[int, dict[str, Any]]] = {}
    for (ai, passes, matches), (_, assignment) in states.items():
        excluded = {owner(i) for i in range(n_excl) if matches[i]}
        eligible = tuple(p and i not in excluded for i, p in enumerate(passes))
        if any(eligible):  # none eligible in either manifest: nothing can change
            outcomes.setdefault((ai, eligible), assignment)
    n_base = len(base.by_op[op])
    solutions = [None] + sorted({k.solution for k in pool.kernels}, key=lambda s: list(type(s)).index(s))
    probes = []
    for (ai, eligible), assignment in outcomes.items():
        names = [k.name for k, ok in zip(pool.kernels, eligible) if ok]
        expected = (frozenset(names[:sum(eligible[:n_base])]), frozenset(names[sum(eligible[:n_base]):]))
        for solution in solutions:
            fields = assignment | ({"solution": solution} if solution is not None else {})
            probes.append(Probe(KernelRequest(op=op, **fields), arch_classes[ai].members, expected))
    return RequestSpace(probes, complete, None if complete else max_states)
