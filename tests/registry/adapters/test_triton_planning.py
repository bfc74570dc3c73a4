"""Launch planning of the Triton kernels: which tile shape and split count a request gets (pure Python)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from registry.adapters.triton_kernels import planning  # noqa: E402
from registry.variants import LaunchEnv  # noqa: E402
from registry.vocab import Arch  # noqa: E402

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


H200 = LaunchEnv(arch=Arch.SM_90, versions={"triton": "3.6.0"})


def mla_request(**fields):
    """What ``mla_variant`` reads of a request: DeepSeek-style MLA decode, bf16."""
    base = dict(q_dtype="bf16", kv_dtype="bf16", kv_lora_rank=512, qk_rope_head_dim=64, num_qo_heads=128, q_len=1)
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize("heads,q_len,want", [(128, 1, "hopper"), (64, 1, "hopper"), (16, 4, "hopper"),
                                              (32, 1, "portable"), (16, 1, "portable")])
def test_mla_uses_the_hopper_kernel_from_one_full_row_tile(heads, q_len, want):
    choice = planning.mla_variant(mla_request(num_qo_heads=heads, q_len=q_len), H200, q_len=q_len)
    assert choice.name == want
    if want == "portable":
        assert choice.passed_over == (("hopper", (f"{heads * q_len} rows per request (q_len {q_len} x {heads} heads) < 64",)),)


def test_the_hopper_config_is_one_warpgroup_tile_pair():
    cfg = planning.mla_config(128, hopper=True)
    assert (cfg.kernel, cfg.block_m, cfg.num_warps) == ("hopper", 64, 8)


def test_mla_without_hopper_keeps_the_portable_kernel():
    assert planning.mla_config(128).kernel == "portable"
    assert planning.mla_config(128, hopper=False) == planning.mla_config(128)


@pytest.mark.parametrize("fields,why", [
    (dict(kv_dtype="fp8_e4m3"), "kv_dtype fp8_e4m3: needs a 16-bit cache of the query's dtype (bf16)"),
    (dict(kv_dtype="fp16"), "kv_dtype fp16: needs a 16-bit cache of the query's dtype (bf16)"),
    (dict(q_dtype="fp32", kv_dtype="fp32"), "kv_dtype fp32: needs a 16-bit cache"),
    (dict(kv_lora_rank=576), "kv_lora_rank 576, qk_rope_head_dim 64: its layouts need a power-of-two rank in 64..512"),
    (dict(kv_lora_rank=1024), "kv_lora_rank 1024, qk_rope_head_dim 64: its layouts need"),
    (dict(qk_rope_head_dim=48), "kv_lora_rank 512, qk_rope_head_dim 48: its layouts need"),
], ids=["fp8-cache", "other-16-bit-cache", "fp32", "rank-not-pow2", "rank-past-one-mma", "rope-not-pow2"])
def test_hopper_mla_is_refused_outside_its_shapes(fields, why):
    choice = planning.mla_variant(mla_request(**fields), H200, q_len=1)
    assert choice.name == "portable"
    assert choice.passed_over[0][1][0].startswith(why)


@pytest.mark.parametrize("arch", [None] + list(Arch))
def test_hopper_mla_needs_sm_90(arch):
    choice = planning.mla_variant(mla_request(), LaunchEnv(arch=arch, versions={"triton": "3.6.0"}), q_len=1)
    assert choice.name == ("hopper" if arch is Arch.SM_90 else "portable")
    if arch is None:
        assert "no CUDA device" in choice.describe()


@pytest.mark.parametrize("version,want", [("3.5.1", "portable"), ("3.2.0", "portable"), ("3.6.0", "hopper"),
                                          ("3.9.0+git1a2b", "hopper")])
def test_gluon_kernel_needs_the_triton_it_was_built_for(version, want):
    choice = planning.mla_variant(mla_request(), LaunchEnv(arch=Arch.SM_90, versions={"triton": version}), q_len=1)
    assert choice.name == want


def test_a_hypothetical_platform_assumes_the_triton_it_needs():
    choice = planning.mla_variant(mla_request(), LaunchEnv(arch=Arch.SM_90, assumed=True))
    assert choice.name == "hopper" and "triton >= 3.6 assumed (hypothetical platform)" in choice.why


@pytest.mark.parametrize("fields,env,depends_on", [
    (dict(num_qo_heads=None), H200, ("num_qo_heads",)),
    (dict(kv_lora_rank=None), H200, ("kv_lora_rank",)),
    (dict(num_qo_heads=16, q_len=8), H200, ("the plan's q_len",)),
    (dict(), LaunchEnv(arch=Arch.SM_90), ("the installed triton",)),
])
def test_a_choice_the_request_cannot_settle_says_what_it_depends_on(fields, env, depends_on):
    choice = planning.mla_variant(mla_request(**fields), env)
    assert choice.variant is None and choice.depends_on == depends_on
    assert (choice.candidate, choice.otherwise.variant) == (planning.HOPPER_MLA, planning.PORTABLE_MLA)


def test_a_failed_condition_settles_the_choice_even_when_another_is_undecided():
    choice = planning.mla_variant(mla_request(num_qo_heads=None, kv_dtype="fp8_e4m3"), H200)
    assert choice.name == "portable" and choice.depends_on == ()


def test_tuning_can_force_the_portable_kernel():
    choice = planning.mla_variant(mla_request(), H200, q_len=1, forced="portable")
    assert choice.name == "portable" and choice.passed_over == (("hopper", ("tuning kernel='portable'",)),)


def test_plan_launches_what_explain_shows(monkeypatch):
    """``TritonMLADecode.plan()`` and ``launch_variant`` (explain) are one decision; a Gluon module that does not
    import disables the Hopper kernel for the process, and explain then says so."""
    torch = pytest.importorskip("torch")
    from registry.adapters.triton import TritonMLADecode
    from registry.contracts import DecodeMetadata

    monkeypatch.setattr(planning, "hopper_mla_disabled", None)
    monkeypatch.setattr(planning, "device_env", lambda device: H200)
    monkeypatch.setattr(planning, "_gluon_import_problem", lambda: None)
    request = SimpleNamespace(op="mla_decode", page_size=4, qk_nope_head_dim=128, sinks=False, sliding_window=False,
                              logits_soft_cap=False, return_lse=False, **vars(mla_request()))
    spec = SimpleNamespace(name="triton-mla-decode", op="mla_decode")
    metadata = DecodeMetadata(block_table=torch.arange(4, dtype=torch.int32).view(2, 2),
                              seq_lens=torch.tensor([5, 8], dtype=torch.int32))
    adapter = TritonMLADecode(spec, request)
    adapter.plan(metadata)
    assert adapter.cfg.kernel == "hopper"
    assert adapter.variant == TritonMLADecode.launch_variant(request, H200)

    monkeypatch.setattr(planning, "_gluon_import_problem", lambda: "the Gluon Hopper API does not import (ImportError: x)")
    adapter.plan(metadata)
    assert adapter.cfg.kernel == "portable"
    assert adapter.variant == TritonMLADecode.launch_variant(request, H200)
    assert "disabled in this process: the Gluon Hopper API does not import" in adapter.variant.describe()


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
    later = planning.mla_variant(mla_request(), H200, q_len=1)
    assert later.name == "portable" and "disabled in this process: OutOfResources" in later.describe()




@pytest.mark.parametrize("tuning,env,want", [
    ({"kernel": "portable"}, H200, "portable"),
    ({"kernel": "hopper"}, LaunchEnv(arch=None, versions={"triton": "3.6.0"}), "portable"),  # no forcing past the decision
    ({"kernel": "hopper", "num_splits": 2}, H200, "hopper"),
])
def test_tuning_kernel_goes_through_the_decision(monkeypatch, tuning, env, want):
    torch = pytest.importorskip("torch")
    from registry.adapters.triton import TritonMLADecode
    from registry.contracts import DecodeMetadata

    monkeypatch.setattr(planning, "hopper_mla_disabled", None)
    monkeypatch.setattr(planning, "device_env", lambda device: env)
    monkeypatch.setattr(planning, "_gluon_import_problem", lambda: None)
    request = SimpleNamespace(op="mla_decode", page_size=4, qk_nope_head_dim=128, sinks=False, sliding_window=False,
                              logits_soft_cap=False, return_lse=False, **vars(mla_request()))
    adapter = TritonMLADecode(SimpleNamespace(name="triton-mla-decode", op="mla_decode"), request, tuning=tuning)
    adapter.plan(DecodeMetadata(block_table=torch.arange(4, dtype=torch.int32).view(2, 2),
                                seq_lens=torch.tensor([5, 8], dtype=torch.int32)))
    assert adapter.cfg.kernel == adapter.variant.name == want
