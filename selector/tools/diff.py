"""``kernelsel diff BASE HEAD``: what a manifest edit changes, for every request it can tell apart.

A reviewer of a ``kernels.yaml`` pull request needs the consequences, not the
text diff: which requests now get another kernel, which lose every kernel
(the regression lightseekorg/tokenspeed#445 hit: moving a FlashInfer MHA gate
from sm_90 to sm_100 silently left Hopper users restricted to FlashInfer with nothing),
which gain one, and which kernel entries changed, field by field.

How:

1. ``selector.tools.request_space`` gives, per op whose kernels changed, one
   request per distinct outcome the pooled kernels of both manifests can produce.
2. Each request is solved with ``solve()`` on ``Platform.hypothetical(arch)``
   in both manifests.  A request whose winner differs is minimised: fields
   are reset to their defaults one at a time while the outcome stays the same
   (same old -> new winner; for a loss or gain, still a loss or gain), so
   the report names only the fields that matter.
3. Findings are grouped: the same change with the same fields is one finding
   over all its (op, arch); findings over the same (op, arch) whose fields
   differ in one value are joined (``q_dtype=fp16|fp8_e4m3``); a finding that
   only specialises another (more fields, values inside it) is folded into
   it.  Each finding prints one line per set of archs sharing the same ops.

Limits: only values derived from the constraints are probed (a class no
probe value falls into is not seen), the ``backend`` and ``kernel`` request
fields are not varied, and an overlay read from a git object must have
``base: bundled``.  The work is bounded (``MAX_STATES``, ``MANY_CHANGES``,
``MAX_MINIMISED``): the outcomes of many independently constrained kernels
grow exponentially, so past those bounds some request classes are not probed
or not named, and the report's ``limits`` say which.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from registry.errors import KernelselError, brief
from registry.loader import load_manifest
from registry.priority import priority_rank_key
from registry.yaml_reader import MAX_BYTES, read_yaml
from registry.schema import Features, KernelSpec, Manifest, Shapes
from registry.vocab import Arch, Op
from selector.platform import Platform
from selector.request import KernelRequest
from selector.selection import Selection
from selector.solver import reasons, restriction_reasons, solve
from selector.tools.request_space import enumerate_requests


class DiffError(KernelselError):
    """A BASE or HEAD argument that names neither a file nor a readable git object."""


# ------------------------------------------------------------------ reading


def read_manifest(spec: str, *, adapter_allowlist: Optional[Iterable[str]] = None) -> Manifest:
    """Load a manifest from a path, or from ``REF:PATH`` through git (a path on disk wins).

    A git object is shown under its own name (``main:kernels.yaml:41``) in
    every message and origin.  ``adapter_allowlist`` as in ``load_manifest``.
    """
    if not spec.strip():
        raise DiffError(f"{spec!r}: an empty argument; give a manifest path or a git object like main:kernels.yaml")
    if Path(spec).exists():
        return load_manifest(spec, adapter_allowlist=adapter_allowlist)
    if ":" not in spec:
        raise DiffError(f"{brief(spec)}: no such file; give a manifest path or a git object like main:kernels.yaml")
    raw = git_show(spec)
    data, _, _, _ = read_yaml(spec, text=raw)
    base = data.get("base") if isinstance(data, dict) else None
    if base is not None and base != "bundled":
        raise DiffError(f"{brief(spec)}: an overlay read from git can only have base: bundled (its base {brief(base)} "
                        f"would be read from the working tree, not from the same commit); check out the commit instead")
    return load_manifest(spec, text=raw, adapter_allowlist=adapter_allowlist)


def git_show(spec: str) -> bytes:
    """The bytes of the blob ``REF:PATH`` from git (run in the current directory), or a DiffError saying why not.

    ``spec`` is never taken as an option: one starting with ``-`` is refused, and git's options end
    before it (``--output=FILE`` would make ``git show`` write a file).  The blob's size is checked
    before it is read; its bytes are decoded by the manifest reader (a non-UTF-8 byte is a located error).
    """
    if spec.startswith("-"):
        raise DiffError(f"{brief(spec)}: starts with '-'; give a manifest path or a git object like main:kernels.yaml")
    git = shutil.which("git")
    if git is None:
        raise DiffError(f"{brief(spec)}: not a file, and git is not installed to read it as REF:PATH")

    def cat_file(*args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([git, "cat-file", *args, "--end-of-options", spec], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DiffError(f"{brief(spec)}: git failed: {exc}") from None

    size = cat_file("-s")
    if size.returncode != 0:
        detail = (size.stderr.decode("utf-8", "replace").strip().splitlines() or ["unknown error"])[0]
        raise DiffError(f"{brief(spec)}: not a file, and git cannot read it as REF:PATH: {detail}")
    if int(size.stdout.strip() or 0) > MAX_BYTES:
        raise DiffError(f"{brief(spec)}: {int(size.stdout):,} bytes, over the {MAX_BYTES // (1024 * 1024)} MiB limit of a manifest")
    blob = cat_file("blob")
    if blob.returncode != 0:
        detail = (blob.stderr.decode("utf-8", "replace").strip().splitlines() or ["unknown error"])[0]
        raise DiffError(f"{brief(spec)}: not a file in git (REF:PATH names a {_object_type(git, spec)}): {detail}")
    return blob.stdout


def _object_type(git: str, spec: str) -> str:
    proc = subprocess.run([git, "cat-file", "-t", "--end-of-options", spec], capture_output=True, timeout=60)
    return proc.stdout.decode("utf-8", "replace").strip() or "non-blob object"


# ------------------------------------------------------------------ finding


@dataclass
class Finding:
    """A group of requests whose outcome changes in the same way.

    ``kind`` is ``lost`` (had a kernel, now none), ``gained`` (had none, now
    one) or ``changed`` (another kernel: ``before`` -> ``after``).  ``pairs``
    are the (op, arch) the group covers; ``fields`` maps each request field
    that matters to the values it takes in the group (fields not named keep
    their defaults).
    """

    kind: str
    pairs: frozenset[tuple[Op, Arch]]
    fields: dict[str, tuple[Any, ...]]
    before: Optional[str] = None
    after: Optional[str] = None
    because: list[str] = field(default_factory=list)
    now: str = ""
    classes: int = 1
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ops(self) -> list[str]:
        return [op.value for op in _dim_sort(op for op, _ in self.pairs)]

    @property
    def archs(self) -> list[str]:
        return [a.value for a in _dim_sort(a for _, a in self.pairs)]

    def request_fields(self) -> dict[str, list[str]]:
        return {k: [_text(v) for v in vs] for k, vs in self.fields.items()}

    def describe_request(self) -> str:
        """``solution=flashinfer q_dtype=fp16|bf16 sinks`` (empty for the default request)."""
        return " ".join(k if vs == ["true"] else f"{k}={'|'.join(vs)}" for k, vs in self.request_fields().items())

    def headline(self) -> str:
        """``sm_90 mha_decode/mha_extend with solution=flashinfer: loses all candidates``."""
        who = f"{', '.join(self.archs)} {'/'.join(self.ops)}"
        if self.fields:
            who += f" with {self.describe_request()}"
        if self.kind == "lost":
            return f"{who}: loses all candidates"
        if self.kind == "gained":
            return f"{who}: gains coverage"
        return f"{who}: {self.before} -> {self.after}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "summary": self.headline(),
            "archs": self.archs,
            "ops": self.ops,
            "request": self.request_fields(),
            "before": self.before,
            "after": self.after,
            "because": self.because,
            "now": self.now,
            "request_classes": self.classes,
            "examples": self.examples,
        }


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v.value) if hasattr(v, "value") else str(v)


_MINIMISE_ORDER = tuple(Features.model_fields) + tuple(Shapes.model_fields) + ("out_dtype", "kv_dtype", "q_dtype", "solution")
"""Fields are reset in this order: features, shapes, then dtypes, the solution restriction last."""


class _Solver:
    """solve() in both manifests, cached per request; and the winners alone, fast, for minimising.

    ``winners`` walks each manifest's kernels of the op in priority order and stops at the first the
    solver's own ``reasons()`` finds nothing against: the same winner as ``solve()`` (the diff's platform
    is hypothetical, with no overrides or perf table), without wording every other kernel's reasons.
    """

    def __init__(self, base: Manifest, head: Manifest):
        self.base, self.head = base, head
        self.cache: dict[KernelRequest, tuple[Selection, Selection]] = {}
        self.winner_cache: dict[KernelRequest, tuple[str, str]] = {}
        self.ranked = {id(m): {op: sorted(m.by_op[op], key=priority_rank_key) for op in Op} for m in (base, head)}

    def both(self, request: KernelRequest) -> tuple[Selection, Selection]:
        hit = self.cache.get(request)
        if hit is None:
            platform = Platform.hypothetical(request.arch)
            hit = (solve(self.base, platform, request), solve(self.head, platform, request))
            self.cache[request] = hit
        return hit

    def winners(self, request: KernelRequest) -> tuple[str, str]:
        hit = self.winner_cache.get(request)
        if hit is None:
            platform = Platform.hypothetical(request.arch)
            hit = tuple(next((k.name for k in self.ranked[id(m)][request.op] if not reasons(k, request, m, platform)), "")
                        for m in (self.base, self.head))
            self.winner_cache[request] = hit
        return hit


def _outcome(old: Any, new: Any) -> Optional[tuple]:
    """None when the winner is the same; else what a minimised request must keep (selections or kernel names)."""
    old, new = getattr(old, "name", old), getattr(new, "name", new)
    if old == new:
        return None
    if not new:
        return ("lost",)
    if not old:
        return ("gained",)
    return ("changed", old, new)


class _Rankings:
    """Per manifest and solution restriction, the op's kernels that restriction leaves, in priority order."""

    def __init__(self, op: Op, base: Manifest, head: Manifest):
        self.op, self.manifests, self.lists = op, (base, head), {}

    def winners(self, probe: Any) -> tuple[str, str]:
        """The winners a probe's expected eligible kernels give (the request space's profile, no solve)."""
        solution = probe.request.solution
        lists = self.lists.get(solution)
        if lists is None:
            restricted = KernelRequest(op=self.op, solution=solution)
            lists = self.lists[solution] = [
                [k.name for k in sorted(m.by_op[self.op], key=priority_rank_key) if not restriction_reasons(k, restricted)]
                for m in self.manifests]
        names = [next((n for n in ranked if n in expected), "") for ranked, expected in zip(lists, probe.expected)]
        return names[0], names[1]


