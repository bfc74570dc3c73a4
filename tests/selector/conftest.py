"""Selector test helpers: the bundled manifest, hypothetical platforms, the CLI in-process."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import pytest

import selector
from registry.loader import load_manifest
from selector import Platform, Selector


@pytest.fixture(scope="session")
def manifest():
    return load_manifest()


@pytest.fixture
def pick(manifest):
    """pick(**request fields) -> Selection on a hypothetical machine of the request's arch."""

    def _pick(**fields):
        return Selector(manifest, Platform.hypothetical(fields["arch"])).solve(selector.KernelRequest(**fields))

    return _pick


@pytest.fixture(autouse=True)
def _fresh_default_selector(monkeypatch):
    """Each test sees a default selector built from its own environment."""
    for var in ("KERNELSEL_MANIFEST", "KERNELSEL_DISABLE"):
        monkeypatch.delenv(var, raising=False)
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
