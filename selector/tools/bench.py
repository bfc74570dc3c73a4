"""``kernelsel bench``: time every eligible kernel per request bucket and record a perf table.

For each request of a grid (or of a suite file) it asks the solver which
kernels are eligible on this machine, builds one sized workload
(``registry.workloads``), and times each kernel through the adapter that
``select_kernel(..., kernel=NAME)`` gives.  The medians go into a perf table
(``registry.perf``), merged into the file at ``--out`` bucket by bucket and
kernel by kernel, then the file is loaded back and validated.

Timing is pluggable (a ``Timer`` from ``selector.timing``: ``fn -> Timing`` plus a
``method()`` text for the table).

Reference kernels are timed only when named with ``kernels=``.  A kernel
that raises is reported and skipped, never recorded.  torch is imported on
use only.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

from pydantic import Field, ValidationError

from registry.errors import KernelselError, ManifestError, RequestError, brief
from registry.ops import RAGGED_OPS
from registry.loader import load_perf_table
from registry.yaml_reader import located, read_yaml, validation_problems
from registry.perf import PerfTable, entry_data, gpu_slug, merge_entries, request_key, table_text  # noqa: F401 (gpu_slug re-exported)
from registry.schema import KernelSpec, StrictModel
from registry.vocab import Arch, Op, Solution
from selector.request import MAX_INT, KernelRequest
from selector.timing import DEFAULT_REPEATS, DEFAULT_WARMUP, CudaTimer, Timer, Timing, WallTimer, default_timer  # noqa: F401 (re-exported for bench scripts)

if TYPE_CHECKING:
    from selector.api import Selector
    from registry.workloads import Workload

SIZE_FIELDS = ("batch", "kv_len", "new_len")
"""Sizes of a bench case: requests in the batch, KV tokens per request (new ones included), new tokens (mha_extend)."""

MAX_CASES = 4096
"""Most cases one bench run (a grid or a suite) may hold: each takes about a second on a GPU, and the
cases are built before timing starts (two axes of 3,000 values were 3.7 GB before the first timing)."""



# ----------------------------------------------------------------- cases


@dataclass(frozen=True)
class BenchCase:
    """One request to time: the request (its ``batch_size``/``kv_len`` are buckets) and the exact sizes run."""

    request: KernelRequest
    batch: int
    kv_len: int
    new_len: Optional[int] = None
    group: str = ""  # the suite group it came from (a model's name in the held-out suite)

    @property
    def key(self) -> tuple:
        """The perf-table bucket this case is recorded under (its request's key: sizes bucketed)."""
        return request_key(self.request.op, self.request)

    @property
    def label(self) -> str:
        r = self.request
        parts = [r.op.value, f"q={r.q_dtype.value}", f"kv={r.kv_dtype.value}", f"B={self.batch}", f"kv_len={self.kv_len}"]
        if self.new_len is not None:
            parts.append(f"new={self.new_len}")
        if r.q_len > 1:
            parts.append(f"q_len={r.q_len}")
        return " ".join(parts)

    @property
    def name(self) -> str:
        """The label with the suite group it came from, which tells apart requests of equal sizes."""
        return f"{self.label} ({self.group})" if self.group else self.label

    def sizes(self) -> dict[str, Any]:
        return {"batch": self.batch, "kv_len": self.kv_len, "new_len": self.new_len}


def make_case(op: Any, arch: Any, fields: Mapping[str, Any]) -> BenchCase:
    """A case from request fields plus the sizes ``batch``, ``kv_len``, ``new_len`` (checked against the op)."""
    from registry.workloads import sized_lengths

    fields = dict(fields)
    sizes = {f: fields.pop(f, None) for f in SIZE_FIELDS}
    if "batch_size" in fields:
        raise RequestError("give the batch as batch (the size run); the request's batch_size bucket follows from it")
    for given in ("op", "arch"):
        if given in fields:
            raise RequestError(f"{given} is set by the {'group' if given == 'op' else 'run (--arch or the GPU)'}, "
                               f"not by a case's fields", [f"request.{given}: set by the "
                                                           f"{'group' if given == 'op' else 'run (--arch or the GPU)'}, not here"])
    for name, size in sizes.items():  # sizes are run, not only bucketed: whole numbers, as written
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_INT):
            raise RequestError(f"{name}: expected a positive whole number, got {brief(size)}",
                               [f"{name}: expected a positive whole number, got {brief(size)}"])
    batch = sizes["batch"] if sizes["batch"] is not None else 1
    kv_len = sizes["kv_len"]
    if kv_len is None and str(getattr(op, "value", op)) == Op.MHA_PREFILL.value:
        kv_len = sizes["new_len"]  # prefill: every token is new
    ragged = str(getattr(op, "value", op)) in {o.value for o in RAGGED_OPS}
    bucket_new = {"new_len": sizes["new_len"]} if ragged and sizes["new_len"] is not None else {}
    request = KernelRequest(op=op, arch=arch, **fields, batch_size=batch, kv_len=kv_len, **bucket_new)
    new, kv = sized_lengths(request, batch, sizes["kv_len"], sizes["new_len"])
    new_len = new[0] if request.op in RAGGED_OPS else None
    return BenchCase(request, batch, kv[0], new_len)


