"""``kernelsel verify``: run every kernel the manifest declares for this machine against the reference.

A manifest entry is a claim; this checks it on hardware.  Cases are derived
from each kernel's *declared* capability (every declared dtype, head dim,
page size, GQA ratio, q_len up to the max, each declared feature on), never
from facts restated here.  Each case goes through ``select_kernel(...,
kernel=NAME)`` so selection is exercised too, runs the adapter on inputs from
``registry.workloads`` and compares with the torch reference.  A feature must
also *change* the output the way the reference says it does, so a kernel that
silently drops it (FlashInfer 0.7.2's decode ``sinks=``) fails.

Entry point: ``verify(manifest=None, *, op=None, kernel=None, quick=False,
device='cuda', progress=None) -> VerifyReport``.  Imports torch when called.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

from registry.constraints import Equals, IntRange, OneOf
from registry.ops import FEATURE_FIELDS_BY_OP, SHAPE_FIELDS_BY_OP
from registry.schema import Features, KernelSpec, Manifest, Shapes
from registry.vocab import DType, Op, Solution

# ----------------------------------------------------------------- policy


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``|out - ref| <= atol + rtol * |ref|`` everywhere and ``|lse - ref_lse| <= lse_atol``."""

    atol: float
    rtol: float
    lse_atol: float


TOLERANCES: dict[DType, Tolerance] = {
    DType.FP32: Tolerance(atol=2e-3, rtol=2e-3, lse_atol=2e-3),
    DType.FP16: Tolerance(atol=5e-3, rtol=5e-3, lse_atol=5e-3),
    DType.BF16: Tolerance(atol=3e-2, rtol=2e-2, lse_atol=1e-2),
    DType.FP8_E4M3: Tolerance(atol=1e-1, rtol=1e-1, lse_atol=5e-2),
    DType.FP8_E5M2: Tolerance(atol=1.5e-1, rtol=1.5e-1, lse_atol=1e-1),
}
"""Per-dtype tolerances; a case uses the loosest of its q, kv and out dtypes.

The reference reads the *same* stored (possibly FP8) inputs, so input
rounding cancels; what remains is the kernel's own rounding: the output's
dtype, P cast to 16 bits before the PV matmul, K/V cast to the query's
dtype when they differ, and for FP8 attention P or Q quantised to FP8
(e4m3: 3 mantissa bits; e5m2: 2).  For bf16 (8 bits) that is an error of
std ~6e-3 per element on these workloads, and the maximum over ~1e4
elements lands near 4 std, hence 3e-2 (measured on H200: up to 2.6e-2 for
Triton MLA with a 576-wide head).  fp32 allows TF32 matmuls.  LSE is fp32
from fp32 scores, so it gets a tighter bound.
"""

FEATURE_EFFECT_MARGIN = 5.0
"""A feature case is meaningful only if the reference output moves by more
than this many ``atol`` when the feature is switched off; otherwise a kernel
that dropped the feature could still pass, and the case is reported as an
error in the harness rather than a pass."""

OPEN_FIELD_SAMPLES: dict[str, tuple[int, ...]] = {
    "head_dim_qk": (64,),
    "num_qo_heads": (16,),
    "num_kv_heads": (2,),
    "gqa_group_size": (1, 4, 48),  # 48: a multi-query model's group (StarCoder), past any dispatch table
    "page_size": (1, 16),
    "q_len": (1, 2),
    "kv_lora_rank": (64,),
    "qk_rope_head_dim": (16,),
    "qk_nope_head_dim": (32,),
    "topk": (8,),
}
"""Sizes tried where a kernel leaves a shape field open or gives a range.

They claim nothing about any kernel: a range contributes its smallest and
(when bounded) largest allowed values plus those of these samples it admits;
an open field uses these samples alone.  ``head_dim_vo`` follows
``head_dim_qk``; ``num_qo_heads`` of MHA ops follows GQA size x KV heads.
"""

_DTYPE_ORDER = (DType.FP32, DType.FP16, DType.BF16, DType.FP8_E4M3, DType.FP8_E5M2)  # tightest first
_CHECKED_FEATURES = ("sinks", "sliding_window", "logits_soft_cap", "non_causal")  # change the output
_NOT_FROM_SAMPLES = ("head_dim_vo",)


