"""Shared test setup: the `gpu` marker skips cleanly where no CUDA device exists; the in-process CLI runner."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "kernels.yaml"


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_configure(config):
    """Without a GPU, Triton kernels run in its interpreter.

    Set here, before any test module imports triton: Triton reads the
    variable when it decorates each function, so a module that imported
    triton first (e.g. ``test_triton_planning.py`` collected before
    ``test_triton_kernels.py``) would leave ``tl.cdiv`` and friends compiled-only.
    """
    if not _cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr): ``kernelsel`` run in-process, each argument through ``str``."""
    from selector.tools.cli import main

    def _cli(*argv):
        code = 0
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return _cli
