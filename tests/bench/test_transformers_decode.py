"""bench/transformers_decode.py on the CPU: the step clock finds transformers' decode steps, the script refuses
without a GPU (its timed runs need one)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from selector.tools import model_conformance as mc  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("transformers_decode", ROOT / "bench" / "transformers_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reference_backend(monkeypatch):
    """kernelsel's torch reference kernels under a name of this module; transformers >= 5.19's refusal of other
    continuous-batching implementations lifted (a no-op ``switch_to_cb_friendly_attn``)."""
    import selector.integrations.transformers as ks

    if mc.refuses_custom_continuous_batching():
        from transformers.generation.continuous_batching import continuous_api

        monkeypatch.setattr(continuous_api.ContinuousBatchingManager, "switch_to_cb_friendly_attn",
                            lambda self, model, *args, **kwargs: None)
    yield ks.register("kernelsel-bench", solution="reference")
    ks.unregister("kernelsel-bench")


def test_step_clock_counts_the_decode_steps_of_generate_batch(reference_backend):
    import torch

    bench = _bench()
    model = mc.build_model(mc.tiny_config("llama"))
    clock = bench.StepClock()
    handle = model.register_forward_pre_hook(clock.hook, with_kwargs=True)
    try:
        batch = mc.prompts(count=3, lengths=(5, 6, 7))
        seqs = mc.generate_batch(model, "kernelsel-bench", batch, 6, max_batch_tokens=64)
    finally:
        handle.remove()
    assert all(seqs)
    kinds = [decode for _, decode, _ in clock.steps]
    assert kinds[0] is False and all(kinds[1:]), kinds  # one prompt step (all fit), then decode steps only
    assert [n for _, _, n in clock.steps] == [3] * len(kinds)
    phase = clock.decode_phase()
    assert phase["steps"] == len(kinds) - 2  # the last decode step has no end stamp
    assert phase["tokens"] == 3 * phase["steps"] and phase["tokens_per_s"] > 0
    starts = [t for t, _, _ in clock.steps]
    assert phase["seconds"] == pytest.approx(starts[-1] - starts[1], abs=1e-3)
    assert torch.is_grad_enabled()  # the hook leaves no global state behind


def test_without_a_gpu_it_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would run")
    assert _bench().main([]) == 2
    assert json.loads(capsys.readouterr().out) == {"error": "needs a CUDA GPU"}
