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


@dataclass(frozen=True, slots=True)
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
PREDICTIONS_OFF = "not measured (predictions off: KERNELSEL_PREDICT=off)"


class Estimator:
    """How one perf table times the eligible kernels of a request: one per table (and predictions on or off).

    A cached selection keeps this shared object, not its estimates: they are
    worded again when read (``estimate``; measured times are one lookup,
    predictions deterministic), so an entry's size does not grow with the
    number of kernels the table cannot time.  Ranking asks only for ``times``.
    """

    __slots__ = ("table", "predict")

    def __init__(self, table: PerfTable, predict: bool):
        self.table = table
        self.predict = predict

    def _measured(self, request: Any, kernels: Sequence[str]) -> dict[str, float]:
        entry = self.table.lookup(request)
        return {k: entry.median_us[k] for k in kernels if k in entry.median_us} if entry is not None else {}

    def times(self, request: Any, kernels: Sequence[str]) -> dict[str, float]:
        """Kernel -> microseconds for those of ``kernels`` with a time: what ranks them (no words)."""
        measured = self._measured(request, kernels)
        if not self.predict or len(measured) == len(kernels):
            return measured
        predicted = perf_model(self.table).predictions(request, [k for k in kernels if k not in measured])
        return {**{k: p.us for k, p in predicted.items()}, **measured}

    def estimate(self, request: Any, kernels: Sequence[str]) -> Estimates:
        """The measured and predicted times of ``kernels`` (eligible for ``request``), and why the others have none."""
        if not kernels:
            return NO_ESTIMATES
        measured = self._measured(request, kernels)
        rest = [k for k in kernels if k not in measured]
        if not rest:
            predicted, missing = {}, {}
        elif self.predict:
            predicted, missing = perf_model(self.table).predict(request, rest)
        else:
            missing = dict.fromkeys(rest, PREDICTIONS_OFF)
            predicted = {}
        return Estimates(f"{self.table.path}, {self.table.gpu}", measured, predicted, missing)


def perf_model(table: PerfTable) -> PerfModel:
    """The prediction model of ``table``, fitted once per table (kernels are fitted on first use)."""
    return table.derived("prediction", PerfModel)


class OtherArchTable:
    """A perf table recorded on another arch than the request's: it times nothing, and explain says so.

    A table given by ``KERNELSEL_PERF`` or ``Selector(perf=...)`` (the CLI's
    ``--perf`` refuses one), or this GPU's table under a hypothetical
    ``arch=``, would otherwise be passed over in silence.
    """

    __slots__ = ("table",)

    def __init__(self, table: PerfTable):
        self.table = table

    def times(self, request: Any, kernels: Sequence[str]) -> dict[str, float]:
        return {}

    def estimate(self, request: Any, kernels: Sequence[str]) -> Estimates:
        if not kernels:
            return NO_ESTIMATES
        arch = request.arch.value if request.arch is not None else "no arch"
        why = f"the table was recorded on {self.table.arch.value}, the request is for {arch}"
        return Estimates(f"{self.table.path}, {self.table.gpu}", missing=dict.fromkeys(kernels, why))


def estimator(perf: Optional[PerfTable], request: Any, *,
              predict: bool = True) -> "Estimator | OtherArchTable | None":
    """What times ``request``'s kernels by ``perf`` (one shared object per table), or None: no table."""
    if perf is None:
        return None
    if perf.arch is not request.arch:
        return perf.derived("other arch", OtherArchTable)
    return perf.derived("estimator" if predict else "estimator, predictions off", lambda t: Estimator(t, predict))


def estimate(perf: Optional[PerfTable], request: Any, kernels: Sequence[str], *, predict: bool = True) -> Estimates:
    """The times that rank ``kernels`` (eligible for ``request``) by ``perf``, a table of this arch or None."""
    timer = estimator(perf, request, predict=predict)
    return timer.estimate(request, kernels) if timer is not None else NO_ESTIMATES
