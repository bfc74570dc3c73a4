"""``kernelsel doctor`` on a CPU machine: no GPU says so, ``--arch`` shows what a GPU would run here,
broken imports are found by importing, and the manifest, perf table and overrides in use are named."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from importlib import metadata

import pytest

import selector.tools.doctor as doctor
from registry.vocab import Arch, Op
from selector.availability import adapter_class
from selector.platform import GPU_SOURCES, NVIDIA_SMI, TORCH, Gpu

H200 = ((Gpu("NVIDIA H200", "9.0", Arch("sm_90"), "570.86.15"),), "")


def _torch_version():
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


@pytest.fixture
def no_gpu(monkeypatch):
    """No nvidia-smi, and a torch (if installed) that sees no CUDA device, whatever machine runs the test."""
    version = _torch_version()
    monkeypatch.setitem(GPU_SOURCES, NVIDIA_SMI, lambda: ((), "nvidia-smi not found"))
    monkeypatch.setitem(GPU_SOURCES, TORCH, lambda: ((), f"torch {version} sees no CUDA device" if version else ""))


def _kernels(report):
    return {k["name"]: k for k in report["kernels"]}


def test_cpu_machine_says_no_gpu_and_names_versions_manifest_and_perf(cli, no_gpu, manifest):
    code, out, err = cli("doctor")
    assert code == 0, err
    if _torch_version():
        assert re.search(r"^gpu        none detected \(nvidia-smi not found; torch \S+ sees no CUDA device\)$", out, re.M)
        assert re.search(r"^torch      \S+, ", out, re.M)
    else:
        assert re.search(r"^gpu        none detected \(nvidia-smi not found\)$", out, re.M)
        assert re.search(r"^torch      not installed$", out, re.M)
    assert re.search(r"^arch       no GPU detected: pass --arch", out, re.M)
    assert re.search(r"^python     3\.\d+", out, re.M)
    for dist in ("flashinfer-python", "triton", "torch", "pydantic", "PyYAML", "click"):
        assert re.search(rf"^(libraries| {{9}}) +{re.escape(dist)} +\S", out, re.M), dist
    assert re.search(r"^imports    torch +(ok|fails)", out, re.M)
    assert re.search(rf"^manifest   {re.escape(manifest.path)} \(bundled; schema 1, {len(manifest.kernels)} kernels, sha {manifest.digest}\)$", out, re.M)
    assert re.search(r"^perf       none \(no GPU detected: eligible kernels rank by priority\)$", out, re.M)
    assert re.search(r"^overrides  none$", out, re.M)
    assert re.search(rf"^kernels here \(any arch\): \d+ of {len(manifest.kernels)} available$", out, re.M)


def test_arch_shows_what_a_gpu_of_that_arch_would_run_with_these_libraries(cli, no_gpu, manifest, break_import):
    break_import("flashinfer")  # whatever is installed: FlashInfer does not import here
    code, out, _ = cli("doctor", "--arch", "9.0", "--json")
    report = json.loads(out)
    assert code == 0 and report["arch"]["value"] == "sm_90"
    kernels = _kernels(report)
    for k in manifest.kernels:
        entry = kernels[k.name]
        arch_problem = k.arch.check("arch", Arch.SM_90 if hasattr(Arch, "SM_90") else Arch("sm_90"))
        assert (arch_problem in entry["reasons"]) if arch_problem else not any(r.startswith("arch ") for r in entry["reasons"])
        if "flashinfer" in adapter_class(k.adapter).libraries:
            assert not entry["available"]
            assert any(r.startswith("needs flashinfer-python") or r.startswith("unavailable: cannot import flashinfer")
                       for r in entry["reasons"]), entry
    assert report["libraries"]["imports"]["flashinfer"].startswith("fails: ModuleNotFoundError")
    code, text, _ = cli("doctor", "--arch", "sm_90")
    assert re.search(rf"^kernels on sm_90: {sum(k['available'] for k in report['kernels'])} of {len(manifest.kernels)} available$", text, re.M)


def test_installed_but_broken_library_is_found_by_importing(cli, no_gpu, break_import, manifest):
    break_import("triton", RuntimeError("libcuda.so.1: cannot open shared object file\nmore"))
    code, out, _ = cli("doctor", "--arch", "sm_90", "--json")
    report = json.loads(out)
    assert report["libraries"]["imports"]["triton"] == "fails: RuntimeError: libcuda.so.1: cannot open shared object file"
    if report["libraries"]["versions"].get("triton") is None:
        pytest.skip("triton is not installed: its kernels fail the metadata check first")
    triton_kernels = [k for k in manifest.kernels if "triton" in adapter_class(k.adapter).libraries]
    assert triton_kernels
    for k in triton_kernels:
        assert _kernels(report)[k.name]["reasons"] == [
            "unavailable: cannot import triton: RuntimeError: libcuda.so.1: cannot open shared object file"]


def test_library_that_imports_without_package_metadata_is_flagged(no_gpu, monkeypatch, manifest):
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    if importlib.util.find_spec("torch") is None:  # the adapters import torch too: a stand-in where it is missing
        monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setattr(doctor, "installed_versions", lambda dists: (("torch", "2"), ("triton", "3")))
    report = doctor.diagnose(arch="sm_90", environ={})
    fi = [k for k in manifest.kernels if "flashinfer" in adapter_class(k.adapter).libraries]
    entry = _kernels(report)[fi[0].name]
    assert not entry["available"] and entry["reasons"][-1].startswith("needs flashinfer-python, not installed")
    assert any("package metadata lacks a required distribution" in n for n in entry["notes"])


def test_detected_gpu_picks_its_committed_perf_table(monkeypatch):
    monkeypatch.setitem(GPU_SOURCES, NVIDIA_SMI, lambda: H200)
    report = doctor.diagnose(environ={})
    assert report["gpu"] == {"name": "NVIDIA H200", "arch": "sm_90", "driver": "570.86.15", "count": 1}
    assert report["arch"] == {"value": "sm_90", "source": "detected (NVIDIA H200)"}
    assert report["perf"]["path"].endswith("nvidia-h200-sm_90.yaml") and report["perf"]["gpu"] == "NVIDIA H200"
    text = doctor.render(report)
    assert re.search(r"^gpu        NVIDIA H200, sm_90$", text, re.M) and re.search(r"^driver     570\.86\.15$", text, re.M)
    assert re.search(r"^perf       \S+nvidia-h200-sm_90\.yaml \(committed table for NVIDIA H200; NVIDIA H200, sm_90, \d+ buckets\)$", text, re.M)


def test_overrides_in_effect_are_shown_and_applied(no_gpu, manifest, tmp_path):
    victim = manifest.kernels[0].name
    env = {"KERNELSEL_DISABLE": victim, "KERNELSEL_PERF": "off",
           f"KERNELSEL_FORCE_{manifest.kernels[1].op.value.upper()}": manifest.kernels[1].name}
    report = doctor.diagnose(arch="sm_90", environ=env)
    assert f"KERNELSEL_DISABLE={victim}" in report["overrides"] and "KERNELSEL_PERF=off" in report["overrides"]
    assert "disabled by KERNELSEL_DISABLE" in _kernels(report)[victim]["reasons"]
    assert any(n.startswith("forced by KERNELSEL_FORCE_") for n in _kernels(report)[manifest.kernels[1].name]["notes"])
    assert re.search(r"^perf       off \(KERNELSEL_PERF=off: eligible kernels rank by priority\)$", doctor.render(report), re.M)


@pytest.mark.parametrize("variable, value, problem", [
    ("KERNELSEL_DISABLE", "nope", r"KERNELSEL_DISABLE: no kernel named 'nope'"),
    ("KERNELSEL_FORCE_MHA_DECODE", "nope", r"KERNELSEL_FORCE_MHA_DECODE=nope: no kernel named 'nope'; kernels for mha_decode: "),
    ("KERNELSEL_FORCE_MHA_DECODE", "{mla}", r"KERNELSEL_FORCE_MHA_DECODE=\S+: kernel '\S+' implements mla_decode, not mha_decode"),
])
def test_an_override_the_manifest_cannot_meet_exits_1(cli, no_gpu, monkeypatch, manifest, variable, value, problem):
    """Every selection (of the op) fails with these set: doctor must not say all is well."""
    monkeypatch.setenv(variable, value.format(mla=manifest.by_op[Op.MLA_DECODE][0].name))
    code, out, _ = cli("doctor", "--arch", "sm_90")
    assert code == 1
    assert re.search(rf"^overrides  invalid: {problem}", out, re.M), out


def test_manifest_from_the_environment_and_a_broken_one(cli, no_gpu, monkeypatch, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema_version: 1\nkernels: [\n")
    monkeypatch.setenv("KERNELSEL_MANIFEST", str(broken))
    code, out, _ = cli("doctor")
    assert code == 1
    assert re.search(rf"^manifest   {re.escape(str(broken))} \(KERNELSEL_MANIFEST\): does not load$", out, re.M)
    assert re.search(r"^ {11}\S*broken\.yaml:\d+:\d+: ", out, re.M)


def test_bad_arch_is_a_usage_error(cli):
    code, _, err = cli("doctor", "--arch", "sm_91")
    assert code == 2 and "sm_91" in err and "sm_90" in err
