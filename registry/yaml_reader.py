"""Read kernelsel's YAML files safely, with every problem located as ``file:line:col: path: message``.

Every YAML file kernelsel reads -- a manifest, an overlay, a perf table, a bench suite -- may come from a
pull request or a shared volume and is read in the start-up path of servers.  ``read_yaml`` holds each to
the same rules: a regular file of at most ``MAX_BYTES``, UTF-8, one document of plain data (core tags only,
no duplicate keys), at most ``MAX_DEPTH`` levels and ``MAX_NODES`` values with aliases expanded.  A broken
file is a ``ManifestError`` naming the file and, where there is one, the line -- never a raw exception, a
hang or a crash.

``validation_problems`` maps a pydantic ``ValidationError`` back onto the YAML marks, so models validated
from a file report where the bad value was written.  Nothing here knows what a manifest is.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from registry.errors import ManifestError, brief
from registry.vocab import did_you_mean


Loc = tuple[Any, ...]

MAX_BYTES = 16 * 1024 * 1024
"""Largest manifest, overlay or perf table read (16 MiB; the bundled manifest is about 30 KiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists, aliases expanded (a manifest needs about 7)."""
MAX_NODES = 250_000
"""Most YAML values in one document, aliases expanded (a 1000-kernel manifest has about 60,000).

Bounds the work a hostile file can cause -- a "billion laughs" alias bomb is
a few lines -- to about a second.
"""

_CORE = "tag:yaml.org,2002:"
_SCALAR_WORDS = {"str": "text", "int": "integer", "float": "number", "bool": "boolean", "null": "null"}
_MERGE_KEYS = (_CORE + "merge", _CORE + "value")
_STR = _CORE + "str"


class _Problem(Exception):
    """A located problem found while reading YAML (turned into one ManifestError line)."""

    def __init__(self, mark: Any, message: str, path: Optional[Loc] = None, node: Optional[yaml.Node] = None):
        super().__init__(message)
        self.mark, self.message, self.path, self.node = mark, message, path, node


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _tag_problem(node: yaml.Node, path: Optional[Loc] = None) -> _Problem:
    return _Problem(node.start_mark, f"tag {_short_tag(node.tag)!r} is not allowed: kernelsel files hold plain data "
                                     f"only (mappings, lists, text, numbers, true/false, null)", path, node)


def _refuse_tag(loader: Any, node: yaml.Node) -> Any:
    raise _tag_problem(node)


def _guarded(name: str) -> Any:
    """A core scalar constructor whose malformed input (``!!int abc``) is a located problem, not a raw error."""
    construct = yaml.constructor.SafeConstructor.yaml_constructors[_CORE + name]

    def guarded(loader: Any, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except yaml.MarkedYAMLError:
            raise
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            why = f" ({exc})" if "digits" in str(exc) else ""
            raise _Problem(node.start_mark, f"{brief(node.value)} is not a valid {_SCALAR_WORDS[name]}{why}",
                           node=node) from None

    return guarded


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer with kernelsel's rules checked while the node graph is built.

    It runs in Python on the parser's flat event stream (libyaml's own composer
    recurses in C, and a few hundred thousand ``[`` crash the process), and it
    refuses, each at its line: nesting past MAX_DEPTH, more than MAX_NODES
    values with aliases expanded (an alias counts as the whole subtree it
    repeats, so a "billion laughs" document stops after MAX_NODES steps), an
    alias inside its own anchor, any tag but the core ones, a key that is a
    list or mapping, and a duplicate key (an error, never "the last one wins").
    """

    def __init__(self) -> None:
        super().__init__()
        self._path: list[Any] = []
        self._depth = 0  # collections open around the current node
        self._deepest = 0  # deepest open count reached (aliases expanded)
        self._values = 0  # values so far, aliases expanded
        self._anchored: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (expanded values, height)

    def _loc(self) -> Loc:
        return tuple(self._path)

    def _count(self, n: int, mark: Any) -> None:
        self._values += n
        if self._values > MAX_NODES:
            raise _Problem(mark, f"more than {MAX_NODES:,} values, aliases expanded (limit {MAX_NODES:,})", self._loc())

    def _reach(self, depth: int, mark: Any) -> None:
        if depth > MAX_DEPTH:
            raise _Problem(mark, f"nested deeper than {MAX_DEPTH} levels, aliases expanded (limit {MAX_DEPTH})", self._loc())
        self._deepest = max(self._deepest, depth)

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        if event.__class__ is yaml.ScalarEvent and event.anchor is None:  # the common case, kept short
            self._count(1, event.start_mark)
            node = self.compose_scalar_node(None)
            if node.tag not in _TAGS:
                raise _tag_problem(node, self._loc())
            return node
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:
                info = self._anchored.get(id(node))
                if info is None:
                    raise _Problem(event.start_mark, f"alias *{event.anchor} is inside its own anchor "
                                                     f"(a recursive structure)", self._loc())
                self._count(info[0], event.start_mark)
                self._reach(self._depth + info[1], event.start_mark)
            return super().compose_node(parent, index)  # an undefined alias is the composer's error
        self._count(1, event.start_mark)
        start_values, saved_deepest = self._values - 1, self._deepest
        collection = isinstance(event, yaml.CollectionStartEvent)
        if collection:
            self._depth += 1
            self._deepest = self._depth
            self._reach(self._depth, event.start_mark)
        node = super().compose_node(parent, index)
        if node.tag not in _TAGS:
            raise _tag_problem(node, self._loc())
        height = self._deepest - self._depth + 1 if collection else 0
        if collection:
            self._depth -= 1
        if event.anchor is not None:
            self._anchored[id(node)] = (self._values - start_values, height)
        self._deepest = max(saved_deepest, self._deepest)
        return node

    def compose_sequence_node(self, anchor: Any) -> yaml.Node:
        start_event = self.get_event()
        tag = start_event.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.SequenceNode, None, start_event.implicit)
        node = yaml.SequenceNode(tag, [], start_event.start_mark, None, flow_style=start_event.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        index = 0
        while not self.check_event(yaml.SequenceEndEvent):
            self._path.append(index)
            node.value.append(self.compose_node(node, index))
            self._path.pop()
            index += 1
        node.end_mark = self.get_event().end_mark
        return node

    def compose_mapping_node(self, anchor: Any) -> yaml.Node:
        start_event = self.get_event()
        tag = start_event.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.MappingNode, None, start_event.implicit)
        node = yaml.MappingNode(tag, [], start_event.start_mark, None, flow_style=start_event.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        seen: dict[Any, int] = {}
        while not self.check_event(yaml.MappingEndEvent):
            key_node = self.compose_node(node, None)
            self._check_key(key_node, seen)
            self._path.append(_key_text(key_node))
            value_node = self.compose_node(node, key_node)
            self._path.pop()
            node.value.append((key_node, value_node))
        node.end_mark = self.get_event().end_mark
        return node

    def _check_key(self, key_node: yaml.Node, seen: dict[Any, int]) -> None:
        if key_node.tag in _MERGE_KEYS:
            return
        if not isinstance(key_node, yaml.ScalarNode):
            raise _Problem(key_node.start_mark, "a key must be text or a number, not a list or mapping", self._loc())
        try:
            key = key_node.value if key_node.tag == _STR else self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
        except _Problem as exc:  # "!!int abc: 1"
            exc.path = self._loc()
            raise
        first = seen.get(key)
        if first is not None:
            raise _Problem(key_node.start_mark, f"duplicate key {brief(key_node.value)} (first at line {first})", self._loc())
        seen[key] = key_node.start_mark.line + 1


try:  # libyaml's parser (C) when available; composing stays in Python either way
    from yaml.cyaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None

if _CParser is not None:

    class _Loader(_BoundedComposer, _CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):  # type: ignore[misc]
        """Safe constructors, core tags only, no implicit timestamps, bounded composing (see _BoundedComposer)."""

        def __init__(self, text: str):
            _CParser.__init__(self, text)
            _BoundedComposer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover

    class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _BoundedComposer,  # type: ignore[no-redef]
                  yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        def __init__(self, text: str):
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            _BoundedComposer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


# Plain data only: Python-object tags (!!python/object...) and every other tag are a located error, and
# so are !!binary, !!set, !!omap, !!timestamp (no field of a kernelsel file is bytes, a set or a date).
_Loader.yaml_constructors = {
    **{_CORE + t: yaml.constructor.SafeConstructor.yaml_constructors[_CORE + t] for t in ("seq", "map")},
    **{_CORE + t: _guarded(t) for t in _SCALAR_WORDS},
    None: _refuse_tag,
}
_TAGS = frozenset(t for t in _Loader.yaml_constructors if t) | frozenset(_MERGE_KEYS)
_Loader.yaml_implicit_resolvers = {  # an unquoted 2024-05-01 stays text
    first: [(tag, rx) for tag, rx in resolvers if tag != _CORE + "timestamp"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}


class Marks:
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
                key = _key_text(k)
                self.keys.setdefault(loc + (key,), (k.start_mark.line + 1, k.start_mark.column + 1))
                self._walk(v, loc + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, loc + (i,))

    def __eq__(self, other: object) -> bool:  # by value: a model holding marks stays equal after pickling
        return isinstance(other, Marks) and (self.marks, self.keys) == (other.marks, other.keys)

    __hash__ = None  # type: ignore[assignment]

    def resolve(self, loc: Loc) -> tuple[Loc, tuple[int, int]]:
        """The longest YAML path along ``loc`` (skipping model-internal parts) and its mark."""
        found: Loc = ()
        for part in loc:
            if found + (part,) in self.marks:
                found = found + (part,)
        return found, self.marks.get(found, (1, 1))

    def key_mark(self, loc: Loc) -> Optional[tuple[int, int]]:
        return self.keys.get(loc)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,59}")


def path_text(loc: Loc) -> str:
    """``kernels[3].dtypes.q_dtype``; a key that is not a plain word is shown quoted: ``solutions['a b']``."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{brief(part, 40)}]"
    return out or "(top level)"


_TYPE_WORDS = {
    "bool_type": "true/false", "bool_parsing": "true/false", "int_type": "an integer", "int_parsing": "an integer",
    "int_from_float": "an integer", "float_type": "a number", "float_parsing": "a number", "string_type": "text",
    "dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "enum": "one of the listed values", "literal_error": "one of the listed values",
}


def error_message(err: dict[str, Any]) -> str:
    """Pydantic's message in kernelsel's words (what was wrong, what is accepted), on one line."""
    return one_line(_message_text(err))


def _message_text(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        allowed = [e.strip().strip("'") for e in expected.replace(" or ", ", ").split(",") if e.strip()]
        got = err.get("input")
        return f"{brief(got)} is not one of {', '.join(allowed)}{did_you_mean(str(got)[:100], allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_type" and isinstance(err.get("input"), dict):
        return "expected text, got a mapping (quote text that contains ': ')"
    if kind == "extra_forbidden":
        return "unknown key"
    bound = _BOUNDS.get(kind)
    if bound is not None:
        word, key = bound
        return f"must be {word} {err.get('ctx', {}).get(key)}, got {_got(err.get('input'))}"
    if kind in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"expected {'at least' if kind == 'too_short' else 'at most'} {limit} item{'s' if limit != 1 else ''}, " \
               f"got {ctx.get('actual_length')}"
    if kind in _TYPE_WORDS and kind not in ("enum", "literal_error"):
        return f"expected {_TYPE_WORDS[kind]}, got {_got(err.get('input'))}"
    return f"{msg} (got {brief(err.get('input'))})" if "input" in err and not isinstance(err.get("input"), (dict, list)) else msg


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}
"""Pydantic's bound errors, in the words the request's errors use: ``must be <= 19, got 99``."""


def _got(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    return brief(value)


def validation_problems(exc: ValidationError, marks: Marks, filename: str, prefix: Loc = ()) -> list[str]:
    """One ``file:line:col: path: message`` line per pydantic error (a union's type errors merged into one)."""
    problems: list[str] = []
    merged: dict[tuple[str, int, int], int] = {}  # (path, line, col) of a type error -> its index in problems
    errors = exc.errors(include_url=False)
    has_inner = {tuple(e["loc"])[:n] for e in errors for n in range(len(e["loc"]))}  # locations with an error below
    for err in errors:
        if err["type"] == "too_short" and tuple(err["loc"]) in has_inner:
            continue  # "at least 1 item after validation" only because the bad items were dropped: they are reported
        loc = prefix + tuple(err["loc"])
        msg = error_message(err)
        path, (line, col) = marks.resolve(loc)
        if msg.startswith("unknown key '"):
            key = msg.split("'")[1]
            if marks.key_mark(path + (key,)):  # point at the offending key itself
                path = path + (key,)
                line, col = marks.key_mark(path)
        elif err["type"] == "missing" and loc:
            path = path + (loc[-1],)  # the mapping's mark, the missing key's name
        else:  # a cross-field message that starts with a field path: point at that field
            for inner in _named_paths(path, msg):
                if inner in marks.marks:
                    path, (line, col) = inner, marks.key_mark(inner) or marks.marks[inner]
                    label = msg.split(" ", 1)[0]
                    if label.endswith(":"):  # "head_dim_qk: 0 is below 1": the located path says it now
                        msg = msg[len(label):].lstrip()
                    break
        where = (path_text(path), line, col)
        if err["type"] in _TYPE_WORDS and err["type"] not in ("enum", "literal_error", "model_type"):
            if where in merged:  # a union: "expected true/false, an integer or text, got [1]"
                i = merged[where]
                head, _, got = problems[i].rpartition(", got ")
                word = _TYPE_WORDS[err["type"]]
                if word not in head:
                    problems[i] = f"{head.replace(' or ', ', ')} or {word}, got {got}"
                continue
            merged[where] = len(problems)
        problems.append(f"{filename}:{line}:{col}: {path_text(path)}: {msg}")
    return problems


_PATH_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[0-9]+\])*)")


