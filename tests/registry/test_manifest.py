"""The bundled manifest: it loads, and every entry is well-formed. Cases come from the manifest itself."""

from __future__ import annotations

import importlib

import pytest

from registry.loader import load_manifest
from registry.priority import Band, band_of
from registry.vocab import Arch, Op, Solution

MANIFEST = load_manifest()
KERNELS = {k.name: k for k in MANIFEST.kernels}


def test_bundled_manifest_loads_with_kernels_for_every_op():
    assert MANIFEST.schema_version == 1
    assert {k.op for k in MANIFEST.kernels} == set(Op)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_adapter_resolves_to_a_class_of_the_op(name):
    spec = KERNELS[name]
    module, attr = spec.adapter.split(":")
    cls = getattr(importlib.import_module(module), attr)
    assert isinstance(cls, type)
    assert getattr(cls, "op", str(spec.op)) in (str(spec.op), "")


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_priority_band_matches_solution_and_leaves_plugin_band_free(name):
    spec = KERNELS[name]
    assert (spec.solution is Solution.REFERENCE) == (band_of(spec.priority) is Band.REFERENCE)
    assert band_of(spec.priority) is not Band.PLUGIN, "in-tree kernels must leave the plugin band to overlays"


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_entry_cites_its_facts_and_points_at_its_line(name):
    spec = KERNELS[name]
    assert spec.refs and all(r.strip() for r in spec.refs)
    assert spec.origin.startswith("kernels.yaml:") and int(spec.origin.split(":")[1]) > 0


@pytest.mark.parametrize("op", list(Op))
def test_every_op_has_a_reference_kernel(op):
    assert any(k.solution is Solution.REFERENCE for k in MANIFEST.by_op[op])


@pytest.mark.parametrize("op", list(Op))
@pytest.mark.parametrize("arch", [a for a in Arch if a >= Arch.SM_80])
def test_every_op_has_a_non_reference_kernel_on_every_arch_from_sm80(op, arch):
    assert any(k.arch.allows(arch) for k in MANIFEST.by_op[op] if k.solution is not Solution.REFERENCE)


def test_exclusions_carry_reason_and_reference():
    exclusions = [e for k in MANIFEST.kernels for e in k.exclude]
    assert exclusions, "the manifest records known-bad combinations"
    assert all(e.reason and e.ref for e in exclusions)
