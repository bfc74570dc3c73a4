"""The decode-loop example runs end to end on CPU through the reference kernel."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "decode_loop.py"


@pytest.fixture(scope="module")
def decode_loop():
    spec = importlib.util.spec_from_file_location("decode_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_three_steps_on_cpu_grow_the_paged_cache(decode_loop):
    cfg = decode_loop.Config(batch=3, page_size=2)
    selection, tokens, cache = decode_loop.generate(cfg, steps=3, device="cpu")
    assert selection.kernel.solution.value == "reference"
    assert tokens.shape == (3, 4)
    assert cache.seq_lens.tolist() == [3, 3, 3]
    used = cache.block_table[:, :2]  # 3 tokens in pages of 2: two pages each, none shared
    assert len(set(used.flatten().tolist())) == 6
    again = decode_loop.generate(cfg, steps=3, device="cpu")[1]
    assert torch.equal(tokens, again)


def test_main_prints_one_line_per_request(decode_loop, capsys):
    assert decode_loop.main(["--device", "cpu", "--steps", "3", "--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("request 0: [") and lines[0].endswith("(cache 3 tokens)")
