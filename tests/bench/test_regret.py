"""``bench/regret.py`` on the CPU: record a perf table for a suite, then score the strategies against it.

The suite is built from the manifest's Triton kernels (their first declared
values, tiny sizes) and runs in Triton's interpreter in a subprocess, through
the same harness as on a GPU.  Timings and ratios are never asserted, only
what is recorded and reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("triton")

from registry.loader import load_manifest, load_perf_table  # noqa: E402
from registry.vocab import Op  # noqa: E402
from selector.tools.verify import plan_cases  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MANIFEST = load_manifest()
TRITON = [k for k in MANIFEST.kernels if k.solution.value == "triton"]


def _suite(path: pathlib.Path) -> int:
    groups = []
    for spec in TRITON:
        fields = {k: getattr(v, "value", v) for k, v in plan_cases(spec, quick=True, device="cpu")[0].fields.items()}
        sizes = {"batch": [1, 2], "kv_len": [24]}
        if spec.op is Op.MHA_EXTEND:
            sizes["new_len"] = [3]
        groups.append({"name": spec.name, "op": spec.op.value, "request": fields, "grid": sizes})
    path.write_text(yaml.safe_dump({"schema_version": 1, "groups": groups}, sort_keys=False))
    return 2 * len(groups)


def _regret(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "bench" / "regret.py"), "--device", "cpu", "--arch", "sm_90",
           "--repeats", "1", "--warmup", "0", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_record_then_report_on_cpu(tmp_path):
    n = _suite(tmp_path / "suite.yaml")
    rec = _regret("--suite", str(tmp_path / "suite.yaml"), "--record", str(tmp_path / "cpu.yaml"))
    assert rec.returncode == 0, rec.stderr
    table = load_perf_table(tmp_path / "cpu.yaml")
    assert len(table.entries) == n and {e.op.value for e in table.entries} == {k.op.value for k in TRITON}
    assert all(set(e.median_us) == {f"triton-{e.op.value.replace('_', '-')}"} for e in table.entries)
    assert json.loads(rec.stdout)["buckets"] == n
    assert sum(line.startswith("bench [") for line in rec.stderr.splitlines()) == n

    rep = _regret("--suite", str(tmp_path / "suite.yaml"), "--perf", str(tmp_path / "cpu.yaml"), "--out", str(tmp_path),
                  "--tune", "--tune-budget-ms", "1")
    assert rep.returncode == 0, rep.stderr
    data = json.loads((tmp_path / "regret-cpu.json").read_text())  # a folder: the file is named after the GPU
    assert data["meta"]["requests"] == len(data["cases"]) == n and data["meta"]["perf_table"]["gpu"] == "cpu"
    assert data["meta"]["copy_tbps"] > 0
    summary = data["summary"]
    for strategy in ("perf_table", "measured_only", "predicted", "priority", "tuned"):
        assert summary[strategy]["requests"] == n, strategy
        assert set(summary[strategy]["by_op"]) == {c["op"] for c in data["cases"]}
    assert {"geomean", "worst", "worst_request", "meets_targets"} <= set(summary["perf_table"])
    assert all(c["strategies"]["perf_table"]["perf_hit"] for c in data["cases"])
    # one kernel per op here: every strategy picks it; tuning timed it within its budget (3 runs at least)
    assert all(c["strategies"]["tuned"]["kernel"] == c["best"]["kernel"] for c in data["cases"])
    assert all(set(c["tuning"]["repeats"].values()) == {3} for c in data["cases"])
    assert summary["tuning_cost"]["buckets"] == n and summary["tuning_cost"]["timing_s_max"] > 0
    with_auto = [c for c in data["cases"] if c["op"] in ("mha_decode", "mha_extend", "mla_decode")]
    assert with_auto and all("flashinfer_auto" in c["strategies"] for c in with_auto)
    assert json.loads(rep.stdout)["summary"] == data["summary"]


def _load_regret():
    spec = importlib.util.spec_from_file_location("regret_script", ROOT / "bench" / "regret.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeFlashInfer(types.ModuleType):
    """Records what the backend="auto" builders pass (names and shapes); the real API is exercised on the GPU."""

    def __init__(self):
        super().__init__("flashinfer")
        self.calls: list[tuple[str, tuple, dict]] = []
        record = self._record

        class Wrapper:
            def __init__(self, *args, **kwargs):
                record("init", args, kwargs)

            def plan(self, *args, **kwargs):
                record("plan", args, kwargs)

            def run(self, *args, **kwargs):
                record("run", args, kwargs)
                return kwargs["out"]

        self.decode = types.SimpleNamespace(trtllm_batch_decode_with_kv_cache=lambda *a, **k: record("decode", a, k))
        self.BatchPrefillWithPagedKVCacheWrapper = Wrapper
        self.mla = types.SimpleNamespace(BatchMLAPagedAttentionWrapper=Wrapper,
                                         MLAPlanMetadata=types.SimpleNamespace(csr=lambda *a: ("csr", a)))

    def _record(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))
        return kwargs.get("out")


@pytest.mark.parametrize("op, kv_dtype", [("mha_decode", "bf16"), ("mha_decode", "fp8_e4m3"), ("mha_extend", "bf16"),
                                          ("mla_decode", "bf16"), ("mla_decode", "fp8_e4m3")])
def test_flashinfer_auto_builders_pass_the_workload_and_backend_auto(monkeypatch, op, kv_dtype):
    import torch

    from registry.adapters import flashinfer_common
    from selector import KernelRequest
    from registry.workloads import make_workload

    regret = _load_regret()
    fake = _FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(flashinfer_common, "float_workspace", lambda device, tag, n: torch.zeros(8, dtype=torch.uint8))
    spec = next(k for k in TRITON if k.op.value == op)
    fields = {k: getattr(v, "value", v) for k, v in plan_cases(spec, quick=True, device="cpu")[0].fields.items()}
    request = KernelRequest(op=op, arch="sm_90", **{**fields, "kv_dtype": kv_dtype})
    work = make_workload(request, batch=2, kv_len=24, new_len=3 if op == "mha_extend" else None)
    call = regret.AUTO_BY_OP[op](work)
    out = call()
    assert tuple(out.shape) == work.out_shape
    kinds = [c[0] for c in fake.calls]
    if op == "mha_decode":
        (_, args, kwargs), = fake.calls
        assert args[0] is work.inputs[0] and args[1] == tuple(work.inputs[1:])
        assert kwargs["backend"] == "auto" and kwargs["kv_layout"] == "NHD" and args[5] == 24
        assert kwargs["bmm2_scale"] == work.scales.get("v_scale", 1.0)
    else:
        assert kinds == ["init", "plan", "run"] and fake.calls[0][2]["backend"] == "auto"
        if op == "mla_decode":
            assert fake.calls[2][2]["query"] == tuple(work.inputs[:2])
            assert ("ckv_scale" in fake.calls[2][2]) == (kv_dtype != "bf16")
