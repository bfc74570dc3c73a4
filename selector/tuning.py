"""Tuning on first use: time the eligible kernels of an unmeasured bucket on this GPU, once, and keep the times.

Opt-in (``select_kernel(..., tune=True)``, ``Selector(..., tune=True)`` or
``KERNELSEL_TUNE=1``).  On a selection miss whose bucket no perf table
measured, every eligible kernel runs on synthetic inputs of the bucket's
shape (``registry.workloads``, sized like ``kernelsel bench``) and is timed
the way perf tables are (``selector.timing``: CUDA graph, L2 flushed, CUDA
events, median; without a sliding window, which buckets do not carry) within a budget per bucket (``TuneBudget``: 200 ms of timing
shared by the kernels, 3 to 20 timed runs each).  A kernel's first call (a
FlashInfer JIT build, Triton compilation) is outside the budget: a JIT build
happens once per library variant and machine, whatever selects the kernel.

The times go into a per-user cache table (``TuneCache``): a perf table
(``registry.perf``: the same schema, validation and lookups) in the user's
cache directory, one file per GPU model, arch and library versions, so later
processes load it instead of timing again.  Writers take a file lock, merge
with what is on disk and replace the file atomically: concurrent processes
never lose each other's buckets or leave a torn file.  A file that does not
load is set aside (renamed ``*.corrupt``) with a warning, never trusted.

Never inside CUDA-graph capture: timing synchronises the device and allocates,
which capture forbids; ``tune`` raises ``TuningError`` there (the selector
then selects without tuning and tries again on a later miss).

torch is imported on use only; ``platformdirs`` and ``filelock`` when a cache
file is used.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from registry.cost import request_cost
from registry.errors import KernelselError, ManifestError, RequestError
from registry.ops import RAGGED_OPS
from registry.perf import PerfTable, entry_data, gpu_slug, merge_entries, table_text
from registry.vocab import Arch, Solution
from selector.timing import CudaTimer, Timer, WallTimer

log = logging.getLogger("kernelsel")

ENV_TUNE_CACHE = "KERNELSEL_TUNE_CACHE"
"""A folder for the tuned tables instead of the user's cache directory (e.g. one shared by a deployment)."""

TUNED_HEADER = """\
# kernelsel tuned table: times measured on this machine on first use of each bucket (selector/tuning.py).
# Same schema as perf/*.yaml; safe to delete (buckets are timed again when next needed).
"""


class TuningError(KernelselError):
    """A bucket cannot be tuned here (no sizes, too large, inside CUDA-graph capture, no GPU).

    ``retry``: the bucket can be tuned later (outside capture), so the selection made without tuning must not
    be cached.
    """

    def __init__(self, message: str, *, retry: bool = False):
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class TuneBudget:
    """How much timing one bucket may cost, and how large its synthetic inputs may be."""

    seconds: float = 0.2  # timing per bucket, shared by its kernels (first calls excluded)
    min_repeats: int = 3
    max_repeats: int = 20
    warmup: int = 2
    max_bytes: int = 4 << 30  # synthetic KV cache + queries + outputs

    def runs(self, share_s: float, run_s: float, flush_s: float = 0.0) -> tuple[int, int]:
        """``(repeats, warmup)`` that fit ``share_s`` for runs of ``run_s`` (at least ``min_repeats`` timed runs)."""
        per = max(run_s + flush_s, 1e-7)
        fit = int(share_s / per)
        warmup = min(self.warmup, max(fit - self.min_repeats, 0))
        repeats = max(self.min_repeats, min(self.max_repeats, fit - warmup))
        return repeats, warmup


@dataclass(frozen=True)
class TuneSettings:
    """How a selector tunes: the budget, the device it times on, where the tuned tables live."""

    budget: TuneBudget = TuneBudget()
    device: str = "cuda"  # "cpu": wall-clock timing of CPU kernels (tests, the reference kernels)
    cache_dir: Optional[Path] = None  # None: KERNELSEL_TUNE_CACHE, else the user's cache directory