def _default(request: KernelRequest, name: str) -> Any:
    """What ``name`` would be if the caller had not given it (some defaults follow other fields)."""
    if name == "kv_dtype":
        return request.q_dtype
    if name == "out_dtype":
        return KernelRequest(op=request.op, q_dtype=request.q_dtype).out_dtype
    if name == "head_dim_vo":
        return request.head_dim_qk
    return type(request).model_fields[name].default


def _explicit(request: KernelRequest) -> dict[str, Any]:
    """The fields a caller must give to make this request (besides op and arch)."""
    return {
        name: getattr(request, name)
        for name in type(request).model_fields
        if name not in ("op", "arch") and getattr(request, name) != _default(request, name)
    }


def _minimise(solver: _Solver, request: KernelRequest, outcome: tuple) -> KernelRequest:
    """Reset fields to their defaults while the outcome stays the same; the fields left are the ones that matter."""
    fields = _explicit(request)
    changed = True
    while changed:
        changed = False
        for name in _MINIMISE_ORDER:
            if name not in fields:
                continue
            trial = {k: v for k, v in fields.items() if k != name}
            try:
                candidate = KernelRequest(op=request.op, arch=request.arch, **trial)
            except KernelselError:
                continue
            if _outcome(*solver.winners(candidate)) == outcome:
                fields, changed = trial, True
    return KernelRequest(op=request.op, arch=request.arch, **fields)


