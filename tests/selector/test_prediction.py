"""Predicted times for buckets a perf table lacks: the fit, the ranking it gives, and how explain shows it.

The tables here are synthetic and the kernels the toy manifest's: each kernel's
time follows a known law of the request's bytes (two kernels whose order flips
with size), so what the model should predict is known exactly.
"""

from __future__ import annotations

import json
import math

import pytest

import selector
from registry.cost import request_cost
from registry.perf import PerfEntry, PerfTable
from selector import KernelRequest, Platform, Selector
from selector import prediction
from selector.prediction import MIN_BUCKETS, PerfModel, nnls

SHAPE = {"q_dtype": "bf16", "kv_dtype": "bf16", "head_dim_qk": 128, "head_dim_vo": 128, "num_qo_heads": 32,
         "num_kv_heads": 8, "page_size": 16, "q_len": 1}
DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
              page_size=16)
SMALL_FAST, LARGE_FAST = "portable-decode", "fast-decode"  # the toy decode kernels eligible on sm_90
SLOWER = {"slow-a": 1.1, "slow-b": 1.4}  # timed in the table only (not in the manifest): LARGE_FAST's law, slower
KERNELS = (SMALL_FAST, LARGE_FAST, *SLOWER)


def law(kernel: str, batch: int, kv_len: int) -> float:
    """Microseconds: one kernel launches fast but streams slower than the others."""
    cost = request_cost(KernelRequest(**DECODE, batch_size=batch, kv_len=kv_len))
    if kernel == SMALL_FAST:
        return 5.0 + cost.bytes / 3.0e6
    return (15.0 + cost.bytes / 4.0e6) * SLOWER.get(kernel, 1.0)


def table(points, kernels=KERNELS, timing=law) -> PerfTable:
    entries = tuple(PerfEntry(op="mha_decode", shape={**SHAPE, "batch_size": b, "kv_len": n},
                              median_us={k: timing(k, b, n) for k in kernels}) for b, n in points)
    return PerfTable(gpu="NVIDIA H200", arch="sm_90", entries=entries)


GRID = [(b, n) for b in (1, 8, 64) for n in (512, 4096, 32768)]


@pytest.fixture
def solve(toy):
    def _solve(perf, **fields):
        return Selector(toy, Platform.hypothetical("sm_90"), perf=perf).solve(KernelRequest(**{**DECODE, **fields}))

    return _solve


def test_nnls_recovers_non_negative_coefficients_and_clamps_negative_ones():
    rows = [[1.0, x, x * x] for x in (0.0, 1.0, 2.0, 3.0, 4.0)]
    gram = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]

    def rhs(y):
        return [sum(r[i] * yi for r, yi in zip(rows, y)) for i in range(3)]

    exact = nnls(gram, rhs([2 + 3 * r[1] for r in rows]))
    assert exact == pytest.approx([2.0, 3.0, 0.0], abs=1e-9)
    clamped = nnls(gram, rhs([10 - r[1] for r in rows]))  # a falling line: the slope cannot go below 0
    assert clamped[1] == 0.0 and clamped[2] == 0.0 and clamped[0] == pytest.approx(8.0)


def test_predictions_follow_each_kernels_law_between_and_beyond_the_measured_buckets():
    """Within 12% on a grid measured 8x apart (the correction interpolates ratios, not each kernel's slope)."""
    model = PerfModel(table(GRID))
    for batch, kv_len in [(16, 2048), (4, 16384), (256, 1024), (2, 65536)]:
        request = KernelRequest(**DECODE, batch_size=batch, kv_len=kv_len)
        predicted, missing = model.predict(request, list(KERNELS))
        assert not missing
        for kernel, p in predicted.items():
            assert p.us == pytest.approx(law(kernel, request.batch_size, request.kv_len), rel=0.12), (batch, kv_len, kernel)
            assert p.buckets == len(GRID) and 0 <= p.error < 0.2  # held out: a grid corner is extrapolated
        true = {k: law(k, request.batch_size, request.kv_len) for k in KERNELS}
        picked = min(predicted, key=lambda k: predicted[k].us)
        assert true[picked] <= 1.05 * min(true.values())  # regret: within 5% of the fastest (near-ties may swap)


def test_the_predicted_ranking_flips_where_the_laws_cross(solve):
    perf = table(GRID)
    small = solve(perf, batch_size=2, kv_len=256)  # not measured: small -> launch cost decides
    large = solve(perf, batch_size=128, kv_len=16384)  # not measured: large -> bandwidth decides
    assert small.kernel.name == SMALL_FAST and large.kernel.name == LARGE_FAST
    assert not small.measured and set(small.predicted) >= {SMALL_FAST, LARGE_FAST}
    assert small.why.startswith("fastest predicted of")


