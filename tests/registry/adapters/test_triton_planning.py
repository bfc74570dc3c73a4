"""Launch planning of the Triton kernels: which tile shape and split count a request gets (pure Python)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from registry.adapters.triton_kernels import planning  # noqa: E402

H200_SMS = 132


def test_fp8_decode_with_enough_work_uses_one_warp_per_16_rows():
    cfg = planning.mha_config(4, 128, 128, kv_bytes=1, work_items=lambda bm: 64 * 8)
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (16, 64, 1, 1)
    assert cfg.split_waves == 8


def test_fp8_decode_warps_follow_the_row_tile():
    cfg = planning.mha_config(32, 128, 128, kv_bytes=1, work_items=lambda bm: 1024)
    assert (cfg.block_m, cfg.num_warps) == (32, 2)


def test_fp8_decode_with_little_work_keeps_the_wide_tile():
    cfg = planning.mha_config(4, 128, 128, kv_bytes=1, work_items=lambda bm: 8)  # B=1, 8 KV heads
    assert (cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.split_waves) == (128, 4, 2, None)


@pytest.mark.parametrize("kv_bytes,head_dim", [(2, 128), (1, 256)])
def test_other_caches_are_unchanged(kv_bytes, head_dim):
    cfg = planning.mha_config(4, head_dim, head_dim, kv_bytes=kv_bytes, work_items=lambda bm: 4096)
    assert cfg.num_warps == 4 and cfg.split_waves is None


@pytest.mark.parametrize("batch,context,want", [(1, 32768, 64), (8, 4096, 16), (64, 4096, 2), (256, 4096, 1), (64, 512, 2)])
def test_fp8_split_counts_match_the_h200_sweep(batch, context, want):
    """The counts chosen at 8 waves (bench/results/triton_fp8_sweep-h200.json: each within 6% of the best)."""
    got = planning.kv_splits(batch * 8, context, H200_SMS, block_n=64, **{**planning.MHA_SPLITS, "waves": 8})
    assert got == want


def test_adapter_plan_applies_the_config_and_its_waves():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from registry.adapters.triton import TritonMHADecode
    from registry.contracts import DecodeMetadata

    request = SimpleNamespace(
        op="mha_decode", q_dtype="bf16", kv_dtype="fp8_e4m3", out_dtype=None, head_dim_qk=128, head_dim_vo=128,
        num_qo_heads=32, num_kv_heads=8, page_size=16, q_len=1, sinks=False, sliding_window=False,
        logits_soft_cap=False, return_lse=False, non_causal=False,
    )
    adapter = TritonMHADecode(SimpleNamespace(name="triton-mha-decode", op="mha_decode"), request)
    batch, pages = 64, 4
    adapter.plan(DecodeMetadata(block_table=torch.arange(batch * pages, dtype=torch.int32).view(batch, pages),
                                seq_lens=torch.full((batch,), pages * 16, dtype=torch.int32)))
    assert adapter.cfg.num_warps == 1 and adapter.cfg.split_waves == 8
    # CPU stand-in: 4 SMs x 8 waves / 512 programs -> 1 split
    assert adapter.num_splits == 1


@pytest.mark.parametrize("rows,want", [(128, "hopper"), (64, "hopper"), (256, "hopper"), (32, "portable"), (16, "portable")])
def test_mla_uses_the_hopper_kernel_from_one_full_row_tile(rows, want):
    cfg = planning.mla_config(rows, hopper=True)
    assert cfg.kernel == want
    if want == "hopper":
        assert (cfg.block_m, cfg.num_warps) == (64, 8)


def test_mla_without_hopper_keeps_the_portable_kernel():
    assert planning.mla_config(128).kernel == "portable"
    assert planning.mla_config(128, hopper=False) == planning.mla_config(128)


@pytest.mark.parametrize("device,q,kv,rank,rope", [
    ("cpu", "bfloat16", "bfloat16", 512, 64),          # no GPU
    ("cuda", "bfloat16", "float8_e4m3fn", 512, 64),    # FP8 cache: portable kernel (fp16 operands)
    ("cuda", "bfloat16", "float16", 512, 64),          # cache dtype differs from the query's
    ("cuda", "float32", "float32", 512, 64),           # not 16-bit
    ("cuda", "bfloat16", "bfloat16", 576, 64),         # rank not a power of two
    ("cuda", "bfloat16", "bfloat16", 1024, 64),        # half the rank is wider than one warpgroup MMA
    ("cuda", "bfloat16", "bfloat16", 512, 48),         # rope not a power of two
])
def test_hopper_mla_is_refused_outside_its_shapes(device, q, kv, rank, rope):
    """Refused before any GPU query: these hold on a CPU-only machine too."""
    torch = pytest.importorskip("torch")
    assert not planning.hopper_mla_eligible(torch.device(device), getattr(torch, q), getattr(torch, kv), rank, rope)


def test_hopper_mla_needs_sm_90(monkeypatch):
    torch = pytest.importorskip("torch")
    for capability, want in (((9, 0), True), ((8, 0), False), ((10, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        monkeypatch.setattr(planning, "_gluon_hopper_importable", lambda: True)
        assert planning.hopper_mla_eligible(torch.device("cuda", 0), torch.bfloat16, torch.bfloat16, 512, 64) is want


def test_a_gluon_build_failure_falls_back_to_the_portable_kernel(monkeypatch, caplog):
    """A Triton whose Gluon API moved fails at compile time: logged once, the portable kernel runs, later plans skip it."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    import logging

    from triton.runtime.errors import OutOfResources

    from registry.adapters.triton_kernels import mla, mla_hopper

    calls = []

    def broken_launch(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(232448, 227 * 1024, "shared memory")

    monkeypatch.setattr(mla_hopper, "launch", broken_launch)
    monkeypatch.setattr(planning, "hopper_mla_disabled", None)
    gen = torch.Generator().manual_seed(0)
    heads, rank, rope, page, batch = 4, 64, 16, 4, 2
    kv = torch.randn(6, page, rank + rope, generator=gen).to(torch.float16)
    block_table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 12], dtype=torch.int32)
    q_nope = torch.randn(batch, heads, rank, generator=gen).to(torch.float16)
    q_pe = torch.randn(batch, heads, rope, generator=gen).to(torch.float16)

    def run(kernel):
        out = torch.empty(batch, heads, rank, dtype=torch.float16)
        mla.mla_decode(q_nope, q_pe, kv, block_table, seq_lens, out, None, q_len=1, sm_scale=0.1, window_left=-1,
                       soft_cap=0.0, sinks=None, q_scale=(1.0, None), kv_scale=(1.0, None), o_part=None,
                       lse_part=None, block_m=16, block_n=16, num_warps=4, num_stages=1, kernel=kernel)
        return out

    with caplog.at_level(logging.WARNING, logger="kernelsel"):
        fell_back = run("hopper")
        again = run("hopper")
    assert torch.equal(fell_back, run("portable")) and torch.equal(again, fell_back)
    assert len(calls) == 1, "the broken kernel is tried once per process"
    assert "OutOfResources" in planning.hopper_mla_disabled
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "portable Triton kernel" in caplog.records[0].message
    assert not planning.hopper_mla_eligible(torch.device("cuda", 0), torch.bfloat16, torch.bfloat16, 512, 64)


@pytest.mark.parametrize("version,want", [("3.5.1", False), ("3.2.0", False), ("3.6.0", True), ("3.9.0+git1a2b", True)])
def test_gluon_kernel_needs_the_triton_it_was_built_for(monkeypatch, version, want):
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    assert planning._gluon_hopper_importable.__wrapped__() is want
