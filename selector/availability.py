"""Can this machine import and build a kernel's adapter?  Found on first use, recorded with the reason.

The solver decides eligibility from the manifest and from package *metadata*
(no import).  That is not enough at run time: a package can be installed and
still fail to import (a CUDA or driver mismatch raises inside ``import
flashinfer``), and an adapter can fail to build (a JIT compile error, an
unsupported driver).  Both are found here, when an adapter is first built
(``Selection.adapter``), by ``kernelsel doctor`` and by ``explain --probe``:

* ``probe(kernel)`` imports the adapter's module and the libraries its class
  names in ``libraries``; a failure holds for every request (*kernel-wide*);
* ``build(kernel, request)`` probes, then constructs the adapter; a failure
  of the constructor may depend on the request (*per request*).

A failure is an *unavailability*: a reason string (the exception's type and
first line, plus the install hint for an import) that the owning ``Selector``
records, so later selections reject the kernel with that reason -- explain
shows it -- and move to the next eligible kernel without retrying it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

UNAVAILABLE = "unavailable: "
"""Prefix of every unavailability reason the solver shows."""

_MAX_MESSAGE = 240


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message`` (cut to a readable length), for a reason string."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > _MAX_MESSAGE:
        first = first[: _MAX_MESSAGE - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _import_reason(what: str, exc: BaseException, install: str) -> str:
    hint = f" ({install})" if install and isinstance(exc, ImportError) and install not in str(exc) else ""
    return f"cannot import {what}: {describe_exception(exc)}{hint}"


def probe_class(cls: type, install: str = "") -> Optional[str]:
    """None when every library ``cls.libraries`` names imports here, else why not (never raises)."""
    for module in getattr(cls, "libraries", ()):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything (RuntimeError, OSError, ...)
            return _import_reason(module, exc, install)
    return None


def probe(adapter_path: str, resolve: Callable[[str], type], install: str = "") -> tuple[Optional[type], Optional[str]]:
    """(adapter class, None) when the adapter and its libraries import here, else (None, why not)."""
    try:
        cls = resolve(adapter_path)
    except Exception as exc:  # noqa: BLE001 - see probe_class
        return None, _import_reason(adapter_path, exc, install)
    reason = probe_class(cls, install)
    return (None, reason) if reason else (cls, None)


def build(kernel: Any, request: Any, resolve: Callable[[str], type], install: str = "") -> tuple[Any, Optional[str], bool]:
    """Probe and construct ``kernel``'s adapter for ``request``.

    Returns ``(adapter, None, _)`` on success, else ``(None, reason,
    per_request)``: ``per_request`` is False for an import failure (it holds
    for every request) and True for a constructor failure.
    """
    cls, reason = probe(kernel.adapter, resolve, install)
    if cls is None:
        return None, reason, False
    try:
        return cls(kernel, request), None, False
    except Exception as exc:  # noqa: BLE001 - a JIT or driver failure raises anything; recorded, never swallowed
        return None, f"adapter construction failed: {describe_exception(exc)}", True
