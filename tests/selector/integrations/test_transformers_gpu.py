"""On a GPU: real-size attention shapes through the kernels kernelsel selects there, against eager."""

from __future__ import annotations

import pytest

from selector.tools import model_conformance as mc

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", mc.ARCHITECTURES)
def test_real_size_models_match_eager_with_the_selected_kernels(arch):
    report = mc.verify_models([arch], device="cuda", size="real", page_sizes=(16, 64), new_tokens=4,
                              prompt_lengths=(2048, 1024))
    for run in report["results"]:
        assert run["passed"], mc.render_report(report)
        assert all(not name.startswith("torch-") for names in run["kernels"].values() for name in names), run["kernels"]
