"""``kernelsel tune --model``: a Hugging Face config's layer kinds, the buckets to tune, what tuning changes."""

from __future__ import annotations

import json
import re

import pytest

from registry.errors import KernelselError
from registry.loader import load_manifest, load_perf_table
from registry.vocab import Arch
from selector import Platform, Selector
from selector.overrides import Overrides
from selector.tools import tune as tune_module
from selector.tools.cli import main
from selector.tools.model_config import read_model_config
from selector.tuning import TuneBudget, TuneCache, TuneResult

LLAMA = {"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
         "num_hidden_layers": 32}
GEMMA2 = {"model_type": "gemma2", "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
          "hidden_size": 3584, "sliding_window": 4096, "attn_logit_softcapping": 50.0, "num_hidden_layers": 42}
QWEN3 = {"model_type": "qwen3", "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
         "sliding_window": 4096, "use_sliding_window": True, "num_hidden_layers": 4,
         "layer_types": ["sliding_attention", "full_attention", "full_attention", "full_attention"]}
GPT_OSS = {"model_type": "gpt_oss", "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
           "sliding_window": 128, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
DEEPSEEK = {"model_type": "deepseek_v3", "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512,
            "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "num_hidden_layers": 61}


def write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_layer_kinds_of_real_configs(tmp_path):
    (llama,) = read_model_config(write(tmp_path, LLAMA)).kinds
    assert llama.fields == {"head_dim_qk": 128, "num_qo_heads": 32, "num_kv_heads": 8} and not llama.mla
    (tp8,) = read_model_config(write(tmp_path, LLAMA), tp=8).kinds
    assert tp8.fields["num_qo_heads"] == 4 and tp8.fields["num_kv_heads"] == 1
    (tp16,) = read_model_config(write(tmp_path, {**LLAMA, "num_attention_heads": 64}), tp=16).kinds
    assert tp16.fields["num_kv_heads"] == 1  # fewer KV heads than GPUs: each GPU keeps one (replicated)
    gemma = read_model_config(write(tmp_path, GEMMA2)).kinds
    assert [k.name for k in gemma] == ["sliding window", "full attention"]
    assert gemma[0].fields == {"head_dim_qk": 256, "num_qo_heads": 16, "num_kv_heads": 8, "logits_soft_cap": True,
                               "sliding_window": True}
    qwen = read_model_config(write(tmp_path, QWEN3)).kinds
    assert [(k.name, k.layers, k.fields.get("sliding_window", False)) for k in qwen] == [
        ("sliding window", 1, True), ("full attention", 3, False)]
    assert read_model_config(write(tmp_path, {**QWEN3, "use_sliding_window": False})).kinds[0].fields.get(
        "sliding_window") is None  # layer_types name it, the config switches it off
    oss = read_model_config(write(tmp_path, GPT_OSS)).kinds
    assert all(k.fields["sinks"] and k.fields["head_dim_qk"] == 64 for k in oss)
    (mla,) = read_model_config(write(tmp_path, DEEPSEEK), tp=8).kinds
    assert mla.mla and mla.fields == {"num_qo_heads": 16, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                      "qk_nope_head_dim": 128}
    vlm = {"model_type": "llava", "text_config": LLAMA}
    assert read_model_config(write(tmp_path, vlm)).kinds[0].fields["num_kv_heads"] == 8


@pytest.mark.parametrize(
    "config, tp, message",
    [
        ("not json", 1, r"config\.json: not JSON"),
        ([1, 2], 1, r"config\.json: expected a Hugging Face config\.json \(an object\)"),
        ({"model_type": "x"}, 1, r"num_attention_heads: expected a positive integer, got None"),
        ({**LLAMA, "num_key_value_heads": 5}, 1, r"num_key_value_heads: 5 does not divide num_attention_heads 32"),
        (LLAMA, 3, r"--tp 3: 32 query heads do not split evenly over 3 GPUs"),
    ],
)
def test_bad_configs_are_named(tmp_path, config, tp, message):
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(KernelselError, match=message):
        read_model_config(path, tp=tp)


def test_the_plan_covers_each_op_of_each_kind_once_per_bucket(tmp_path):
    model = read_model_config(write(tmp_path, QWEN3))
    plan = tune_module.plan_requests(model, "sm_90", q_dtype="bf16", kv_dtype=None, page_size=None, batches=[1, 8],
                                     kv_lens=[1024, 4096], new_lens=[512, 2048], ops=["mha_decode", "mha_extend"])
    decode = [r for _, r in plan if r.op.value == "mha_decode"]
    extend = [r for _, r in plan if r.op.value == "mha_extend"]
    assert len(decode) == 2 * 2 * 2  # two layer kinds (the window is a feature: a request of its own)
    assert len(extend) == 2 * (2 * 1 + 2 * 2)  # new_len 2048 does not fit kv_len 1024
    assert all(r.page_size == 16 for _, r in plan) and len(set(r for _, r in plan)) == len(plan)
    mla = tune_module.plan_requests(read_model_config(write(tmp_path, DEEPSEEK)), "sm_90", q_dtype="bf16",
                                    kv_dtype=None, page_size=None, batches=[1], kv_lens=[1024], new_lens=[64],
                                    ops=["mha_decode", "mha_extend"])
    assert [(k, r.op.value, r.page_size) for k, r in mla] == [("MLA", "mla_decode", 64)]


def test_tuning_records_times_and_reports_what_changed(tmp_path, monkeypatch):
    """A fake tuner that finds the lowest-priority kernel fastest: the selection changes, and a rerun tunes nothing."""
    manifest = load_manifest()
    platform = Platform.hypothetical("sm_90")
    calls = []

    def fake_tune(request, names, build, **kw):
        calls.append(request)
        by_priority = [k.name for k in Selector(manifest, platform).solve(request).eligible]
        return TuneResult(request, times={n: 10.0 + by_priority[::-1].index(n) for n in names})

    monkeypatch.setattr(tune_module, "tune", fake_tune)
    plan = tune_module.plan_requests(read_model_config(write(tmp_path, LLAMA)), "sm_90", q_dtype="bf16", kv_dtype=None,
                                     page_size=None, batches=[8], kv_lens=[4096], new_lens=[512], ops=["mha_decode"])
    cache = TuneCache.for_machine("NVIDIA H200", Arch.SM_90, {"torch": "x"}, directory=tmp_path / "cache")

    def make(table):
        return Selector(manifest, platform, Overrides(), table)

    report = tune_module.run_tune(plan, make, None, cache, device="cpu", budget=TuneBudget(), method="fake")
    (row,) = report.rows
    lowest = make(None).solve(plan[0][1]).eligible[-1].name
    assert row.before_how == "priority" and row.after == lowest and row.after_how == "measured" and row.changed
    assert load_perf_table(cache.path).entries[0].median_us[lowest] == 10.0
    lines = tune_module.summary_lines(report)
    assert re.match(r"tuned 1 of 1 requests in [\d.]+ s \(1 selections changed\); tuned table: .*\.yaml$", lines[0])
    assert lines[1].startswith("  full attention: op=mha_decode") and f"-> {lowest} (measured, 10.0 us)" in lines[1]
    again = tune_module.run_tune(plan, make, None, cache, device="cpu", budget=TuneBudget(), method="fake")
    assert len(calls) == 1 and again.rows[0].skipped == "already measured" and not again.rows[0].changed
    dry = tune_module.run_tune(plan[:1], make, None, TuneCache.for_machine("x", Arch.SM_90, {}, tmp_path / "c2"),
                               device="cpu", budget=TuneBudget(), method="fake", dry_run=True)
    assert dry.rows[0].skipped == "dry run" and len(calls) == 1


def test_cli_tunes_a_model_on_the_cpu_with_the_reference_kernels(tmp_path, capsys):
    pytest.importorskip("torch")
    config = write(tmp_path, {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2,
                              "hidden_size": 256})
    args = ["tune", "--model", str(config), "--device", "cpu", "--arch", "sm_90", "--batch", "1,2", "--kv-len", "32",
            "--new-len", "8", "--solution", "reference", "--cache-dir", str(tmp_path / "cache"), "--budget-ms", "5"]
    main(args)
    out = capsys.readouterr().out
    assert out.startswith("tuned 4 of 4 requests in ")
    (table_path,) = (tmp_path / "cache").glob("cpu-sm_90-*.yaml")
    table = load_perf_table(table_path)
    assert sorted((e.op.value, e.shape["batch_size"]) for e in table.entries) == [
        ("mha_decode", 1), ("mha_decode", 2), ("mha_extend", 1), ("mha_extend", 2)]
    assert "tuned on first use (5 ms of timing per bucket" in table.method
    main(args + ["--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["tuned"] == 0 and {r["skipped"] for r in report["rows"]} == {"already measured"}
    assert {r["before_ranked_by"] for r in report["rows"]} == {"measured"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ops", "prefill"], r"--ops: 'prefill': expected decode, extend or decode,extend"),
        (["--batch", "0"], r"--batch: 0 is not a positive integer"),
        (["--tp", "3"], r"--model: --tp 3: 32 query heads do not split evenly over 3 GPUs"),
    ],
)
def test_cli_tune_bad_input_is_one_line(tmp_path, capsys, extra, message):
    config = write(tmp_path, LLAMA)
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--model", str(config), "--device", "cpu", "--arch", "sm_90", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_explain_on_this_gpu_ranks_by_what_it_tuned(tmp_path, monkeypatch, capsys):
    """What ``kernelsel tune`` (or tuning on first use) measured here is what explain shows, as the runtime ranks."""
    pytest.importorskip("torch", reason="explain on this GPU ranks installed kernels: torch's references at least")
    from selector import KernelRequest
    from selector.platform import GPU_SOURCES, NVIDIA_SMI, Gpu, installed_versions, required_distributions
    from selector.tuning import software_key

    manifest = load_manifest()
    monkeypatch.setitem(GPU_SOURCES, NVIDIA_SMI, lambda: ((Gpu("NVIDIA H200", "", Arch.SM_90),), ""))
    monkeypatch.setenv("KERNELSEL_TUNE_CACHE", str(tmp_path))
    here = Platform(arch=Arch.SM_90, libraries=installed_versions(required_distributions(manifest.solutions)))
    request = KernelRequest(op="mha_decode", arch="sm_90", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
                            page_size=16, batch_size=8, kv_len=3000)
    eligible = [k.name for k in Selector(manifest, here).solve(request).eligible]
    last = eligible[-1]
    TuneCache.for_machine("NVIDIA H200", Arch.SM_90, software_key(here), tmp_path).add(
        [TuneResult(request, times={n: (1.0 if n == last else 50.0) for n in eligible})], "tuned here")
    main(["explain", "--op", "mha_decode", "--head-dim", "128", "--num-qo-heads", "32", "--num-kv-heads", "8",
          "--page-size", "16", "--batch-size", "8", "--kv-len", "3000"])
    out = capsys.readouterr().out
    assert re.search(rf"^selected  {re.escape(last)} ", out, re.M)
    assert re.search(rf"^  ok  {re.escape(last)} .* 1\.0 us$", out, re.M)  # the tuned time, not the committed one
    assert re.search(r"^perf      .*nvidia-h200-sm_90\.yaml \+ .*nvidia-h200-sm_90-\w+\.yaml, NVIDIA H200 \(measured", out, re.M)


@pytest.mark.gpu
def test_tuning_on_first_use_on_the_gpu(tmp_path):
    """On a GPU: a miss times every eligible kernel within the budget, the selection ranks by those times, the
    tuned table holds them, and a second selector (a later process) ranks by them without timing."""
    import time

    import torch

    from registry.perf_policy import choose_perf_table
    from selector import KernelRequest
    from selector.platform import detect_platform, required_distributions
    from selector.tuning import TuneSettings

    manifest = load_manifest()
    platform = detect_platform(required_distributions(manifest.solutions))
    settings = TuneSettings(cache_dir=tmp_path)
    request = KernelRequest(op="mha_decode", q_dtype="bf16", head_dim_qk=128, num_qo_heads=24, num_kv_heads=3,
                            page_size=16, batch_size=8, kv_len=4096)  # a head configuration no table holds
    tuner = Selector(manifest, platform, tune=True, tune_settings=settings,
                     perf=choose_perf_table(None, torch.cuda.get_device_name(), platform.arch).table)
    started = time.perf_counter()
    sel = tuner.select(request)
    assert set(sel.measured) == {k.name for k in sel.eligible}, sel.explain()
    assert sel.kernel.name == min(sel.measured, key=sel.measured.get)
    (table_file,) = tmp_path.glob("*.yaml")
    assert load_perf_table(table_file).entries[0].median_us == sel.measured
    later = Selector(manifest, platform, tuned_tables=True, tune_settings=settings)
    assert later.select(request).measured == sel.measured
    print(f"tuned {len(sel.measured)} kernels in {time.perf_counter() - started:.2f} s (first calls included)")