def grid_size(axes: Mapping[str, Sequence[Any]]) -> int:
    """How many cases the cartesian product of ``axes`` holds, counted without building them."""
    return math.prod(len(v) for v in axes.values())


def check_grid_size(axes: Mapping[str, Sequence[Any]], already: int = 0, where: str = "the grid") -> int:
    """``already`` plus the grid's cases; RequestError before anything is built when that passes MAX_CASES."""
    total = already + grid_size(axes)
    if total > MAX_CASES:
        shape = " x ".join(f"{len(v):,} {k}" for k, v in axes.items() if len(v) > 1) or "one case each"
        raise RequestError(f"{where} has {total:,} cases ({shape}), over the limit of {MAX_CASES:,} for one run; "
                           f"time it in several runs (they merge into one table)")
    return total


def grid(op: Any, arch: Any, fixed: Mapping[str, Any], axes: Mapping[str, Sequence[Any]]) -> list[BenchCase]:
    """The cartesian product of ``axes`` (request fields or sizes), each point on top of ``fixed``."""
    check_grid_size(axes)
    names = list(axes)
    return [make_case(op, arch, {**fixed, **dict(zip(names, values))})
            for values in itertools.product(*(axes[n] for n in names))]


def check_buckets(cases: Sequence[BenchCase]) -> None:
    """A perf table keeps one time per bucket: two different cases in one bucket would overwrite each other."""
    seen: dict[tuple, BenchCase] = {}
    clashes = []
    for c in cases:
        other = seen.setdefault(c.key, c)
        if other is not c:
            clashes.append(f"{other.name} and {c.name}")
    if clashes:
        raise RequestError(
            "these cases fall into one perf bucket (batch_size, kv_len and new_len are bucketed to powers of two), "
            "so a table would keep only the last:\n  "
            + "\n  ".join(clashes)
        )


class SuiteGroup(StrictModel):
    """Requests sharing an op: ``request`` fields, crossed with ``grid`` and with each of ``cases``."""

    name: str
    op: Op
    request: dict[str, Any] = Field(default_factory=dict, description="KernelRequest fields shared by the group")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="field or size -> values (cartesian product)")
    cases: tuple[dict[str, Any], ...] = Field(default=(), description="explicit points (fields and sizes)")


class Suite(StrictModel):
    """A fixed set of bench requests, as data (``bench/regret_suite.yaml``)."""

    schema_version: int = Field(1, ge=1, le=1)
    description: str = ""
    groups: tuple[SuiteGroup, ...] = Field(min_length=1)


