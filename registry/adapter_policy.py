"""Which adapter classes a manifest may name: a manifest is data, not a way to import arbitrary code.

An ``adapter: module:Class`` must name a class defined at the top level of a module under
``registry.adapters`` -- or under a package the user allowlisted (``KERNELSEL_ADAPTER_ALLOWLIST``,
``--allow-adapter``, ``load_manifest(adapter_allowlist=)``).  The module is found and read as source,
never imported, to check the class exists: validating a manifest runs none of its code.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
from typing import Any, Iterable, Mapping, Optional, Union

from registry.errors import brief
from registry.vocab import did_you_mean

ADAPTER_PACKAGE = "registry.adapters"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_ADAPTER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)")
"""Matched with ``fullmatch``: ``$`` would also match before a final newline (``mod:Class\n``)."""

ENV_ADAPTER_ALLOWLIST = "KERNELSEL_ADAPTER_ALLOWLIST"
"""Comma-separated module prefixes whose classes a manifest's ``adapter:`` may name, besides registry.adapters."""

ALLOWLIST_HINT = f"allow another package with --allow-adapter PREFIX or {ENV_ADAPTER_ALLOWLIST}=PREFIX,..."


def parse_adapter_allowlist(prefixes: Union[str, Iterable[str], None], source: str = ENV_ADAPTER_ALLOWLIST) -> tuple[str, ...]:
    """Validated module prefixes from a comma-separated string or an iterable; ValueError names ``source``.

    A prefix is a dotted module path (``mycompany.kernels``).  It admits that
    module and the modules under it -- never a name that merely starts with
    the same letters (``mycompany.kernels_evil``).  Standard-library modules
    (``os``, ``subprocess``, ``builtins``...) cannot be allowlisted.
    """
    if prefixes is None:
        return ()
    items = prefixes.split(",") if isinstance(prefixes, str) else list(prefixes)
    out: list[str] = []
    for raw in items:
        text = str(raw).strip()
        if not text and isinstance(prefixes, str):
            continue  # "a,,b" or a trailing comma
        if not _MODULE.fullmatch(text):
            raise ValueError(f"{source}: {brief(text)} is not a module prefix like mycompany.kernels "
                             f"(dotted Python identifiers, no ':' or '/')")
        if text.split(".")[0] in sys.stdlib_module_names:
            raise ValueError(f"{source}: {text!r} is in the standard library; the allowlist names packages "
                             f"that hold adapter classes (e.g. mycompany.kernels)")
        if text not in out:
            out.append(text)
    return tuple(out)


def adapter_allowlist_from_env(environ: Optional[Mapping[str, str]] = None) -> tuple[str, ...]:
    """The prefixes in ``KERNELSEL_ADAPTER_ALLOWLIST`` (read when a manifest is loaded, never at import)."""
    env = os.environ if environ is None else environ
    return parse_adapter_allowlist(env.get(ENV_ADAPTER_ALLOWLIST, ""))


def _find_module_spec(module: str) -> Any:
    """The module's spec, found the way ``import`` would find it but without running any module code.

    ``importlib.util.find_spec`` imports every parent package of a dotted name;
    this walks the dotted name through ``sys.meta_path`` finders instead, using a
    parent's search path (from ``sys.modules`` when it is already imported).
    """
    parts = module.split(".")
    search: Optional[list[str]] = None
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        if i:
            search = list(spec.submodule_search_locations or [])
            if not search:
                return None  # the parent is a module, not a package
        loaded = sys.modules.get(name)
        spec = getattr(loaded, "__spec__", None) if loaded is not None else None
        if spec is None:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(name, search)
                if spec is not None:
                    break
        if spec is None:
            return None
    return spec


@functools.lru_cache(maxsize=None)
def _module_classes(module: str) -> Optional[frozenset[str]]:
    """Top-level class names of an adapter module, read from source (nothing is imported: no torch)."""
    spec = _find_module_spec(module)
    if spec is None or not spec.origin or not str(spec.origin).endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    return frozenset(n.name for n in tree.body if isinstance(n, ast.ClassDef))


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def check_adapter_path(path: Any, allowlist: Iterable[str] = ()) -> Optional[str]:
    """None if ``module:Class`` names a class inside the adapter package (or an allowlisted one), else why not.

    A manifest is data: its ``adapter:`` must not be a way to import arbitrary
    code.  Only classes defined at the top level of a module under
    ``registry.adapters`` (or under a prefix in ``allowlist``) are accepted,
    and the module is read as source, never imported, to check.
    """
    allowed = (ADAPTER_PACKAGE,) + tuple(p for p in allowlist if p != ADAPTER_PACKAGE)
    accepted = " or ".join(f"{p}.MODULE:Class" for p in allowed)
    m = _ADAPTER.fullmatch(path) if isinstance(path, str) else None
    if m is None:
        return f"{brief(path)} is not 'module:Class'; expected {accepted}"
    module, attr = m.groups()
    if not any(_within(module, p) for p in allowed):
        extra = "" if allowlist else f"; {ALLOWLIST_HINT}"
        return (f"{brief(path, 100)} is outside {', '.join(allowed)}: a manifest is data and cannot import arbitrary code; "
                f"expected {accepted}{extra}")
    try:
        classes = _module_classes(module)
    except Exception as exc:  # noqa: BLE001 - unreadable source, a broken finder: say so, never raise
        return f"module {module} cannot be read: {type(exc).__name__}: {exc}"
    if classes is None:
        return f"module {module} does not exist (or has no Python source)"
    if attr not in classes:
        return f"{module} defines no class {attr!r}{did_you_mean(attr, sorted(classes))}"
    return None
