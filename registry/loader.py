"""Load a manifest, an overlay or a perf table, with every error as ``file:line:col: path: message``.

The YAML is read by ``registry.yaml_reader`` (safe, bounded, located); this module turns it into the
pydantic models.  An *overlay* (a file with ``base:``) adds or replaces kernels by name on top of another
manifest.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from pydantic import ValidationError

from registry.adapter_policy import adapter_allowlist_from_env, parse_adapter_allowlist
from registry.errors import ManifestError, brief
from registry.schema import CROSS_KERNEL_CHECKED, KernelSpec, Manifest, cross_kernel_problems
from registry.vocab import did_you_mean
from registry.yaml_reader import (
    Marks,
    kind_of,
    located,
    path_text,
    read_yaml,
    validation_problems,
)

if TYPE_CHECKING:
    from registry.perf import PerfTable

def bundled_manifest_path() -> Path:
    """The manifest shipped with kernelsel (the repo root's kernels.yaml in a checkout)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "kernels.yaml"
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("registry") / "kernels.yaml"))


def load_manifest(
    path: Optional[os.PathLike | str] = None,
    *,
    text: Optional[str] = None,
    adapter_allowlist: Optional[Iterable[str] | str] = None,
) -> Manifest:
    """Load and validate a manifest (the bundled one by default); raise ManifestError with every problem.

    ``adapter_allowlist``: module prefixes (besides ``registry.adapters``) whose
    classes ``adapter:`` may name.  ``None`` reads ``KERNELSEL_ADAPTER_ALLOWLIST``
    (comma-separated; unset means none); ``()`` allows ``registry.adapters`` only.
    """
    try:
        allow = adapter_allowlist_from_env() if adapter_allowlist is None else parse_adapter_allowlist(
            adapter_allowlist, source="adapter_allowlist")
    except ValueError as exc:
        raise ManifestError([str(exc)]) from None
    return _load(Path(path) if path is not None else bundled_manifest_path(), text, allow, ())


def _load(path: Path, text: Optional[str], allow: tuple[str, ...], chain: tuple[str, ...]) -> Manifest:
    data, marks, filename, raw_text = read_yaml(path, text=text)
    if not isinstance(data, dict):
        raise ManifestError([f"{filename}:1:1: (top level): expected a mapping with schema_version and kernels, "
                             f"got {kind_of(data)}"])
    digest = hashlib.sha256(raw_text.encode()).hexdigest()
    context = {"adapter_allowlist": allow, CROSS_KERNEL_CHECKED: True}
    if "base" in data:
        return _load_overlay(path, filename, data, marks, digest, context, chain + (_identity(path),))
    problems: list[str] = []
    try:
        manifest = Manifest.model_validate(data, context=context)
    except ValidationError as exc:
        problems = validation_problems(exc, marks, filename)
    kernels, solutions = data.get("kernels"), data.get("solutions")
    if isinstance(kernels, list):  # checked here, not by the model, so they come with every entry's own problems
        problems += [located(marks, filename, loc, message) for loc, message in
                     cross_kernel_problems(kernels, solutions if isinstance(solutions, dict) else None)]
    if problems:
        raise ManifestError(_in_file_order(problems, filename))
    _stamp(manifest, marks, filename, digest)
    return manifest


def _in_file_order(problems: list[str], filename: str) -> list[str]:
    """Problems sorted by line and column, as a compiler lists them (stable for equal places)."""
    def place(problem: str) -> tuple[int, int]:
        if not problem.startswith(filename + ":"):
            return (0, 0)
        line, col = (problem[len(filename) + 1:].split(":", 2) + ["", ""])[:2]
        return (int(line), int(col)) if line.isdigit() and col.isdigit() else (0, 0)

    return sorted(problems, key=place)




def _identity(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):
        return str(path)


def _stamp(manifest: Manifest, marks: Marks, filename: str, digest: str) -> None:
    """Record where each kernel and the manifest came from (explain and errors show it)."""
    for i, k in enumerate(manifest.kernels):
        if not k.origin:
            line, _ = marks.marks.get(("kernels", i), (0, 0))
            k._origin = f"{filename}:{line}"
    manifest._path = filename
    manifest._digest = digest[:12]