def load_suite(path: os.PathLike | str, arch: Any) -> list[BenchCase]:
    """Every case of a suite file for ``arch``; problems as ``file:line:col: path: message``."""
    path = Path(path)
    try:  # the manifest's rules: a bounded regular UTF-8 file, plain data, no duplicate keys
        data, marks, filename, _ = read_yaml(path, what="suite")
    except ManifestError as exc:
        raise KernelselError("\n".join(exc.problems) if "cannot read" in exc.problems[0]
                             else "invalid suite:\n" + "\n".join(exc.problems)) from None
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        raise KernelselError("invalid suite:\n" + "\n".join(validation_problems(exc, marks, filename))) from None
    total = 0
    for i, g in enumerate(suite.groups):  # counted before any case is built
        total = check_grid_size({**g.grid, "cases": g.cases or [{}]}, total, where=f"{filename}: the suite")
    cases: list[BenchCase] = []
    for i, g in enumerate(suite.groups):
        points = [dict(c) for c in g.cases] or [{}]
        for j, point in enumerate(points):
            try:
                cases += [dataclasses.replace(c, group=g.name) for c in grid(g.op, arch, {**g.request, **point}, g.grid)]
            except RequestError as exc:
                where = ("groups", i) + (("cases", j) if g.cases else ())
                name = g.name if g.name.isprintable() else brief(g.name)  # one line per problem, whatever the name
                raise KernelselError("invalid suite:\n" + located(marks, filename, where, f"({name}) "
                                                                   + "; ".join(exc.problems))) from None
    return cases


# ----------------------------------------------------------------- timers


# ----------------------------------------------------------------- running


@dataclass
class KernelTiming:
    """One kernel (or extra callable) on one case: its median and bandwidth, or the error it raised."""

    kernel: str
    median_us: Optional[float] = None
    tbps: Optional[float] = None
    mode: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.median_us is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


@dataclass
class CaseResult:
    """Every timing of one case: eligible kernels, extras (not recorded), kernels named but not eligible."""

    case: BenchCase
    kernels: list[KernelTiming] = field(default_factory=list)
    extra: list[KernelTiming] = field(default_factory=list)
    not_eligible: dict[str, str] = field(default_factory=dict)
    kv_bytes: int = 0

    @property
    def times(self) -> dict[str, float]:
        """Kernel name -> median us, for the kernels that ran."""
        return {t.kernel: t.median_us for t in self.kernels if t.ok}

    def best(self) -> Optional[KernelTiming]:
        ok = [t for t in self.kernels if t.ok]
        return min(ok, key=lambda t: (t.median_us, t.kernel)) if ok else None

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.case.name, "op": self.case.request.op.value, "fields": self.case.request.given(),
                **self.case.sizes(),
                "bucket": {"batch_size": self.case.request.batch_size, "kv_len": self.case.request.kv_len},
                "kv_bytes": self.kv_bytes, "kernels": [t.to_dict() for t in self.kernels],
                "extra": [t.to_dict() for t in self.extra], "not_eligible": dict(self.not_eligible)}


def candidates(selector: "Selector", request: KernelRequest,
               kernels: Optional[Sequence[str]] = None) -> tuple[list[KernelSpec], dict[str, str]]:
    """The kernels to time: eligible ones (no reference kernel unless named), or exactly ``kernels``.

    Returns ``(specs, not_eligible)`` where ``not_eligible`` maps a named
    kernel that cannot serve the request to the solver's reasons.
    """
    selection = selector.solve(request)
    if not kernels:
        keep = [k for k in selection.eligible
                if k.solution is not Solution.REFERENCE or request.solution is Solution.REFERENCE]
        return keep, {}
    specs, rejected = [], {}
    for name in kernels:
        forced = selector.solve(request.forcing(name))  # a bad name raises RequestError with did-you-mean
        verdict = next(v for v in forced.verdicts if v.kernel.name == name)
        if verdict.eligible:
            specs.append(verdict.kernel)
        else:
            rejected[name] = "; ".join(verdict.reasons)
    return specs, rejected


