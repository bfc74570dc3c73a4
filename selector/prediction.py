"""Predicted kernel times for request buckets a perf table does not hold, fitted to the ones it does.

A perf table measures a few buckets; engines run many more.  For each op and
dtype pair (op, q_dtype, kv_dtype) of the table of the current GPU, every
kernel with at least ``MIN_BUCKETS`` measured buckets gets:

1. **A cost model** (``TERMS``): time = a launch term + bytes / bandwidth +
   FLOPs / throughput + a bandwidth ramp (sqrt of the bytes: small transfers
   do not reach full bandwidth) + the bytes of one work unit (one KV head of
   one request: a kernel that does not split a request's cache is bound by
   it).  Bytes, FLOPs and units come from ``registry.cost``.  Coefficients are
   non-negative (each term can only add time), fitted by least squares on
   relative error (a 10 us bucket counts as much as a 10 ms one).
2. **A shared scale**: the geometric mean of the group's cost models at a
   request -- the time of a typical kernel there.
3. **A local correction**: each kernel's measured time over the shared scale
   (how much faster or slower than typical it was at each measured bucket) is
   carried to a request with a Gaussian weight in log2 of the bucket's sizes
   (batch, KV length, new tokens, heads, head dims, page size; width
   ``BANDWIDTH``), the same weights for every kernel, against a weight
   ``PRIOR`` for the kernel's own cost model.

So between measured buckets the predicted ranking is the neighbours' measured
ranking (the cost models' own errors cannot reorder kernels that measured
close), sizes scale as the cost models say, and far from every bucket (another
model's heads or head dim) each kernel falls back to its own cost model.  The
design was chosen by held-out selection regret on the H200 data
(``bench/predict_loo.py``: leave-one-out over the table and over a regret run,
with the simpler designs for comparison).

Each kernel's ``error`` is its model's leave-one-out error over its own
buckets (mean absolute log error, as a fraction: 0.08 reads "±8%").

Pure Python (no numpy), deterministic.  A group is fitted once per table on
first use (milliseconds); a prediction is one pass over the kernel's buckets,
once per request class (the solver's cache keeps the selection).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from registry.cost import Cost, new_tokens, request_cost
from registry.errors import RequestError
from registry.perf import PERF_KEY, PerfTable
from selector.request import KernelRequest

MIN_BUCKETS = 3
"""A kernel needs this many measured buckets (of its op and dtypes) before its times are predicted."""

TERM_FUNCTIONS = {
    "launch": lambda c: 1.0,
    "bytes": lambda c: c.bytes,
    "flops": lambda c: c.flops,
    "ramp": lambda c: c.bytes ** 0.5,
    "unit_bytes": lambda c: c.kv_bytes / max(c.units, 1),
}
"""Every term the cost model can use: a function of the request's cost, times a non-negative coefficient."""

TERMS = tuple(TERM_FUNCTIONS)
"""The terms the runtime uses (all of them; ``bench/predict_loo.py`` compares subsets)."""

BANDWIDTH = 1.5
"""Width of the local correction's Gaussian weight, in log2 of the bucket's sizes (a factor of 2.8)."""

PRIOR = 0.05
"""Weight of a kernel's own cost model against the measured buckets' corrections (rules far from every bucket)."""

_SIZES = tuple(f for f in PERF_KEY if f not in ("q_dtype", "kv_dtype")) + ("new_tokens",)
"""Bucket sizes the correction measures distance in (log2), plus the new tokens per request of any op: so new
tokens count twice (as ``q_len``/``new_len`` and as new tokens), which held-out time error prefers (9.3% vs 9.6%)."""


