"""Continuous-batching decode over transformers' physical paged cache: in place, no gather, same tokens as eager."""

from __future__ import annotations

import copy

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROTOCOL_B = ("transformers >= 5.19 calls cache.update (which gathers every key) before the attention function, "
              "so there is no gather left for kernelsel to avoid")


def test_block_table_pages_hold_the_rows_read_index_names():
    from selector.integrations.transformers.paged_cache import block_table

    # request 0: 5 keys on physical pages 3 and 1 (page size 4); request 1: 2 keys on page 6
    rows = [12, 13, 14, 15, 4, 24, 25]
    table = block_table(torch.tensor(rows), torch.tensor([0, 5, 7], dtype=torch.int32), max_keys=5, page_size=4)
    assert table.dtype == torch.int32
    assert table.tolist() == [[3, 1], [6, 6]]  # a request's unused columns repeat its last page


class _Spy:
    """Wraps a registered ``paged|`` attention function: per decode call of a full-attention layer, the keys and
    values transformers gathers for it, and what ``paged_cache`` addresses in the physical cache instead."""

    def __init__(self, model, name):
        from transformers import AttentionInterface

        self.name, self.checked, self.cache = name, 0, None
        self.original = AttentionInterface._global_mapping[name]
        AttentionInterface._global_mapping[name] = self
        self.hook = model.register_forward_pre_hook(self._remember_cache, with_kwargs=True)

    def _remember_cache(self, module, args, kwargs):
        self.cache = kwargs.get("cache", self.cache)

    def close(self):
        from transformers import AttentionInterface

        AttentionInterface._global_mapping[self.name] = self.original
        self.hook.remove()

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from selector.integrations.transformers import paged_cache

        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        if isinstance(cu_k, dict):
            cu_k = cu_k["full_attention"] if "full_attention" in cu_k else None
        pages = paged_cache.layer_pages(self.cache, module.layer_idx)
        decode = bool(((cu_q[1:] - cu_q[:-1]) == 1).all())
        if pages is not None and cu_k is not None and decode and kwargs["read_index"][pages.group].numel():
            if "cache" in kwargs:  # 5.17-5.18: transformers' own write and gather (writing the same keys twice is a no-op)
                keys, values = kwargs["cache"].update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                                                      read_index=kwargs["read_index"], write_index=kwargs["write_index"])
            else:  # >= 5.19: the model gathered them before this call
                keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)
            counts = (cu_k[1:] - cu_k[:-1]).tolist()
            read = kwargs["read_index"][pages.group]
            table = paged_cache.block_table(read, cu_k.to(torch.int32), max(counts), pages.page_size)
            b = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            t = torch.cat([torch.arange(n) for n in counts])
            page, slot = table[b, t // pages.page_size].long(), t % pages.page_size
            assert torch.equal(pages.k_pages[page, slot], keys[: len(b)])
            assert torch.equal(pages.v_pages[page, slot], values[: len(b)])
            self.checked += 1
        return self.original(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_block_table_reads_exactly_the_keys_transformers_gathers(arch, tiny_model, reference_backend,
                                                                 lift_continuous_batching_check):
    """On every transformers release: page ``j`` of request ``b`` through ``layer_pages`` + ``block_table`` holds
    the keys and values transformers' own ``cache.update`` gathers for it, on the real paged cache."""
    model = tiny_model(arch)
    name = mc.continuous_batching_name("kernelsel-reference")
    spy = _Spy(model, name)
    try:
        seqs = mc.generate_batch(model, "kernelsel-reference", mc.prompts(), 4, page_size=4)
    finally:
        spy.close()
    assert all(seqs)
    full_layers = 2 if arch == "llama" else 1  # qwen3's second layer slides: its ring buffer is gathered
    assert spy.checked >= 3 * full_layers  # every decode step, every full-attention layer


@pytest.mark.skipif(mc.refuses_custom_continuous_batching(), reason=PROTOCOL_B)
@pytest.mark.parametrize("solution", ["reference", "triton"])
def test_decode_reads_the_physical_cache_in_place(solution, tiny_model, reference_backend, triton_backend, monkeypatch):
    """transformers 5.17-5.18: in every decode call the kernel gets the cache tensors' own pages (same storage,
    page size = block size), ``cache.update`` only writes (empty read index), nothing is gathered, and the
    tokens pass the rule of ``model_conformance`` against float32 eager."""
    from transformers import AttentionInterface
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    from registry.adapters.reference import TorchMHADecode
    from registry.adapters.triton import TritonMHADecode

    backend = reference_backend if solution == "reference" else triton_backend
    name = f"kernelsel-{solution}"
    dtype = torch.float32 if solution == "reference" else torch.bfloat16
    model = tiny_model("llama") if dtype == torch.float32 else copy.deepcopy(tiny_model("llama")).to(dtype)
    events: list = []  # what happened inside the current attention call

    adapter = TorchMHADecode if solution == "reference" else TritonMHADecode
    run = adapter.run
    monkeypatch.setattr(adapter, "run", lambda self, q, k, v, **kw: events.append(("run", k, v)) or run(self, q, k, v, **kw))
    update = PagedAttentionCache.update

    def recording_update(self, *args, **kwargs):
        events.append(("update", sum(r.numel() for r in kwargs["read_index"])))
        return update(self, *args, **kwargs)

    monkeypatch.setattr(PagedAttentionCache, "update", recording_update)
    index_select = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: events.append(("gather",)) or index_select(*a, **k))

    calls = []
    paged_name = mc.continuous_batching_name(name)
    attention = AttentionInterface._global_mapping[paged_name]

    def delimited(module, query, key, value, mask, **kwargs):
        events.clear()
        out = attention(module, query, key, value, mask, **kwargs)
        if query.shape[2] == kwargs["cu_seq_lens_q"].shape[0] - 1:  # one new token per request: a decode call
            cache = kwargs["cache"]
            storage = {t.untyped_storage().data_ptr() for t in (*cache.key_cache, *cache.value_cache)}
            calls.append({"events": [e[0] if e[0] != "update" else ("update", e[1]) for e in events],
                          "pages": [(k.untyped_storage().data_ptr() in storage, v.untyped_storage().data_ptr() in storage,
                                     tuple(k.shape[1:])) for e in events if e[0] == "run" for k, v in [e[1:]]]})
        return out

    monkeypatch.setitem(AttentionInterface._global_mapping, paged_name, delimited)
    backend.reset_counts()
    batch = mc.prompts()
    seqs = mc.generate_batch(model, name, batch, 4, page_size=8)
    assert all(seqs), seqs
    assert calls and backend.in_place_decodes() == {8: len(calls)}  # every decode call, pages of the block size
    assert sum(backend.kernels_used()["mha_decode"].values()) == len(calls)
    for call in calls:
        assert call["events"] == [("update", 0), "run"], call  # a write-only cache.update, no gather, the kernel
        assert call["pages"] == [(True, True, (8, 2, 64))], call  # views of the cache tensors: [S, Hkv, D] pages
    near_tie = 1e-4 if dtype == torch.float32 else mc.Tolerance.for_dtype(dtype, 0.05).near_tie
    assert not mc.greedy_violations(tiny_model("llama"), seqs, [len(p) for p in batch], near_tie)
