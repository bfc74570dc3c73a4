"""``kernelsel verify`` on CPU: the reference kernels pass, broken adapters are caught.

Cases come from the real manifest; the broken adapters are the reference
with one defect each, swapped in where selection resolves adapter classes.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

torch = pytest.importorskip("torch")

from registry.adapters import reference as ref  # noqa: E402
from registry.constraints import Equals, IntRange, OneOf  # noqa: E402
from registry.loader import load_manifest  # noqa: E402
from registry.schema import Features  # noqa: E402
from registry.vocab import DType  # noqa: E402
from selector import availability  # noqa: E402
from selector.tools import verify as verify_module  # noqa: E402
from selector.tools.verify import CaseResult, VerifyReport, case_axes, plan_cases, verify  # noqa: E402

MANIFEST = load_manifest(None)


def test_reference_kernels_pass_quick_on_cpu():
    seen = []
    report = verify(MANIFEST, solution="reference", quick=True, device="cpu", progress=lambda *a: seen.append(a))
    assert report.ok, report.render(show_passed=False)
    assert {r.kernel for r in report.results} == {k.name for k in MANIFEST.kernels if k.solution.value == "reference"}
    assert seen[-1][0] == seen[-1][1] == len(report.results)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and data["counts"]["pass"] == len(report.results)
    assert data["environment"]["versions"]["torch"] == torch.__version__
    assert report.render().splitlines()[-1] == f"{len(report.results)} passed, 0 failed, 0 errors, 0 skipped"


@pytest.mark.slow
def test_reference_sparse_mla_full_cross_product_on_cpu():
    report = verify(MANIFEST, kernel="torch-sparse-mla-decode", device="cpu", progress=False)
    assert report.ok and len(report.results) == len(plan_cases(MANIFEST.by_name["torch-sparse-mla-decode"], quick=False, device="cpu"))


@pytest.mark.parametrize("spec", MANIFEST.kernels, ids=lambda k: k.name)
def test_quick_cases_cover_every_declared_value_and_feature(spec):
    cases = plan_cases(spec, quick=True, device="cuda")
    for field, values in case_axes(spec).items():
        if field == "gqa_group_size":
            got = {c.fields["num_qo_heads"] // c.fields["num_kv_heads"] for c in cases}
        else:
            got = {c.fields[field] for c in cases}
        assert set(values) <= got, field
        constraint = getattr(spec.shapes, field, None)
        if isinstance(constraint, OneOf):
            assert set(constraint.values) == set(values)  # every declared value, nothing invented
    declared = {f for f in Features.model_fields if getattr(spec.features, f)}
    assert {c.feature for c in cases if c.feature} == declared


@pytest.mark.parametrize("spec", [k for k in MANIFEST.kernels if isinstance(k.dtypes.kv_dtype, Equals)], ids=lambda k: k.name)
def test_a_field_that_equals_another_tries_that_fields_values_then_its_or(spec):
    kv = spec.dtypes.kv_dtype
    assert case_axes(spec)["kv_dtype"] == list(dict.fromkeys([*spec.dtypes.q_dtype.values, *kv.alternatives]))
    for case in plan_cases(spec, quick=False, device="cuda"):
        if "head_dim_qk" in case.fields and isinstance(spec.shapes.head_dim_vo, Equals):
            assert case.fields["head_dim_vo"] == case.fields["head_dim_qk"]


@pytest.mark.parametrize(
    "field, constraint, expected",
    [
        ("page_size", IntRange(min=16, power_of_two=True), [16]),
        ("page_size", IntRange(min=1), [1, 16]),
        ("q_len", IntRange(max=8), [1, 2, 8]),
        ("q_len", IntRange(max=1), [1]),
        ("topk", IntRange(multiple_of=4), [4, 8]),
        ("num_qo_heads", IntRange(min=16, max=128), [16, 128]),
    ],
)
def test_range_values_take_the_ends_and_admitted_samples(field, constraint, expected):
    assert verify_module._range_values(field, constraint) == expected


def test_tolerance_is_the_loosest_dtype_of_the_case():
    from selector.request import KernelRequest

    r = KernelRequest(op="mha_decode", q_dtype="bf16", kv_dtype="fp8_e5m2")
    assert verify_module.tolerance_for(r) is verify_module.TOLERANCES[r.kv_dtype]
    r = KernelRequest(op="mha_decode", q_dtype="fp16")
    assert verify_module.tolerance_for(r) is verify_module.TOLERANCES[DType.FP16]
    assert verify_module.TOLERANCES[DType.FP16].atol < verify_module.TOLERANCES[DType.BF16].atol


def test_kernels_whose_library_is_missing_are_skipped_with_the_reason():
    if importlib.util.find_spec("flashinfer") is not None:
        pytest.skip("flashinfer is installed here")
    report = verify(MANIFEST, kernel="xqa-decode", quick=True, device="cpu", progress=False)
    assert report.results and all(r.status == "skip" for r in report.results)
    assert all("flashinfer-python, not installed" in r.message for r in report.results)
    assert any("kv_dtype fp16 must equal q_dtype bf16 or be one of [fp8_e4m3]" in r.message for r in report.results)


# --------------------------------------------------------------- broken adapters must fail


class DropsSinks(ref.TorchMHADecode):
    """FlashInfer 0.7.2's decode: accepts sinks= and ignores it."""

    def run(self, q, k_cache, v_cache, *, sinks=None, **kw):
        return super().run(q, k_cache, v_cache, **kw)


