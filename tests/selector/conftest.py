"""Selector test helpers: the bundled manifest, hypothetical platforms, the CLI in-process."""

from __future__ import annotations

import pytest

import selector
from registry.loader import load_manifest
from selector import Platform, Selector
from selector.cli import main


@pytest.fixture(scope="session")
def manifest():
    return load_manifest()


@pytest.fixture
def pick(manifest):
    """pick(**request fields) -> Selection on a hypothetical machine of the request's arch."""

    def _pick(**fields):
        return Selector(manifest, Platform.hypothetical(fields["arch"])).solve(selector.KernelRequest(**fields))

    return _pick


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr): ``kernelsel`` run in-process, each argument through ``str``."""

    def _cli(*argv):
        code = 0
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return _cli


@pytest.fixture(autouse=True)
def _fresh_default_selector(monkeypatch):
    """Each test sees a default selector built from its own environment."""
    for var in ("KERNELSEL_MANIFEST", "KERNELSEL_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    selector.reset()
    yield
    selector.reset()