# ----------------------------------------------------------------- report


@dataclass
class CaseResult:
    """One case of one kernel: what ran, how far from the reference, and the verdict."""

    kernel: str
    case: str
    status: str  # "pass" | "fail" | "error" | "skip"
    max_abs_err: Optional[float] = None
    tolerance: Optional[float] = None
    lse_err: Optional[float] = None
    feature_effect: Optional[float] = None
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VerifyReport:
    """Every case of every kernel checked, plus the software and hardware it ran on."""

    results: list[CaseResult] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "error": 0, "skip": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    @property
    def ok(self) -> bool:
        """True when nothing failed or errored (skips are allowed: undeclared or unrunnable here)."""
        c = self.counts()
        return c["fail"] == 0 and c["error"] == 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts(), "environment": dict(self.environment),
                "results": [r.to_dict() for r in self.results]}

    def render(self, *, show_passed: bool = True) -> str:
        """A fixed-width text table, failures first within each kernel, then a summary line."""
        env = self.environment
        lines = [
            f"device    {env.get('device', '?')} {env.get('gpu', '')}".rstrip(),
            f"arch      {env.get('arch') or '-'}",
            "versions  " + " ".join(f"{k}={v}" for k, v in env.get("versions", {}).items()),
            f"manifest  {env.get('manifest', '')}",
        ]
        rows = [r for r in self.results if show_passed or r.status != "pass"]
        kw = max([len(r.kernel) for r in rows] + [6])
        cw = max([len(r.case) for r in rows] + [4])
        lines.append(
            f"{'status':<6}  {'kernel':<{kw}}  {'case':<{cw}}  {'max_err':>8}  {'atol':>8}  {'lse_err':>8}  "
            f"{'effect':>8}  note"
        )
        for r in rows:
            lines.append(
                f"{r.status:<6}  {r.kernel:<{kw}}  {r.case:<{cw}}  {_num(r.max_abs_err):>8}  {_num(r.tolerance):>8}  "
                f"{_num(r.lse_err):>8}  {_num(r.feature_effect):>8}  {r.message}".rstrip()
            )
        c = self.counts()
        lines.append(f"{c['pass']} passed, {c['fail']} failed, {c['error']} errors, {c['skip']} skipped")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2e}"


# ----------------------------------------------------------------- cases from the manifest


def _range_values(field_name: str, c: IntRange) -> list[int]:
    """Smallest and largest allowed values of a range plus the samples it admits."""
    values = {v for v in OPEN_FIELD_SAMPLES.get(field_name, ()) if c.allows(v)}
    lo = max(c.min or 1, 1)
    hi = c.max if c.max is not None else lo + 4096
    smallest = next((v for v in range(lo, hi + 1) if c.allows(v)), None)
    if smallest is not None:
        values.add(smallest)
    if c.max is not None:
        largest = next((v for v in range(c.max, lo - 1, -1) if c.allows(v)), None)
        if largest is not None:
            values.add(largest)
    return sorted(values)


def _declared_values(field_name: str, c: Any) -> list[Any]:
    if c is None:
        return list(OPEN_FIELD_SAMPLES.get(field_name, ()))
    if isinstance(c, OneOf):
        return list(c.values)
    if isinstance(c, IntRange):
        return _range_values(field_name, c)
    return list(c.values)  # DTypeSet


def _field_values(spec: KernelSpec, field_name: str) -> list[Any]:
    """The values to try for one field; a field that equals another takes that field's values, then its ``or``."""
    group = spec.dtypes if field_name in type(spec.dtypes).model_fields else spec.shapes
    c = getattr(group, field_name)
    if isinstance(c, Equals):
        return list(dict.fromkeys(_field_values(spec, c.equals) + list(c.alternatives)))
    return _declared_values(field_name, c)