def _load_overlay(path: Path, filename: str, data: dict, marks: Marks, digest: str, context: dict,
                  chain: tuple[str, ...]) -> Manifest:
    """Kernels in the overlay replace same-named base kernels or are added; ``disable`` drops names."""
    allowed = ("base", "disable", "kernels")
    problems = []
    for key in data:
        if key not in allowed:
            line, col = marks.key_mark((key,)) or (1, 1)
            problems.append(f"{filename}:{line}:{col}: {path_text((key,))}: unknown key in an overlay"
                            f"{did_you_mean(str(key), list(allowed))}; expected one of: {', '.join(allowed)}")
    base_ref = data["base"]
    kernels_raw, disable_raw = data.get("kernels"), data.get("disable")
    if not isinstance(base_ref, str) or not base_ref.strip():
        problems.append(located(marks, filename, ("base",), f"expected 'bundled' or a manifest path, got {brief(base_ref)}"))
    if kernels_raw is not None and not isinstance(kernels_raw, list):
        problems.append(located(marks, filename, ("kernels",), f"expected a list of kernels, got {kind_of(kernels_raw)}"))
    if disable_raw is not None and not isinstance(disable_raw, list):
        problems.append(located(marks, filename, ("disable",), f"expected a list of kernel names, got {kind_of(disable_raw)}"))
    if problems:
        raise ManifestError(problems)
    base_path = bundled_manifest_path() if base_ref == "bundled" else (path.parent / base_ref)
    if _identity(base_path) in chain:
        raise ManifestError([located(marks, filename, ("base",), f"{brief(base_ref)} leads back to this overlay "
                                      f"(overlays must not form a loop)")])
    try:
        base = _load(base_path, None, context["adapter_allowlist"], chain)
    except ManifestError as exc:  # each of the base's problems, at this overlay's base: line
        raise ManifestError([located(marks, filename, ("base",), f"{brief(base_ref)}: {p}") for p in exc.problems]) from None
    kernels = {k.name: k for k in base.kernels}
    order = [k.name for k in base.kernels]
    own: dict[str, int] = {}  # name -> index in this overlay's kernels
    for i, raw in enumerate(kernels_raw or []):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str):
            if name in own:  # never "the last one wins"
                problems.append(located(marks, filename, ("kernels", i, "name"), f"duplicate kernel name {brief(name)} "
                                        f"in this overlay (first at kernels[{own[name]}])"))
            own.setdefault(name, i)
        try:
            spec = KernelSpec.model_validate(raw, context=context)
        except ValidationError as exc:
            problems += validation_problems(exc, marks, filename, prefix=("kernels", i))
            continue
        if spec.solution not in base.solutions:
            problems.append(located(marks, filename, ("kernels", i, "solution"),
                                     f"{spec.solution.value!r} is not listed under the base manifest's solutions "
                                     f"({', '.join(s.value for s in base.solutions)})"))
            continue
        spec._origin = f"{filename}:{marks.marks.get(('kernels', i), (0, 0))[0]}"
        if spec.name not in kernels:
            order.append(spec.name)
        kernels[spec.name] = spec
    disabled: dict[str, int] = {}
    for i, name in enumerate(disable_raw or []):
        line, col = marks.marks.get(("disable", i), (1, 1))
        if isinstance(name, str) and name in disabled:
            problems.append(f"{filename}:{line}:{col}: disable[{i}]: {brief(name)} is already disabled at disable[{disabled[name]}]")
        elif isinstance(name, str) and name in own:
            problems.append(f"{filename}:{line}:{col}: disable[{i}]: {brief(name)} is added by this overlay "
                            f"(kernels[{own[name]}]); remove the entry instead of disabling it")
        elif not isinstance(name, str) or name not in kernels:
            problems.append(f"{filename}:{line}:{col}: disable[{i}]: no kernel named {brief(name)}"
                            f"{did_you_mean(str(name), order) if isinstance(name, str) else ''}")
        else:
            disabled[name] = i
            kernels.pop(name)
            order.remove(name)
    if problems:
        raise ManifestError(_in_file_order(problems, filename))
    merged_kernels = tuple(kernels[n] for n in order)
    cross = cross_kernel_problems(merged_kernels, base.solutions)
    if cross:  # each at the overlay entry that causes it (or at base: for a base kernel)
        raise ManifestError([located(marks, filename, ("kernels", own[merged_kernels[loc[1]].name]) + loc[2:]
                                     if merged_kernels[loc[1]].name in own else ("base",), message)
                             for loc, message in cross])
    # validated kernel models pass through as they are; the cross-kernel checks ran above
    merged = Manifest.model_validate(
        {
            "schema_version": base.schema_version,
            "solutions": base.solutions,
            "attention_plan": base.attention_plan,
            "kernels": merged_kernels,
        },
        context=context,
    )
    merged._path = filename
    merged._digest = hashlib.sha256((base.digest + digest).encode()).hexdigest()[:12]
    return merged


def load_perf_table(path: os.PathLike | str, *, text: Optional[str] = None) -> "PerfTable":
    """Load and validate a perf table (``perf/*.yaml``); raise ManifestError with every problem located."""
    from registry.perf import PerfTable

    data, marks, filename, _ = read_yaml(path, text=text, what="perf table")
    if not isinstance(data, dict):
        raise ManifestError([f"{filename}:1:1: (top level): expected a mapping with gpu, arch and entries, "
                             f"got {kind_of(data)}"])
    try:
        table = PerfTable.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(validation_problems(exc, marks, filename)) from None
    table._path, table._marks = filename, marks
    return table


def bundled_perf_dir() -> Path:
    """The committed perf tables: ``perf/`` in a checkout, ``registry/perf_tables`` in a wheel."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "perf"
    return checkout if checkout.is_dir() else here / "perf_tables"