class DropsWindow(ref.TorchMHADecode):
    def plan(self, metadata):
        super().plan(metadata)
        self.window_left = -1


class Base2Lse(ref.TorchMHADecode):
    def run(self, *args, **kw):
        res = super().run(*args, **kw)
        return res._replace(lse=None if res.lse is None else res.lse / 0.6931471805599453)


class IgnoresOut(ref.TorchMHADecode):
    def run(self, *args, out=None, **kw):
        return super().run(*args, **kw)


class IgnoresTensorScale(ref.TorchMHADecode):
    def run(self, *args, k_scale=1.0, v_scale=1.0, **kw):
        if isinstance(k_scale, torch.Tensor):
            k_scale, v_scale = 1.0, 1.0
        return super().run(*args, k_scale=k_scale, v_scale=v_scale, **kw)


def _verify_with(monkeypatch, broken):
    original = availability.adapter_class

    def resolve(path):
        return broken if path == "registry.adapters.reference:TorchMHADecode" else original(path)

    monkeypatch.setattr(availability, "adapter_class", resolve)
    return verify(MANIFEST, kernel="torch-mha-decode", quick=True, device="cpu", progress=False)


def _failures(report: VerifyReport) -> dict[str, CaseResult]:
    return {r.case: r for r in report.results if r.status != "pass"}


@pytest.mark.parametrize(
    "broken, case_suffix, message",
    [
        (DropsSinks, "+sinks", r"sinks had no effect: output equals the reference without it \(dropped\?\)"),
        (DropsWindow, "+sliding_window", r"sliding_window had no effect"),
        (Base2Lse, "+return_lse", r"^LSE off by [0-9.]+ \(natural log expected\)$"),
    ],
)
def test_a_dropped_or_wrong_feature_fails_only_its_case(monkeypatch, broken, case_suffix, message):
    failures = _failures(_verify_with(monkeypatch, broken))
    assert len(failures) == 1, failures
    (case, result), = failures.items()
    assert case.endswith(case_suffix) and result.status == "fail"
    assert re.search(message, result.message), result.message


def test_ignoring_out_fails_every_case(monkeypatch):
    report = _verify_with(monkeypatch, IgnoresOut)
    assert report.results and all(r.status == "fail" and "run() ignored out=" in r.message for r in report.results)


def test_ignoring_a_tensor_scale_fails_the_fp8_cases(monkeypatch):
    failures = _failures(_verify_with(monkeypatch, IgnoresTensorScale))
    assert failures and all("kv=fp8" in case for case in failures)
    assert all("tensor scales differ from float scales" in r.message for r in failures.values())


def test_a_kernel_that_raises_is_an_error_row_not_a_crash(monkeypatch):
    class Raises(ref.TorchMHADecode):
        def run(self, *args, **kw):
            raise NotImplementedError("no such path\nsecond line")

    report = _verify_with(monkeypatch, Raises)
    assert not report.ok
    assert all(r.status == "error" and r.message == "NotImplementedError: no such path" for r in report.results)