def case_axes(spec: KernelSpec) -> dict[str, list[Any]]:
    """Request field -> the values to try, taken from the kernel's declared constraints."""
    op_fields = SHAPE_FIELDS_BY_OP[spec.op]
    is_mha = "gqa_group_size" in op_fields
    axes: dict[str, list[Any]] = {
        "q_dtype": _field_values(spec, "q_dtype"),
        "kv_dtype": _field_values(spec, "kv_dtype"),
    }
    if spec.dtypes.out_dtype is not None:
        axes["out_dtype"] = _field_values(spec, "out_dtype")
    for name in Shapes.model_fields:
        if name not in op_fields or name in _NOT_FROM_SAMPLES or (is_mha and name == "num_qo_heads"):
            continue
        values = _field_values(spec, name)
        if values:
            axes[name] = values
    return axes


def _combinations(axes: dict[str, list[Any]], quick: bool) -> Iterator[dict[str, Any]]:
    """Full: the cross product.  Quick: a base case, then one case per other declared value."""
    names = list(axes)
    if not quick:
        for values in itertools.product(*(axes[n] for n in names)):
            yield dict(zip(names, values))
        return
    base = {n: axes[n][0] for n in names}
    yield base
    for n in names:
        for v in axes[n][1:]:
            yield {**base, n: v}


def _to_request_fields(spec: KernelSpec, combo: dict[str, Any]) -> dict[str, Any]:
    """A case's axis values -> KernelRequest fields (derived heads, head_dim_vo, default out dtype)."""
    fields = dict(combo)
    if "gqa_group_size" in fields:  # MHA: query heads follow from the group size, next to the KV heads
        group = fields.pop("gqa_group_size")
        fields = {k: v for k, v in fields.items() if k != "num_kv_heads"} | {
            "num_qo_heads": group * fields["num_kv_heads"], "num_kv_heads": fields["num_kv_heads"]
        }
    if "head_dim_qk" in fields:
        vo = spec.shapes.head_dim_vo
        qk = fields["head_dim_qk"]
        fields["head_dim_vo"] = qk if vo is None or vo.allows(qk) else _declared_values("head_dim_vo", vo)[0]
    return fields


def _features(spec: KernelSpec, device: str) -> list[str]:
    """Declared features that verify exercises on ``device`` (graph capture needs CUDA)."""
    names = [f for f in Features.model_fields if getattr(spec.features, f) and f in FEATURE_FIELDS_BY_OP[spec.op]]
    return [f for f in names if f != "cuda_graph" or device.startswith("cuda")]


def _describe(fields: dict[str, Any], feature: Optional[str]) -> str:
    short = {"q_dtype": "q", "kv_dtype": "kv", "out_dtype": "out", "head_dim_qk": "d", "head_dim_vo": "dv",
             "num_qo_heads": "hq", "num_kv_heads": "hkv", "page_size": "page", "kv_lora_rank": "rank",
             "qk_rope_head_dim": "rope", "qk_nope_head_dim": "nope"}
    parts = []
    for k, v in fields.items():
        if k == "head_dim_vo" and v == fields.get("head_dim_qk"):
            continue
        parts.append(f"{short.get(k, k)}={getattr(v, 'value', v)}")
    if feature:
        parts.append(f"+{feature}")
    return " ".join(parts)


def tolerance_for(request: Any) -> Tolerance:
    """The tolerance verify holds a request to: that of its least precise dtype."""
    dtypes = {request.q_dtype, request.kv_dtype, request.out_dtype}
    return TOLERANCES[max(dtypes, key=_DTYPE_ORDER.index)]


@dataclass(frozen=True)
class _Case:
    spec: KernelSpec
    fields: dict
    feature: Optional[str]
    description: str


def plan_cases(spec: KernelSpec, *, quick: bool, device: str) -> list[_Case]:
    """Every case for one kernel: declared values (cross product or one at a time), each feature on."""
    combos = [_to_request_fields(spec, c) for c in _combinations(case_axes(spec), quick)]
    seen, unique = set(), []
    for c in combos:
        key = tuple(sorted((k, str(v)) for k, v in c.items()))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    features = _features(spec, device)
    cases = []
    for i, fields in enumerate(unique):
        cases.append(_Case(spec, fields, None, _describe(fields, None)))
        if quick and i:
            continue  # quick: features on the base case only
        for f in features:
            cases.append(_Case(spec, {**fields, f: True}, f, _describe(fields, f)))
    return cases