def time_case(
    case: BenchCase,
    selector: "Selector",
    *,
    timer: Timer,
    device: str = "cuda",
    kernels: Optional[Sequence[str]] = None,
    extra: Optional[Mapping[str, Callable[["Workload"], Callable[[], Any]]]] = None,
    seed: int = 0,
) -> CaseResult:
    """Time each candidate kernel (and each ``extra`` builder: workload -> call) on one sized workload."""
    from registry.workloads import make_workload

    specs, not_eligible = candidates(selector, case.request, kernels)
    result = CaseResult(case, not_eligible=not_eligible)
    if not specs and not extra:
        return result
    try:
        work = make_workload(case.request, device=device, seed=seed, **case.sizes())
    except Exception as exc:  # noqa: BLE001 - too large for this device, say: every kernel of the case fails
        _release(device)
        why = _error_text("the workload", exc)
        result.kernels = [KernelTiming(spec.name, error=why) for spec in specs]
        result.extra = [KernelTiming(name, error=why) for name in (extra or {})]
        return result
    result.kv_bytes = work.kv_bytes
    try:
        for spec in specs:
            result.kernels.append(_time_one(spec.name, lambda: _adapter_call(selector, case.request, spec.name, work),
                                            work.kv_bytes, timer, device))
        for name, build in (extra or {}).items():
            result.extra.append(_time_one(name, lambda: build(work), work.kv_bytes, timer, device))
    finally:
        work = None  # the largest workloads take most of the GPU: free before the next is built
        _release(device)
    return result


def _adapter_call(selector: "Selector", request: KernelRequest, name: str, work: "Workload") -> Callable[[], Any]:
    """The adapter ``select_kernel(request, kernel=name)`` gives, planned, as a call that writes into ``out=``."""
    adapter = selector.select(request.forcing(name)).make_adapter()
    adapter.plan(work.metadata)
    out = work.new_out()
    lse = work.new_lse() if request.return_lse else None
    return lambda: work.run(adapter, out=out, lse=lse)


def _time_one(name: str, build: Callable[[], Callable[[], Any]], kv_bytes: int, timer: Timer, device: str) -> KernelTiming:
    try:
        timing = timer(build())
    except Exception as exc:  # noqa: BLE001 - a kernel that fails here is reported and skipped, not a crash
        _release(device)
        return KernelTiming(name, error=_error_text("", exc))
    us = max(timing.us, 1e-3)
    return KernelTiming(name, median_us=us, tbps=kv_bytes / us / 1e6 if kv_bytes else None, mode=timing.mode)


