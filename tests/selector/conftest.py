"""Selector test helpers: the bundled and the toy manifest, hypothetical platforms, broken imports.

Solver tests use the toy manifest (``toy_manifest.yaml``, adapters in ``toy_adapters.py``): they test the
solver, not the bundled data, and need neither torch nor a GPU library.  Facts of the bundled manifest are
asserted in ``tests/registry/test_manifest.py`` and ``test_seeds.py`` only.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

import selector
from registry.adapter_policy import ENV_ADAPTER_ALLOWLIST
from registry.loader import load_manifest
from selector import Platform, Selector
from selector.availability import adapter_class
from selector.overrides import ENV_MANIFEST

HERE = Path(__file__).resolve().parent
TOY_MANIFEST = HERE / "toy_manifest.yaml"
TOY_ADAPTERS = "toy_adapters"


@pytest.fixture(scope="session")
def manifest():
    return load_manifest()


@pytest.fixture
def toy(monkeypatch):
    """The toy manifest, its adapter module importable and every stand-in library it imports present."""
    monkeypatch.syspath_prepend(str(HERE))
    toy_manifest = load_manifest(TOY_MANIFEST, adapter_allowlist=(TOY_ADAPTERS,))
    for k in toy_manifest.kernels:
        for lib in adapter_class(k.adapter).libraries:
            monkeypatch.setitem(sys.modules, lib, types.ModuleType(lib))
    return toy_manifest


@pytest.fixture
def toy_file() -> Path:
    """Where the toy manifest lives (an overlay's ``base:``)."""
    return TOY_MANIFEST


@pytest.fixture
def toy_allowlist() -> str:
    """The toy adapters' module: what ``--allow-adapter`` / ``adapter_allowlist=`` must name to load the toy manifest."""
    return TOY_ADAPTERS


@pytest.fixture
def toy_env(toy, monkeypatch):
    """The default selector (``select_kernel``) reads the toy manifest from the environment; returns it."""
    monkeypatch.setenv(ENV_MANIFEST, str(TOY_MANIFEST))
    monkeypatch.setenv(ENV_ADAPTER_ALLOWLIST, TOY_ADAPTERS)
    selector.reset()
    return toy


@pytest.fixture
def pick(manifest):
    """pick(**request fields) -> Selection on a hypothetical machine of the request's arch."""

    def _pick(**fields):
        return Selector(manifest, Platform.hypothetical(fields["arch"])).solve(selector.KernelRequest(**fields))

    return _pick


@pytest.fixture(autouse=True)
def _fresh_default_selector(monkeypatch):
    """Each test sees a default selector built from its own environment, with no kernelsel variable set."""
    for var in [v for v in os.environ if v.startswith("KERNELSEL_")]:
        monkeypatch.delenv(var)
    selector.reset()
    yield
    selector.reset()


class BrokenImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import NAME`` raises ``exc`` (what an installed package with a CUDA/driver mismatch does)."""

    def __init__(self, name: str, exc: BaseException):
        self.name, self.exc, self.calls = name, exc, 0

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.calls += 1
        raise self.exc


@pytest.fixture
def break_import(monkeypatch):
    """break_import(name, exc=None): importing ``name`` fails (ImportError by default, or raises ``exc``)."""

    def _break(name: str, exc: BaseException = None):
        if exc is None:
            monkeypatch.setitem(sys.modules, name, None)
            return None
        monkeypatch.delitem(sys.modules, name, raising=False)
        finder = BrokenImport(name, exc)
        monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
        return finder

    return _break
