"""The backend's run-time behaviour: selections cached per layer type and shape, the mask read back exactly."""

from __future__ import annotations

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_selections_are_made_once_per_layer_type_and_shape(tiny_model, reference_backend, monkeypatch):
    from selector.integrations.transformers import kernels

    model = tiny_model("gpt_oss")  # a sliding and a full layer: two layer types
    ids, mask = mc.left_padded(mc.prompts(), "cpu")
    mc.greedy(model, "kernelsel-reference", ids, mask, 3)  # warm the resolver
    calls = []
    monkeypatch.setattr(kernels, "select_kernel", lambda **f: calls.append(f) or pytest.fail("selected again"))
    monkeypatch.setattr(kernels, "select_plan", lambda **f: calls.append(f) or pytest.fail("planned again"))
    reference_backend.reset_counts()
    mc.greedy(model, "kernelsel-reference", ids, mask, 3)
    assert not calls
    used = reference_backend.kernels_used()
    assert used == {"mha_decode": {"torch-mha-decode": 2 * 2}, "mha_extend": {"torch-mha-extend": 2}}
    labels = {label for label, _, _ in reference_backend.calls}
    assert labels == {"GptOssAttention sliding_window=6", "GptOssAttention"}


@pytest.mark.parametrize("window", [None, 3])
def test_mask_layout_reads_left_padding_and_windows(window):
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    from selector.integrations.transformers.layout import LAYOUT_ATTRIBUTE, kernelsel_mask

    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mask = kernelsel_mask(batch_size=2, q_length=6, kv_length=6, mask_function=fn, attention_mask=padding,
                          local_size=window, device="cpu")
    layout = getattr(mask, LAYOUT_ATTRIBUTE)
    assert (layout.key_start, layout.key_end, layout.queries) == ([0, 2], [6, 6], [6, 4])
    assert layout.causal and layout.window == window
    paging = layout.paging(4)
    assert paging.seq_lens.tolist() == [6, 4] and paging.block_table.tolist() == [[0, 1], [2, 3]]
    assert paging.cu_seqlens_q.tolist() == [0, 6, 10]
    keys = torch.arange(2 * 6, dtype=torch.float32).view(2, 1, 6, 1)  # [B, H, L, D]
    pages = paging.pages(keys)  # sequence 1 starts at its first real key (dense index 2)
    assert pages[2, :, 0, 0].tolist() == [8.0, 9.0, 10.0, 11.0]


def test_a_static_cache_layout_ends_at_the_last_written_key():
    from transformers.masking_utils import causal_mask_function

    from selector.integrations.transformers.layout import LAYOUT_ATTRIBUTE, kernelsel_mask

    mask = kernelsel_mask(batch_size=1, q_length=1, kv_length=8, q_offset=4, mask_function=causal_mask_function,
                          device="cpu")  # query at position 4 of an 8-slot static cache
    layout = getattr(mask, LAYOUT_ATTRIBUTE)
    assert (layout.key_start, layout.key_end, layout.queries) == ([0], [5], [1])


def test_static_cache_generation_matches_eager(tiny_model, reference_backend):
    model = tiny_model("llama")
    ids, mask = mc.left_padded(mc.prompts(), "cpu")
    with torch.no_grad():
        with mc.attention(model, "eager"):
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
        with mc.attention(model, "kernelsel-reference"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert out.tolist() == ref.tolist()
