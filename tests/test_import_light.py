"""Importing kernelsel is free: no torch, flashinfer or triton, no manifest load, no env read."""

from __future__ import annotations

import subprocess
import sys


def test_import_selector_and_registry_pull_in_no_heavy_library():
    probe = (
        "import sys, selector, registry, registry.adapters, selector.tools.cli\n"
        "print(','.join(m for m in ('torch', 'flashinfer', 'triton') if m in sys.modules))\n"
        "import selector.api as a; print(a._DEFAULT is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "", f"heavy modules imported: {out[0]}"
    assert out[1] == "True", "importing must not build the default selector"


def test_selecting_with_an_explicit_arch_imports_no_heavy_library():
    """Whatever is installed here (a kernel found or not), selecting imports no GPU library."""
    probe = (
        "import sys\nfrom selector import NoKernelError, select_kernel\n"
        "try:\n    print(select_kernel(op='mla_decode', arch='sm_120', q_dtype='bf16').kernel.name)\n"
        "except NoKernelError:\n    print('no kernel')\n"
        "print('|' + ','.join(m for m in ('torch', 'flashinfer', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "|", f"heavy modules imported: {out}"


def test_importing_every_adapter_module_pulls_in_no_heavy_library():
    """Adapters import their library on first use, so the manifest can name them freely."""
    from registry.loader import load_manifest

    modules = sorted({k.adapter.split(":")[0] for k in load_manifest().kernels}) + ["registry.adapters.triton_kernels"]
    probe = (
        f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(','.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'flashinfer', 'triton')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported: {out}"


def test_the_cli_finds_the_gpu_without_importing_torch():
    """``kernelsel explain`` without ``--arch`` asks nvidia-smi (``detect_gpus``'s CLI source), never torch."""
    probe = (
        "import sys\nfrom selector.tools.cli import main\n"
        "try:\n    main(['explain', '--op', 'mha_decode'])\nexcept SystemExit:\n    pass\n"
        "print('|' + ','.join(m for m in ('torch', 'flashinfer', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "|", f"heavy modules imported: {out}"
