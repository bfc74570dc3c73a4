"""Timing a kernel's ``run()`` the same way everywhere: perf tables, tuning on first use, the bench scripts.

* ``CudaTimer``: ``run()`` captured in a CUDA graph and replayed (eager when
  capture fails, and the ``mode`` says so), one first call and ``warmup``
  calls, then ``repeats`` runs each timed with a pair of CUDA events after
  writing ``FLUSH_BYTES`` (which evicts L2); the median.  The same method as
  ``triton.testing.do_bench``.
* ``WallTimer``: the same loop with ``time.perf_counter`` and no flush, for
  CPU runs (tests drive the whole path with the reference kernels and the
  Triton interpreter).

torch is imported on use only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

FLUSH_BYTES = 256 << 20
"""Written before every timed run on a GPU: several times any L2 (50-60 MB on H100/H200), as do_bench does."""

DEFAULT_REPEATS, DEFAULT_WARMUP = 50, 10


@dataclass(frozen=True)
class Timing:
    """A median in microseconds and how it was taken: ``graph``, ``eager (...)`` or ``wall``."""

    us: float
    mode: str


class Timer(Protocol):
    def __call__(self, fn: Callable[[], Any]) -> Timing: ...

    def method(self, eager: Iterable[str] = ()) -> str: ...


@dataclass
class CudaTimer:
    """CUDA events around each run, L2 flushed before each, CUDA-graph replay where capture works."""

    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    flush_bytes: int = FLUSH_BYTES
    graphs: bool = True
    _flush: Any = field(default=None, repr=False)

    def method(self, eager: Iterable[str] = ()) -> str:
        eager = sorted(set(eager))
        text = (f"CUDA events, median of {self.repeats} runs after {self.warmup} warm-up runs, L2 flushed "
                f"({self.flush_bytes >> 20} MiB written) before each run; "
                + ("run() replayed from a CUDA graph" if self.graphs else "run() called eagerly"))
        if self.graphs and eager:
            text += f"; eager where capture failed: {', '.join(eager)}"
        return text

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        import torch

        if self._flush is None:
            self._flush = torch.empty(self.flush_bytes, dtype=torch.uint8, device="cuda")
        fn()  # JIT builds, autotuning, lazy initialisation: outside everything timed
        torch.cuda.synchronize()
        call, mode, graph = fn, "eager", None
        if self.graphs:
            graph, mode = capture_graph(fn)
            if graph is not None:
                call = graph.replay
        for _ in range(self.warmup):
            call()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            self._flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
        del graph
        return Timing(ms * 1e3, mode)


def capture_graph(fn: Callable[[], Any]) -> tuple[Any, str]:
    """``(graph, "graph")``, or ``(None, "eager (Error)")`` when ``fn`` cannot be captured.

    Shared with the scripts under ``bench/``, which time captured calls the same way.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph docs ask
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - not capturable: time it eagerly and say so
        torch.cuda.synchronize()
        return None, f"eager ({type(exc).__name__})"
    return graph, "graph"


@dataclass
class WallTimer:
    """Wall-clock time of each run (``time.perf_counter``), median; for CPU runs.  No cache flush."""

    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP

    def method(self, eager: Iterable[str] = ()) -> str:
        return (f"wall clock (time.perf_counter) on the CPU, median of {self.repeats} runs after "
                f"{self.warmup} warm-up runs; no cache flush")

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        for _ in range(1 + self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return Timing(statistics.median(times) * 1e6, "wall")


def default_timer(device: str, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP) -> Timer:
    return CudaTimer(repeats, warmup) if str(device).startswith("cuda") else WallTimer(repeats, warmup)
