"""Six real transformers architectures through kernelsel against transformers' own eager attention.

float32 with the torch reference kernels: logits within 1e-4, greedy tokens equal (near-ties of 1e-4
aside); bf16 with kernelsel's Triton kernels (Triton's interpreter here, real kernels on a GPU): the rule of
``selector.tools.model_conformance.Tolerance``.  Every test also checks which kernels ran.
"""

from __future__ import annotations

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")

DECODE_OP = {arch: ("mla_decode" if arch == "deepseek_v3" else "mha_decode") for arch in mc.ARCHITECTURES}


def _batches(arch):
    """Continuous batching is checked here except for MLA on 5.17-5.18 (the xfail below says why)."""
    return arch != "deepseek_v3" or mc.refuses_custom_continuous_batching()


def _assert_report(report, arch, solution):
    assert report["prompt_logits"]["unpadded"]["ok"], report
    assert report["prompt_logits"]["left_padded"]["ok"], report
    assert report["generate"]["unpadded"]["ok"], report
    assert report["generate"]["left_padded"]["ok"], report
    kernels = report["kernels"]
    decode = kernels.get(DECODE_OP[arch], {})
    assert decode and all(name.startswith(f"{'torch' if solution == 'reference' else solution}-") for name in decode), kernels
    prompt = {**kernels.get("mha_extend", {}), **kernels.get("mha_prefill", {})}
    assert prompt, kernels
    assert report["passed"], report


@pytest.mark.parametrize("arch", mc.ARCHITECTURES)
def test_float32_reference_kernels_match_eager(arch, tiny_model, reference_backend, lift_continuous_batching_check):
    report = mc.verify(tiny_model(arch), "kernelsel-reference", dtype=torch.float32, backend=reference_backend,
                       check_generate_batch=_batches(arch))
    assert report["tolerance"]["logits"] == 1e-4
    for label in ("unpadded", "left_padded"):
        assert report["prompt_logits"][label]["error"] <= 1e-4
    if _batches(arch):
        assert report["generate_batch"]["ok"] and not report["generate_batch"]["empty_outputs"], report["generate_batch"]
    _assert_report(report, arch, "reference")


@pytest.mark.parametrize("arch", mc.ARCHITECTURES)
def test_bf16_triton_kernels_within_eager_bf16_error(arch, tiny_model, triton_backend, lift_continuous_batching_check):
    report = mc.verify(tiny_model(arch), "kernelsel-triton", dtype=torch.bfloat16, backend=triton_backend, new_tokens=4,
                       check_generate_batch=_batches(arch))
    assert report["tolerance"]["eager_error"] > 0  # bf16 eager differs from float32: the bound is not vacuous
    if _batches(arch):
        assert report["generate_batch"]["ok"], report["generate_batch"]
    _assert_report(report, arch, "triton")


@pytest.mark.xfail(mc.refuses_custom_continuous_batching(), reason=mc.CONTINUOUS_BATCHING_REFUSAL, strict=True, raises=ValueError)
def test_generate_batch_runs_kernelsel_without_lifting_any_check(tiny_model, reference_backend):
    """Where transformers calls registered ``paged|`` functions (5.17-5.18), continuous batching runs kernelsel as is."""
    model = tiny_model("llama")
    batch = mc.prompts()
    seqs = mc.generate_batch(model, "kernelsel-reference", batch, 4)
    assert all(seqs)
    assert not mc.greedy_violations(model, seqs, [len(p) for p in batch], 1e-4)


@pytest.mark.xfail(not mc.refuses_custom_continuous_batching(), strict=True, reason=mc.MLA_CONTINUOUS_BATCHING_BROKEN)
def test_generate_batch_deepseek_v3_runs_absorbed_mla(tiny_model, reference_backend, lift_continuous_batching_check):
    model = tiny_model("deepseek_v3")
    batch = mc.prompts()
    reference_backend.reset_counts()
    seqs = mc.generate_batch(model, "kernelsel-reference", batch, 4)
    assert all(seqs), seqs
    assert not mc.greedy_violations(model, seqs, [len(p) for p in batch], 1e-4)
    assert reference_backend.kernels_used()["mla_decode"]


def test_prompt_chunks_run_over_the_cached_prefix(tiny_model, reference_backend, lift_continuous_batching_check):
    """max_batch_tokens 4 splits every prompt into chunks: later chunks attend to the cached prefix (mha_extend)."""
    model = tiny_model("qwen3")
    batch = mc.prompts(lengths=(13, 10))
    reference_backend.reset_counts()
    seqs = mc.generate_batch(model, "kernelsel-reference", batch, 3, max_batch_tokens=4)
    assert all(seqs), seqs
    assert not mc.greedy_violations(model, seqs, [len(p) for p in batch], 1e-4)
    assert sum(reference_backend.kernels_used()["mha_extend"].values()) >= 2 * 6  # >= 6 chunked forwards x 2 layers