def _verdict(sel: Selection, name: str) -> Optional[str]:
    """A kernel's standing in a selection: its reasons, 'eligible', or None when the manifest lacks it."""
    v = next((v for v in sel.verdicts if v.kernel.name == name), None)
    if v is None:
        return None
    return "; ".join(v.reasons) if v.reasons else "eligible"


def _because(old: Selection, new: Selection, kind: str, op: str) -> list[str]:
    """Why the outcome changed, in the solver's words: the old winner now, the new winner before."""
    lines = []
    if old.kernel is not None:
        now = _verdict(new, old.name)
        if kind == "lost":
            lines.append(f"was {old.name} ({op}): {now or 'removed'}")
        else:
            lines.append(f"{old.name}: {'removed' if now is None else 'still eligible, outranked' if now == 'eligible' else now}")
    if new.kernel is not None:
        before = _verdict(old, new.name)
        if before is None:
            before = "added"
        elif before == "eligible":
            before = f"eligible before, ranked below {old.name}"
        else:
            before = "before: " + before
        lines.append(f"{f'now {new.name} ({op})' if kind == 'gained' else new.name}: {before}")
    return lines


def _subject(line: str) -> str:
    return line.split(":", 1)[0]


def _dim_sort(values: Iterable[Any]) -> tuple[Any, ...]:
    """Values of one dimension in vocabulary order (archs by capability), ints by value."""
    def key(v: Any) -> tuple:
        if isinstance(v, Arch):
            return (0, v.number, "")
        if hasattr(v, "value"):
            return (1, list(type(v)).index(v), "")
        if isinstance(v, (bool, int)):
            return (2, int(v), "")
        return (3, 0, str(v))

    return tuple(sorted(set(values), key=key))