@dataclass
class TuneResult:
    """The times of one bucket's kernels, the kernels that failed, and what timing cost."""

    request: Any
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    timing_s: float = 0.0  # wall time of the budgeted timing (warm-up and timed runs, flushes, syncs)
    first_calls_s: float = 0.0  # wall time of each kernel's first call (JIT builds, planning)
    workload_s: float = 0.0  # building the synthetic inputs
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"times_us": {k: round(v, 3) for k, v in self.times.items()}, "errors": dict(self.errors),
                "repeats": dict(self.repeats), "timing_s": round(self.timing_s, 4),
                "first_calls_s": round(self.first_calls_s, 4), "workload_s": round(self.workload_s, 4)}


def _capturing() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def sizes(request: Any) -> dict[str, int]:
    """The sizes a bucket is timed at: its ``batch_size``, ``kv_len`` and new tokens (``new_len``)."""
    missing = [f for f in ("batch_size", "kv_len") if getattr(request, f) is None]
    if request.op in RAGGED_OPS and request.new_len is None:
        missing.append("new_len")
    if missing:
        raise TuningError(f"cannot tune {request.op.value} without {', '.join(missing)} (the bucket's sizes)")
    out = {"batch": request.batch_size, "kv_len": request.kv_len}
    if request.op in RAGGED_OPS:
        out["new_len"] = request.new_len
    return out


