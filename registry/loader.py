"""Load a manifest from YAML with every error as ``file:line:col: path: message``.

YAML is read with safe constructors only (a manifest is data).  Line numbers
come from ``yaml.compose`` node marks; pydantic error locations are mapped
back onto them.  An *overlay* (a file with ``base:``) adds or replaces
kernels by name on top of another manifest.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from pydantic import ValidationError

from registry.errors import ManifestError
from registry.schema import KernelSpec, Manifest
from registry.vocab import did_you_mean

if TYPE_CHECKING:
    from registry.perf import PerfTable

Loc = tuple[Any, ...]
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same safe constructors, in C when available


def bundled_manifest_path() -> Path:
    """The manifest shipped with kernelsel (the repo root's kernels.yaml in a checkout)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "kernels.yaml"
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("registry") / "kernels.yaml"))


class _Marks:
    """YAML path -> (line, col), 1-based, from a composed node tree."""

    def __init__(self, node: Optional[yaml.Node]):
        self.marks: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, loc: Loc) -> None:
        self.marks[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                self.keys[loc + (key,)] = (k.start_mark.line + 1, k.start_mark.column + 1)
                self._walk(v, loc + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, loc + (i,))

    def resolve(self, loc: Loc) -> tuple[Loc, tuple[int, int]]:
        """The longest YAML path along ``loc`` (skipping model-internal parts) and its mark."""
        found: Loc = ()
        for part in loc:
            if found + (part,) in self.marks:
                found = found + (part,)
        return found, self.marks.get(found, (1, 1))

    def key_mark(self, loc: Loc) -> Optional[tuple[int, int]]:
        return self.keys.get(loc)


def _path_text(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(err: dict[str, Any]) -> str:
    """Pydantic's message in kernelsel's words (what was wrong, what is accepted)."""
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        allowed = [e.strip().strip("'") for e in expected.replace(" or ", ", ").split(",") if e.strip()]
        got = err.get("input")
        return f"{got!r} is not one of {', '.join(allowed)}{did_you_mean(str(got), allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_type" and isinstance(err.get("input"), dict):
        return "expected text, got a mapping (quote text that contains ': ')"
    if kind == "extra_forbidden":
        return "unknown key"
    return f"{msg} (got {err.get('input')!r})" if "input" in err and not isinstance(err.get("input"), (dict, list)) else msg


def _problems(exc: ValidationError, marks: _Marks, filename: str, prefix: Loc = ()) -> list[str]:
    """One ``file:line:col: path: message`` line per pydantic error."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        msg = _message(err)
        path, (line, col) = marks.resolve(loc)
        if msg.startswith("unknown key '"):
            key = msg.split("'")[1]
            if marks.key_mark(path + (key,)):  # point at the offending key itself
                path = path + (key,)
                line, col = marks.key_mark(path)
        elif err["type"] == "missing" and loc:
            path = path + (loc[-1],)  # the mapping's mark, the missing key's name
        else:  # a cross-field message that starts with a field path: point at that field
            inner = path + tuple(msg.split(" ", 1)[0].split("."))
            if inner in marks.marks:
                path, (line, col) = inner, marks.key_mark(inner) or marks.marks[inner]
        problems.append(f"{filename}:{line}:{col}: {_path_text(path)}: {msg}")
    return problems


def _compose(text: str, filename: str) -> tuple[Any, _Marks]:
    try:
        loader = _SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise ManifestError([f"{where}: not valid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"{filename}: not valid YAML: {exc}"]) from None
    return data, _Marks(node)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read manifest: {exc.strerror or exc}"]) from None


def _display_name(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def load_manifest(path: Optional[os.PathLike | str] = None, *, text: Optional[str] = None) -> Manifest:
    """Load and validate a manifest (the bundled one by default); raise ManifestError with every problem."""
    path = Path(path) if path is not None else bundled_manifest_path()
    filename = _display_name(path)
    raw_text = text if text is not None else _read(path)
    data, marks = _compose(raw_text, filename)
    if not isinstance(data, dict):
        raise ManifestError([f"{filename}:1:1: (top level): expected a mapping with schema_version and kernels"])
    digest = hashlib.sha256(raw_text.encode()).hexdigest()
    if "base" in data:
        return _load_overlay(path, filename, data, marks, digest)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_problems(exc, marks, filename)) from None
    _stamp(manifest, marks, filename, digest)
    return manifest


def _stamp(manifest: Manifest, marks: _Marks, filename: str, digest: str) -> None:
    """Record where each kernel and the manifest came from (explain and errors show it)."""
    for i, k in enumerate(manifest.kernels):
        if not k.origin:
            line, _ = marks.marks.get(("kernels", i), (0, 0))
            k._origin = f"{filename}:{line}"
    manifest._path = filename
    manifest._digest = digest[:12]


def _load_overlay(path: Path, filename: str, data: dict, marks: _Marks, digest: str) -> Manifest:
    """Kernels in the overlay replace same-named base kernels or are added; ``disable`` drops names."""
    allowed = ("base", "disable", "kernels")
    problems = []
    for key in data:
        if key not in allowed:
            line, col = marks.key_mark((key,)) or (1, 1)
            problems.append(f"{filename}:{line}:{col}: {key}: unknown key in an overlay"
                            f"{did_you_mean(str(key), list(allowed))}; expected one of: {', '.join(allowed)}")
    base_ref = data["base"]
    base_path = None if base_ref == "bundled" else (path.parent / str(base_ref))
    if problems:
        raise ManifestError(problems)
    base = load_manifest(base_path)
    kernels = {k.name: k for k in base.kernels}
    order = [k.name for k in base.kernels]
    for i, raw in enumerate(data.get("kernels") or []):
        try:
            spec = KernelSpec.model_validate(raw)
        except ValidationError as exc:
            problems += _problems(exc, marks, filename, prefix=("kernels", i))
            continue
        spec._origin = f"{filename}:{marks.marks.get(('kernels', i), (0, 0))[0]}"
        if spec.name not in kernels:
            order.append(spec.name)
        kernels[spec.name] = spec
    for i, name in enumerate(data.get("disable") or []):
        if name not in kernels:
            line, col = marks.marks.get(("disable", i), (1, 1))
            problems.append(f"{filename}:{line}:{col}: disable[{i}]: no kernel named {name!r}{did_you_mean(str(name), order)}")
        else:
            kernels.pop(name)
            order.remove(name)
    if problems:
        raise ManifestError(problems)
    try:  # validated kernel models pass through as they are; this runs the cross-kernel checks
        merged = Manifest.model_validate(
            {
                "schema_version": base.schema_version,
                "solutions": base.solutions,
                "attention_plan": base.attention_plan,
                "kernels": tuple(kernels[n] for n in order),
            }
        )
    except ValidationError as exc:
        raise ManifestError([f"{filename}: merged manifest: {_message(e)}" for e in exc.errors(include_url=False)]) from None
    merged._path = filename
    merged._digest = hashlib.sha256((base.digest + digest).encode()).hexdigest()[:12]
    return merged


def load_perf_table(path: os.PathLike | str, *, text: Optional[str] = None) -> "PerfTable":
    """Load and validate a perf table (``perf/*.yaml``); raise ManifestError with every problem located."""
    from registry.perf import PerfTable

    path = Path(path)
    filename = _display_name(path)
    data, marks = _compose(text if text is not None else _read(path), filename)
    if not isinstance(data, dict):
        raise ManifestError([f"{filename}:1:1: (top level): expected a mapping with gpu, arch and entries"])
    try:
        table = PerfTable.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_problems(exc, marks, filename)) from None
    table._path = filename
    return table


def bundled_perf_dir() -> Path:
    """The committed perf tables: ``perf/`` in a checkout, ``registry/perf_tables`` in a wheel."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "perf"
    return checkout if checkout.is_dir() else here / "perf_tables"