def _same_change(a: Finding, b: Finding) -> bool:
    return (a.kind, a.before, a.after) == (b.kind, b.before, b.after)


def _absorb(into: Finding, other: Finding) -> None:
    into.classes += other.classes
    into.examples += other.examples
    subjects = {_subject(line) for line in into.because}
    into.because += [line for line in other.because if _subject(line) not in subjects]


def _covers(g: Finding, f: Finding) -> bool:
    """``g`` covers ``f``: same change, at least f's (op, arch), and every field g names holds f's values."""
    return (
        _same_change(f, g)
        and f.pairs <= g.pairs
        and set(g.fields) <= set(f.fields)
        and all(set(f.fields[k]) <= set(g.fields[k]) for k in g.fields)
    )


def _step(findings: list[Finding]) -> bool:
    """One collapse step; True if two findings became one."""
    for f in findings:  # a finding that only specialises another is folded into it
        g = next((g for g in findings if g is not f and _covers(g, f)), None)
        if g is not None:
            _absorb(g, f)
            findings.remove(f)
            return True
    for a, b in itertools.combinations(findings, 2):
        if not _same_change(a, b) or set(a.fields) != set(b.fields):
            continue
        differ = [k for k in a.fields if set(a.fields[k]) != set(b.fields[k])]
        if not differ:  # same request fields: one finding over both (op, arch) sets
            a.pairs = a.pairs | b.pairs
        elif len(differ) == 1 and a.pairs == b.pairs:  # one field takes either value
            a.fields[differ[0]] = _dim_sort(a.fields[differ[0]] + b.fields[differ[0]])
        else:
            continue
        _absorb(a, b)
        findings.remove(b)
        return True
    return False


def _split(f: Finding) -> list[Finding]:
    """One finding per set of archs that share the same ops, so each headline is a product."""
    ops_by_arch: dict[Arch, set[Op]] = {}
    for op, arch in f.pairs:
        ops_by_arch.setdefault(arch, set()).add(op)
    by_ops: dict[frozenset[Op], list[Arch]] = {}
    for arch, ops in ops_by_arch.items():
        by_ops.setdefault(frozenset(ops), []).append(arch)
    if len(by_ops) == 1:
        return [f]
    out = []
    for ops, archs in by_ops.items():
        pairs = frozenset((op, a) for op in ops for a in archs)
        examples = [e for e in f.examples if e["op"] in {o.value for o in ops} and set(e["archs"]) & {a.value for a in archs}]
        out.append(Finding(f.kind, pairs, dict(f.fields), f.before, f.after,
                           [line for line in f.because if _mentions(line, ops)] or list(f.because),
                           f.now, len(examples), examples))
    return out