def test_the_fit_error_is_held_out_and_grows_with_noise():
    clean = PerfModel(table(GRID)).group("mha_decode", "bf16", "bf16")[0]

    def noisy(kernel, b, n):  # +-30% alternating: no smooth law reproduces it
        return law(kernel, b, n) * (1.3 if (b * 7 + n // 512) % 2 else 0.7)

    rough = PerfModel(table(GRID, timing=noisy)).group("mha_decode", "bf16", "bf16")[0]
    assert max(clean.errors.values()) < 0.2 < 0.25 < min(rough.errors.values())


def test_predictions_are_deterministic():
    request = KernelRequest(**DECODE, batch_size=16, kv_len=2048)
    first = PerfModel(table(GRID)).predict(request, [SMALL_FAST, LARGE_FAST])
    again = PerfModel(table(list(reversed(GRID)))).predict(request, [SMALL_FAST, LARGE_FAST])
    assert {k: p.us for k, p in first[0].items()} == pytest.approx({k: p.us for k, p in again[0].items()}, rel=1e-12)


def test_a_kernel_with_too_few_buckets_has_no_prediction_and_ranks_by_priority(solve):
    few = table(GRID[:MIN_BUCKETS - 1])
    sel = solve(few, batch_size=16, kv_len=2048)
    assert sel.predicted == {} and not sel.perf_source
    text = sel.explain()
    assert (f"no prediction: {MIN_BUCKETS - 1} measured mha_decode bf16/bf16 buckets, a model needs {MIN_BUCKETS}; "
            "priority ranks the eligible kernels)") in text
    assert sel.why.startswith("highest priority")


def test_one_kernel_without_a_model_ranks_after_the_predicted_ones(solve):
    perf = table(GRID, kernels=(SMALL_FAST,))
    sel = solve(perf, batch_size=16, kv_len=2048)
    assert sel.eligible[0].name == SMALL_FAST and set(sel.predicted) == {SMALL_FAST}
    assert [k.name for k in sel.eligible[1:]] == [k.name for k in solve(None).eligible if k.name != SMALL_FAST]
    line = next(ln for ln in sel.explain().splitlines() if LARGE_FAST in ln)
    assert line.endswith(f"(no prediction: 0 measured mha_decode bf16/bf16 buckets, a model needs {MIN_BUCKETS})")


def test_a_request_without_sizes_is_not_predicted(solve):
    sel = solve(table(GRID))
    assert sel.predicted == {} and "no prediction: the cost of mha_decode needs batch_size, kv_len" in sel.explain()


def test_explain_shows_predictions_apart_from_measurements(solve):
    perf = table(GRID)
    predicted = solve(perf, batch_size=16, kv_len=2048)
    text = predicted.explain()
    assert "(bucket not measured: predicted times rank the eligible kernels)" in text
    p = predicted.predicted[SMALL_FAST]
    assert f"predicted {p.us:.1f} us from {len(GRID)} measured buckets, fit error ±{p.error * 100:.0f}%" in text
    data = predicted.to_dict()
    assert data["perf"]["ranked_by"] == "predicted" and data["perf"]["median_us"] == {}
    row = next(e for e in data["eligible"] if e["name"] == SMALL_FAST)
    assert row["predicted"] == {"us": round(p.us, 3), "buckets": len(GRID), "fit_error": round(p.error, 4)}
    json.dumps(data)
    measured = solve(perf, batch_size=8, kv_len=4096)
    assert measured.predicted == {} and measured.measured[SMALL_FAST] == law(SMALL_FAST, 8, 4096)
    assert "(measured times rank the eligible kernels)" in measured.explain() and "predicted" not in measured.explain()


def test_a_measured_bucket_and_a_cached_selection_never_predict(toy, monkeypatch):
    perf = table(GRID)
    calls = []
    original = PerfModel.predictions  # what ranking asks (explain words the rest with predict())
    monkeypatch.setattr(PerfModel, "predictions", lambda self, *a: calls.append(a) or original(self, *a))
    sel = Selector(toy, Platform.hypothetical("sm_90"), perf=perf)
    sel.solve(KernelRequest(**DECODE, batch_size=8, kv_len=4096))  # measured: no prediction at all
    assert calls == []
    request = KernelRequest(**DECODE, batch_size=16, kv_len=2048)
    first = sel.solve(request)
    assert len(calls) == 1
    assert sel.solve(request) is first and sel.solve(KernelRequest(**DECODE, batch_size=9, kv_len=1500)) is first
    assert len(calls) == 1  # the same request class: one dict hit


def test_kernelsel_predict_off_ranks_unmeasured_buckets_by_priority(toy):
    from selector.overrides import Overrides

    perf = table(GRID)
    off = Selector(toy, Platform.hypothetical("sm_90"), Overrides.from_env({"KERNELSEL_PREDICT": "off"}), perf)
    sel = off.solve(KernelRequest(**DECODE, batch_size=16, kv_len=2048))
    assert sel.predicted == {} and sel.why.startswith("highest priority")
    assert "override  KERNELSEL_PREDICT=off" in sel.explain()
    assert off.solve(KernelRequest(**DECODE, batch_size=8, kv_len=4096)).measured  # measured buckets still rank
    with pytest.raises(selector.RequestError, match=r"KERNELSEL_PREDICT: 'maybe' is not a switch; use on or off"):
        Overrides.from_env({"KERNELSEL_PREDICT": "maybe"})


def test_shared_scale_and_terms_are_options_of_the_model():
    request = KernelRequest(**DECODE, batch_size=16, kv_len=2048)
    for options in ({"shared_scale": False}, {"prior": math.inf}, {"terms": ("launch", "bytes")}):
        predicted, _ = PerfModel(table(GRID), **options).predict(request, [SMALL_FAST])
        assert predicted[SMALL_FAST].us == pytest.approx(law(SMALL_FAST, 16, 2048), rel=0.1), options
    assert prediction.TERMS == tuple(prediction.TERM_FUNCTIONS)