def tune(
    request: Any,
    kernels: Sequence[str],
    build: Callable[[str], Any],
    *,
    device: str = "cuda",
    budget: TuneBudget = TuneBudget(),
    seed: int = 0,
    capturing: Optional[Callable[[], bool]] = None,
) -> TuneResult:
    """Time ``kernels`` (eligible for ``request``; ``build(name)`` gives each one's adapter) on one workload.

    Raises ``TuningError`` inside CUDA-graph capture, for a request without
    its bucket's sizes and for inputs over ``budget.max_bytes``.  A kernel that
    fails is recorded in ``errors`` and skipped.
    """
    from registry.workloads import make_workload

    if str(device).startswith("cuda") and (capturing or _capturing)():
        raise TuningError("cannot tune inside CUDA-graph capture (timing synchronises and allocates); "
                          "select once before capturing, or pre-tune with `kernelsel tune`", retry=True)
    size = sizes(request)
    try:
        cost = request_cost(request)
    except RequestError as exc:
        raise TuningError(f"cannot tune: {exc}") from None
    if cost.bytes > budget.max_bytes:
        raise TuningError(f"cannot tune this bucket: its synthetic inputs take {cost.bytes / 2**30:.1f} GiB, over the "
                          f"{budget.max_bytes / 2**30:.1f} GiB tuning limit")
    result = TuneResult(request)
    t0 = time.perf_counter()
    work = make_workload(_timed(request), device=device, seed=seed, **size)
    result.workload_s = time.perf_counter() - t0
    share = budget.seconds / max(len(kernels), 1)
    try:
        for name in kernels:
            try:
                t0 = time.perf_counter()
                adapter = build(name)
                adapter.plan(work.metadata)
                out = work.new_out()
                lse = work.new_lse() if request.return_lse else None

                def call() -> Any:
                    return work.run(adapter, out=out, lse=lse)

                run_s = _first_call(call, device)
                result.first_calls_s += time.perf_counter() - t0
                repeats, warmup = budget.runs(share, run_s, _FLUSH_S if str(device).startswith("cuda") else 0.0)
                timer = _timer(device, repeats, warmup)
                t0 = time.perf_counter()
                timing = timer(call)
                result.timing_s += time.perf_counter() - t0
                result.times[name] = max(timing.us, 1e-3)
                result.repeats[name] = repeats
                result.method = timer.method()
            except Exception as exc:  # noqa: BLE001 - a kernel that fails here is skipped, not a crash
                text = str(exc).strip().splitlines()
                result.errors[name] = f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
    finally:
        work = None
        if str(device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()
    return result


def _timed(request: Any) -> Any:
    """The request a bucket is timed with: without a sliding window (buckets carry none; full attention over the
    bucket's context is the work a window can only cut, and the bench workload's window is a few tokens)."""
    if not request.sliding_window:
        return request
    return type(request)(**{**request.model_dump(exclude_defaults=True), "sliding_window": False})


_FLUSH_S = 1e-4
"""About what CudaTimer's L2 flush (256 MiB written) costs before each run on an H100/H200."""


def _first_call(call: Callable[[], Any], device: str) -> float:
    """Run ``call`` once (builds, autotuning), then once more timed: seconds per run."""
    call()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _timer(device: str, repeats: int, warmup: int) -> Timer:
    return CudaTimer(repeats, warmup) if str(device).startswith("cuda") else WallTimer(repeats, warmup)


def budget_method(budget: TuneBudget, timer_method: str) -> str:
    return (f"tuned on first use ({budget.seconds * 1e3:.0f} ms of timing per bucket, "
            f"{budget.min_repeats}-{budget.max_repeats} runs per kernel): {timer_method}")


# ------------------------------------------------------------------ the cache file


def software_digest(software: Mapping[str, str]) -> str:
    """A short digest of library versions: a table timed with other versions is another file."""
    text = ";".join(f"{k}={v}" for k, v in sorted(software.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``KERNELSEL_TUNE_CACHE``, else ``<user cache dir>/kernelsel/tuned`` (platformdirs)."""
    if environ.get(ENV_TUNE_CACHE):
        return Path(environ[ENV_TUNE_CACHE])
    try:
        import platformdirs
    except ImportError as exc:  # a declared dependency, but an engine's image may lack it
        raise TuningError(f"the tuned tables' folder needs platformdirs ({exc}): pip install platformdirs, "
                          f"or set {ENV_TUNE_CACHE}=DIR") from None
    return Path(platformdirs.user_cache_dir("kernelsel", appauthor=False)) / "tuned"


@dataclass(frozen=True)
class TuneCache:
    """The tuned table of one GPU model, arch and set of library versions, in one file."""

    path: Path
    gpu: str
    arch: Arch
    software: Mapping[str, str]

    @classmethod
    def for_machine(cls, gpu: str, arch: Arch, software: Mapping[str, str],
                    directory: Optional[Path] = None) -> "TuneCache":
        directory = directory if directory is not None else cache_dir()
        name = f"{gpu_slug(gpu)}-{arch.value}-{software_digest(software)}.yaml"
        return cls(Path(directory) / name, gpu, arch, dict(software))

    def load(self) -> Optional[PerfTable]:
        """The tuned table, or None when there is none (a broken file is set aside with a warning)."""
        from registry.loader import load_perf_table

        if not self.path.exists():
            return None
        try:
            table = load_perf_table(self.path)
        except ManifestError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt")
            os.replace(self.path, aside)
            log.warning("kernelsel: tuned table %s does not load (%s); moved to %s, buckets are timed again",
                        self.path, exc.problems[0] if exc.problems else exc, aside)
            return None
        if table.gpu != self.gpu or table.arch is not self.arch:
            log.warning("kernelsel: tuned table %s is for %s (%s), not %s; ignored", self.path, table.gpu,
                        table.arch.value, self.gpu)
            return None
        return table

    def add(self, results: Sequence[TuneResult], method: str) -> PerfTable:
        """Merge ``results`` into the file (under its lock, re-reading what other processes wrote); the table."""
        import filelock

        from registry.loader import load_perf_table

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.path) + ".lock"):
            existing = self.load()
            new = [entry_data(r.request, r.times) for r in results if r.times]
            text = table_text(gpu=self.gpu, arch=self.arch, software=dict(self.software), method=method,
                              recorded=datetime.date.today().isoformat(), entries=merge_entries(existing, new),
                              header=TUNED_HEADER)
            load_perf_table(self.path, text=text)  # never write a table that would not load
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
            return load_perf_table(self.path)


def eligible_to_tune(selection: Any) -> list[str]:
    """The kernels tuning times: the eligible ones, reference kernels only where the request restricts to them."""
    reference = selection.request.solution is Solution.REFERENCE
    return [k.name for k in selection.eligible if reference or k.solution is not Solution.REFERENCE]


def software_key(platform: Any) -> dict[str, str]:
    """The library versions a tuned table belongs to: the platform's libraries and kernelsel's own version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("kernelsel")
    except PackageNotFoundError:
        own = "source"
    return {**{n: v for n, v in platform.libraries if n != "*"}, "kernelsel": own}


def share_first_rank(value: Any, group: Any) -> Any:
    """``value`` of the group's first rank, on every rank (a collective: call it on every rank of ``group``).

    How a process group agrees on one measurement: the first rank tunes,
    the others take its times, so no two ranks rank by different timings.
    """
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out[0]

