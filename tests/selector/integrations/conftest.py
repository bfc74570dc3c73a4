"""Fixtures of the transformers backend tests: registered backends and the tiny models, built once per session."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from selector.tools import model_conformance as mc  # noqa: E402


@pytest.fixture
def lift_continuous_batching_check(monkeypatch):
    """Lift that one check (a no-op ``switch_to_cb_friendly_attn``) where transformers has it, so kernelsel's
    paged path runs through the rest of transformers' continuous batching unchanged."""
    if mc.refuses_custom_continuous_batching():
        from transformers.generation.continuous_batching import continuous_api

        monkeypatch.setattr(continuous_api.ContinuousBatchingManager, "switch_to_cb_friendly_attn",
                            lambda self, model, *args, **kwargs: None)


@pytest.fixture(scope="session")
def reference_backend():
    import selector.integrations.transformers as ks

    backend = ks.register("kernelsel-reference", solution="reference")
    yield backend
    ks.unregister("kernelsel-reference")


@pytest.fixture(scope="session")
def triton_backend():
    import selector.integrations.transformers as ks

    backend = ks.register("kernelsel-triton", solution="triton")
    yield backend
    ks.unregister("kernelsel-triton")


_MODELS: dict = {}


@pytest.fixture
def tiny_model():
    """``tiny_model(arch)``: the float32 tiny model of ``arch`` (built once per session; do not modify it)."""

    def _get(arch: str):
        if arch not in _MODELS:
            _MODELS[arch] = mc.build_model(mc.tiny_config(arch))
        return _MODELS[arch]

    return _get