def copy_bandwidth(device: str, timer: Timer, nbytes: int = 1 << 30) -> Optional[float]:
    """TB/s of a device-to-device copy of ``nbytes`` (read and write counted): the ceiling of a memory-bound kernel.

    Timed like the kernels (``timer``).  The copy is an elementwise kernel on the
    SMs, as attention kernels read memory: ``dst.copy_(src)`` replayed from a
    CUDA graph becomes a memcpy node served by the copy engines, which on the
    H200 moved 2.7 TB/s while decode kernels reached 4.5.  On the CPU a 16 MiB
    copy, for tests.
    """
    import torch

    if not str(device).startswith("cuda"):
        nbytes = min(nbytes, 16 << 20)
    try:
        src = torch.zeros(nbytes // 4, dtype=torch.int32, device=device)
        dst = torch.empty_like(src)
        nbytes = src.numel() * 4
        us = timer(lambda: torch.bitwise_not(src, out=dst)).us
    except Exception:  # noqa: BLE001 - a ceiling is a nicety; never fail a run for it
        return None
    finally:
        src = dst = None
        _release(device)
    return 2 * nbytes / us / 1e6


def _error_text(what: str, exc: BaseException) -> str:
    """``[what: ]Type: first line`` of an exception, cut short, for a timing's error."""
    text = str(exc).strip().splitlines()
    return (f"{what}: " if what else "") + f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _release(device: str) -> None:
    """Wait for the GPU and hand cached blocks back, so the next (differently sized) workload fits."""
    if not str(device).startswith("cuda"):
        return
    import torch

    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - a sticky CUDA error shows up in the next timing
        pass


def progress_line(i: int, n: int, result: CaseResult) -> str:
    """``bench [i/n] <case>: kernel 12.3 us 3.10 TB/s (graph), ...`` then one line per error or rejection."""
    def one(t: KernelTiming) -> str:
        if not t.ok:
            return f"{t.kernel} error"
        bw = f" {t.tbps:.2f} TB/s" if t.tbps is not None else ""
        return f"{t.kernel} {t.median_us:.1f} us{bw} ({t.mode})"

    timings = result.kernels + result.extra
    head = f"bench [{i}/{n}] {result.case.name}: " + (", ".join(one(t) for t in timings) or "no eligible kernel")
    lines = [head]
    lines += [f"  error  {t.kernel}: {t.error}" for t in timings if not t.ok]
    lines += [f"  skip   {name}: not eligible: {why}" for name, why in result.not_eligible.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------- environment


@dataclass(frozen=True)
class BenchEnvironment:
    """The machine a table is recorded on: device, GPU name, arch, platform for selection, versions."""

    device: str
    gpu: str
    arch: Arch
    platform: Any
    software: dict[str, str]


def environment(manifest: Any, device: str = "cuda", arch: Optional[str] = None) -> BenchEnvironment:
    """This machine: the GPU (name and arch through torch) or, with ``device='cpu'``, a nominal ``arch``."""
    import torch

    from registry.vocab import parse_arch
    from selector.platform import detect_platform, installed_versions, required_distributions

    libraries = required_distributions(manifest.solutions)
    software = dict(installed_versions(sorted(set(libraries) | {"torch", "triton"})))
    software["torch"] = str(torch.__version__)
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise RequestError("bench: no CUDA device here; run on a GPU machine, or pass --device cpu --arch ARCH")
        platform = detect_platform(libraries)
        if arch is not None and parse_arch(arch) is not platform.arch:
            raise RequestError(f"--arch {arch}: this GPU is {platform.arch.value}; a perf table records the GPU it ran on")
        if torch.version.cuda:
            software["cuda"] = str(torch.version.cuda)
        return BenchEnvironment(device, torch.cuda.get_device_name(), platform.arch, platform, software)
    if arch is None:
        raise RequestError("bench --device cpu needs --arch (the nominal arch that selection runs for)")
    platform = detect_platform(libraries, arch=arch)
    return BenchEnvironment(device, "cpu", platform.arch, platform, software)


def default_table_path(gpu: str, arch: Arch) -> Path:
    """``perf/<gpu>-<arch>.yaml`` under the current directory, e.g. ``perf/nvidia-h200-sm_90.yaml``.

    Never the bundled tables' directory: on a wheel install that is inside site-packages.  Run from a
    checkout's root, it is the committed table.
    """
    return Path("perf") / f"{gpu_slug(gpu)}-{arch.value}.yaml"


# ----------------------------------------------------------------- the table


def entry(result: CaseResult) -> Optional[dict[str, Any]]:
    """The perf-table entry of one case (None when no kernel ran)."""
    ok = [t for t in result.kernels if t.ok]
    if not ok:
        return None
    return entry_data(result.case.request, {t.kernel: t.median_us for t in ok},
                      {t.kernel: t.tbps for t in ok if t.tbps is not None})


def merged_entries(existing: Optional[PerfTable], results: Iterable[CaseResult]) -> list[dict[str, Any]]:
    """Old entries updated kernel by kernel with new times, new buckets added; sorted by op and shape."""
    return merge_entries(existing, [e for e in map(entry, results) if e is not None])


def write_table(path: os.PathLike | str, env: BenchEnvironment, method: str, results: Sequence[CaseResult],
                *, existing: Optional[PerfTable] = None, recorded: Optional[str] = None) -> PerfTable:
    """Merge ``results`` into ``existing`` and write ``path``; validated before and after writing."""
    path = Path(path)
    text = table_text(gpu=env.gpu, arch=env.arch, software=env.software, method=method,
                      recorded=recorded or datetime.date.today().isoformat(), entries=merged_entries(existing, results))
    load_perf_table(path, text=text)  # never replace a good table with one that does not load
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return load_perf_table(path)


def read_existing(path: os.PathLike | str, env: BenchEnvironment) -> Optional[PerfTable]:
    """The table already at ``path`` (None if there is none); refuse one recorded on another GPU or arch."""
    path = Path(path)
    if not path.exists():
        return None
    table = load_perf_table(path)
    if table.gpu != env.gpu or table.arch is not env.arch:
        raise KernelselError(
            f"{path}: recorded on {table.gpu} ({table.arch.value}); this is {env.gpu} ({env.arch.value}). "
            f"Write to another file, e.g. {default_table_path(env.gpu, env.arch)}"
        )
    return table


@dataclass
class BenchReport:
    """What a bench run did: every case's timings and the table it wrote (if any)."""

    results: list[CaseResult]
    method: str
    table: Optional[PerfTable] = None
    path: Optional[str] = None
    copy_tbps: Optional[float] = None  # device-copy bandwidth measured in the run (for plots)
    selected: dict[int, str] = field(default_factory=dict)  # case index -> kernel kernelsel selects with the table

    @property
    def errors(self) -> int:
        return sum(not t.ok for r in self.results for t in r.kernels)

    @property
    def recorded(self) -> int:
        return sum(t.ok for r in self.results for t in r.kernels)

    def to_dict(self) -> dict[str, Any]:
        cases = [r.to_dict() | ({"selected": self.selected[i]} if i in self.selected else {})
                 for i, r in enumerate(self.results)]
        return {"meta": {"method": self.method, "copy_tbps": self.copy_tbps}, "method": self.method, "out": self.path,
                "recorded": self.recorded, "errors": self.errors, "cases": cases}


def run_bench(
    cases: Sequence[BenchCase],
    selector: "Selector",
    env: BenchEnvironment,
    *,
    timer: Optional[Timer] = None,
    out: Optional[os.PathLike | str] = None,
    kernels: Optional[Sequence[str]] = None,
    extra: Optional[Callable[[BenchCase], Mapping[str, Callable]]] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> BenchReport:
    """Time every case; with ``out``, merge into that table after each case (a run cut short keeps its work).

    ``extra(case)`` may give more callables to time per case (``name -> workload -> call``); they are
    reported, never recorded.  ``progress`` gets one line (or a few) per case; default: stderr.
    """
    timer = timer or default_timer(env.device)
    say = progress or (lambda text: print(text, file=sys.stderr, flush=True))
    existing = None
    if out is not None:
        check_buckets(cases)
        existing = read_existing(out, env)
    report = BenchReport([], timer.method(), path=str(out) if out is not None else None)
    eager: set[str] = set()
    for i, case in enumerate(cases, 1):
        result = time_case(case, selector, timer=timer, device=env.device, kernels=kernels,
                           extra=extra(case) if extra else None, seed=seed)
        report.results.append(result)
        eager |= {t.kernel for t in result.kernels if t.ok and t.mode.startswith("eager")}
        report.method = timer.method(eager)
        say(progress_line(i, len(cases), result))
        if out is not None and entry(result) is not None:
            report.table = write_table(out, env, report.method, report.results, existing=existing)
    return report