def _mentions(line: str, ops: Iterable[Op]) -> bool:
    return any(f"({op.value})" in line for op in ops) or not any(f"({op.value})" in line for op in Op)


def _collapse(findings: list[Finding]) -> list[Finding]:
    """Join findings step by step; only findings of the same change can join, so each change is joined apart."""
    by_change: dict[tuple, list[Finding]] = {}
    for f in findings:
        by_change.setdefault((f.kind, f.before, f.after), []).append(f)
    out = []
    for group in by_change.values():
        while _step(group):
            pass
        out += group
    return [part for f in out for part in _split(f)]


# ------------------------------------------------------------- kernel diff


def _render(value: Any) -> str:
    """A dumped field in its YAML spelling: [a, b], {min: 1, max: 8}, true."""
    if isinstance(value, dict):
        items = {k: v for k, v in value.items() if v is not None and v is not False}
        if set(items) in ({"values"}, {"only"}):
            return _render(next(iter(items.values())))
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in items.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if value is None:
        return "(unset)"
    return _text(value)


def _flatten(spec: KernelSpec) -> dict[str, Any]:
    """A kernel's model_dump as dotted fields (dtypes.q_dtype, shapes.page_size, features.sinks, ...)."""
    out: dict[str, Any] = {}
    for key, value in spec.model_dump(mode="json", by_alias=True).items():
        if isinstance(value, dict) and key in ("dtypes", "shapes", "features", "settings"):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


@dataclass
class KernelChange:
    name: str
    fields: list[tuple[str, str, str]]  # (field, base, head) in YAML spelling

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fields": [{"field": f, "base": b, "head": h} for f, b, h in self.fields]}


def kernel_changes(base: Manifest, head: Manifest) -> tuple[list[str], list[str], list[KernelChange]]:
    """(added names, removed names, changed kernels with every differing field)."""
    added = [k.name for k in head.kernels if k.name not in base.by_name]
    removed = [k.name for k in base.kernels if k.name not in head.by_name]
    changed = []
    for k in head.kernels:
        old = base.by_name.get(k.name)
        if old is None:
            continue
        a, b = _flatten(old), _flatten(k)
        diffs = []
        for key in list(a) + [x for x in b if x not in a]:
            va, vb = a.get(key), b.get(key)
            if va == vb:
                continue
            if isinstance(va, list) and isinstance(vb, list) and key in ("exclude", "refs"):
                diffs += [(key, _render(x), "(removed)") for x in va if x not in vb]
                diffs += [(key, "(absent)", _render(x)) for x in vb if x not in va]
            else:
                diffs.append((key, _render(va), _render(vb)))
        if diffs:
            changed.append(KernelChange(k.name, diffs))
    return added, removed, changed


# ------------------------------------------------------------------ report


