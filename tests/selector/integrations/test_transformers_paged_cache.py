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
    """transformers 5.17-5.18: on decode steps the adapter gets the cache tensor's own pages (same storage, page
    size = block size), ``cache.update`` only writes (empty read index), nothing is gathered, tokens equal eager's."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    backend = reference_backend if solution == "reference" else triton_backend
    name = f"kernelsel-{solution}"
    model = tiny_model("llama")
    updates, runs, gathers = [], [], []
    update = PagedAttentionCache.update

    def recording_update(self, *args, **kwargs):
        reads = kwargs.get("read_index", args[3] if len(args) > 3 else None)
        updates.append(sum(r.numel() for r in reads))
        return update(self, *args, **kwargs)

    monkeypatch.setattr(PagedAttentionCache, "update", recording_update)
    real_select = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: gathers.append(a[0].shape) or real_select(*a, **k))
    dtype = torch.float32 if solution == "reference" else torch.bfloat16
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)

    from selector.integrations.transformers import paged

    in_place = paged._decode_in_place

    def recording_decode(backend_, module, spec, cache, pages, batch, *rest):
        storage = {t.untyped_storage().data_ptr() for t in (*cache.key_cache, *cache.value_cache)}
        before = (len(gathers), len(updates))
        out = in_place(backend_, module, spec, cache, pages, batch, *rest)
        runs.append(dict(k_in_cache=pages.k_pages.untyped_storage().data_ptr() in storage,
                         v_in_cache=pages.v_pages.untyped_storage().data_ptr() in storage,
                         page_size=pages.page_size, page=tuple(pages.k_pages.shape[1:]),
                         gathers=len(gathers) - before[0], reads=updates[before[1]:]))
        return out

    monkeypatch.setattr(paged, "_decode_in_place", recording_decode)
    backend.reset_counts()
    batch = mc.prompts()
    seqs = mc.generate_batch(model, name, batch, 4, page_size=8)
    assert all(seqs), seqs
    assert runs and len(runs) == sum(backend.kernels_used()["mha_decode"].values())  # every decode call ran in place
    for run in runs:
        assert run["k_in_cache"] and run["v_in_cache"], run  # views of transformers' cache tensors, not copies
        assert run["page_size"] == 8 and run["page"] == (8, 2, 64), run  # pages of the block size, [S, Hkv, D]
        assert run["gathers"] == 0 and run["reads"] == [0], run  # one write-only cache.update, nothing gathered
    near_tie = 1e-4 if dtype == torch.float32 else mc.Tolerance.for_dtype(dtype, 0.05).near_tie
    assert not mc.greedy_violations(tiny_model("llama"), seqs, [len(p) for p in batch], near_tie)
