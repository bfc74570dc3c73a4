"""Provenance: derived from committed ``kernelsel verify`` results, never declared; never-run kernels say so."""

from __future__ import annotations

import json

import pytest

from registry.loader import load_manifest
from registry.provenance import RESULTS_DIR, committed_runs, provenance, source_of
from registry.vocab import Arch

MANIFEST = load_manifest()


def _executed_in_committed_files() -> dict[str, set[str]]:
    """kernel -> archs it has a passed/failed/errored case on, read straight from the JSON files."""
    out: dict[str, set[str]] = {}
    for path in sorted(RESULTS_DIR.glob("verify-*.json")):
        data = json.loads(path.read_text())
        for r in data["results"]:
            if r["status"] != "skip":
                out.setdefault(r["kernel"], set()).add(data["environment"]["arch"])
    return out


def test_the_committed_results_are_shipped_with_the_package():
    assert sorted(p.name for p in RESULTS_DIR.glob("verify-*.json")), "no verify results under registry/verify_results"


@pytest.mark.parametrize("spec", MANIFEST.kernels, ids=[k.name for k in MANIFEST.kernels])
def test_a_kernel_is_verified_exactly_where_a_results_file_ran_it(spec):
    ran = _executed_in_committed_files().get(spec.name, set())
    p = provenance(spec)
    assert p.ran == bool(ran)
    for arch in spec.arch.members():
        text = p.summary(arch)
        if arch.value in ran:
            assert text.startswith("verified by kernelsel verify on ") and f"({arch.value})" in text
        else:
            assert text.startswith("never run by kernelsel"), text
            assert "facts from " in text


def _write(tmp_path, name, gpu, arch, statuses, date="2026-12-01"):
    results = [{"kernel": k, "case": f"c{i}", "status": s} for k, ss in statuses.items() for i, s in enumerate(ss)]
    (tmp_path / name).write_text(json.dumps({"environment": {"gpu": gpu, "arch": arch, "date": date}, "results": results}))


def test_summary_names_the_gpu_date_counts_and_file(tmp_path):
    _write(tmp_path, "verify-h200-quick.json", "NVIDIA H200", "sm_90", {"k": ["pass", "pass", "fail", "skip"]})
    spec = type("Spec", (), {"name": "k", "refs": ("flashinfer/decode.py:10 plan",), "sources": {}})()
    p = provenance(spec, committed_runs(str(tmp_path)))
    assert p.summary(Arch.SM_90) == (
        "verified by kernelsel verify on NVIDIA H200 (sm_90), 2026-12-01: 2 passed, 1 FAILED, 1 skipped "
        "(bench/results/verify-h200-quick.json)"
    )
    assert p.summary(Arch.SM_100) == (
        "never run by kernelsel on sm_100 (verified on sm_90 only); facts from flashinfer/decode.py"
    )


def test_a_kernel_only_skipped_was_never_run(tmp_path):
    _write(tmp_path, "verify-h200-quick.json", "NVIDIA H200", "sm_90", {"k": ["skip", "skip"]})
    spec = type("Spec", (), {"name": "k", "refs": ("NVIDIA/TensorRT-LLM#12606 (MLA)",), "sources": {}})()
    p = provenance(spec, committed_runs(str(tmp_path)))
    assert not p.ran and p.summary(Arch.SM_90) == "never run by kernelsel: facts from NVIDIA/TensorRT-LLM#12606"


def test_an_unreadable_results_file_is_skipped_not_fatal(tmp_path):
    (tmp_path / "verify-broken.json").write_text("{not json")
    _write(tmp_path, "verify-ok.json", "NVIDIA H200", "sm_90", {"k": ["pass"]})
    assert set(committed_runs(str(tmp_path))) == {"k"}


@pytest.mark.parametrize(
    "ref,source",
    [
        ("flashinfer/decode.py:4205-4584 trtllm_batch_decode_with_kv_cache(backend=\"trtllm-gen\")", "flashinfer/decode.py"),
        ("flashinfer/data/include/flashinfer/trtllm/fmha/fmhaKernels.cuh:259-261 (page size)",
         "flashinfer/data/include/flashinfer/trtllm/fmha/fmhaKernels.cuh"),
        ("NVIDIA/TensorRT-LLM#12606 (MLA generation on trtllm-gen)", "NVIDIA/TensorRT-LLM#12606"),
        ("registry/contracts.py (the semantics it defines)", "registry/contracts.py"),
        ("NVIDIA/TensorRT-LLM tensorrt_llm/_torch/attention_backend/fmha/flashinfer_trtllm_gen.py "
         "SUPPORTED_DTYPE_COMBOS_GENERATION: (q, KV) = (e4m3, e4m3)",
         "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/attention_backend/fmha/flashinfer_trtllm_gen.py"),
    ],
)
def test_source_of_a_ref_is_the_document_it_points_at(ref, source):
    assert source_of(ref) == source


# ------------------------------------------------------------ where users see it

RAN = next(k for k in MANIFEST.kernels if provenance(k).ran_on(Arch.SM_90))
NEVER = next(k for k in MANIFEST.kernels if not provenance(k).ran)


def test_show_prints_the_provenance(cli):
    for spec in (RAN, NEVER):
        code, out, _ = cli("show", spec.name)
        assert code == 0 and out.rstrip().splitlines()[-1] == f"# provenance: {provenance(spec).summary()}"
        code, out, _ = cli("show", spec.name, "--json")
        data = json.loads(out)["provenance"]
        assert data["ran"] is provenance(spec).ran and data["summary"] == provenance(spec).summary()


def test_explain_puts_it_on_the_selected_line_and_in_the_json(cli):
    arch = NEVER.arch.members()[0]
    fields = ["--op", NEVER.op.value, "--arch", arch.value, "--kernel", NEVER.name]
    code, out, _ = cli("explain", *fields)
    selected = next(line for line in out.splitlines() if line.startswith("selected  "))
    assert code == 0 and selected.endswith(" — " + provenance(NEVER).summary(arch)) and "never run by kernelsel" in selected
    code, out, _ = cli("explain", *fields, "--json")
    assert json.loads(out)["selected"]["provenance"]["ran"] is False


def test_matrix_has_a_run_by_kernelsel_column():
    from selector.tools.matrix import render_matrix

    text = render_matrix(MANIFEST)
    for spec in (RAN, NEVER):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{spec.name}` |"))
        last = row.rstrip(" |").rsplit(" | ", 1)[1]
        assert last == ("never (facts from sources)" if spec is NEVER else "H200 (sm_90)")


def test_doctor_notes_each_kernel_of_the_arch_that_kernelsel_never_ran_there():
    import selector.tools.doctor as doctor

    arch = NEVER.arch.members()[0]
    report = doctor.diagnose(arch=arch.value, environ={})
    entry = next(k for k in report["kernels"] if k["name"] == NEVER.name)
    assert entry["provenance"]["ran"] is False and provenance(NEVER).summary(arch) in entry["notes"]
    ran_here = next(k for k in doctor.diagnose(arch="sm_90", environ={})["kernels"] if k["name"] == RAN.name)
    assert not any(n.startswith("never run") for n in ran_here["notes"])