# ----------------------------------------------------------------- running


def _environment(device: str, arch: Any, manifest: Manifest) -> dict[str, Any]:
    import torch

    from selector.platform import installed_versions

    versions = dict(installed_versions(["torch", "flashinfer-python", "triton"]))
    versions["torch"] = torch.__version__
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else ""
    return {"device": device, "gpu": gpu, "arch": getattr(arch, "value", arch), "versions": versions,
            "manifest": f"{manifest.path} ({manifest.digest})", "date": datetime.date.today().isoformat()}


def _progress_fn(progress: Union[bool, Callable, None]) -> Callable[[int, int, str], None]:
    if callable(progress):
        return progress
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return lambda done, total, label: None

    def line(done: int, total: int, label: str) -> None:
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r\033[Kverify [{done}/{total}] {label}"[:200] + end)
        sys.stderr.flush()

    return line


def _max_err(got: Any, want: Any) -> float:
    return float((got.float() - want).abs().max()) if want.numel() else 0.0


def within(got: Any, want: Any, tol: Tolerance) -> bool:
    """Every element of ``got`` within ``tol`` of ``want`` (the check verify applies to an output)."""
    import torch

    return bool(torch.all((got.float() - want).abs() <= tol.atol + tol.rtol * want.abs()))


def _lse_err(got: Any, want: Any) -> float:
    import torch

    if got.shape != want.shape:
        return float("inf")
    same_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    diff = (got.float() - want).abs().masked_fill(same_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def _run_case(case: _Case, request: Any, select: Callable, device: str, seed: int) -> CaseResult:
    from registry.workloads import make_workload

    result = CaseResult(case.spec.name, case.description, "error")
    tol = tolerance_for(request)
    result.tolerance = tol.atol
    adapter = select(request).make_adapter()
    work = make_workload(request, device=device, seed=seed)
    adapter.plan(work.metadata)
    out = work.new_out()
    lse = work.new_lse() if request.return_lse else None
    got = work.run(adapter, out=out, lse=lse)
    want_out, want_lse = work.reference()
    problems = []

    if tuple(got.out.shape) != tuple(want_out.shape):
        result.message = f"output shape {list(got.out.shape)}, expected {list(want_out.shape)}"
        return result
    if got.out.data_ptr() != out.data_ptr():
        problems.append("run() ignored out=")
    result.max_abs_err = _max_err(got.out, want_out)
    if not within(got.out, want_out, tol):
        problems.append("output differs from the reference")

    if request.return_lse:
        if got.lse is None:
            problems.append("return_lse requested but no LSE returned")
        else:
            result.lse_err = _lse_err(got.lse, want_lse)
            if not result.lse_err <= tol.lse_atol:
                problems.append(f"LSE off by {result.lse_err:.3g} (natural log expected)")

    if case.feature in _CHECKED_FEATURES:
        want_without, _ = work.reference(without=case.feature)
        result.feature_effect = _max_err(want_out, want_without)
        if result.feature_effect < FEATURE_EFFECT_MARGIN * tol.atol:
            result.message = (
                f"case too weak: {case.feature} moves the reference by only {result.feature_effect:.3g}"
            )
            return result
        if within(got.out, want_without, tol):
            problems.append(f"{case.feature} had no effect: output equals the reference without it (dropped?)")

    if work.scales:  # FP8: a one-element tensor scale must give the same answer as a float
        again = work.run(adapter, tensor_scales=True)
        if not within(again.out, want_out, tol):
            problems.append(f"tensor scales differ from float scales (max err {_max_err(again.out, want_out):.3g})")

    if case.feature == "cuda_graph":
        problem = _graph_problem(adapter, work, want_out, tol)
        if problem:
            problems.append(problem)

    result.status = "fail" if problems else "pass"
    result.message = "; ".join(problems)
    return result


def _graph_problem(adapter: Any, work: Any, want: Any, tol: Tolerance) -> Optional[str]:
    """Capture run() in a CUDA graph, replay into a cleared buffer, compare."""
    import torch

    out = work.new_out()
    lse = work.new_lse() if work.request.return_lse else None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        work.run(adapter, out=out, lse=lse)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            work.run(adapter, out=out, lse=lse)
    except Exception as exc:  # noqa: BLE001 - any capture failure is the finding
        return f"not capturable in a CUDA graph: {type(exc).__name__}: {_first_line(exc)}"
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    if not within(out, want, tol):
        return f"CUDA-graph replay differs from the reference (max err {_max_err(out, want):.3g})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def verify(
    manifest: Optional[Manifest] = None,
    *,
    op: Optional[str] = None,
    kernel: Optional[str] = None,
    quick: bool = False,
    device: str = "cuda",
    progress: Union[bool, Callable[[int, int, str], None], None] = None,
    solution: Optional[str] = None,
    arch: Optional[str] = None,
    seed: int = 0,
) -> VerifyReport:
    """Check every kernel the manifest declares for this machine against the torch reference.

    ``manifest``: a loaded Manifest (default: the bundled / KERNELSEL_MANIFEST one).
    ``op``, ``kernel``, ``solution``: restrict which kernels run.  ``quick``:
    one case per declared value instead of the cross product.  ``device``:
    'cuda' (arch detected) or 'cpu' (each kernel gets its lowest declared
    arch as a nominal one unless ``arch`` is given; only kernels whose
    library runs on CPU pass).  ``progress``: None = a stderr line when
    stderr is a terminal, True/False = always/never, or a callable
    ``(done, total, label)``.
    """
    import torch

    from registry.loader import load_manifest
    from selector.api import select_kernel
    from selector.overrides import Overrides
    from selector.platform import detect_platform, required_distributions
    from selector.request import KernelRequest
    from selector.solver import reasons

    if manifest is None:
        manifest = load_manifest(Overrides.from_env().manifest)
    platform = detect_platform(required_distributions(manifest.solutions), arch=arch)
    if device.startswith("cuda") and platform.arch is None:
        from registry.errors import RequestError

        raise RequestError("verify: no CUDA device detected; run on a GPU machine or pass device='cpu'")
    if kernel is not None and kernel not in manifest.by_name:
        from registry.errors import RequestError
        from registry.vocab import did_you_mean

        raise RequestError(f"verify: no kernel named {kernel!r}{did_you_mean(kernel, list(manifest.by_name))}")

    specs = [
        k for k in manifest.kernels
        if (op is None or k.op is Op(op)) and (kernel is None or k.name == kernel)
        and (solution is None or k.solution is Solution(solution))
    ]
    report = VerifyReport(environment=_environment(device, platform.arch, manifest))
    plans: list[tuple[_Case, Any]] = []
    for spec in specs:
        spec_platform = platform
        if platform.arch is None:  # CPU: a nominal arch, only so that selection can run
            spec_platform = dataclasses.replace(platform, arch=spec.arch.members()[0])
        elif not spec.arch.allows(platform.arch):
            continue  # not declared for this machine
        for case in plan_cases(spec, quick=quick, device=device):
            plans.append((case, spec_platform))

    tick = _progress_fn(progress)
    total = len(plans)
    for i, (case, spec_platform) in enumerate(plans):
        tick(i, total, f"{case.spec.name} {case.description}")
        started = time.perf_counter()
        request = KernelRequest(op=case.spec.op, arch=spec_platform.arch, kernel=case.spec.name, **case.fields)
        why_not = reasons(case.spec, request, manifest, spec_platform, forced=True)
        if why_not:
            report.results.append(CaseResult(case.spec.name, case.description, "skip", message="; ".join(why_not)))
            continue

        def select(req: Any, _platform: Any = spec_platform) -> Any:
            return select_kernel(req, manifest=manifest, platform=_platform)

        try:
            result = _run_case(case, request, select, device, seed)
        except Exception as exc:  # noqa: BLE001 - a kernel that raises is a finding, not a crash
            result = CaseResult(case.spec.name, case.description, "error",
                                message=f"{type(exc).__name__}: {_first_line(exc)}")
        result.seconds = time.perf_counter() - started
        report.results.append(result)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    tick(total, total, "done")
    return report
