"""``adapter:`` names a class inside registry.adapters, or inside an explicitly allowlisted package.

A manifest from a pull request must not be able to make kernelsel import an
arbitrary module.  Paths outside the adapter package are refused with a
message saying what is accepted; the allowlist (``adapter_allowlist=``,
``KERNELSEL_ADAPTER_ALLOWLIST``, ``--allow-adapter``) is the operator's
explicit opt-in and is never read from a manifest.  Checking a path reads
the module's source: nothing is imported, not even its parent packages.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

from registry.errors import ManifestError
from registry.loader import load_manifest
from registry.adapter_policy import ADAPTER_PACKAGE, ENV_ADAPTER_ALLOWLIST, check_adapter_path, parse_adapter_allowlist

BROKEN = pathlib.Path(__file__).parent / "broken"
VALID = (BROKEN / "_valid.yaml").read_text()
ADAPTER = "registry.adapters.triton:TritonMHADecode"
PLUGIN = "kernelsel_plugin_probe"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A package outside kernelsel whose __init__ would raise if anything imported it."""
    pkg = tmp_path / PLUGIN
    (pkg / "attn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the allowlist check imported the package')\n")
    (pkg / "attn" / "__init__.py").write_text("raise RuntimeError('the allowlist check imported attn')\n")
    (pkg / "attn" / "decode.py").write_text("import os\n\nclass MyDecode:\n    pass\n\ndef helper():\n    pass\n")
    (tmp_path / f"{PLUGIN}_evil.py").write_text("class X:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    yield f"{PLUGIN}.attn.decode:MyDecode"
    assert not any(m == PLUGIN or m.startswith(PLUGIN + ".") or m.startswith(PLUGIN + "_") for m in sys.modules), \
        "checking an adapter path imported a module"


def _manifest(tmp_path, adapter: str) -> pathlib.Path:
    path = tmp_path / "m.yaml"
    path.write_text(VALID.replace(ADAPTER, json.dumps(adapter, ensure_ascii=False)))  # quoted: the value as written
    return path


def _refusal(tmp_path, adapter: str, **kw) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(_manifest(tmp_path, adapter), **kw)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


@pytest.mark.parametrize("adapter", [
    "os:system", "subprocess:Popen", "builtins:eval", "importlib:import_module", "registry.adapters_evil:X",
    "registry.adaptersx.triton:TritonMHADecode", "registry:Manifest", "registry.schema:KernelSpec",
])
def test_paths_outside_the_adapter_package_are_refused_saying_what_is_accepted(monkeypatch, tmp_path, adapter):
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    msg = _refusal(tmp_path, adapter)
    assert re.search(rf"m\.yaml:11:14: kernels\[0\]\.adapter: '{re.escape(adapter)}' is outside registry\.adapters: "
                     r"a manifest is data and cannot import arbitrary code; expected registry\.adapters\.MODULE:Class; "
                     r"allow another package with --allow-adapter PREFIX or KERNELSEL_ADAPTER_ALLOWLIST", msg), msg


@pytest.mark.parametrize("adapter", [
    "registry.adapters.../../x", "registry.adapters..triton:TritonMHADecode", ".adapters:X", "..registry.adapters.triton:X",
    "registry/adapters/triton.py:TritonMHADecode", "registry.adapters.triton:TritonMHADecode.run",
    "registry.adapters.triton", "registry.adapters.triton:", ":TritonMHADecode", " registry.adapters.triton:TritonMHADecode",
    "registry.adapters.triton:TritonMHADecode;os:system", "registry.adаpters.triton:TritonMHADecode",  # Cyrillic а
    "registry.adapters.triton:TritonMHADecode\n",  # a `$` regex would take it, and the name would not resolve
])
def test_malformed_and_relative_paths_are_refused(monkeypatch, tmp_path, adapter):
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    msg = _refusal(tmp_path, adapter)
    assert re.search(r"kernels\[0\]\.adapter: .* is not 'module:Class'; expected registry\.adapters\.MODULE:Class$", msg), msg


@pytest.mark.parametrize("adapter, why", [
    ("registry.adapters.triton:math", r"registry\.adapters\.triton defines no class 'math'"),  # imported, not defined there
    ("registry.adapters.triton:check_tensor", r"defines no class 'check_tensor'"),
    ("registry.adapters.base:importlib", r"defines no class 'importlib'"),
    ("registry.adapters.nope:X", r"module registry\.adapters\.nope does not exist"),
    ("registry.adapters.triton:TritonMHADecod", r"defines no class 'TritonMHADecod' \(did you mean 'TritonMHADecode'\?\)"),
])
def test_only_classes_defined_in_the_module_count(monkeypatch, tmp_path, adapter, why):
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    assert re.search(why, _refusal(tmp_path, adapter))


def test_an_allowlisted_package_is_accepted_without_importing_it(tmp_path, plugin, monkeypatch):
    msg = _refusal(tmp_path, plugin)
    assert f"'{plugin}' is outside registry.adapters" in msg
    m = load_manifest(_manifest(tmp_path, plugin), adapter_allowlist=(PLUGIN,))
    assert m.kernels[0].adapter == plugin
    assert load_manifest(_manifest(tmp_path, plugin), adapter_allowlist=(f"{PLUGIN}.attn",)).kernels[0].adapter == plugin
    monkeypatch.setenv(ENV_ADAPTER_ALLOWLIST, f" other.pkg , {PLUGIN} ,")
    assert load_manifest(_manifest(tmp_path, plugin)).kernels[0].adapter == plugin
    with pytest.raises(ManifestError):  # () means registry.adapters only, whatever the environment says
        load_manifest(_manifest(tmp_path, plugin), adapter_allowlist=())


def test_an_allowlisted_prefix_is_a_package_not_a_string_prefix(tmp_path, plugin):
    msg = _refusal(tmp_path, f"{PLUGIN}_evil:X", adapter_allowlist=(PLUGIN,))
    assert f"'{PLUGIN}_evil:X' is outside registry.adapters, {PLUGIN}" in msg
    assert f"expected registry.adapters.MODULE:Class or {PLUGIN}.MODULE:Class" in msg
    assert "--allow-adapter" not in msg  # the allowlist was given: no hint to widen it
    assert re.search(r"defines no class 'helper'", _refusal(tmp_path, f"{PLUGIN}.attn.decode:helper", adapter_allowlist=(PLUGIN,)))


@pytest.mark.parametrize("prefix, why", [
    ("os", "is in the standard library"), ("subprocess", "is in the standard library"),
    ("builtins", "is in the standard library"), ("importlib.util", "is in the standard library"),
    ("my/pkg", "is not a module prefix"), ("my..pkg", "is not a module prefix"), (".pkg", "is not a module prefix"),
    ("pkg:Class", "is not a module prefix"), ("pkg.", "is not a module prefix"),
])
def test_allowlist_entries_are_checked(monkeypatch, tmp_path, prefix, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_adapter_allowlist([prefix])
    with pytest.raises(ManifestError, match=rf"^1 problem in manifest:\nadapter_allowlist: .*{re.escape(why)}"):
        load_manifest(_manifest(tmp_path, ADAPTER), adapter_allowlist=[prefix])
    monkeypatch.setenv(ENV_ADAPTER_ALLOWLIST, prefix)
    with pytest.raises(ManifestError, match=rf"KERNELSEL_ADAPTER_ALLOWLIST: .*{re.escape(why)}"):
        load_manifest(_manifest(tmp_path, ADAPTER))


def test_a_manifest_cannot_widen_the_allowlist(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    path = tmp_path / "m.yaml"
    path.write_text(f"adapter_allowlist: [os]\n{VALID.replace(ADAPTER, 'os:system')}")
    with pytest.raises(ManifestError, match=r"m\.yaml:1:1: adapter_allowlist: unknown key 'adapter_allowlist'"):
        load_manifest(path)


def test_the_bundled_manifest_needs_no_allowlist(monkeypatch):
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    m = load_manifest(adapter_allowlist=())
    assert all(check_adapter_path(k.adapter) is None and k.adapter.startswith(ADAPTER_PACKAGE + ".") for k in m.kernels)


def test_cli_allow_adapter_flag(tmp_path, plugin, cli):
    run = cli
    path = _manifest(tmp_path, plugin)
    code, _, err = run("validate", path)
    assert code == 1 and f"'{plugin}' is outside registry.adapters" in err
    code, out, _ = run("validate", path, "--allow-adapter", PLUGIN)
    assert code == 0 and ": ok (1 kernels" in out
    code, out, _ = run("explain", "--op", "mha_decode", "--arch", "sm_90", "--manifest", path, "--allow-adapter", PLUGIN)
    assert code == 0 and "selected  triton-mha-decode" in out
    code, _, err = run("explain", "--op", "mha_decode", "--arch", "sm_90", "--manifest", path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("kernelsel explain: --manifest: ")
    code, _, err = run("validate", path, "--allow-adapter", "subprocess")
    assert code == 2 and err == ("kernelsel validate: --allow-adapter: 'subprocess' is in the standard library; "
                                 "the allowlist names packages that hold adapter classes (e.g. mycompany.kernels)\n")


def test_doctor_takes_the_allowlist_too(tmp_path, plugin, cli, monkeypatch):
    monkeypatch.delenv(ENV_ADAPTER_ALLOWLIST, raising=False)
    path = _manifest(tmp_path, plugin)
    code, out, _ = cli("doctor", "--arch", "sm_90", "--manifest", path, "--json")
    assert code == 1 and f"'{plugin}' is outside registry.adapters" in out
    code, out, _ = cli("doctor", "--arch", "sm_90", "--manifest", path, "--json", "--allow-adapter", PLUGIN)
    assert code == 0 and '"schema_version": 1' in out
