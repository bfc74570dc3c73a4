"""Architecture promises, checked on the source (AST) of every module of the project.

1. **No reaching into another module's privates.**  No ``from X import _name`` and no ``X._name`` on an
   imported module ``X`` of the project, when ``X`` is another module (a package's own private names count
   too: ``selector.api`` may not take ``selector.selection._something``).  If B needs A's private, that is
   a public function missing from A or a concept for a third module.  Dunder names (``__version__``) are
   not private; ``from __future__`` is not a module of the project; third-party modules are their
   maintainers' business.  ``setattr(X, "_name", ...)`` / ``monkeypatch.setattr(X, "_name", ...)`` and
   ``getattr`` count as uses.  Tests follow the same rule with one exception: a test module may use the
   privates of the module it tests, the one its path mirrors -- ``tests/P/test_N.py`` tests ``P.N``
   (``tests/selector/tools/test_doctor.py`` -> ``selector.tools.doctor``), or ``P.S.M`` when ``N`` is
   ``A_M`` and ``S`` a subpackage of ``P`` whose name starts with ``A``
   (``tests/registry/adapters/test_triton_planning.py`` -> ``registry.adapters.triton_kernels.planning``).
   Anything else a test needs goes through public names.
2. **The runtime never imports the tools.**  No module of ``selector/`` outside ``selector/tools/``
   imports ``selector.tools`` -- at the top, lazily inside a function, or through ``importlib``.
3. **Data flows one way.**  ``registry/`` never imports ``selector`` at run time (an import under
   ``if TYPE_CHECKING:`` is only for type hints and is allowed).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry", "selector")
SOURCES = ("registry", "selector", "tests", "bench", "examples")


@dataclass(frozen=True)
class Module:
    path: Path
    name: str  # dotted, from the repository root: selector.tools.doctor, tests.selector.test_solver
    is_package: bool

    @property
    def tested(self) -> frozenset[str]:
        """The modules a test module mirrors (see the module docstring); empty for any other module."""
        parts = self.name.split(".")
        if parts[0] != "tests" or not parts[-1].startswith("test_"):
            return frozenset()
        package, subject = parts[1:-1], parts[-1][len("test_"):]
        out = {".".join(package + [subject])}
        for i in range(1, subject.count("_") + 1):
            prefix, rest = subject.split("_", i)[:i], subject.split("_", i)[i]
            directory = ROOT.joinpath(*package)
            for sub in sorted(directory.glob("_".join(prefix) + "*/__init__.py")) if directory.is_dir() else []:
                out.add(".".join(package + [sub.parent.name, rest]))
        return frozenset(out)


def _modules() -> list[Module]:
    out = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out.append(Module(path, ".".join(parts), is_package))
    return out


MODULES = _modules()


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` names, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own(module: Module, target: str) -> bool:
    """Whether ``module`` may use ``target``'s privates: itself, or (for a test) the module it mirrors."""
    return target == module.name or target in module.tested


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes inside ``if TYPE_CHECKING:`` blocks (type hints only: never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imports(module: Module, tree: ast.Module) -> Iterator[tuple[ast.AST, str, list[ast.alias]]]:
    """(node, imported module, names) for every import, anywhere in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node, _absolute(module, node), node.names
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node, node.args[0].value, []


def _module_aliases(module: Module, tree: ast.Module) -> dict[str, str]:
    """Local name -> project module, for names bound by an import to a module (not to a function or class)."""
    known = {m.name for m in MODULES}
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _project(alias.name):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if _project(base) and full in known:
                    aliases[alias.asname or alias.name] = full
    return aliases


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def private_uses(module: Module, source: Optional[str] = None) -> list[str]:
    """Every use of another module's private in ``module`` (its file, or ``source`` given as text)."""
    text = module.path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, str(module.path))
    where = module.path.relative_to(ROOT)
    problems = []
    for node, target, names in _imports(module, tree):
        if not _project(target) or _own(module, target):
            continue
        for alias in names:
            if _private(alias.name):
                problems.append(f"{where}:{node.lineno}: from {target} import {alias.name}")
    aliases = _module_aliases(module, tree)
    known = {m.name for m in MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner, attr = node.value, node.attr
        elif (isinstance(node, ast.Call) and _dotted(node.func) in ("setattr", "getattr", "monkeypatch.setattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            owner, attr = node.args[0], node.args[1].value
        else:
            continue
        dotted = _dotted(owner)
        if dotted is None or dotted.split(".")[0] not in aliases:
            continue
        head, _, rest = dotted.partition(".")
        target = aliases[head] + (f".{rest}" if rest else "")
        if target in known and not _own(module, target):
            problems.append(f"{where}:{node.lineno}: {dotted}.{attr} (a private of {target})")
    return problems


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_no_module_uses_another_modules_privates(module):
    assert private_uses(module) == []


RUNTIME = [m for m in MODULES if m.name.split(".")[0] == "selector" and not m.name.startswith("selector.tools")]
REGISTRY = [m for m in MODULES if m.name.split(".")[0] == "registry"]


def test_the_runtime_and_the_registry_are_found():
    names = {m.name for m in RUNTIME}
    assert {"selector.api", "selector.solver", "selector.distributed", "selector.availability"} <= names
    assert "selector.tools.cli" not in names and {"registry.loader", "registry.schema"} <= {m.name for m in REGISTRY}


@pytest.mark.parametrize("module", RUNTIME, ids=lambda m: m.name)
def test_the_runtime_never_imports_the_tools(module):
    tree = ast.parse(module.path.read_text(encoding="utf-8"))
    bad = [f"{module.path.relative_to(ROOT)}:{node.lineno}: imports {target}{'.' + names[0].name if names else ''}"
           for node, target, names in _imports(module, tree)
           if target == "selector.tools" or target.startswith("selector.tools.")
           or (target == "selector" and any(a.name == "tools" for a in names))]
    assert bad == []


@pytest.mark.parametrize("module", REGISTRY, ids=lambda m: m.name)
def test_the_registry_never_imports_the_selector(module):
    tree = ast.parse(module.path.read_text(encoding="utf-8"))
    typing_only = _type_checking_only(tree)
    bad = [f"{module.path.relative_to(ROOT)}:{node.lineno}: imports {target}"
           for node, target, _ in _imports(module, tree)
           if target.split(".")[0] == "selector" and id(node) not in typing_only]
    assert bad == []


@pytest.mark.parametrize("source, problem", [
    ("from selector.selection import _adapter_class", "from selector.selection import _adapter_class"),
    ("from .selection import _adapter_class", "from selector.selection import _adapter_class"),
    ("from selector import selection\nselection._adapter_class('x')", "selection._adapter_class (a private of selector.selection)"),
    ("import selector.api as a\na._DEFAULT", "a._DEFAULT (a private of selector.api)"),
    ("def f():\n    from registry.loader import _load", "from registry.loader import _load"),
    ("import selector.api as api\ndef t(monkeypatch):\n    monkeypatch.setattr(api, '_DEFAULT', None)",
     "api._DEFAULT (a private of selector.api)"),
])
def test_the_check_finds_each_kind_of_private_use(source, problem):
    found = private_uses(Module(ROOT / "selector" / "distributed.py", "selector.distributed", False), source)
    assert len(found) == 1 and found[0].endswith(problem), found


@pytest.mark.parametrize("name, source", [
    ("selector.selection", "from selector.selection import _ADAPTER_LOCK"),
    ("selector.api", "from registry import __version__\nfrom __future__ import annotations\nimport yaml\nyaml._x"),
    ("tests.selector.tools.test_doctor",
     "import selector.tools.doctor as doctor\ndoctor._torch()\nfrom selector.tools.doctor import _gpu"),
    ("tests.registry.adapters.test_triton_planning",
     "from registry.adapters.triton_kernels import planning\nplanning._gluon_hopper_importable()"),
])
def test_the_check_allows_own_privates_dunders_and_mirrored_tests(name, source):
    assert private_uses(Module(ROOT / "x.py", name, False), source) == []
