"""Platform: the machine a selection is for (arch + installed libraries), a plain value.

``detect_platform()`` looks up installed distributions through package
metadata (no import of torch/flashinfer/triton) and the arch through torch
only when asked to and torch is installed.  ``Platform.hypothetical(arch)``
describes a machine with every library present, for ``explain --arch``.

``detect_gpus(sources)`` is the one place this machine's GPU is found.  Its
callers differ only in which sources they may use: the runtime asks torch
(an engine has it loaded; the Selector asks only when torch is imported
already or no arch was given), the CLI asks ``nvidia-smi`` (so that
``kernelsel explain`` never imports torch), ``kernelsel doctor`` asks both.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Iterable, Mapping, Optional, Sequence

from registry.vocab import Arch, parse_arch
from selector.availability import describe_exception

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


TORCH = "torch"
NVIDIA_SMI = "nvidia-smi"


@dataclass(frozen=True)
class Gpu:
    """One GPU as a detection source reports it."""

    name: str
    compute_cap: str  # "9.0"
    arch: Optional[Arch]  # None when kernelsel knows no SM of that compute capability
    driver: str = ""  # nvidia-smi only


@dataclass(frozen=True)
class GpuDetection:
    """What ``detect_gpus`` found: the GPUs of the first source that saw any, or why none."""

    gpus: tuple[Gpu, ...] = ()  # the current device first
    source: str = ""  # the source that found them
    notes: tuple[str, ...] = ()  # why each source asked before it found none

    @property
    def current(self) -> Optional[Gpu]:
        return self.gpus[0] if self.gpus else None


def _gpu(name: str, cap: str, driver: str = "") -> Gpu:
    try:
        arch = parse_arch(cap) if cap else None
    except ValueError:
        arch = None
    return Gpu(name=name, compute_cap=cap, arch=arch, driver=driver)


def torch_gpus() -> tuple[tuple[Gpu, ...], str]:
    """The CUDA devices torch sees, the current one first (imports torch if installed), or why none."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return (), ""
    try:
        import torch

        if not torch.cuda.is_available():
            return (), f"torch {version} sees no CUDA device"
        current = torch.cuda.current_device()
        order = [current] + [i for i in range(torch.cuda.device_count()) if i != current]
        gpus = []
        for i in order:
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(_gpu(torch.cuda.get_device_name(i), f"{major}.{minor}"))
        return tuple(gpus), ""
    except Exception as exc:  # noqa: BLE001 - a broken torch or driver raises anything: reported, not raised
        return (), f"torch: {describe_exception(exc)}"


def nvidia_smi_gpus() -> tuple[tuple[Gpu, ...], str]:
    """Every GPU ``nvidia-smi`` lists, with the driver (imports nothing), or why none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return (), "nvidia-smi not found"
    try:
        proc = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return (), f"nvidia-smi failed: {describe_exception(exc)}"
    if proc.returncode != 0:
        first = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[0]
        return (), f"nvidia-smi failed: {first}".rstrip(": ")
    gpus = []
    for line in proc.stdout.strip().splitlines():
        name, cap, driver = (part.strip() for part in (line.split(",") + ["", ""])[:3])
        gpus.append(_gpu(name, cap, driver))
    return tuple(gpus), "" if gpus else "nvidia-smi lists no GPU"


GPU_SOURCES: dict[str, Callable[[], tuple[tuple[Gpu, ...], str]]] = {TORCH: torch_gpus, NVIDIA_SMI: nvidia_smi_gpus}
"""Each way of finding the GPUs: name -> function returning (GPUs, why none)."""


def detect_gpus(sources: Sequence[str] = (TORCH,)) -> GpuDetection:
    """This machine's GPUs, from the first of ``sources`` (``"torch"``, ``"nvidia-smi"``) that finds any.

    Never raises: a source that fails or sees nothing adds a note saying why.
    """
    notes = []
    for source in sources:
        gpus, note = GPU_SOURCES[source]()
        if gpus:
            return GpuDetection(gpus=gpus, source=source, notes=tuple(notes))
        if note:
            notes.append(note)
    return GpuDetection(notes=tuple(notes))


def detect_platform(distributions: Iterable[str], *, arch: Optional[Arch | str] = None) -> Platform:
    """This machine: installed libraries, and the CUDA arch unless ``arch`` is given."""
    libs = installed_versions(distributions)
    if arch is not None:
        return Platform(arch=parse_arch(arch), libraries=libs, detected=True)
    gpu = detect_gpus((TORCH,)).current
    return Platform(arch=gpu.arch if gpu else None, libraries=libs, device_name=gpu.name if gpu else "", detected=True)


def required_distributions(solutions: Mapping) -> list[str]:
    """Every distribution any solution in the manifest requires."""
    return sorted({d for info in solutions.values() for d in info.requires})
