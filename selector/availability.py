"""Can this machine import and build a kernel's adapter?  Found on first use, recorded with the reason.

The solver decides eligibility from the manifest and from package *metadata*
(no import).  That is not enough at run time: a package can be installed and
still fail to import (a CUDA or driver mismatch raises inside ``import
flashinfer``), and an adapter can fail to build (a JIT compile error, an
unsupported driver).  Both are found here, when an adapter is first built
(``Selection.adapter``), by ``kernelsel doctor`` and by ``explain --probe``:

* ``adapter_class(path)`` is the one resolver of a manifest's ``adapter:``
  (``module:Class``) to the class; it imports the module;
* ``probe(kernel)`` imports the adapter's module and the libraries its class
  names in ``libraries``; a failure holds for every request (*kernel-wide*);
* ``build(kernel, request)`` probes, then constructs the adapter; a failure
  of the constructor may depend on the request (*per request*).

A failure is an *unavailability*: a reason string (the exception's type and
first line, plus the install hint for an import) kept in an
``UnavailableKernels`` record.  A ``Selector`` owns one and hands it to every
``Selection`` it makes, so a failure found while building one selection's
adapter makes later selections reject the kernel with that reason -- explain
shows it -- and move to the next eligible kernel without retrying it.  The
record is shared data, not a way back to the Selector: it tells its
subscribers (the Selector's cache) that it changed, nothing more.
"""

from __future__ import annotations

import functools
import importlib
import threading
import weakref
from types import MappingProxyType
from typing import Any, Callable, Hashable, Mapping, Optional

UNAVAILABLE = "unavailable: "
"""Prefix of every unavailability reason the solver shows."""

_MAX_MESSAGE = 240
_NOTHING: Mapping[str, str] = MappingProxyType({})


@functools.lru_cache(maxsize=None)
def adapter_class(path: str) -> type:
    """The class a manifest's ``adapter: module:Class`` names (imports the module; cached).

    The manifest loader has already checked that the path lies inside the
    adapter package or an allowlisted one (``registry.adapter_policy``).
    """
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


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


def probe(adapter_path: str, install: str = "") -> tuple[Optional[type], Optional[str]]:
    """(adapter class, None) when the adapter and its libraries import here, else (None, why not)."""
    try:
        cls = adapter_class(adapter_path)
    except Exception as exc:  # noqa: BLE001 - see probe_class
        return None, _import_reason(adapter_path, exc, install)
    reason = probe_class(cls, install)
    return (None, reason) if reason else (cls, None)


def build(kernel: Any, request: Any, install: str = "") -> tuple[Any, Optional[str], bool]:
    """Probe and construct ``kernel``'s adapter for ``request``.

    Returns ``(adapter, None, _)`` on success, else ``(None, reason,
    per_request)``: ``per_request`` is False for an import failure (it holds
    for every request) and True for a constructor failure.
    """
    cls, reason = probe(kernel.adapter, install)
    if cls is None:
        return None, reason, False
    try:
        return cls(kernel, request), None, False
    except Exception as exc:  # noqa: BLE001 - a JIT or driver failure raises anything; recorded, never swallowed
        return None, f"adapter construction failed: {describe_exception(exc)}", True


class UnavailableKernels:
    """Kernels whose adapter cannot be used here, and why: for every request, or for one request.

    One record per ``Selector``, referenced by every ``Selection`` it makes: a
    failure one selection finds while building its adapter is seen by later
    selections.  Thread-safe: changes take the record's lock; lookups are
    plain dict reads.  Subscribers (the Selector's cache) are told after each
    change, outside the lock, so one may take its own lock to react.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kernel_wide: dict[str, str] = {}
        self._per_request: dict[Hashable, dict[str, str]] = {}
        self._subscribers: list[Callable[[], Optional[Callable[[], None]]]] = []

    def __getstate__(self) -> dict:
        """Pickled as its records only: the lock and the subscribers belong to this process."""
        with self._lock:
            return {"kernel_wide": dict(self._kernel_wide), "per_request": {k: dict(v) for k, v in self._per_request.items()}}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self._kernel_wide, self._per_request = state["kernel_wide"], state["per_request"]

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change.  A bound method is held weakly: the record keeps no owner alive."""
        ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda: callback)
        with self._lock:
            self._subscribers.append(ref)

    def mark(self, kernel: str, reason: str, request: Optional[Hashable] = None) -> None:
        """Record that ``kernel`` cannot be used here: for ``request`` only, or (None) for every request."""
        with self._lock:
            if request is None:
                self._kernel_wide[kernel] = reason
            else:
                self._per_request.setdefault(request, {})[kernel] = reason
            subscribers = list(self._subscribers)
        for ref in subscribers:
            callback = ref()
            if callback is not None:
                callback()

    def reason(self, kernel: str, request: Optional[Hashable] = None) -> Optional[str]:
        """Why ``kernel`` cannot be used (for ``request``), or None if nothing is recorded."""
        reason = self._kernel_wide.get(kernel)
        if reason is None and request is not None:
            reason = self._per_request.get(request, {}).get(kernel)
        return reason

    def reasons(self, request: Optional[Hashable] = None) -> Mapping[str, str]:
        """kernel -> reason for ``request`` (kernel-wide ones, then the request's own): what the solver rejects."""
        if not self._kernel_wide and not self._per_request:  # nothing recorded (the usual case): no lock, no copy
            return _NOTHING
        with self._lock:
            out = dict(self._kernel_wide)
            if request is not None:
                out.update(self._per_request.get(request, {}))
        return MappingProxyType(out)

    @property
    def kernel_wide(self) -> dict[str, str]:
        """Kernels unusable for every request: name -> reason (a copy)."""
        with self._lock:
            return dict(self._kernel_wide)

    def build_adapter(self, kernel: Any, request: Hashable, install: str = "") -> tuple[Any, Optional[str]]:
        """``(adapter, None)``, or ``(None, reason)`` with the reason recorded here.

        A kernel already recorded as unavailable is not tried again (no second
        failing import or JIT); a new failure is recorded kernel-wide for an
        import, for ``request`` only for a constructor.
        """
        known = self.reason(kernel.name, request)
        if known is not None:
            return None, known
        adapter, reason, per_request = build(kernel, request, install)
        if adapter is not None:
            return adapter, None
        reason = UNAVAILABLE + reason
        self.mark(kernel.name, reason, request if per_request else None)
        return None, reason
