"""How each kernel's claims are known: run by ``kernelsel verify`` on which GPU, or only read from sources.

Derived, never declared: the runs come from the committed results of
``kernelsel verify --out bench/results/verify-<gpu>-<mode>.json`` (shipped as
package data under ``registry/verify_results``), the sources from the
kernel's own ``refs`` and ``sources``.  A kernel no results file ran is
labelled "never run by kernelsel" wherever a selection is shown (explain,
show, matrix, doctor), so a claim nobody executed is never presented like
one that was.  Reading the files is lazy and cached: importing this module
reads nothing.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from registry.vocab import Arch

RESULTS_DIR = Path(__file__).parent / "verify_results"
"""``bench/results`` as shipped with the package (a link in a checkout)."""

RESULTS_GLOB = "verify-*.json"

_STATUSES = ("pass", "fail", "error", "skip")


@dataclass(frozen=True)
class VerifyRun:
    """One committed ``kernelsel verify`` results file's record of one kernel."""

    file: str  # "bench/results/verify-h200-quick.json"
    gpu: str  # "NVIDIA H200"
    arch: Optional[Arch]
    date: str  # "" when the file records none
    versions: tuple[tuple[str, str], ...]
    counts: tuple[tuple[str, int], ...]  # status -> cases, in _STATUSES order

    def count(self, status: str) -> int:
        return dict(self.counts).get(status, 0)

    @property
    def executed(self) -> int:
        """Cases that ran (passed, failed or errored); skipped ones did not."""
        return self.count("pass") + self.count("fail") + self.count("error")

    def describe(self) -> str:
        """``NVIDIA H200 (sm_90), 2026-11-21: 17 passed, 2 skipped (bench/results/verify-h200-quick.json)``."""
        where = f"{self.gpu or 'an unnamed GPU'} ({self.arch.value if self.arch else 'unknown arch'})"
        when = f", {self.date}" if self.date else ""
        words = {"pass": "passed", "fail": "FAILED", "error": "errors", "skip": "skipped"}
        tally = ", ".join(f"{n} {words[s]}" for s, n in self.counts if n)
        return f"{where}{when}: {tally} ({self.file})"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "gpu": self.gpu, "arch": self.arch.value if self.arch else None, "date": self.date,
                "versions": dict(self.versions), "counts": dict(self.counts)}


@dataclass(frozen=True)
class Provenance:
    """One kernel's provenance: its verify runs (possibly none) and where its facts were read."""

    kernel: str
    runs: tuple[VerifyRun, ...]
    sources: tuple[str, ...]

    @property
    def ran(self) -> bool:
        return any(r.executed for r in self.runs)

    def ran_on(self, arch: Optional[Arch]) -> tuple[VerifyRun, ...]:
        return tuple(r for r in self.runs if r.executed and (arch is None or r.arch == arch))

    def summary(self, arch: Optional[Arch] = None) -> str:
        """One line: verified where (for ``arch`` when given), or never run and read from which sources."""
        here = self.ran_on(arch)
        if here:
            more = f" (also {', '.join(r.file for r in here[1:])})" if len(here) > 1 else ""
            return f"verified by kernelsel verify on {here[0].describe()}{more}"
        read = f"facts from {_list(self.sources)}" if self.sources else "no source recorded"
        elsewhere = self.ran_on(None)
        if elsewhere:
            archs = ", ".join(dict.fromkeys(r.arch.value for r in elsewhere if r.arch)) or "another GPU"
            return f"never run by kernelsel on {arch.value if arch else 'this arch'} (verified on {archs} only); {read}"
        return f"never run by kernelsel: {read}"

    def to_dict(self) -> dict[str, Any]:
        return {"ran": self.ran, "runs": [r.to_dict() for r in self.runs if r.executed], "sources": list(self.sources)}


def _list(items: tuple[str, ...], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


_SOURCE = re.compile(r"^(?P<src>[\w.\-]+/[\w.\-/]+?(?:#\d+|\.\w+))(?::[\d,\- ]+)?")
_REPO_FILE = re.compile(r"^(?P<src>[\w.\-]+/[\w.\-]+ [\w.\-/]+\.\w+)(?::[\d,\- ]+)?(?:\s|$)")


def source_of(ref: str) -> str:
    """The document a ref points at: ``flashinfer/decode.py:4205 trtllm_...`` -> ``flashinfer/decode.py``,
    ``NVIDIA/TensorRT-LLM#12606 (...)`` -> ``NVIDIA/TensorRT-LLM#12606``, ``owner/repo path/file.py NAME`` ->
    ``owner/repo path/file.py``; else the ref's first words."""
    ref = ref.strip()
    m = _REPO_FILE.match(ref) or _SOURCE.match(ref)
    if m:
        return m.group("src")
    return " ".join(ref.split()[:4])


def kernel_sources(spec: Any) -> tuple[str, ...]:
    """Distinct sources of a kernel's facts: its per-fact ``sources`` (if the schema has them), then ``refs``."""
    refs = list(getattr(spec, "sources", {}).values()) + list(spec.refs)
    return tuple(dict.fromkeys(source_of(r) for r in refs))


def _parse(path: Path, label: str) -> dict[str, VerifyRun]:
    data = json.loads(path.read_text(encoding="utf-8"))
    env = data.get("environment", {}) or {}
    try:
        arch: Optional[Arch] = Arch(env.get("arch")) if env.get("arch") else None
    except ValueError:
        arch = None
    counts: dict[str, dict[str, int]] = {}
    for r in data.get("results", []):
        per = counts.setdefault(str(r.get("kernel")), dict.fromkeys(_STATUSES, 0))
        status = r.get("status")
        if status in per:
            per[status] += 1
    versions = tuple(sorted((str(k), str(v)) for k, v in (env.get("versions") or {}).items()))
    return {
        kernel: VerifyRun(file=label, gpu=str(env.get("gpu") or ""), arch=arch, date=str(env.get("date") or ""),
                          versions=versions, counts=tuple(per.items()))
        for kernel, per in counts.items()
    }


@functools.lru_cache(maxsize=None)
def committed_runs(directory: Optional[str] = None) -> dict[str, tuple[VerifyRun, ...]]:
    """kernel name -> its runs in every ``verify-*.json`` under ``directory`` (default: the shipped results).

    An unreadable file is skipped (provenance is shown, never fatal); files are
    read in name order so the result is the same on every machine.
    """
    root = Path(directory) if directory else RESULTS_DIR
    out: dict[str, list[VerifyRun]] = {}
    for path in sorted(root.glob(RESULTS_GLOB)) if root.is_dir() else []:
        try:
            runs = _parse(path, f"bench/results/{path.name}")
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        for kernel, run in runs.items():
            out.setdefault(kernel, []).append(run)
    return {k: tuple(v) for k, v in out.items()}


def provenance(spec: Any, runs: Optional[dict[str, tuple[VerifyRun, ...]]] = None) -> Provenance:
    """``spec``'s provenance from the committed verify results (or ``runs``, for tests and other result sets)."""
    table = committed_runs() if runs is None else runs
    return Provenance(kernel=spec.name, runs=table.get(spec.name, ()), sources=kernel_sources(spec))
