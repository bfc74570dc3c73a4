"""Platform: the machine a selection is for (arch + installed libraries), a plain value.

``detect_platform()`` looks up installed distributions through package
metadata (no import of torch/flashinfer/triton) and the arch through torch
only when asked to and torch is installed.  ``Platform.hypothetical(arch)``
describes a machine with every library present, for ``explain --arch``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, Mapping, Optional

from registry.vocab import Arch, parse_arch

EVERYTHING = "*"
"""Marker in ``libraries`` meaning 'assume every library is installed'."""


@dataclass(frozen=True)
class Platform:
    arch: Optional[Arch]
    libraries: tuple[tuple[str, str], ...] = ()  # (distribution, version); ("*", "*") = all present
    device_name: str = ""
    detected: bool = False

    @classmethod
    def hypothetical(cls, arch: Arch | str) -> "Platform":
        return cls(arch=parse_arch(arch), libraries=((EVERYTHING, EVERYTHING),))

    def has(self, distribution: str) -> bool:
        return any(name in (distribution, EVERYTHING) for name, _ in self.libraries)

    def version(self, distribution: str) -> Optional[str]:
        for name, version in self.libraries:
            if name == distribution:
                return version
        return None

    def describe(self) -> str:
        arch = self.arch.value if self.arch else "unknown arch"
        if self.libraries == ((EVERYTHING, EVERYTHING),):
            return f"{arch} (hypothetical: every library assumed installed)"
        else:
            libs = ", ".join(f"{n} {v}" for n, v in self.libraries) or "no optional libraries"
        where = f"{self.device_name}, " if self.device_name else ""
        return f"{arch} ({where}{libs})"

    def to_dict(self) -> dict:
        return {
            "arch": self.arch.value if self.arch else None,
            "device_name": self.device_name,
            "libraries": dict(self.libraries),
            "detected": self.detected,
        }


def installed_versions(distributions: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(name, version) for each distribution that is installed, from package metadata only."""
    found = []
    for name in sorted(set(distributions)):
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(found)


@functools.lru_cache(maxsize=1)
def _cuda_device() -> tuple[Optional[Arch], str]:
    """The current CUDA device's arch and name, via torch if installed (imports torch)."""
    try:
        metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None, ""
    import torch

    if not torch.cuda.is_available():
        return None, ""
    major, minor = torch.cuda.get_device_capability()
    try:
        arch = parse_arch(f"{major}.{minor}")
    except ValueError:
        arch = None
    return arch, torch.cuda.get_device_name()


def detect_platform(distributions: Iterable[str], *, arch: Optional[Arch | str] = None) -> Platform:
    """This machine: installed libraries, and the CUDA arch unless ``arch`` is given."""
    libs = installed_versions(distributions)
    if arch is not None:
        return Platform(arch=parse_arch(arch), libraries=libs, detected=True)
    dev_arch, name = _cuda_device()
    return Platform(arch=dev_arch, libraries=libs, device_name=name, detected=True)


def required_distributions(solutions: Mapping) -> list[str]:
    """Every distribution any solution in the manifest requires."""
    return sorted({d for info in solutions.values() for d in info.requires})
