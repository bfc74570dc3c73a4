"""``kernelsel doctor``: what this machine is, which manifest and perf table are in use, what can run here.

A diagnostic, so unlike the rest of kernelsel it probes: it runs ``nvidia-smi``, imports torch, and
imports every adapter and the libraries its class names (``Adapter.libraries``) -- catching every
error -- to find packages that are installed but broken (a CUDA or driver mismatch), which package
metadata alone cannot show.  Per kernel of the manifest it then says *available* or each reason why
not, from the same checks the solver makes (``KERNELSEL_DISABLE``, the arch range, the solution's
required distributions) plus the import.  ``diagnose()`` returns one plain dict; ``render()`` is its
text; the CLI prints either.
"""

from __future__ import annotations

import os
import platform as host
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Mapping, Optional

from registry.errors import KernelselError, ManifestError
from registry.vocab import Arch, Solution, parse_arch
from selector.availability import describe_exception, probe
from selector.overrides import ENV_MANIFEST, ENV_PERF, PREFIX_FORCE, Overrides
from selector.platform import Platform, installed_versions, required_distributions
from selector.solver import library_reason

CORE = ("pydantic", "PyYAML", "click")
"""kernelsel's own dependencies, shown with their versions."""


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict[str, Any]:
    """Every GPU nvidia-smi lists (name, arch, driver), or why none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"gpus": [], "note": "nvidia-smi not found"}
    try:
        proc = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"gpus": [], "note": f"nvidia-smi failed: {describe_exception(exc)}"}
    if proc.returncode != 0:
        return {"gpus": [], "note": f"nvidia-smi failed: {(proc.stderr or proc.stdout).strip().splitlines()[:1]}"}
    gpus = []
    for line in proc.stdout.strip().splitlines():
        name, cap, driver = (part.strip() for part in (line.split(",") + ["", ""])[:3])
        try:
            arch = parse_arch(cap).value if cap else None
        except ValueError:
            arch = None
        gpus.append({"name": name, "compute_cap": cap, "arch": arch, "driver": driver})
    return {"gpus": gpus, "note": "" if gpus else "nvidia-smi lists no GPU"}


def _torch() -> dict[str, Any]:
    """torch's version, CUDA build, and the devices it sees (imports torch; never raises)."""
    version = _version("torch")
    if version is None:
        return {"version": None, "note": "not installed"}
    out: dict[str, Any] = {"version": version}
    t0 = time.perf_counter()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch is a finding
        return out | {"import": f"fails: {describe_exception(exc)}"}
    out["import"] = f"ok ({time.perf_counter() - t0:.1f} s)"
    out["cuda"] = torch.version.cuda
    try:
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        available = torch.cuda.is_available()
        out["cuda_available"] = available
        if available:
            out["devices"] = []
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                out["devices"].append({"index": i, "name": torch.cuda.get_device_name(i), "compute_cap": f"{major}.{minor}"})
    except Exception as exc:  # noqa: BLE001 - a driver problem shows up here
        out["cuda_error"] = describe_exception(exc)
    return out


def _gpu(smi: dict, torch_info: dict) -> tuple[Optional[Arch], str, dict]:
    """The current GPU's arch and name (nvidia-smi first, else torch) and what was found."""
    name, arch = "", None
    if smi["gpus"]:
        first = smi["gpus"][0]
        name = first["name"]
        arch = parse_arch(first["arch"]) if first["arch"] else None
    elif torch_info.get("devices"):
        first = torch_info["devices"][0]
        name = first["name"]
        try:
            arch = parse_arch(first["compute_cap"])
        except ValueError:
            arch = None
    info = {"name": name or None, "arch": arch.value if arch else None,
            "driver": smi["gpus"][0]["driver"] if smi["gpus"] else None, "count": len(smi["gpus"]) or
            len(torch_info.get("devices", []))}
    if not name:
        why = [smi["note"]]
        if torch_info.get("version"):
            why.append(f"torch {torch_info['version']} sees no CUDA device" if not torch_info.get("cuda_error")
                       else f"torch: {torch_info['cuda_error']}")
        info["note"] = "; ".join(w for w in why if w)
    return arch, name, info


def _imports(manifest: Any) -> dict[str, str]:
    """module -> 'ok (time)' / 'fails: ...' for every library an adapter of the manifest imports."""
    from selector.selection import _adapter_class

    modules: dict[str, None] = {}
    for k in manifest.kernels:
        try:
            modules.update(dict.fromkeys(getattr(_adapter_class(k.adapter), "libraries", ())))
        except Exception:  # noqa: BLE001 - reported per kernel below
            continue
    out = {}
    for module in modules:
        t0 = time.perf_counter()
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - that is the finding
            out[module] = f"fails: {describe_exception(exc)}"
        else:
            out[module] = f"ok ({time.perf_counter() - t0:.1f} s)"
    return out