def _named_paths(path: Loc, message: str) -> list[Loc]:
    """Where a message that starts with a field path (``exclude[0].when.q_len means ...``) may point, under ``path``.

    The named path is taken below ``path``, or overlapping its last part (``shapes.x`` under ``kernels[0].shapes``).
    """
    parts: list[Any] = []
    for word in message.split(" ", 1)[0].rstrip(":").split("."):
        m = _PATH_PART.fullmatch(word)
        if m is None:
            return []
        parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"[0-9]+", m.group(2))]
    named = tuple(parts)
    out = [path + named]
    if path and named and named[0] == path[-1]:
        out.append(path[:-1] + named)
    return out


def _line_col(text: str, index: int) -> tuple[int, int]:
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _key_text(node: yaml.Node) -> Any:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _find_path(root: Optional[yaml.Node], target: Optional[yaml.Node]) -> Optional[Loc]:
    """The first YAML path to ``target`` (only when reporting a problem found while constructing)."""
    if root is None or target is None:
        return None
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack += [(v, path + (_key_text(k),)) for k, v in reversed(node.value)]
            stack += [(k, path) for k, _ in reversed(node.value)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(v, path + (i,)) for i, v in reversed(list(enumerate(node.value)))]
    return None


def _compose(text: str, filename: str) -> tuple[Any, Marks]:
    """Parse one YAML document of plain data; every problem is a ManifestError naming ``file:line:col``."""
    node = None
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
        marks = Marks(node)
    except _Problem as exc:
        where = f"{filename}:{exc.mark.line + 1}:{exc.mark.column + 1}" if exc.mark else filename
        loc = exc.path if exc.path is not None else _find_path(node, exc.node)
        path = "" if loc is None else f" {path_text(loc[:12])}{'...' if len(loc) > 12 else ''}:"
        raise ManifestError([f"{where}:{path} {exc.message}"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, other control characters)
        line, col = _line_col(text, exc.position)
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else brief(exc.character)
        raise ManifestError([f"{filename}:{line}:{col}: not valid YAML: character {char} is not allowed ({exc.reason})"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        what = exc.problem or exc.context or str(exc)
        if exc.context and exc.problem and exc.problem.startswith("but "):  # "expected X but found Y"
            what = f"{exc.context} {exc.problem}"
        elif exc.problem == "second occurrence" and exc.context_mark:  # a duplicate anchor
            what = f"{exc.context} at line {exc.context_mark.line + 1}"
        raise ManifestError([f"{where}: not valid YAML: {one_line(what)}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"{filename}: not valid YAML: {one_line(str(exc))}"]) from None
    except RecursionError:  # a safety net: depth is bounded above, but never let this escape as a traceback
        raise ManifestError([f"{filename}: nested too deeply to load (limit {MAX_DEPTH} levels)"]) from None
    return data, marks


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _limit_text() -> str:
    return f"{MAX_BYTES // (1024 * 1024)} MiB"


def _decode(raw: bytes, filename: str) -> str:
    """UTF-8 text with universal newlines; undecodable bytes are a located error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = len(raw[raw.rfind(b"\n", 0, exc.start) + 1: exc.start].decode("utf-8", "replace")) + 1
        raise ManifestError([f"{filename}:{line}:{col}: not UTF-8: byte 0x{raw[exc.start]:02x} cannot be decoded "
                             f"({exc.reason}); save the file as UTF-8"]) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read(path: Path, filename: str, what: str = "manifest") -> str:
    """The file's text: a regular file of at most MAX_BYTES, in UTF-8; anything else is a ManifestError."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ManifestError([f"{filename}: cannot read {what}: {exc.strerror or exc}"]) from None
    try:
        st = os.fstat(fd)
        problem = (
            "cannot read {what}: is a directory, not a file" if stat.S_ISDIR(st.st_mode)
            else "cannot read {what}: not a regular file (a pipe or device)" if not stat.S_ISREG(st.st_mode)
            else f"{{what}} is {st.st_size:,} bytes, over the {_limit_text()} limit" if st.st_size > MAX_BYTES
            else None
        )
        if problem:
            os.close(fd)
            raise ManifestError([f"{filename}: " + problem.format(what=what)])
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ManifestError([f"{filename}: cannot read {what}: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_BYTES:
        raise ManifestError([f"{filename}: {what} is over the {_limit_text()} limit"])
    return _decode(raw, filename)


def _given_text(text: Any, filename: str, what: str) -> str:
    """Text handed in directly (``text=``, e.g. from ``git show``), held to the same rules as a file."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_BYTES:
            raise ManifestError([f"{filename}: {what} is {len(text):,} bytes, over the {_limit_text()} limit"])
        return _decode(bytes(text), filename)
    if not isinstance(text, str):
        raise ManifestError([f"{filename}: {what} text must be str or bytes, not {type(text).__name__}"])
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        line, col = _line_col(text, exc.start)
        raise ManifestError([f"{filename}:{line}:{col}: not valid text: {exc.reason}"]) from None
    if size > MAX_BYTES:
        raise ManifestError([f"{filename}: {what} is {size:,} bytes, over the {_limit_text()} limit"])
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_yaml(path: os.PathLike | str, *, text: Any = None, what: str = "manifest") -> tuple[Any, "Marks", str, str]:
    """Read one YAML document of plain data: ``(data, marks, display name, text)``.

    The rules every kernelsel YAML file (manifest, overlay, perf table, bench
    suite) is held to -- each broken one is a ManifestError naming the file and,
    where there is one, the line: a regular file of at most MAX_BYTES, UTF-8,
    one document, core tags only (no Python-object or other tags), no duplicate
    keys, at most MAX_DEPTH levels and MAX_NODES values with aliases expanded.
    """
    path = Path(path)
    filename = display_name(path)
    raw_text = _given_text(text, filename, what) if text is not None else _read(path, filename, what)
    data, marks = _compose(raw_text, filename)
    return data, marks, filename, raw_text


def display_name(path: Path) -> str:
    """The path relative to the working directory when it is below it, else as given."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def located(marks: Marks, filename: str, loc: Loc, message: str) -> str:
    """``file:line:col: path: message`` at the key ``loc`` names (or its value, or the file's start)."""
    line, col = marks.key_mark(loc) or marks.marks.get(loc, (1, 1))
    return f"{filename}:{line}:{col}: {path_text(loc)}: {message}"


def kind_of(data: Any) -> str:
    """What a YAML value is, in words: 'a list', 'text', 'an empty document'."""
    if data is None:
        return "an empty document"
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}.get(type(data), type(data).__name__)
