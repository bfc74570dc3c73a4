"""One root error class, so callers can catch everything kernelsel raises."""

from __future__ import annotations

from typing import Any, Optional


class KernelselError(Exception):
    """Root of every error kernelsel raises on purpose."""


class ManifestError(KernelselError):
    """A manifest that does not load; carries every problem, each ``file:line:col: path: msg``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in manifest"
        super().__init__(head + ":\n" + "\n".join(self.problems))

    def __reduce__(self) -> tuple:  # pickled by its problems (the default would rebuild it from the message)
        return (type(self), (self.problems,))


class RequestError(KernelselError, ValueError):
    """A request with a bad field; the message names the field and what is accepted.

    ``problems`` holds one ``request.FIELD: message`` line per bad field when
    the request model raised it (the CLI renders them with flag names).
    """

    def __init__(self, message: str, problems: Optional[list[str]] = None):
        self.problems = list(problems) if problems else [message]
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.problems))


class MissingDependencyError(KernelselError, ImportError):
    """A library an adapter needs is not installed; keeps the original message, adds the install hint."""


class AdapterInputError(KernelselError, ValueError):
    """A tensor handed to an adapter breaks the op's contract (shape, dtype, device, layout)."""


class UnsupportedFeatureError(KernelselError, ValueError):
    """A caller asked an adapter for something its kernel cannot do; never dropped silently."""


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted input.

    Never raises: a value whose repr fails (an int past Python's digit limit,
    a broken ``__repr__``) is named by its type.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