def _perf(overrides: Overrides, gpu: str, arch: Optional[Arch]) -> dict[str, Any]:
    """The perf table the default selector would use here, and the committed ones."""
    from registry.loader import bundled_perf_dir, load_perf_table
    from selector.api import find_perf_table

    directory = bundled_perf_dir()
    committed = []
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            t = load_perf_table(path)
            committed.append(f"{t.path} ({t.gpu}, {t.arch.value}, {len(t.entries)} buckets)")
        except ManifestError as exc:
            committed.append(f"{path}: invalid: {exc.problems[0]}")
    out: dict[str, Any] = {"committed": committed}
    if overrides.perf and overrides.perf.lower() == "off":
        return out | {"path": None, "source": f"{ENV_PERF}=off", "note": "eligible kernels rank by priority"}
    if overrides.perf:
        try:
            t = load_perf_table(overrides.perf)
        except ManifestError as exc:
            return out | {"path": overrides.perf, "source": ENV_PERF, "error": str(exc)}
        return out | {"path": t.path, "source": ENV_PERF, "gpu": t.gpu, "arch": t.arch.value, "buckets": len(t.entries)}
    if not gpu:
        return out | {"path": None, "source": "none", "note": "no GPU detected: eligible kernels rank by priority"}
    t = find_perf_table(gpu, arch)
    if t is None:
        return out | {"path": None, "source": "none",
                      "note": f"no committed table for {gpu} {arch.value if arch else ''}: eligible kernels rank by priority"}
    return out | {"path": t.path, "source": f"committed table for {gpu}", "gpu": t.gpu, "arch": t.arch.value,
                  "buckets": len(t.entries)}


def _kernels(manifest: Any, platform: Platform, overrides: Overrides) -> list[dict[str, Any]]:
    """Per kernel: available here (on ``platform.arch`` if known) or every reason why not."""
    from selector.selection import _adapter_class

    out = []
    for k in manifest.kernels:
        reasons = []
        notes = []
        if k.name in overrides.disable:
            reasons.append("disabled by KERNELSEL_DISABLE")
        if platform.arch is not None:
            problem = k.arch.check("arch", platform.arch)
            if problem:
                reasons.append(problem)
        missing = library_reason(k, manifest, platform)
        install = manifest.solutions[k.solution].install
        _, failed = probe(k.adapter, _adapter_class, install)
        if missing:
            reasons.append(missing)
            if failed is None:
                notes.append("its libraries import, but package metadata lacks a required distribution: "
                             "the selector will not choose it")
        elif failed:
            reasons.append("unavailable: " + failed)
        if k.solution is Solution.REFERENCE:
            notes.append("reference: chosen only with solution=reference or kernel=<name>")
        forced = overrides.forced(k.op)
        if forced == k.name:
            notes.append(f"forced by {PREFIX_FORCE}{k.op.value.upper()}")
        out.append({"name": k.name, "op": k.op.value, "solution": k.solution.value, "backend": k.backend.value,
                    "arch": k.arch.describe(), "priority": k.priority, "origin": k.origin,
                    "available": not reasons, "reasons": reasons, "notes": notes})
    return out