def _position(request: Any) -> dict[str, float]:
    out = {}
    for f in _SIZES:
        v = new_tokens(request) if f == "new_tokens" else getattr(request, f, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[f] = math.log2(v)
    return out


def _distance2(a: dict[str, float], b: dict[str, float]) -> float:
    return sum((a[f] - b[f]) ** 2 for f in a.keys() & b.keys())


@dataclass(frozen=True, slots=True)
class Prediction:
    """A predicted median time, the number of measured buckets behind it and its model's held-out error."""

    us: float
    buckets: int
    error: float

    def describe(self) -> str:
        return f"predicted {self.us:.1f} us from {self.buckets} measured buckets, fit error ±{self.error * 100:.0f}%"


# ------------------------------------------------------------------ least squares, pure Python


def _solve(a: list[list[float]], b: list[float]) -> Optional[list[float]]:
    """``a x = b`` by Gaussian elimination with partial pivoting (small, dense); None if singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def nnls(gram: list[list[float]], rhs: list[float]) -> list[float]:
    """Non-negative least squares from the normal equations (Lawson-Hanson active set): min |Ax-b|, x >= 0.

    ``gram`` is ``A^T A`` and ``rhs`` is ``A^T b``.  Deterministic: ties go to the lower index.
    """
    k = len(rhs)
    x, active = [0.0] * k, []
    tol = 1e-12 * max(1.0, max(abs(v) for v in rhs))
    for _ in range(3 * k):
        gradient = [rhs[i] - sum(gram[i][j] * x[j] for j in range(k)) for i in range(k)]
        free = [i for i in range(k) if i not in active and gradient[i] > tol]
        if not free:
            break
        active.append(max(free, key=lambda i: (gradient[i], -i)))
        while True:
            z_active = _solve([[gram[i][j] for j in active] for i in active], [rhs[i] for i in active])
            if z_active is None:  # collinear terms: drop the newest and stop growing
                active.pop()
                return x
            z = [0.0] * k
            for i, v in zip(active, z_active):
                z[i] = v
            if all(z[i] > 0 for i in active):
                x = z
                break
            alpha = min(x[i] / (x[i] - z[i]) for i in active if z[i] <= 0)
            x = [x[i] + alpha * (z[i] - x[i]) for i in range(k)]
            active = [i for i in active if x[i] > 1e-15]
            if not active:
                break
    return x


# ------------------------------------------------------------------ the models of one op and dtype pair


@dataclass(frozen=True)
class _Point:
    position: dict
    terms: list
    us: float


class CostFit:
    """One kernel's cost model: non-negative coefficients of ``terms``, fitted on relative error."""

    def __init__(self, points: Sequence[_Point]):
        k = len(points[0].terms)
        # column scales: every term of the relative-error system is at most 1
        self.scale = [max(p.terms[j] / p.us for p in points) or 1.0 for j in range(k)]
        self.rows = [[p.terms[j] / p.us / self.scale[j] for j in range(k)] for p in points]
        self.gram = [[sum(r[i] * r[j] for r in self.rows) for j in range(k)] for i in range(k)]
        self.rhs = [sum(r[i] for r in self.rows) for i in range(k)]  # target: us / us = 1
        self.coefficients = self._fit(self.gram, self.rhs)

    @staticmethod
    def _fit(gram: list[list[float]], rhs: list[float]) -> list[float]:
        ridge = 1e-9 * max(gram[i][i] for i in range(len(rhs)))  # keeps collinear terms solvable
        return nnls([[g + (ridge if i == j else 0.0) for j, g in enumerate(row)] for i, row in enumerate(gram)], rhs)

    def without(self, i: int) -> list[float]:
        """The coefficients fitted without point ``i`` (for leave-one-out)."""
        r, k = self.rows[i], len(self.rhs)
        return self._fit([[self.gram[a][b] - r[a] * r[b] for b in range(k)] for a in range(k)],
                         [self.rhs[a] - r[a] for a in range(k)])

    def time(self, terms: Sequence[float], coefficients: Optional[Sequence[float]] = None) -> float:
        c = self.coefficients if coefficients is None else coefficients
        return max(sum(c[j] * terms[j] / self.scale[j] for j in range(len(c))), 1e-3)


class GroupModel:
    """The models of every kernel measured for one (op, q_dtype, kv_dtype), sharing one scale.

    Each kernel's cost model (``CostFit``) gives its own size scaling; their
    geometric mean is the group's *shared scale*.  Measured times divided by the
    shared scale -- how much slower or faster each kernel is than a typical one
    at that bucket -- are what the local correction interpolates, with the same
    weights for every kernel: so between measured buckets the predicted ranking
    follows the neighbours' measured rankings, and time errors of the separate
    cost models cannot reorder kernels that measured close.  Far from every
    bucket (weight ``prior``) each kernel falls back to its own cost model.
    ``shared_scale=False`` interpolates each kernel around its own cost model
    instead (``bench/predict_loo.py`` compares both).
    """

    def __init__(self, points: dict[str, list[_Point]], bandwidth: float = BANDWIDTH, prior: float = PRIOR,
                 shared_scale: bool = True):
        self.points = points
        self.bandwidth, self.prior, self.shared_scale = bandwidth, prior, shared_scale
        self.fits = {k: CostFit(p) for k, p in points.items()}
        self.residuals = {k: [math.log(p.us / self._scale(k, p.terms)) for p in pts] for k, pts in points.items()}
        self.errors = {k: self._held_out_error(k) for k in points}

    def _scale(self, kernel: str, terms: Sequence[float], replaced: Optional[Sequence[float]] = None) -> float:
        """The scale ``kernel``'s correction is relative to (``replaced``: its coefficients in a refit)."""
        own = self.fits[kernel].time(terms, replaced)
        if not self.shared_scale:
            return own
        logs = [math.log(own if k == kernel else fit.time(terms)) for k, fit in self.fits.items()]
        return math.exp(sum(logs) / len(logs))

    def _correction(self, kernel: str, position: dict, prior_log: float, skip: int = -1) -> float:
        if math.isinf(self.prior):
            return prior_log
        num, den = self.prior * prior_log, self.prior
        for i, p in enumerate(self.points[kernel]):
            if i == skip:
                continue
            w = math.exp(-_distance2(position, p.position) / (2 * self.bandwidth * self.bandwidth))
            num += w * self.residuals[kernel][i]
            den += w
        return num / den

    def _own(self, kernel: str, terms: Sequence[float], replaced: Optional[Sequence[float]] = None) -> float:
        """log of the kernel's own cost model over the scale (0 without a shared scale)."""
        return math.log(self.fits[kernel].time(terms, replaced) / self._scale(kernel, terms, replaced))

    def _predict(self, kernel: str, terms: Sequence[float], position: dict, replaced: Optional[Sequence[float]] = None,
                 skip: int = -1) -> float:
        scale = self._scale(kernel, terms, replaced)
        own = self._own(kernel, terms, replaced)
        return scale * math.exp(self._correction(kernel, position, own, skip))

    def _held_out_error(self, kernel: str) -> float:
        """Mean absolute log error predicting each of the kernel's buckets from its others."""
        points = self.points[kernel]
        if len(points) < 2:
            return math.inf
        fit = self.fits[kernel]
        total = sum(abs(math.log(self._predict(kernel, p.terms, p.position, fit.without(i), skip=i) / p.us))
                    for i, p in enumerate(points))
        return math.exp(total / len(points)) - 1.0

    def predict(self, kernel: str, cost: Cost, position: dict, terms: Sequence[str]) -> float:
        return self._predict(kernel, [TERM_FUNCTIONS[t](cost) for t in terms], position)


# ------------------------------------------------------------------ a table's models


class PerfModel:
    """Predictions from one perf table: ``predict(request, kernels)`` for a bucket the table lacks."""

    def __init__(self, table: PerfTable, *, terms: Sequence[str] = TERMS, bandwidth: float = BANDWIDTH,
                 prior: float = PRIOR, shared_scale: bool = True):
        self.table = table
        self.terms, self.bandwidth, self.prior, self.shared_scale = tuple(terms), bandwidth, prior, shared_scale
        self._groups: dict[tuple, tuple[GroupModel, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def _points(self, op: str, q_dtype: str, kv_dtype: str) -> dict[str, list[_Point]]:
        points: dict[str, list[_Point]] = {}
        for entry in self.table.entries:
            shape = entry.shape
            if entry.op.value != op or shape.get("q_dtype") != q_dtype or shape.get("kv_dtype") != kv_dtype:
                continue
            try:  # a bucket read as the request it stands for
                request = KernelRequest(op=entry.op, arch=self.table.arch, **shape)
                cost = request_cost(request)
            except RequestError:
                continue
            terms, position = [TERM_FUNCTIONS[t](cost) for t in self.terms], _position(request)
            for kernel, us in sorted(entry.median_us.items()):
                points.setdefault(kernel, []).append(_Point(position, terms, us))
        return points

    def group(self, op: Any, q_dtype: Any, kv_dtype: Any) -> tuple[Optional[GroupModel], dict[str, int]]:
        """The models of one op and dtype pair (kernels with ``MIN_BUCKETS`` buckets) and every kernel's count."""
        key = tuple(getattr(v, "value", v) for v in (op, q_dtype, kv_dtype))
        with self._lock:
            if key not in self._groups:
                points = self._points(*key)
                fitted = {k: p for k, p in points.items() if len(p) >= MIN_BUCKETS}
                model = GroupModel(fitted, self.bandwidth, self.prior, self.shared_scale) if fitted else None
                self._groups[key] = (model, {k: len(p) for k, p in points.items()})
            return self._groups[key]

    def predict(self, request: Any, kernels: Sequence[str]) -> tuple[dict[str, Prediction], dict[str, str]]:
        """Predicted times of ``kernels`` for ``request``, and for the others why there is none."""
        predictions = self.predictions(request, kernels)
        return predictions, self.no_predictions(request, [k for k in kernels if k not in predictions])

    def predictions(self, request: Any, kernels: Sequence[str]) -> dict[str, Prediction]:
        """Predicted times of those of ``kernels`` the table has a model of (what ranking needs: no words)."""
        try:
            cost = request_cost(request)
        except RequestError:
            return {}
        model, _ = self.group(request.op, request.q_dtype, request.kv_dtype)
        if model is None:
            return {}
        position = _position(request)
        fits = model.fits
        return {name: Prediction(model.predict(name, cost, position, self.terms), len(model.points[name]),
                                 model.errors[name])
                for name in kernels if name in fits}

    def no_predictions(self, request: Any, kernels: Sequence[str]) -> dict[str, str]:
        """Why each of ``kernels`` (ones the table has no model of) has no predicted time for ``request``."""
        try:
            request_cost(request)
        except RequestError as exc:
            return {k: f"no prediction: {exc}" for k in kernels}
        _, counts = self.group(request.op, request.q_dtype, request.kv_dtype)
        group = f"{request.op.value} {request.q_dtype.value}/{request.kv_dtype.value}"
        return {k: f"no prediction: {n} measured {group} bucket{'' if n == 1 else 's'}, a model needs {MIN_BUCKETS}"
                for k in kernels for n in (counts.get(k, 0),)}