@dataclass
class DiffReport:
    base: Manifest
    head: Manifest
    lost: list[Finding]
    gained: list[Finding]
    changed: list[Finding]
    added: list[str]
    removed: list[str]
    kernels_changed: list[KernelChange]
    ops_compared: list[str]
    requests_checked: int
    limits: list[str] = field(default_factory=list)  # where the diff is bounded (not every class probed or named)

    @property
    def has_changes(self) -> bool:
        return bool(self.lost or self.gained or self.changed or self.added or self.removed or self.kernels_changed)

    @property
    def exit_status(self) -> int:
        """1 when some request loses every candidate (a regression a reviewer must see), else 0."""
        return 1 if self.lost else 0

    def to_dict(self) -> dict[str, Any]:
        def side(m: Manifest) -> dict[str, Any]:
            return {"path": m.path, "digest": m.digest, "kernels": len(m.kernels)}

        return {
            "base": side(self.base),
            "head": side(self.head),
            "ops_compared": self.ops_compared,
            "requests_checked": self.requests_checked,
            "limits": self.limits,
            "lost": [f.to_dict() for f in self.lost],
            "gained": [f.to_dict() for f in self.gained],
            "changed": [f.to_dict() for f in self.changed],
            "kernels": {
                "added": self.added,
                "removed": self.removed,
                "changed": [c.to_dict() for c in self.kernels_changed],
            },
            "exit_status": self.exit_status,
        }

    # -------------------------------------------------------------- text
    def text(self) -> str:
        b, h = self.base, self.head
        lines = [
            f"base      {b.path} ({len(b.kernels)} kernels, sha {b.digest})",
            f"head      {h.path} ({len(h.kernels)} kernels, sha {h.digest})",
            f"checked   {self.requests_checked} request classes over "
            f"{', '.join(self.ops_compared) or 'no op (no op has kernel changes)'}",
        ]
        lines += [f"{'limit' if i == 0 else '':<9} {text}" for i, text in enumerate(self.limits)]
        if not self.has_changes:
            lines.append("no changes")
            return "\n".join(lines)
        sections = (
            ("loses all candidates (exit 1)", self.lost),
            ("selection changes", self.changed),
            ("gains coverage", self.gained),
        )
        for title, findings in sections:
            if not findings:
                continue
            lines += ["", f"{title}: {len(findings)}"]
            for f in findings:
                lines.append(f"  {f.headline()}  [{f.classes} request class{'es' if f.classes != 1 else ''}]")
                lines += [f"      {line}" for line in f.because]
                if f.kind == "changed" and f.now:
                    lines.append(f"      why: {f.now}")
        if not (self.lost or self.changed or self.gained):
            lines += ["", "no request changes its kernel"]
        if self.added or self.removed or self.kernels_changed:
            lines += ["", "kernels"]
            lines += [f"  + {n} (added)" for n in self.added]
            lines += [f"  - {n} (removed)" for n in self.removed]
            for c in self.kernels_changed:
                lines.append(f"  ~ {c.name}")
                lines += [f"      {fld}: {vb} -> {vh}" for fld, vb, vh in c.fields]
        return "\n".join(lines)

    # ---------------------------------------------------------- markdown
    def markdown(self) -> str:
        b, h = self.base, self.head
        out = [f"### kernelsel diff: `{b.path}` → `{h.path}`", ""]
        if not self.has_changes:
            out.append(f"No changes ({self.requests_checked} request classes checked).")
            return "\n".join(out) + "\n"
        if self.lost:
            out.append(f"> [!CAUTION]\n> {len(self.lost)} request group{'s' if len(self.lost) != 1 else ''} "
                       f"**lose every candidate kernel** with this change.")
            out.append("")
        out.append(f"{self.requests_checked} request classes checked over {', '.join(self.ops_compared)}.")
        out += [f"> [!NOTE]\n> Bounded: {_md(text)}." for text in self.limits]
        tables = (
            ("Requests that lose all candidates", self.lost, "what they had, and why it is gone"),
            ("Selection changes", self.changed, "before → after, and why"),
            ("Requests that gain coverage", self.gained, "what they get now"),
        )
        for title, findings, detail in tables:
            if not findings:
                continue
            out += ["", f"#### {title}", "", f"| arch | op | request | {detail} |", "| --- | --- | --- | --- |"]
            for f in findings:
                lines = ([f"`{f.before}` → `{f.after}`"] if f.kind == "changed" else []) + [_md(x) for x in f.because]
                if f.kind == "changed" and f.now:
                    lines.append(f"why: {_md(f.now)}")
                request = f"`{_md(f.describe_request())}`" if f.request_fields() else "(default)"
                out.append(f"| {', '.join(f.archs)} | {', '.join(f.ops)} | {request} | {'<br>'.join(lines)} |")
        if self.added or self.removed or self.kernels_changed:
            out += ["", "#### Kernels", ""]
            out += [f"- added `{n}`" for n in self.added]
            out += [f"- removed `{n}`" for n in self.removed]
            for c in self.kernels_changed:
                out.append(f"- changed `{c.name}`")
                out += [f"  - `{fld}`: `{vb}` → `{vh}`" for fld, vb, vh in c.fields]
        return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


