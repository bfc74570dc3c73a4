"""``kernelsel doctor``: what this machine is, which manifest and perf table are in use, what can run here.

A diagnostic, so unlike the rest of kernelsel it probes: it asks ``nvidia-smi`` and torch for the GPU
(``selector.platform.detect_gpus``), imports torch, and imports every adapter and the libraries its
class names (``Adapter.libraries``) -- catching every error -- to find packages that are installed but
broken (a CUDA or driver mismatch), which package metadata alone cannot show.  Per kernel of the
manifest it then says *available* or each reason why not, in the solver's own words
(``selector.solver.platform_reasons``: ``KERNELSEL_DISABLE``, the arch range, the solution's required
distributions, the import).  The perf table is the one ``registry.perf_policy`` picks for the runtime.
``diagnose()`` returns one plain dict; ``render()`` is its text; the CLI prints either.
"""

from __future__ import annotations

import os
import platform as host
import sys
import time
from importlib import metadata
from typing import Any, Mapping, Optional

from registry.errors import KernelselError, ManifestError
from registry.loader import bundled_perf_dir, load_perf_table
from registry.perf_policy import choose_perf_table
from registry.provenance import provenance
from registry.vocab import Arch, Solution, parse_arch
from selector.availability import UNAVAILABLE, adapter_class, describe_exception, probe
from selector.overrides import ENV_MANIFEST, ENV_PERF, Overrides
from selector.perf_check import perf_table_problems
from selector.platform import NVIDIA_SMI, TORCH, GpuDetection, Platform, detect_gpus, installed_versions, required_distributions
from selector.solver import REFERENCE_ONLY, library_reason, platform_reasons

CORE = ("pydantic", "PyYAML", "click")
"""kernelsel's own dependencies, shown with their versions."""


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


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
        out["cuda_available"] = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - a driver problem shows up here
        out["cuda_error"] = describe_exception(exc)
    return out


def _gpu(found: GpuDetection) -> dict[str, Any]:
    """The current GPU (nvidia-smi's first, else torch's current device) as the report shows it, or why none."""
    gpu = found.current
    info: dict[str, Any] = {"name": gpu.name if gpu else None, "arch": gpu.arch.value if gpu and gpu.arch else None,
                            "driver": (gpu.driver or None) if gpu else None, "count": len(found.gpus)}
    if gpu is None:
        info["note"] = "; ".join(found.notes)
    return info


def _imports(manifest: Any) -> dict[str, str]:
    """module -> 'ok (time)' / 'fails: ...' for every library an adapter of the manifest imports."""
    modules: dict[str, None] = {}
    for k in manifest.kernels:
        try:
            modules.update(dict.fromkeys(getattr(adapter_class(k.adapter), "libraries", ())))
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


def _perf(overrides: Overrides, gpu: str, arch: Optional[Arch], manifest: Any) -> dict[str, Any]:
    """The perf table the default selector would use here (``registry.perf_policy``), and the committed ones.

    A table ``KERNELSEL_PERF`` names must fit the manifest (``selector.perf_check``), as the CLI and the
    default selector require."""
    directory = bundled_perf_dir()
    committed = []
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            t = load_perf_table(path)
            committed.append(f"{t.path} ({t.gpu}, {t.arch.value}, {len(t.entries)} buckets)")
        except ManifestError as exc:
            committed.append(f"{path}: invalid: {exc.problems[0]}")
    out: dict[str, Any] = {"committed": committed}
    try:
        choice = choose_perf_table(overrides.perf, gpu, arch, setting_name=ENV_PERF)
    except ManifestError as exc:
        return out | {"path": overrides.perf, "source": ENV_PERF, "error": str(exc)}
    t = choice.table
    if t is None:
        return out | {"path": None, "source": choice.source, "note": choice.note}
    problems = perf_table_problems(t, manifest) if choice.source == ENV_PERF else []
    if problems:
        return out | {"path": t.path, "source": ENV_PERF, "error": "; ".join(problems)}
    return out | {"path": t.path, "source": choice.source, "gpu": t.gpu, "arch": t.arch.value, "buckets": len(t.entries)}


def _kernels(manifest: Any, platform: Platform, overrides: Overrides) -> list[dict[str, Any]]:
    """Per kernel: available here (on ``platform.arch`` if known) or every reason why not, in the solver's words."""
    out = []
    for k in manifest.kernels:
        notes = []
        missing = library_reason(k, manifest, platform)
        _, failed = probe(k.adapter, manifest.solutions[k.solution].install)
        if missing and failed is None:
            notes.append("its libraries import, but package metadata lacks a required distribution: "
                         "the selector will not choose it")
        unavailable = {k.name: UNAVAILABLE + failed} if failed and not missing else {}
        reasons = list(platform_reasons(k, manifest, platform, overrides, unavailable))
        if k.solution is Solution.REFERENCE:
            notes.append(REFERENCE_ONLY)
        if overrides.forced(k.op) == k.name:
            notes.append(f"forced by {overrides.forced_by(k.op)}")
        known = provenance(k)
        if not known.ran_on(platform.arch) and (platform.arch is None or k.arch.allows(platform.arch)):
            notes.append(known.summary(platform.arch))
        out.append({"name": k.name, "op": k.op.value, "solution": k.solution.value, "backend": k.backend.value,
                    "arch": k.arch.describe(), "priority": k.priority, "origin": k.origin,
                    "available": not reasons, "reasons": reasons, "notes": notes,
                    "provenance": known.to_dict() | {"summary": known.summary(platform.arch)}})
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
    torch_info = _torch()  # first: it times the import
    found = detect_gpus((NVIDIA_SMI, TORCH))
    gpu_arch = found.current.arch if found.current else None
    gpu_name = found.current.name if found.current else ""
    report["gpu"] = _gpu(found)
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
    problems = overrides.problems(manifest)  # e.g. KERNELSEL_DISABLE=nope: every selection would fail
    if problems:
        report["overrides_error"] = "; ".join(filter(None, [report.get("overrides_error"), *problems]))
    dists = required_distributions(manifest.solutions)
    report["libraries"] = _libraries(list(dists) + list(CORE), _imports(manifest))
    report["perf"] = _perf(overrides, gpu_name if target is None else "", target or gpu_arch, manifest)
    platform = Platform(arch=target or gpu_arch, libraries=installed_versions(dists), device_name=gpu_name)
    report["kernels"] = _kernels(manifest, platform, overrides)
    return report


def _ops():
    from registry.vocab import Op

    return list(Op)


def _libraries(distributions: list[str], imports: dict[str, str]) -> dict[str, Any]:
    return {"versions": {d: _version(d) for d in dict.fromkeys(distributions)}, "imports": imports}


def exit_status(report: dict[str, Any]) -> int:
    """0 normally; 1 when the manifest, the perf table or an override does not load or does not fit the manifest."""
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
