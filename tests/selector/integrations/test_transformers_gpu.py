"""On a GPU: real-size attention shapes through the kernels kernelsel selects there, against eager."""

from __future__ import annotations

import copy

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", mc.ARCHITECTURES)
def test_real_size_models_match_eager_with_the_selected_kernels(arch):
    report = mc.verify_models([arch], device="cuda", size="real", page_sizes=(16, 64), new_tokens=4,
                              prompt_lengths=(2048, 1024))
    for run in report["results"]:
        assert run["passed"], mc.render_report(report)
        assert all(not name.startswith("torch-") for names in run["kernels"].values() for name in names), run["kernels"]


@pytest.mark.gpu
@pytest.mark.skipif(mc.refuses_custom_continuous_batching(), reason="transformers >= 5.19 gathers before the attention function")
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_generate_batch_decodes_in_place_with_the_selected_kernels(page_size):
    """Real Llama-3-8B attention shapes in bf16 through generate_batch: every decode call of every layer reads
    transformers' cache in place with a kernel selected for the block size, and the tokens pass the bf16 rule."""
    import selector.integrations.transformers as ks

    model32 = mc.build_model(mc.real_config("llama"), device="cuda")
    model = copy.deepcopy(model32).to(torch.bfloat16)
    backend = ks.register("kernelsel-gpu-in-place")
    try:
        batch = mc.prompts(count=8, lengths=(1024, 700, 333), vocab=32000)
        seqs = mc.generate_batch(model, "kernelsel-gpu-in-place", batch, 8, page_size=page_size, max_batch_tokens=4096)
    finally:
        ks.unregister("kernelsel-gpu-in-place")
    assert all(seqs)
    decode = backend.kernels_used()["mha_decode"]
    assert backend.in_place_decodes() == {page_size: sum(decode.values())}, (backend.in_place_decodes(), decode)
    assert all(not name.startswith("torch-") for name in decode), decode
    ids, mask = mc.left_padded(batch, "cuda")
    eager_error = mc.logits_error(mc.prompt_logits(model, "eager", ids, mask), mc.prompt_logits(model32, "eager", ids, mask), mask)
    tolerance = mc.Tolerance.for_dtype(torch.bfloat16, eager_error)
    assert not mc.greedy_violations(model32, seqs, [len(p) for p in batch], tolerance.near_tie)
