"""What kernelsel cannot honour is refused with the layer and the feature named, never run some other way."""

from __future__ import annotations

import re

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from selector.integrations.transformers import LayerError  # noqa: E402


def _forward(model, name, ids, **kwargs):
    with mc.attention(model, name), torch.no_grad():
        return model(ids, **kwargs)


def test_dropout_is_refused_naming_the_layer(reference_backend):
    config = mc.tiny_config("llama")
    config.attention_dropout = 0.1
    model = mc.build_model(config).train()
    with pytest.raises(LayerError, match=r"^kernelsel: LlamaAttention layer 0: attention dropout 0\.1 > 0"):
        _forward(model, "kernelsel-reference", torch.tensor([[1, 2, 3]]))


def test_an_arbitrary_4d_mask_is_refused(tiny_model, reference_backend):
    model = tiny_model("llama")
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[0, 0, 3, 1] = False  # a hole no causal/sliding/padding mask has
    with pytest.raises(LayerError, match=r"^kernelsel: LlamaAttention layer 0: an attention mask kernelsel's mask "
                                         r"function did not build .*arbitrary 4-D mask"):
        _forward(model, "kernelsel-reference", torch.tensor([[1, 2, 3, 4]]), attention_mask=mask)


def test_padding_inside_a_sequence_is_refused(tiny_model, reference_backend):
    model = tiny_model("llama")
    mask = torch.tensor([[1, 1, 0, 1, 1]])  # right-padded prompt continued: a hole inside the sequence
    with pytest.raises(LayerError, match=r"^kernelsel: LlamaAttention layer 0: the attention mask is not causal over "
                                         r"left-padded sequences"):
        _forward(model, "kernelsel-reference", torch.tensor([[1, 2, 3, 4, 5]]), attention_mask=mask)


def test_an_overlay_mask_function_is_refused():
    """Chunked attention (Llama 4) is not a sliding window: the mask kernelsel reads back is refused."""
    from transformers.masking_utils import chunked_causal_mask_function

    from selector.integrations.transformers.layout import LAYOUT_ATTRIBUTE, kernelsel_mask

    mask = kernelsel_mask(batch_size=1, q_length=6, kv_length=6, mask_function=chunked_causal_mask_function(3, torch.zeros(1, dtype=torch.long)),
                          local_size=3, device="cpu")
    assert isinstance(getattr(mask, LAYOUT_ATTRIBUTE), str)
    assert "causal with sliding_window 3" in getattr(mask, LAYOUT_ATTRIBUTE)


def test_output_attentions_is_refused(tiny_model, reference_backend):
    model = tiny_model("llama")
    with pytest.raises(LayerError, match=r"output_attentions=True"):
        _forward(model, "kernelsel-reference", torch.tensor([[1, 2, 3]]), output_attentions=True)


def test_deepseek_v32_topk_indices_are_refused(reference_backend):
    config = transformers.DeepseekV32Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1, n_group=1, topk_group=1, index_topk=4,
        index_n_heads=2, index_head_dim=16, eos_token_id=None, bos_token_id=None)
    model = mc.build_model(config)
    with pytest.raises(LayerError, match=r"^kernelsel: DeepseekV32Attention layer 0: top-k sparse attention \(indices="):
        _forward(model, "kernelsel-reference", torch.randint(0, 64, (1, 8)))


def test_deepseek_v4_compressor_layers_are_refused():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    from selector.integrations.transformers.layers import refuse_unsupported

    config = transformers.DeepseekV4Config(
        hidden_size=64, num_attention_heads=4, head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        index_n_heads=2, index_head_dim=16, index_topk=4, num_hidden_layers=2, sliding_window=8,
        layer_types=["sliding_attention", "compressed_sparse_attention"], mlp_layer_types=["moe", "moe"])
    compressed = v4.DeepseekV4Attention(config, 1)
    with pytest.raises(LayerError, match=r"^kernelsel: DeepseekV4Attention layer 1: compressed KV \(DeepSeek-V4's "
                                         r"\w+Compressor layers\)"):
        refuse_unsupported(compressed, {})
    refuse_unsupported(v4.DeepseekV4Attention(config, 0), {})  # the sliding-only layers are not refused


def test_paged_function_without_a_paged_cache_is_refused(reference_backend):
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping["paged|kernelsel-reference"]
    module = mc.build_model(mc.tiny_config("llama")).model.layers[0].self_attn
    q = torch.zeros(1, 4, 2, 64)
    with pytest.raises(LayerError, match=r"'paged\|kernelsel-reference' was called without transformers' paged cache"):
        fn(module, q, q[:, :2], q[:, :2], None, scaling=0.125)


def test_a_forced_kernel_that_cannot_serve_a_layer_is_an_error_not_a_fallback(tiny_model):
    import selector.integrations.transformers as ks

    ks.register("kernelsel-forced", solution="reference", kernels={"mha_decode": "triton-mha-decode"})
    try:
        model = tiny_model("llama")  # float32: the Triton kernel takes bf16/fp16 only
        with mc.attention(model, "kernelsel-forced"), torch.no_grad(), pytest.raises(LayerError) as err:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
        assert re.search(r"^kernelsel: LlamaAttention layer 0: .*triton-mha-decode", str(err.value), re.S)
        assert "q_dtype fp32 not in [bf16, fp16]" in str(err.value)
    finally:
        ks.unregister("kernelsel-forced")


def test_register_rejects_names_transformers_gives_meaning_to():
    import selector.integrations.transformers as ks

    for bad in ("paged|x", "my_flash", "sdpa2", ""):
        with pytest.raises(LayerError, match="register: name"):
            ks.register(bad)
    with pytest.raises(Exception, match="kernels: 'mha_decod' is not an op"):
        ks.register("kernelsel-bad", kernels={"mha_decod": "x"})
