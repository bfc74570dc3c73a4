"""One root error class, so callers can catch everything kernelsel raises."""

from __future__ import annotations


class KernelselError(Exception):
    """Root of every error kernelsel raises on purpose."""


class ManifestError(KernelselError):
    """A manifest that does not load; carries every problem, each ``file:line:col: path: msg``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in manifest"
        super().__init__(head + ":\n" + "\n".join(self.problems))


class RequestError(KernelselError, ValueError):
    """A request with a bad field; the message names the field and what is accepted."""


class MissingDependencyError(KernelselError, ImportError):
    """A library an adapter needs is not installed; keeps the original message, adds the install hint."""


class AdapterInputError(KernelselError, ValueError):
    """A tensor handed to an adapter breaks the op's contract (shape, dtype, device, layout)."""


class UnsupportedFeatureError(KernelselError, ValueError):
    """A caller asked an adapter for something its kernel cannot do; never dropped silently."""
