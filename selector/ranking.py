"""What ranks the eligible kernels of a request: times measured in its perf bucket, else predicted ones.

The solver asks ``estimate(perf, request, kernels)`` for the eligible kernels'
times and ranks by them (kernels without one after, by priority).  A kernel's
time is the median measured in the request's bucket of the perf table for this
GPU; for a kernel the bucket lacks (or a bucket the table lacks) it is
predicted from the table's other buckets (``selector.prediction``), unless
predictions are off (``KERNELSEL_PREDICT=off``).  Measured and predicted times
stay apart, so explain can say which is which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from registry.perf import PerfTable
from selector.prediction import PerfModel, Prediction


@dataclass(frozen=True)
class Estimates:
    """Times for the eligible kernels of one request, each measured or predicted, and why others have none."""

    source: str = ""  # "perf/<gpu>-<arch>.yaml, <GPU>": the table behind every time here
    measured: Mapping[str, float] = field(default_factory=dict)  # kernel -> median us in the request's bucket
    predicted: Mapping[str, Prediction] = field(default_factory=dict)  # kernel -> predicted from other buckets
    missing: Mapping[str, str] = field(default_factory=dict)  # kernel -> why it has neither

    @property
    def times(self) -> dict[str, float]:
        """Kernel -> microseconds, measured where there is a measurement, else predicted."""
        return {**{k: p.us for k, p in self.predicted.items()}, **self.measured}

    @property
    def kind(self) -> str:
        """``measured``, ``predicted``, ``measured and predicted``, or '' (no time: priority ranks)."""
        return " and ".join(w for w, d in (("measured", self.measured), ("predicted", self.predicted)) if d)


NO_ESTIMATES = Estimates()


def perf_model(table: PerfTable) -> PerfModel:
    """The prediction model of ``table``, fitted once per table (kernels are fitted on first use)."""
    return table.derived("prediction", PerfModel)


def estimate(perf: Optional[PerfTable], request: Any, kernels: Sequence[str], *, predict: bool = True) -> Estimates:
    """The times that rank ``kernels`` (eligible for ``request``) by ``perf``, a table of this arch or None."""
    if perf is None or perf.arch is not request.arch or not kernels:
        return NO_ESTIMATES
    entry = perf.lookup(request)
    measured = {k: entry.median_us[k] for k in kernels if k in entry.median_us} if entry is not None else {}
    rest = [k for k in kernels if k not in measured]
    if not rest:
        predicted, missing = {}, {}
    elif predict:
        predicted, missing = perf_model(perf).predict(request, rest)
    else:
        missing = {k: "not measured (predictions off: KERNELSEL_PREDICT=off)" for k in rest}
        predicted = {}
    return Estimates(f"{perf.path}, {perf.gpu}", measured, predicted, missing)