def diagnose(*, arch: Optional[str] = None, manifest_path: Optional[str] = None,
             environ: Mapping[str, str] = os.environ, adapter_allowlist: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Everything ``kernelsel doctor`` reports, as plain data.  Raises RequestError for a bad ``arch``.

    ``adapter_allowlist`` (default: ``KERNELSEL_ADAPTER_ALLOWLIST``) is passed to the manifest loader.
    """
    from registry.loader import bundled_manifest_path, load_manifest

    target = parse_arch(arch) if arch is not None else None
    report: dict[str, Any] = {
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "host": f"{host.system()} {host.machine()}",
        "kernelsel": _version("kernelsel"),
    }
    smi = _nvidia_smi()
    torch_info = _torch()
    gpu_arch, gpu_name, report["gpu"] = _gpu(smi, torch_info)
    report["torch"] = torch_info
    if target is not None:
        report["arch"] = {"value": target.value, "source": "--arch: a hypothetical GPU with this machine's libraries"}
    elif gpu_arch is not None:
        report["arch"] = {"value": gpu_arch.value, "source": f"detected ({gpu_name})"}
    else:
        report["arch"] = {"value": None, "source": "no GPU detected: pass --arch (e.g. sm_90) to see what a GPU of "
                                                   "that arch would run with this machine's libraries"}
    try:
        overrides = Overrides.from_env(environ)
    except KernelselError as exc:
        overrides = Overrides()
        report["overrides_error"] = str(exc)
    report["overrides"] = sorted({line for op_lines in (overrides.applied(op) for op in _ops()) for line in op_lines})
    path = manifest_path or overrides.manifest
    source = "--manifest" if manifest_path else (ENV_MANIFEST if overrides.manifest else "bundled")
    try:
        manifest = load_manifest(path, adapter_allowlist=adapter_allowlist)
    except ManifestError as exc:
        report["manifest"] = {"path": str(path or bundled_manifest_path()), "source": source, "error": exc.problems}
        report["libraries"] = _libraries(CORE, {})
        return report
    report["manifest"] = {"path": manifest.path, "source": source, "schema_version": manifest.schema_version,
                          "kernels": len(manifest.kernels), "digest": manifest.digest}
    dists = required_distributions(manifest.solutions)
    report["libraries"] = _libraries(list(dists) + list(CORE), _imports(manifest))
    report["perf"] = _perf(overrides, gpu_name if target is None else "", target or gpu_arch)
    platform = Platform(arch=target or gpu_arch, libraries=installed_versions(dists), device_name=gpu_name)
    report["kernels"] = _kernels(manifest, platform, overrides)
    return report


def _ops():
    from registry.vocab import Op

    return list(Op)


def _libraries(distributions: list[str], imports: dict[str, str]) -> dict[str, Any]:
    return {"versions": {d: _version(d) for d in dict.fromkeys(distributions)}, "imports": imports}


def exit_status(report: dict[str, Any]) -> int:
    """0 normally; 1 when the manifest (or a perf table or override it names) does not load."""
    bad = "error" in report.get("manifest", {}) or "error" in report.get("perf", {}) or "overrides_error" in report
    return 1 if bad else 0


def render(report: dict[str, Any]) -> str:
    """The text of ``kernelsel doctor``."""
    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<10} {text}")

    row("python", report["python"])
    row("kernelsel", report["kernelsel"] or "not installed (running from a checkout)")
    gpu = report["gpu"]
    if gpu["name"]:
        more = f" (+{gpu['count'] - 1} more)" if gpu["count"] > 1 else ""
        row("gpu", f"{gpu['name']}, {gpu['arch'] or 'unknown arch'}{more}")
    else:
        row("gpu", f"none detected ({gpu.get('note', '')})")
    row("driver", gpu["driver"] or "unknown (no nvidia-smi)")
    t = report["torch"]
    if t.get("version") is None:
        row("torch", "not installed")
    else:
        cuda = f"built for CUDA {t['cuda']}" if t.get("cuda") else "a CPU build"
        cudnn = f", cuDNN {t['cudnn']}" if t.get("cudnn") else ""
        row("torch", f"{t['version']}, {cuda}{cudnn}; import {t.get('import', '?')}")
    a = report["arch"]
    row("arch", f"{a['value']} ({a['source']})" if a["value"] else a["source"])
    libs = report["libraries"]
    width = max((len(d) for d in libs["versions"]), default=0)
    first = True
    for dist, version in libs["versions"].items():
        row("libraries" if first else "", f"{dist:<{width}}  {version or 'not installed'}")
        first = False
    for module, status in libs["imports"].items():
        row("imports" if module == next(iter(libs["imports"])) else "", f"{module:<{width}}  {status}")
    m = report["manifest"]
    if "error" in m:
        row("manifest", f"{m['path']} ({m['source']}): does not load")
        lines.extend(f"           {p}" for p in m["error"])
    else:
        row("manifest", f"{m['path']} ({m['source']}; schema {m['schema_version']}, {m['kernels']} kernels, sha {m['digest']})")
    if "perf" in report:
        p = report["perf"]
        if p.get("error"):
            row("perf", f"{p['path']} ({p['source']}): does not load: {p['error']}")
        elif p.get("path"):
            row("perf", f"{p['path']} ({p['source']}; {p['gpu']}, {p['arch']}, {p['buckets']} buckets)")
        elif p["source"] == "none":
            row("perf", f"none ({p['note']})")
        else:
            row("perf", f"off ({p['source']}: {p['note']})")
        for c in p["committed"]:
            row("", f"committed: {c}")
    if report.get("overrides_error"):
        row("overrides", f"invalid: {report['overrides_error']}")
    row("overrides", ", ".join(report["overrides"]) or "none")
    if "kernels" not in report:
        return "\n".join(lines)
    kernels = report["kernels"]
    where = f"on {a['value']}" if a["value"] else "here (any arch)"
    lines.append("")
    lines.append(f"kernels {where}: {sum(k['available'] for k in kernels)} of {len(kernels)} available")
    width = max(len(k["name"]) for k in kernels)
    kind = max(len(f"{k['solution']}/{k['backend']}") for k in kernels)
    for op in dict.fromkeys(k["op"] for k in kernels):
        lines.append(f"  {op}")
        for k in (k for k in kernels if k["op"] == op):
            head = f"    {'ok' if k['available'] else 'no'}  {k['name']:<{width}}  {k['solution'] + '/' + k['backend']:<{kind}}"
            texts = k["reasons"] or [f"priority {k['priority']}, arch {k['arch']}"]
            texts = texts + [f"({n})" for n in k["notes"]]
            lines.append(f"{head}  {texts[0]}")
            lines.extend(f"{' ' * len(head)}  {t}" for t in texts[1:])
    return "\n".join(lines)
