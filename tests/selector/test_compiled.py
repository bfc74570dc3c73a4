"""The compiled solver decides exactly like the straightforward one, on random requests and random manifests.

``selector.solver.solve`` reads bitmasks compiled from the manifest
(``selector.compiled``); ``tests/selector/reference_solver.py`` keeps the
solver that reads every kernel with ``reasons()`` and sorts.  For over 10,000
random requests -- every op, every arch and dtype, the manifests' declared
shape values and their neighbours, features, solution/backend restrictions,
forced and disabled kernels, unavailable kernels (recorded kernel-wide and
per request, and a process group's), platforms missing libraries, perf
tables with tied times -- on the bundled manifest and on random synthetic
manifests (ranges with steps and powers of two, equals constraints with and
without ``or``, exclusions on every kind of field, tied priorities), the two
must give the same winner, ranking, ``why``, verdicts and ``to_dict()``, and
byte for byte the same ``explain()``.  A seeded generator (not hypothesis):
the same cases on every run, fast enough for CI.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import pytest
import yaml

from registry.constraints import Equals, IntRange
from registry.errors import KernelselError, ManifestError, RequestError
from registry.loader import bundled_perf_dir, load_manifest, load_perf_table
from registry.ops import FEATURE_FIELDS_BY_OP, RAGGED_OPS, SHAPE_FIELDS_BY_OP
from registry.perf import PERF_KEY, PerfEntry, PerfTable
from registry.vocab import Arch, Backend, DType, Op, Solution
from selector.availability import UnavailableKernels
from selector.compiled import CompiledOp, compiled
from selector.overrides import Overrides
from selector.platform import Platform
from selector.request import KernelRequest
from selector.solver import solve

import reference_solver as reference

SIZES = [1, 2, 3, 4, 7, 8, 15, 16, 32, 48, 64, 96, 128, 192, 256, 512, 576, 1024]
LIBRARIES = [(), (("*", "*"),), (("*", "*"),), (("torch", "2"),), (("torch", "2"), ("triton", "3")), (("flashinfer-python", "0.7"), ("torch", "2"))]


# ------------------------------------------------------------------ random manifests

def _shape_constraint(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.45:
        return sorted(rng.sample(SIZES, rng.randint(1, 4)))
    out: dict[str, Any] = {}
    lo, hi = sorted(rng.sample(SIZES, 2))
    if rng.random() < 0.6:
        out["min"] = lo
    if rng.random() < 0.6:
        out["max"] = hi
    if rng.random() < 0.3:
        out["multiple_of"] = rng.choice([1, 2, 8, 16])
    if rng.random() < 0.2:
        out["power_of_two"] = True
    if not out:
        out["min"] = lo
    return out


def _when(rng: random.Random, op: Op) -> dict[str, Any]:
    shapes = sorted(SHAPE_FIELDS_BY_OP[op])
    features = sorted(FEATURE_FIELDS_BY_OP[op])
    fields = rng.sample(["arch", "q_dtype", "kv_dtype", "out_dtype", "shape", "shape", "feature"], rng.randint(1, 2))
    out: dict[str, Any] = {}
    for f in fields:
        if f == "arch":
            out["arch"] = [a.value for a in rng.sample(list(Arch), rng.randint(1, 3))]
        elif f.endswith("dtype"):
            out[f] = [d.value for d in rng.sample(list(DType), rng.randint(1, 2))]
        elif f == "shape":
            field = rng.choice(shapes)
            out[field] = rng.choice(SIZES) if rng.random() < 0.3 else _shape_constraint(rng)
        else:
            out[rng.choice(features)] = rng.random() < 0.7
    return out


def _kernel(rng: random.Random, name: str, op: Op, adapter: str, strict: float) -> dict[str, Any]:
    """One random kernel; ``strict`` (0..1) scales how much it constrains (loose manifests rank many kernels)."""
    solution = rng.choice([Solution.FLASHINFER, Solution.XQA, Solution.TRTLLM_GEN, Solution.TRITON, Solution.TRITON,
                           Solution.REFERENCE])
    arch: Any
    lo, hi = sorted(rng.sample(list(Arch), 2), key=lambda a: a.number)
    shape = rng.random()
    if shape < 0.2:
        arch = [a.value for a in rng.sample(list(Arch), rng.randint(1, 3))]
    elif shape < 0.4:
        arch = {"min": lo.value}
    elif shape < 0.5:
        arch = {"max": hi.value}
    else:
        arch = {"min": lo.value, "max": hi.value}
    wide = 5 - round(3 * strict)
    dtypes: dict[str, Any] = {"q_dtype": [d.value for d in rng.sample(list(DType), rng.randint(1, wide))]}
    if rng.random() < 0.35:
        dtypes["kv_dtype"] = {"equals": "q_dtype"} | ({"or": [rng.choice(list(DType)).value]} if rng.random() < 0.5 else {})
    else:
        dtypes["kv_dtype"] = [d.value for d in rng.sample(list(DType), rng.randint(1, wide))]
    out_kind = rng.random()
    if out_kind < 0.3:
        dtypes["out_dtype"] = [d.value for d in rng.sample(list(DType), rng.randint(1, 2))]
    elif out_kind < 0.5:
        dtypes["out_dtype"] = {"equals": "q_dtype"}
    shapes: dict[str, Any] = {}
    fields = sorted(SHAPE_FIELDS_BY_OP[op])
    for f in fields:
        if rng.random() < 0.45 * strict:
            shapes[f] = _shape_constraint(rng)
    for f in fields:  # equals another field of the op, one that is not itself an equals constraint
        if rng.random() >= 0.12 or any(isinstance(c, dict) and c.get("equals") == f for c in shapes.values()):
            continue
        targets = [g for g in fields if g != f and not (isinstance(shapes.get(g), dict) and "equals" in shapes[g])]
        if targets:
            shapes[f] = {"equals": rng.choice(targets)} | ({"or": rng.sample(SIZES, 2)} if rng.random() < 0.4 else {})
    features = {f: True for f in sorted(FEATURE_FIELDS_BY_OP[op]) if rng.random() < 0.5}
    priority = rng.choice([0, 1, 3]) if solution is Solution.REFERENCE else rng.choice([4, 5, 5, 9, 9, 12, 16])
    kernel: dict[str, Any] = {
        "name": name, "op": op.value, "solution": solution.value, "backend": rng.choice(list(Backend)).value,
        "adapter": adapter, "arch": arch, "dtypes": dtypes, "shapes": shapes, "features": features,
        "priority": priority, "refs": ["synthetic"],
    }
    if rng.random() < 0.1:
        kernel["settings"] = {"kv_layout": rng.choice(["NHD", "HND"])}
    exclusions = [{"when": _when(rng, op), "reason": f"bad combination {i}", "ref": "synthetic"}
                  for i in range(rng.choice([0, 0, 1, 1, 2, 3]) if rng.random() < strict else 0)]
    if exclusions:
        kernel["exclude"] = exclusions
    return kernel


def synthetic_manifest(seed: int, bundled, sizes: dict[Op, int]):
    """A random manifest with ``sizes[op]`` kernels per op, or None when the random draw is not a valid manifest."""
    rng = random.Random(seed)
    strict = rng.choice([0.2, 0.5, 1.0])
    adapters = {op: [k.adapter for k in bundled.by_op[op]] for op in Op}
    kernels = []
    for op, n in sizes.items():
        names = [f"{op.value.replace('_', '-')}-{i:03d}" for i in range(n)]
        rng.shuffle(names)  # manifest order is not name order
        kernels += [_kernel(rng, name, op, rng.choice(adapters[op]), strict) for name in names]
    data = {
        "schema_version": 1,
        "solutions": {s.value: {"requires": list(i.requires), "install": i.install} for s, i in bundled.solutions.items()},
        "attention_plan": {"postwrite_min_priority": 12, "refs": ["synthetic"]},
        "kernels": kernels,
    }
    try:
        return load_manifest(f"synthetic-{seed}.yaml", text=yaml.safe_dump(data, sort_keys=False))
    except ManifestError:
        return None


# ------------------------------------------------------------------ random requests

def _declared(manifest, op: Op) -> dict[str, list[int]]:
    """Every integer a kernel of ``op`` names for each shape field, with its neighbours."""
    out: dict[str, set[int]] = {f: {1, 2, 64, 128} for f in SHAPE_FIELDS_BY_OP[op]}
    for k in manifest.by_op[op]:
        pairs = list(k.constraints) + [(f, c) for e in k.exclude for f, c in e.when.items()]
        for field, c in pairs:
            if field not in out:
                continue
            values = list(getattr(c, "values", ()) or ()) + list(getattr(c, "alternatives", ()) or ())
            values += [v for v in (getattr(c, "min", None), getattr(c, "max", None), getattr(c, "multiple_of", None))
                       if isinstance(v, int) and not isinstance(v, bool)]
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool):
                    out[field] |= {v - 1, v, v + 1}
    return {f: sorted(v for v in vs if v >= 1) for f, vs in out.items()}


def _allowed(rng: random.Random, c: Any) -> Any:
    """A value ``c`` admits (None when none of the sizes tried is), for aiming a request at a kernel."""
    if hasattr(c, "members"):
        members = c.members()
        return rng.choice(members) if members else None
    if hasattr(c, "values"):
        return rng.choice(c.values)
    if isinstance(c, IntRange):
        fits = [v for v in SIZES + [c.min or 1, c.max or 1] if v >= 1 and c.allows(v)]
        return rng.choice(fits) if fits else None
    return None


def random_request(rng: random.Random, manifest, op: Op, declared: dict[str, list[int]]) -> Optional[KernelRequest]:
    """A request for ``op``: mostly aimed at one kernel (values it admits, then a field or two changed), else anything."""
    shapes = sorted(SHAPE_FIELDS_BY_OP[op] - {"gqa_group_size"})
    fields: dict[str, Any] = {"op": op, "arch": rng.choice(list(Arch)), "q_dtype": rng.choice(list(DType))}
    if rng.random() < 0.6:
        fields["kv_dtype"] = rng.choice(list(DType))
    if rng.random() < 0.3:
        fields["out_dtype"] = rng.choice(list(DType))
    for f in shapes:
        if rng.random() < 0.4:
            fields[f] = rng.choice(declared[f])
    aim = rng.choice(manifest.by_op[op]) if rng.random() < 0.75 else None
    if aim is not None:
        relations = []
        for field, c in aim.constraints:
            if isinstance(c, Equals):
                relations.append((field, c))
            elif field in fields or field in ("arch", "q_dtype") or rng.random() < 0.5:
                value = _allowed(rng, c)
                if value is not None:
                    fields[field] = value
        for field, c in relations:
            if rng.random() < 0.8:
                other = fields.get(c.equals)
                fields[field] = other if other is not None and rng.random() < 0.8 else (
                    rng.choice(c.alternatives) if c.alternatives else _allowed(rng, c.target) if c.target else None)
        for _ in range(rng.choice([0, 0, 0, 0, 0, 1, 2])):  # knock it off its kernel a little
            f = rng.choice(["arch", "q_dtype", "kv_dtype"] + shapes)
            fields[f] = rng.choice(list(Arch)) if f == "arch" else rng.choice(list(DType)) if "dtype" in f \
                else rng.choice(declared[f])
    fields = {f: v for f, v in fields.items() if v is not None}
    if "gqa_group_size" in dict(aim.constraints if aim else ()) and "num_kv_heads" in fields:
        group = _allowed(rng, dict(aim.constraints)["gqa_group_size"])
        if group is not None:
            fields["num_qo_heads"] = fields["num_kv_heads"] * group
    if "num_qo_heads" in fields and "num_kv_heads" in fields and fields["num_qo_heads"] % fields["num_kv_heads"]:
        fields["num_qo_heads"] = fields["num_kv_heads"] * rng.choice([1, 2, 4, 8])
    for f in sorted(FEATURE_FIELDS_BY_OP[op]):
        supported = aim is not None and f not in aim.unsupported_features
        if rng.random() < (0.25 if supported else 0.015):
            fields[f] = True
    if rng.random() < 0.08:
        fields["solution"] = aim.solution if aim is not None and rng.random() < 0.6 else rng.choice(list(Solution))
    if rng.random() < 0.05:
        fields["backend"] = aim.backend if aim is not None and rng.random() < 0.6 else rng.choice(list(Backend))
    if rng.random() < 0.07:
        fields["kernel"] = aim.name if aim is not None else rng.choice(manifest.by_op[op]).name
    if rng.random() < 0.01:
        fields["kernel"] = rng.choice(manifest.kernels).name  # perhaps another op's: a RequestError on both sides
    if rng.random() < 0.5:
        fields["batch_size"] = rng.choice([1, 3, 8, 64, 100])
        fields["kv_len"] = rng.choice([1, 500, 4096, 5000])
        if op in RAGGED_OPS and rng.random() < 0.7:
            fields["new_len"] = fields["kv_len"] if op is Op.MHA_PREFILL else rng.choice([1, 7, 300, fields["kv_len"]])
    try:
        return KernelRequest(**fields)
    except RequestError:
        return None


def _perf_table(rng: random.Random, manifest, arch: Arch, requests: list[KernelRequest]) -> PerfTable:
    """Times (with ties, for eligible and ineligible kernels) for the buckets of some of ``requests``."""
    entries, seen = [], set()
    for r in requests:
        shape = {f: getattr(getattr(r, f), "value", getattr(r, f)) for f in PERF_KEY if getattr(r, f) is not None}
        key = (r.op, tuple(shape.items()))
        if key in seen or not manifest.by_op[r.op] or (r.op in RAGGED_OPS and r.new_len is None):
            continue  # a ragged op's bucket needs its new tokens
        seen.add(key)
        names = rng.sample([k.name for k in manifest.by_op[r.op]], rng.randint(1, len(manifest.by_op[r.op])))
        entries.append(PerfEntry(op=r.op, shape=shape, median_us={n: rng.choice([10.0, 12.5, 12.5, 40.0]) for n in names}))
    return PerfTable(gpu="Synthetic GPU", arch=arch, entries=tuple(entries))


# ------------------------------------------------------------------ the comparison

def same_decision(manifest, platform, request, overrides=Overrides(), perf=None, unavailable=None,
                  record: Optional[UnavailableKernels] = None) -> bool:
    """Assert that both solvers decide alike; False when both refused the request (the same RequestError)."""
    args = (manifest, platform, request, overrides, perf, unavailable or {})
    try:
        expected = reference.solve(*args, unavailable_kernels=record)
    except KernelselError as exc:
        with pytest.raises(type(exc)) as got:
            solve(*args, unavailable_kernels=record)
        assert str(got.value) == str(exc)
        return False
    selection = solve(*args, unavailable_kernels=record)
    where = f"{manifest.path}: {request.describe()} on {platform.describe()} with {overrides}"
    assert selection.name == expected.name, where
    assert [k.name for k in selection.eligible] == [k.name for k in expected.eligible], where
    assert selection.why == expected.why, where
    assert [(v.kernel.name, v.reasons) for v in selection.verdicts] == \
        [(v.kernel.name, v.reasons) for v in expected.verdicts], where
    assert [v.kernel.name for v in selection.rejected] == [v.kernel.name for v in expected.rejected], where
    assert (selection.forced_by, selection.measured, selection.perf_source, selection.overrides) == \
        (expected.forced_by, expected.measured, expected.perf_source, expected.overrides), where
    variant = selection.variant
    assert selection.explain() == reference.explain(expected, variant), where
    assert selection.to_dict() == reference.to_dict(expected, variant), where
    return True


def _contexts(rng: random.Random, manifest, perf_arch: Arch, requests: list[KernelRequest]):
    """(platform, overrides, perf, unavailable, record) combinations for one manifest."""
    names = sorted(manifest.by_name)
    perf = _perf_table(rng, manifest, perf_arch, requests)
    recorded = UnavailableKernels()
    for name in rng.sample(names, min(2, len(names))):
        recorded.mark(name, "unavailable: cannot import x: ImportError: no x (pip install x)")
    for r in rng.sample(requests, min(20, len(requests))):
        recorded.mark(rng.choice(names), "unavailable: adapter construction failed: RuntimeError: JIT", r)
    forced_op = rng.choice([op for op in Op if manifest.by_op[op]])
    return [
        (Platform.hypothetical(perf_arch), Overrides(), perf, None, None),
        (Platform(arch=perf_arch, libraries=rng.choice(LIBRARIES)), Overrides(), None, None, recorded),
        (Platform.hypothetical(perf_arch), Overrides(disable=frozenset(rng.sample(names, len(names) // 4))), perf,
         {rng.choice(names): "not eligible on rank 1: arch sm_80 below minimum sm_90"}, None),
        (Platform(arch=perf_arch, libraries=rng.choice(LIBRARIES)),
         Overrides(force=((forced_op, rng.choice(manifest.by_op[forced_op]).name),)), perf, None, recorded),
    ]


def _run(manifest, seed: int, per_context: int) -> int:
    rng = random.Random(seed)
    ops = [op for op in Op if manifest.by_op[op]]
    declared = {op: _declared(manifest, op) for op in ops}
    requests = []
    while len(requests) < per_context * 4:
        op = rng.choice(ops)
        r = random_request(rng, manifest, op, declared[op])
        if r is not None:
            requests.append(r)
    perf_arch = max(((r.arch, n) for n, r in enumerate(requests)), key=lambda p: (sum(q.arch is p[0] for q in requests), -p[1]))[0]
    compared = 0
    for i, (platform, overrides, perf, unavailable, record) in enumerate(_contexts(rng, manifest, perf_arch, requests)):
        for request in requests[i * per_context:(i + 1) * per_context]:
            compared += same_decision(manifest, platform, request, overrides, perf, unavailable, record)
    return compared


def test_compiled_solver_matches_the_reference_on_random_requests_and_manifests(manifest):
    compared = _run(manifest, seed=1, per_context=1250)  # the bundled manifest: 5,000 requests
    bundled = manifest
    synthetic = 0
    seed = 100
    while synthetic < 24:
        sizes = {op: random.Random(seed).choice([0, 3, 6, 12]) for op in Op}
        if synthetic == 0:
            sizes = {Op.MLA_DECODE: 90, Op.MHA_DECODE: 70}  # masks wider than a machine word
        m = synthetic_manifest(seed, bundled, sizes)
        seed += 1
        if m is None or not m.kernels:
            continue
        synthetic += 1
        compared += _run(m, seed=seed, per_context=60)
    assert compared >= 10_000, compared


def test_a_forced_reference_kernel_and_restrictions_read_like_the_reference(manifest):
    """The paths a random draw rarely takes together: forced reference kernel, solution=reference, a backend."""
    platform = Platform.hypothetical("sm_90")
    for op in Op:
        for k in manifest.by_op[op]:
            base = {"op": op, "arch": "sm_90"}
            for extra in ({"kernel": k.name}, {"solution": k.solution}, {"backend": k.backend},
                          {"solution": "reference", "kernel": k.name}):
                same_decision(manifest, platform, KernelRequest(**base, **extra))


def test_the_masks_number_kernels_by_priority_then_name(manifest):
    for op in Op:
        index = compiled(manifest, Platform.hypothetical("sm_90")).op(op)
        assert isinstance(index, CompiledOp)
        assert list(index.kernels) == sorted(manifest.by_op[op], key=lambda k: (-k.priority, k.name))
        assert [index.bit[k.name] for k in index.kernels] == list(range(len(index.kernels)))


def test_compiled_solver_matches_the_reference_with_the_committed_table_and_its_predictions(manifest):
    """Measured and predicted times (the committed H200 table): its buckets and nearby unmeasured ones."""
    tables = [load_perf_table(p) for p in sorted(bundled_perf_dir().glob("*.yaml"))]
    compared = predicted = 0
    for table in tables:
        platform = Platform.hypothetical(table.arch)
        for entry in table.entries:
            for scale in (1, 2, 8, 64):
                shape = dict(entry.shape)
                for field in ("batch_size", "kv_len", "new_len"):
                    if shape.get(field) is not None:
                        shape[field] = shape[field] * scale
                if shape.get("new_len") and entry.op is Op.MHA_PREFILL:
                    shape["new_len"] = shape["kv_len"]
                try:
                    request = KernelRequest(op=entry.op, arch=table.arch, **shape)
                except RequestError:
                    continue
                for overrides in (Overrides(), Overrides(predict=False)):
                    if same_decision(manifest, platform, request, overrides, table):
                        compared += 1
                        predicted += "predicted" in solve(manifest, platform, request, overrides, table).why
    assert compared >= 200 and predicted >= 20, (compared, predicted)
