"""explain_model and `kernelsel model`: what each layer type runs, from a model or a config.json alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import selector.integrations.transformers as ks  # noqa: E402


def test_groups_follow_layer_types_and_specs():
    explanation = ks.explain_model(mc.tiny_config("gemma2"), device="cpu")
    assert [g.layers for g in explanation.groups] == [[0], [1]]
    sliding, full = explanation.groups
    assert (sliding.spec.window, sliding.spec.window_left, full.spec.window) == (6, 5, None)
    assert sliding.spec.soft_cap == 3.0 and sliding.spec.head_dim_qk == 256
    assert sliding.spec.sm_scale == pytest.approx(144 ** -0.5)  # query_pre_attn_scalar, not 1/sqrt(256)
    assert sliding.decode.name == "torch-mha-decode" and sliding.decode.request.sliding_window
    assert sliding.prompt.mode == "prewrite" and sliding.prompt.selection.name == "torch-mha-extend"
    text = explanation.explain()
    assert "sliding_window 6 (window_left 5), soft cap 3" in text and "layers 1 (1)" in text


def test_mla_layers_explain_absorbed_decode_and_unabsorbed_prompts():
    group, = ks.explain_model(mc.tiny_config("deepseek_v3"), device="cpu").groups
    assert group.spec.mla and group.decode.request.op.value == "mla_decode"
    assert group.decode.request.kv_lora_rank == 512
    assert group.prompt.selection.request.head_dim_qk == 128 and group.prompt.selection.request.num_kv_heads == 16


def test_a_loaded_model_explains_like_its_config(tiny_model):
    from_model = ks.explain_model(tiny_model("qwen3"), device="cpu").to_dict()
    from_config = ks.explain_model(mc.tiny_config("qwen3"), device="cpu", dtype="fp32").to_dict()
    assert from_model == from_config


def test_hypothetical_gpu_selects_the_vendor_kernels():
    from registry.loader import load_manifest
    from selector import Platform, Selector

    selector = Selector(load_manifest(), Platform.hypothetical("sm_90"))
    group, = ks.explain_model(mc.real_config("llama"), selector=selector).groups
    assert group.decode.kernel.solution.value in ("flashinfer", "xqa")
    assert group.prompt.mode == "postwrite"  # FA3 prefill, priority 12, on sm_90


def _config_file(tmp_path, arch="qwen3"):
    mc.tiny_config(arch).save_pretrained(tmp_path)
    return tmp_path / "config.json"


def test_cli_model_text_and_json(cli, tmp_path):
    path = _config_file(tmp_path)
    code, out, err = cli("model", path, "--arch", "sm_90")
    assert code == 0, err
    assert out.startswith("model     Qwen3ForCausalLM (qwen3): 2 attention layers")
    assert "platform  sm_90 (hypothetical" in out and "sliding_window 6 (window_left 5)" in out
    code, out, _ = cli("model", path, "--arch", "sm_90", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and [g["layers"] for g in data["groups"]] == [[0], [1]]
    assert data["groups"][1]["decode"]["request"]["sliding_window"] is True


def test_cli_model_no_kernel_exits_3(cli, tmp_path):
    path = _config_file(tmp_path)
    code, out, _ = cli("model", path, "--arch", "sm_90", "--kernel", "mha_decode=xqa-decode", "--dtype", "fp32")
    assert code == 3 and "no kernel" in out


@pytest.mark.parametrize("argv, message", [
    (["model", "{missing}"], r"^kernelsel model: CONFIG: .*does not exist"),
    (["model", "{notjson}", "--arch", "sm_90"], r"^kernelsel model: .*not JSON"),
    (["model", "{notype}", "--arch", "sm_90"], r"^kernelsel model: the config has no model_type"),
    (["model", "{good}", "--arch", "sm_90", "--kernel", "decode=x"], r"^kernelsel model: --kernel: 'decode=x' is not OP=NAME"),
    (["verify-model", "--arch", "lama"], r"^kernelsel verify-model: --arch: 'lama' is not one of .*did you mean 'llama'"),
])
def test_cli_bad_input_is_one_line(cli, tmp_path, argv, message):
    import re

    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "notype.json").write_text('{"hidden_size": 8}')
    good = _config_file(tmp_path)
    paths = {"missing": tmp_path / "missing.json", "notjson": tmp_path / "bad.json", "notype": tmp_path / "notype.json", "good": good}
    code, out, err = cli(*[a.format(**paths) for a in argv])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and re.search(message, err.strip()), err


def test_cli_verify_model_cpu_report(cli):
    code, out, err = cli("verify-model", "--arch", "mistral", "--no-generate-batch", "--json")
    assert code == 0, err
    report = json.loads(out)
    run, = report["results"]
    # 2 generate runs (unpadded, left-padded) x 5 decode steps (6 new tokens, the first from the prompt) x 2 layers
    assert run["passed"] and run["kernels"]["mha_decode"] == {"torch-mha-decode": 2 * 5 * 2}


def test_cli_verify_model_writes_out_after_every_run(cli, tmp_path, monkeypatch):
    """A long GPU run stopped by a time limit keeps what it checked: --out holds the report after each run."""
    from selector.tools import model_conformance as mc

    seen = []
    real = mc.verify_models

    def spy(*args, on_result=None, **kwargs):
        def record(report):
            seen.append(json.loads((tmp_path / "r.json").read_text()) if (tmp_path / "r.json").exists() else None)
            on_result(report)
            seen.append(json.loads((tmp_path / "r.json").read_text()))
        return real(*args, on_result=record, **kwargs)

    monkeypatch.setattr(mc, "verify_models", spy)
    code, out, err = cli("verify-model", "--arch", "mistral", "--no-generate-batch", "--page-size", "16,8",
                         "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    assert [None if r is None else (r["complete"], len(r["results"])) for r in seen] == [
        None, (False, 1), (False, 1), (False, 2)]
    final = json.loads((tmp_path / "r.json").read_text())
    assert final["complete"] and [r["page_size"] for r in final["results"]] == [16, 8] and final["passed"] == 2
    assert "verify-model: pass mistral page_size=8 selected" in err


def test_importing_the_integration_imports_neither_torch_nor_transformers():
    probe = ("import sys, selector.integrations.transformers\n"
             "print(','.join(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