MAX_STATES = 200
"""Partial request classes kept per arch class while enumerating an op (``enumerate_requests``): bounds the work
of a diff of many independently constrained kernels (the bundled manifest needs far fewer)."""
MANY_CHANGES = 300
"""Past this many changed request classes in an op, each change (same solution restriction, old and new winner)
is named once and its other classes are counted with it; and only the first ``MAX_MINIMISED`` named ones are
minimised (the others show every field their request sets)."""
MAX_MINIMISED = 40


def diff_manifests(base: Manifest, head: Manifest, *, skip_identical_ops: bool = True) -> DiffReport:
    """Compare two manifests request by request (the method is in the module docstring)."""
    solver = _Solver(base, head)
    findings: dict[str, list[Finding]] = {"lost": [], "gained": [], "changed": []}
    compared: list[str] = []
    limits: list[str] = []
    checked = 0
    same_solutions = base.solutions == head.solutions
    for op in Op:
        if skip_identical_ops and same_solutions and _op_dump(base, op) == _op_dump(head, op):
            continue
        compared.append(op.value)
        space = enumerate_requests(op, base, head, max_states=MAX_STATES)
        if not space.complete:
            limits.append(f"{op.value}: more request classes than {MAX_STATES:,} per arch class; those past the limit "
                          f"were not probed, so a change among them is not shown")
        checked += len(space.probes)
        rankings = _Rankings(op, base, head)
        changes = [(p, o) for p in space.probes if (o := _outcome(*rankings.winners(p))) is not None]
        bounded = len(changes) > MANY_CHANGES
        per_change: dict[tuple, Finding] = {}
        counted = minimised = 0
        for probe, outcome in changes:
            kind = outcome[0]
            key = (outcome, probe.request.solution)
            shown = per_change.get(key)
            if bounded and shown is not None:
                shown.classes += 1  # counted with its change, not named
                counted += 1
                continue
            small = probe.request
            if not bounded or minimised < MAX_MINIMISED:
                small, minimised = _minimise(solver, probe.request, outcome), minimised + 1
            old_m, new_m = solver.both(small)
            findings[kind].append(Finding(
                kind=kind,
                pairs=frozenset((op, a) for a in probe.archs),
                fields={k: (v,) for k, v in _explicit(small).items()},
                before=old_m.name if kind == "changed" else None,
                after=new_m.name if kind == "changed" else None,
                because=_because(old_m, new_m, kind, op.value),
                now=new_m.why if new_m.kernel is not None else "",
                examples=[{"op": op.value, "archs": [a.value for a in probe.archs], "request": probe.request.given(),
                           "before": old_m.name or None, "after": new_m.name or None}],
            ))
            per_change.setdefault(key, findings[kind][-1])
        if bounded:
            limits.append(f"{op.value}: {len(changes):,} request classes change; each change is named once (the first "
                          f"{MAX_MINIMISED} cut down to the fields that matter) and its other {counted:,} classes "
                          f"are counted with it")
    added, removed, kernels_changed = kernel_changes(base, head)

    def order(f: Finding) -> tuple:
        return (Arch(f.archs[0]).number, [Op.values().index(o) for o in f.ops], f.describe_request(), f.before or "")

    return DiffReport(
        base=base, head=head,
        lost=sorted(_collapse(findings["lost"]), key=order),
        gained=sorted(_collapse(findings["gained"]), key=order),
        changed=sorted(_collapse(findings["changed"]), key=order),
        added=added, removed=removed, kernels_changed=kernels_changed,
        ops_compared=compared, requests_checked=checked, limits=limits,
    )


def _op_dump(m: Manifest, op: Op) -> list[dict[str, Any]]:
    return sorted((k.model_dump(mode="json") for k in m.by_op[op]), key=lambda d: d["name"])
