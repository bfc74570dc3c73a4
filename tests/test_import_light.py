"""Importing kernelsel is free: no torch, flashinfer or triton, no manifest load, no env read."""

from __future__ import annotations

import subprocess
import sys


def test_import_selector_and_registry_pull_in_no_heavy_library():
    probe = (
        "import sys, selector, registry, registry.adapters, selector.tools.cli\n"
        "print(','.join(m for m in ('torch', 'flashinfer', 'triton', 'matplotlib', 'numpy') if m in sys.modules))\n"
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


def test_predicting_from_a_perf_table_imports_no_numpy_or_torch():
    """Predictions are pure Python: an engine without numpy gets them too, and importing stays cheap."""
    probe = (
        "import sys\nfrom registry.loader import bundled_perf_dir, load_perf_table\n"
        "from selector import KernelRequest, Platform, Selector\nfrom registry.loader import load_manifest\n"
        "perf = load_perf_table(bundled_perf_dir() / 'nvidia-h200-sm_90.yaml')\n"
        "s = Selector(load_manifest(), Platform.hypothetical('sm_90'), perf=perf).solve(KernelRequest(\n"
        "    op='mha_decode', arch='sm_90', head_dim_qk=128, num_qo_heads=32, num_kv_heads=8, page_size=16,\n"
        "    batch_size=16, kv_len=8192))\n"
        "print(len(s.predicted), ','.join(m for m in ('numpy', 'torch', 'flashinfer', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 2 and len(out) == 1, f"predicted {out[0]} kernels; heavy modules imported: {out[1:]}"
