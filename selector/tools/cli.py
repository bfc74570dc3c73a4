"""``kernelsel``: explain, plan, list, show, validate, doctor, diff, matrix, schema, model (and verify, bench,
verify-model on a GPU).

Exit codes: 0 success; 1 an invalid manifest (validate), failed verification or nothing recorded (bench);
2 bad input (unknown command or option, bad value, missing argument, conflicting flags, bad request,
unreadable or broken manifest / perf table); 3 no kernel can serve the request.  Bad input is one line on
stderr, ``kernelsel COMMAND: --flag: message``, never a traceback or click's usage block.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import click
import yaml

from registry.errors import KernelselError, ManifestError, RequestError, brief
from registry.loader import load_manifest, load_perf_table
from registry.perf_policy import PERF_OFF, choose_perf_table
from registry.priority import band_name
from registry.provenance import provenance
from registry.adapter_policy import adapter_allowlist_from_env, parse_adapter_allowlist
from registry.schema import Manifest
from registry.vocab import Backend, DType, Op, Solution, did_you_mean, parse_arch, parse_dtype
from selector.api import Selector
from selector.overrides import ENV_MANIFEST, ENV_PERF, Overrides
from selector.perf_check import perf_table_problems
from selector.platform import NVIDIA_SMI, Platform, detect_gpus, installed_versions, required_distributions
from registry.perf import PerfTable, overlay
from selector.tools.tune import DEFAULT_BATCHES, DEFAULT_KV_LENS, DEFAULT_NEW_LENS
from selector.request import KernelRequest
from selector.selection import NoKernelError

EXIT_INVALID, EXIT_USAGE, EXIT_NO_KERNEL = 1, 2, 3


class Failure(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ------------------------------------------------- bad input: one line on stderr, exit 2, never a traceback


class _Choice(click.Choice):
    """A closed vocabulary; a bad value is named with every accepted one and a did-you-mean."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            choices = [str(c) for c in self.choices]
            self.fail(f"{brief(value)} is not one of {', '.join(choices)}{did_you_mean(str(value).lower(), choices)}",
                      param, ctx)


class _Spelling(click.ParamType):
    """An arch (sm_90, sm90, 9.0, 90a) or a dtype (bf16, bfloat16, fp8) in any accepted spelling, normalised."""

    def __init__(self, name: str, parse: Any):
        self.name, self._parse = name, parse

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            return self._parse(value)
        except RequestError as exc:
            self.fail(str(exc), param, ctx)


ARCH, DTYPE = _Spelling("arch", parse_arch), _Spelling("dtype", parse_dtype)


class _FilePath(click.Path):
    """A file named on the command line; an empty one is an error, never a silent "use the default"."""

    def __init__(self, **kw: Any):
        super().__init__(dir_okay=False, **kw)

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, str) and not value.strip():
            what = "leave the option out for the default" if isinstance(param, click.Option) else "give a file"
            self.fail(f"an empty path; {what}", param, ctx)
        return super().convert(value, param, ctx)


FILE = _FilePath()


class _Device(click.ParamType):
    """Where verify and bench run: cuda, cuda:N or cpu (anything else would fail deep inside torch)."""

    name = "device"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        text = str(value).strip().lower()
        if text == "cpu" or re.fullmatch(r"cuda(:[0-9]{1,3})?", text):
            return text
        self.fail(f"{brief(value)} is not a device; expected cuda, cuda:N or cpu", param, ctx)


DEVICE = _Device()


class _Command(click.Command):
    """A command whose errors name it: ``kernelsel explain: --manifest: ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # "--op needs a value" is raised without the command's context
            if exc.ctx is None:
                exc.ctx = ctx
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (Failure, KernelselError, OSError) as exc:
            if not hasattr(exc, "command_path"):
                exc.command_path = ctx.command_path  # type: ignore[union-attr]
            raise


class _Group(click.Group):
    command_class = _Command


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _flag(param: Optional[click.Parameter]) -> str:
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return (param.human_readable_name if param is not None else "argument").upper()


def _usage_message(exc: click.ClickException) -> str:
    """Click's usage errors in kernelsel's words, on one line: ``--q-dtype: 'bf17' is not one of ...``."""
    if isinstance(exc, click.MissingParameter):
        what = "required" if isinstance(exc.param, click.Option) else "missing argument"
        return f"{_flag(exc.param)}: {what}"
    if isinstance(exc, click.BadParameter) and exc.param is not None:
        return f"{_flag(exc.param)}: {exc.message.rstrip('.')}"
    if isinstance(exc, click.NoSuchOption):
        near = list(exc.possibilities or [])
        return f"no such option {exc.option_name}" + (f" (did you mean {near[0]}?)" if near else "; --help lists them")
    if isinstance(exc, click.BadOptionUsage):
        if "requires an argument" in exc.message:
            return f"{exc.option_name}: needs a value"
        return f"{exc.option_name}: {exc.message.rstrip('.')}"
    name = getattr(exc, "command_name", None)  # click's NoSuchCommand
    if isinstance(name, str):
        commands = sorted(cli.commands)
        return f"no such command {brief(name)}{did_you_mean(name, commands)}; commands: {', '.join(commands)}"
    text = exc.format_message().rstrip(".")
    return text[:1].lower() + text[1:]  # "got unexpected extra argument (x)"


def _request_message(exc: RequestError) -> str:
    """A request's problems with the flags that set them: ``--head-dim: must be >= 1, got 0``."""
    flags = {p.name: max(p.opts, key=len) for p in explain.params if isinstance(p, click.Option)}
    parts = []
    for problem in exc.problems:
        field, sep, msg = problem.partition(": ")
        name = field.removeprefix("request.")
        parts.append(f"{flags[name]}: {msg}" if sep and field.startswith("request.") and name in flags else problem)
    return "; ".join(parts)


def _manifest_failure(exc: ManifestError, source: str, lister: str = "kernelsel validate") -> Failure:
    """The first problem on one line, the count of the rest, and where to see them all."""
    first = exc.problems[0] if exc.problems else str(exc)
    more = len(exc.problems) - 1
    tail = f" (and {more} more problem{'s' if more != 1 else ''}; `{lister}` lists them all)" if more > 0 else ""
    return Failure(f"{source}: {first}{tail}", EXIT_USAGE)


def _store_allowlist(ctx: click.Context, param: click.Parameter, value: tuple) -> tuple:
    try:
        ctx.meta["kernelsel.allow_adapter"] = parse_adapter_allowlist(value, source="--allow-adapter")
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--allow-adapter: "), ctx=ctx, param=param) from None
    return value


allow_adapter_option = click.option(
    "--allow-adapter", "allow_adapter", multiple=True, expose_value=False, callback=_store_allowlist,
    metavar="PREFIX", help="also accept adapter: classes from modules under PREFIX (repeat; adds to "
                           "KERNELSEL_ADAPTER_ALLOWLIST); by default only registry.adapters")


def _adapter_allowlist() -> tuple[str, ...]:
    """KERNELSEL_ADAPTER_ALLOWLIST plus every --allow-adapter of this command."""
    ctx = click.get_current_context(silent=True)
    flags = ctx.meta.get("kernelsel.allow_adapter", ()) if ctx is not None else ()
    try:
        env = adapter_allowlist_from_env()
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    return env + tuple(p for p in flags if p not in env)


def _write_json(out: str, data: Any) -> None:
    """A JSON report to ``out``, replaced whole: a reader (or a run stopped midway) never sees half a file."""
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, out)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _manifest(path: Optional[str], overrides: Overrides) -> Manifest:
    try:
        return load_manifest(path or overrides.manifest, adapter_allowlist=_adapter_allowlist())
    except ManifestError as exc:
        source = "--manifest" if path else (ENV_MANIFEST if overrides.manifest else "bundled manifest")
        raise _manifest_failure(exc, source) from None


def _platform(manifest: Manifest, arch: Optional[str], installed_only: bool) -> Platform:
    if arch is not None and not installed_only:
        return Platform.hypothetical(arch)
    libs = installed_versions(required_distributions(manifest.solutions))
    if arch is not None:
        return Platform(arch=parse_arch(arch), libraries=libs, detected=True)
    gpu = detect_gpus((NVIDIA_SMI,)).current  # never torch: explain stays light
    if gpu is None or gpu.arch is None:
        raise Failure("no --arch given and no NVIDIA GPU detected (nvidia-smi); pass --arch sm_90", EXIT_USAGE)
    return Platform(arch=gpu.arch, libraries=libs, device_name=gpu.name, detected=True)


def _choice(values: list[str]) -> click.Choice:
    return _Choice(values, case_sensitive=False)


def request_options(f):
    """The request flags shared by explain and plan (kebab-case of the request fields)."""
    opts = [
        click.option("--arch", type=ARCH, help="target SM: sm_90, sm90, 9.0 (default: this machine's GPU)"),
        click.option("--q-dtype", type=DTYPE, default="bf16", show_default=True, help=f"one of {', '.join(DType.values())}"),
        click.option("--kv-dtype", type=DTYPE, help="default: the q dtype"),
        click.option("--out-dtype", type=DTYPE, help="default: the q dtype (bf16 for fp8 q)"),
        click.option("--head-dim", "head_dim_qk", type=int, help="query/key head dim"),
        click.option("--head-dim-v", "head_dim_vo", type=int, help="value/output head dim (default: --head-dim)"),
        click.option("--num-qo-heads", type=int),
        click.option("--num-kv-heads", type=int),
        click.option("--page-size", type=int),
        click.option("--q-len", type=int, help="query tokens per request in one decode step (default 1)"),
        click.option("--kv-lora-rank", type=int),
        click.option("--qk-rope-head-dim", type=int),
        click.option("--qk-nope-head-dim", type=int),
        click.option("--topk", type=int, help="sparse MLA: positions per query token"),
        click.option("--batch-size", type=int, help="batch size (bucketed to a power of two; perf lookup)"),
        click.option("--kv-len", type=int, help="longest KV length (bucketed to a power of two; perf lookup)"),
        click.option("--new-len", type=int,
                     help="new tokens per request, mha_extend/mha_prefill (bucketed to a power of two; perf lookup)"),
        click.option("--sinks", is_flag=True, help="needs attention sinks"),
        click.option("--sliding-window", is_flag=True, help="needs a sliding window"),
        click.option("--soft-cap", "logits_soft_cap", is_flag=True, help="needs a logits soft cap"),
        click.option("--return-lse", is_flag=True, help="needs the LSE (decode-context-parallel)"),
        click.option("--non-causal", is_flag=True),
        click.option("--noncontiguous-kv", is_flag=True, help="K/V are strided views"),
        click.option("--cuda-graph", is_flag=True, help="run() must be capturable in a CUDA graph"),
        click.option("--solution", type=_choice(Solution.values()), help="restrict to one solution"),
        click.option("--backend", type=_choice(Backend.values()), help="restrict to one backend"),
        click.option("--kernel", help="force one kernel by name"),
        click.option("--manifest", "manifest_path", type=FILE, help="manifest or overlay (default: bundled)"),
        click.option("--perf", "perf_path", type=FILE, help="rank eligible kernels by this perf table"),
        allow_adapter_option,
        click.option("--installed-only", is_flag=True, help="with --arch: only libraries installed here count"),
        click.option("--json", "as_json", is_flag=True, help="machine-readable output"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_NOT_REQUEST = {"manifest_path", "perf_path", "installed_only", "as_json"}


def _build(op: Optional[str], kw: dict) -> tuple[Selector, KernelRequest]:
    overrides = Overrides.from_env()
    manifest = _manifest(kw.get("manifest_path"), overrides)
    platform = _platform(manifest, kw.get("arch"), kw.get("installed_only", False))
    fields = {k: v for k, v in kw.items() if k not in _NOT_REQUEST and v is not None and v is not False}
    fields["arch"] = platform.arch
    if op is not None:
        fields["op"] = op
    flag = "--perf" if kw.get("perf_path") else ENV_PERF
    setting = kw.get("perf_path") or overrides.perf
    try:  # the device name is known only for a detected GPU: a hypothetical --arch has no committed table
        choice = choose_perf_table(setting, platform.device_name, platform.arch, setting_name=flag)
        perf = choice.table
        if perf is not None and choice.source == flag:  # a table the user names must fit the manifest
            problems = perf_table_problems(perf, manifest)
            if problems:
                raise ManifestError(problems)
    except ManifestError as exc:
        raise _manifest_failure(exc, flag, f"kernelsel validate --perf {setting}") from None
    if kw.get("perf_path") and perf is not None and perf.arch is not platform.arch:
        raise Failure(f"--perf: {perf.path} was recorded on {perf.arch.value} ({perf.gpu}), the request is for "
                      f"{platform.arch.value}: give a table recorded on {platform.arch.value}, or leave --perf out",
                      EXIT_USAGE)
    off = (kw.get("perf_path") or overrides.perf or "").strip().lower() == PERF_OFF
    if platform.device_name and not off:  # this GPU: what it tuned ranks too, as in the runtime
        from selector.tuning import TuneCache, TuningError, cache_dir, software_key

        try:
            folder = cache_dir()
        except TuningError:  # no platformdirs: no tuned table, as in the runtime
            folder = None
        if folder is not None:
            perf = overlay(perf, TuneCache.for_machine(platform.device_name, platform.arch, software_key(platform),
                                                       folder).load())
    return Selector(manifest, platform, overrides, perf), KernelRequest(**fields)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kernelsel", message="kernelsel %(version)s")
def cli() -> None:
    """Declarative attention-kernel selection: explain, plan, list, show, validate, doctor, diff, matrix, schema,
    verify, bench, tune."""


@cli.command()
@click.option("--op", required=True, type=_choice(Op.values()), help="the op to select a kernel for")
@request_options
@click.option("--probe", is_flag=True,
              help="import each eligible kernel's adapter and libraries here; reject those that fail (imports torch etc.)")
def explain(op: str, probe: bool, **kw: Any) -> None:
    """Show which kernel serves a request, why, and why every other kernel of the op does not."""
    selector, request = _build(op, kw)
    selection = selector.probe(request) if probe else selector.solve(request)
    if kw["as_json"]:
        _echo_json(selection.to_dict())
    else:
        click.echo(selection.explain())
    if selection.kernel is None:
        sys.exit(EXIT_NO_KERNEL)


@cli.command()
@request_options
def plan(**kw: Any) -> None:
    """Decide postwrite vs prewrite for a prefill step (the attention plan) and explain it."""
    from selector.plan import select_plan

    selector, request = _build(Op.MHA_EXTEND.value, kw)
    try:
        result = select_plan(request, selector=selector)
    except NoKernelError as exc:
        _echo_json(exc.selection.to_dict()) if kw["as_json"] else click.echo(exc.selection.explain())
        sys.exit(EXIT_NO_KERNEL)
    if kw["as_json"]:
        _echo_json(result.to_dict())
    else:
        click.echo(result.explain())


@cli.command("list")
@click.option("--op", type=_choice(Op.values()))
@click.option("--manifest", "manifest_path", type=FILE)
@allow_adapter_option
@click.option("--json", "as_json", is_flag=True)
def list_kernels(op: Optional[str], manifest_path: Optional[str], as_json: bool) -> None:
    """List the manifest's kernels (name, op, solution/backend, arch, priority, source line)."""
    manifest = _manifest(manifest_path, Overrides.from_env())
    kernels = [k for k in manifest.kernels if op is None or k.op.value == op]
    if as_json:
        _echo_json([{"name": k.name, "op": k.op.value, "solution": k.solution.value, "backend": k.backend.value,
                     "arch": k.arch.describe(), "priority": k.priority, "origin": k.origin} for k in kernels])
        return
    rows = [("kernel", "op", "solution/backend", "arch", "priority", "source")]
    rows += [(k.name, k.op.value, f"{k.solution.value}/{k.backend.value}", k.arch.describe(),
              f"{k.priority} {band_name(k.priority)}", k.origin) for k in kernels]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@cli.command()
@click.argument("name")
@click.option("--manifest", "manifest_path", type=FILE)
@allow_adapter_option
@click.option("--json", "as_json", is_flag=True)
def show(name: str, manifest_path: Optional[str], as_json: bool) -> None:
    """Show one kernel's full manifest entry."""
    manifest = _manifest(manifest_path, Overrides.from_env())
    spec = manifest.by_name.get(name)
    if spec is None:
        raise Failure(f"no kernel named {name!r}{did_you_mean(name, list(manifest.by_name))}; "
                      f"`kernelsel list` shows them all", EXIT_USAGE)
    data = spec.model_dump(mode="json", exclude_defaults=True, by_alias=True)
    data["exclude"] = [{"when": {f: c.describe() for f, c in e.when.items()}, "reason": e.reason, "ref": e.ref}
                       for e in spec.exclude]
    data = {k: v for k, v in data.items() if v not in ([], {}, None)}
    known = provenance(spec)
    if as_json:
        _echo_json(data | {"origin": spec.origin, "provenance": known.to_dict() | {"summary": known.summary()}})
        return
    click.echo(f"# {spec.origin}")
    click.echo(yaml.safe_dump(_plain(data), sort_keys=False, width=100).rstrip())
    click.echo(f"# provenance: {known.summary()}")


def _plain(data: Any) -> Any:
    """Constraint models dumped as their YAML spelling (lists / ranges)."""
    if isinstance(data, dict):
        if set(data) == {"values"}:
            return list(data["values"])
        if set(data) == {"only"}:
            return list(data["only"])
        return {k: _plain(v) for k, v in data.items() if v is not None and v is not False}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


@cli.command()
@click.argument("path", nargs=-1, type=_FilePath(exists=True, readable=True))
@click.option("--perf", "perf_paths", multiple=True, type=_FilePath(exists=True, readable=True),
              help="also check this perf table against each manifest (repeat)")
@allow_adapter_option
def validate(path: tuple[str, ...], perf_paths: tuple[str, ...]) -> None:
    """Check manifests (default: the bundled one); print every problem as file:line:col: path: message (exit 1 if any).

    Takes several paths, so a pre-commit hook can pass every changed manifest at once.  With --perf, each
    perf table must load and fit each manifest (known kernels of the entry's op, buckets a request can fall in).
    """
    allow = _adapter_allowlist()
    count = 0
    for one in path or (None,):
        try:
            manifest = load_manifest(one, adapter_allowlist=allow)
        except ManifestError as exc:
            for problem in exc.problems:
                click.echo(problem, err=True)
            count += len(exc.problems)
            continue
        click.echo(f"{manifest.path}: ok ({len(manifest.kernels)} kernels, schema {manifest.schema_version}, "
                   f"sha {manifest.digest})")
        for table_path in perf_paths:
            try:
                table = load_perf_table(table_path)
                problems = perf_table_problems(table, manifest)
            except ManifestError as exc:
                problems = exc.problems
            for problem in problems:
                click.echo(problem, err=True)
            count += len(problems)
            if not problems:
                click.echo(f"{table.path}: ok ({len(table.entries)} buckets, {table.gpu}, {table.arch.value}; "
                           f"fits {manifest.path})")
    if count:
        click.echo(f"{count} problem{'s' if count != 1 else ''}", err=True)
        sys.exit(EXIT_INVALID)


# ------------------------------------------------------- manifest review


def _write_or_check(text: str, out: Optional[str], check: bool, default: str, regenerate: str) -> None:
    """Print ``text``, write it to ``out``, or (``check``) exit 1 when the file there differs."""
    if check:
        path = out or default
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except OSError:
            current = None
        if current != text:
            state = "missing" if current is None else "stale"
            click.echo(f"{path} is {state}; regenerate it with: {regenerate}", err=True)
            sys.exit(EXIT_INVALID)
        click.echo(f"{path}: up to date")
    elif out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)


@cli.command()
@click.argument("base")
@click.argument("head")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--markdown", is_flag=True, help="Markdown for a pull-request comment")
@allow_adapter_option
def diff(base: str, head: str, as_json: bool, markdown: bool) -> None:
    """What changes from manifest BASE to HEAD, request by request (exit 1 if a request loses every kernel).

    BASE and HEAD are manifest paths or git objects such as main:kernels.yaml
    or HEAD~1:kernels.yaml (read with `git show`; a path on disk wins).
    """
    from selector.tools.diff import diff_manifests, read_manifest

    if as_json and markdown:
        raise Failure("give --json or --markdown, not both", EXIT_USAGE)
    allow = _adapter_allowlist()
    manifests = []
    for name, spec in (("BASE", base), ("HEAD", head)):
        try:
            manifests.append(read_manifest(spec, adapter_allowlist=allow))
        except ManifestError as exc:
            raise _manifest_failure(exc, name) from None
    report = diff_manifests(*manifests)
    if as_json:
        _echo_json(report.to_dict())
    elif markdown:
        click.echo(report.markdown(), nl=False)
    else:
        click.echo(report.text())
    sys.exit(report.exit_status)


@cli.command()
@click.option("--manifest", "manifest_path", type=FILE, help="manifest (default: bundled)")
@allow_adapter_option
@click.option("--out", type=FILE, help="write the matrix here, e.g. docs/support-matrix.md")
@click.option("--check", is_flag=True, help="exit 1 if --out (default docs/support-matrix.md) is stale")
def matrix(manifest_path: Optional[str], out: Optional[str], check: bool) -> None:
    """The Markdown support matrix: per op a row per kernel, and what wins by default per arch."""
    from selector.tools.matrix import DEFAULT_PATH, REGENERATE, render_matrix

    text = render_matrix(_manifest(manifest_path, Overrides.from_env()))
    _write_or_check(text, out, check, DEFAULT_PATH, REGENERATE)


@cli.command()
@click.option("--out", type=FILE, help="write the schema here, e.g. docs/kernels.schema.json")
@click.option("--check", is_flag=True, help="exit 1 if --out (default docs/kernels.schema.json) is stale")
def schema(out: Optional[str], check: bool) -> None:
    """The manifest's JSON Schema (draft 2020-12), describing kernels.yaml as written."""
    from selector.tools.schema import DEFAULT_PATH, REGENERATE, render_schema

    _write_or_check(render_schema(), out, check, DEFAULT_PATH, REGENERATE)


@cli.command()
@click.option("--op", type=_choice(Op.values()), help="only kernels of this op")
@click.option("--kernel", help="only this kernel")
@click.option("--solution", type=_choice(Solution.values()), help="only kernels of this solution")
@click.option("--quick", is_flag=True, help="one case per declared value instead of the cross product")
@click.option("--device", type=DEVICE, default="cuda", show_default=True, help="cuda, cuda:N (arch detected) or cpu")
@click.option("--manifest", "manifest_path", type=FILE)
@allow_adapter_option
@click.option("--json", "as_json", is_flag=True, help="the full report as JSON")
@click.option("--out", type=FILE, help="also write the JSON report here")
def verify(op: Optional[str], kernel: Optional[str], solution: Optional[str], quick: bool, device: str,
           manifest_path: Optional[str], as_json: bool, out: Optional[str]) -> None:
    """Run every kernel the manifest declares for this GPU against the torch reference (exit 1 on any failure)."""
    try:
        from selector.tools.verify import verify as run_verify
    except ImportError as exc:
        raise Failure(f"verify needs torch: {exc} (pip install torch)", EXIT_USAGE) from None
    manifest = _manifest(manifest_path, Overrides.from_env())
    if kernel is not None and kernel not in manifest.by_name:
        raise Failure(f"no kernel named {kernel!r}{did_you_mean(kernel, list(manifest.by_name))}", EXIT_USAGE)
    report = run_verify(manifest, op=op, kernel=kernel, solution=solution, quick=quick, device=device)
    data = report.to_dict()
    if out:
        _write_json(out, data)
    if as_json:
        _echo_json(data)
    else:
        click.echo(report.render())
    if not report.ok:
        sys.exit(EXIT_INVALID)



def _transformers_failure(exc: ImportError) -> Failure:
    return Failure(f"needs transformers and torch: {exc} (pip install 'kernelsel[transformers]' after installing torch)",
                   EXIT_USAGE)


def _forced_kernels(values: tuple) -> dict[str, str]:
    forced = {}
    for value in values:
        op, sep, name = value.partition("=")
        if not sep or not name or op not in Op.values():
            raise Failure(f"--kernel: {value!r} is not OP=NAME with OP one of {', '.join(Op.values())}", EXIT_USAGE)
        forced[op] = name
    return forced


@cli.command("model")
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, readable=True))
@click.option("--arch", type=ARCH, help="target SM: sm_90, sm90, 9.0 (default: this machine's GPU)")
@click.option("--installed-only", is_flag=True, help="with --arch: only libraries installed here count")
@click.option("--dtype", "dtype_", type=_choice(["bf16", "fp16", "fp32"]), help="default: the config's dtype (bf16)")
@click.option("--page-size", type=click.IntRange(min=1), default=16, show_default=True, help="tokens per KV page")
@click.option("--solution", type=_choice(Solution.values()), help="restrict every op to one solution")
@click.option("--kernel", "kernels", multiple=True, metavar="OP=NAME", help="force a kernel for an op (repeat)")
@click.option("--manifest", "manifest_path", type=FILE, help="manifest or overlay (default: bundled)")
@click.option("--verbose", is_flag=True, help="also every kernel's verdict per op (the full explain)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def model(config_path: str, arch: Optional[str], installed_only: bool, dtype_: Optional[str], page_size: int,
          solution: Optional[str], kernels: tuple, manifest_path: Optional[str], verbose: bool, as_json: bool) -> None:
    """Per layer type of a Hugging Face model (its config.json, no weights), the kernel of each op and why."""
    forced = _forced_kernels(kernels)
    overrides = Overrides.from_env()
    manifest = _manifest(manifest_path, overrides)
    platform = _platform(manifest, arch, installed_only)
    try:
        from selector.integrations.transformers.explain import explain_model
    except ImportError as exc:
        raise _transformers_failure(exc) from None
    try:
        result = explain_model(config_path, selector=Selector(manifest, platform, overrides), device="cuda",
                               dtype=dtype_, page_size=page_size, solution=solution, kernels=forced)
    except ImportError as exc:
        raise _transformers_failure(exc) from None
    except (ValueError, TypeError, KeyError) as exc:  # transformers rejects the config itself
        raise Failure(f"{config_path}: transformers cannot build this config: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}", EXIT_USAGE) from None
    if as_json:
        _echo_json(result.to_dict())
    else:
        click.echo(result.explain(verbose=verbose))
    if not result.ok:
        sys.exit(EXIT_NO_KERNEL)


@cli.command("verify-model")
@click.option("--arch", "archs", default="all", show_default=True,
              help="architectures (comma-separated): llama, qwen3, mistral, gemma2, gpt_oss, deepseek_v3")
@click.option("--device", type=_choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", "dtype_", type=_choice(["bf16", "fp16", "fp32"]), help="default: fp32 on cpu, bf16 on cuda")
@click.option("--solution", type=_choice(Solution.values()), help="restrict every op (default: reference on cpu, best on cuda)")
@click.option("--size", type=_choice(["tiny", "real"]), default="tiny", show_default=True,
              help="tiny models, or real-size attention shapes (hidden 2-4k, 4k-token prompts; for a GPU)")
@click.option("--page-size", "page_sizes", default="16", show_default=True, help="page sizes (comma-separated)")
@click.option("--each-kernel", is_flag=True, help="then force each eligible kernel of each op in turn")
@click.option("--new-tokens", type=click.IntRange(min=1), default=6, show_default=True, help="greedy tokens per prompt")
@click.option("--prompt-lengths", help="prompt lengths (comma-separated; default 12,7,9 tiny, 4096,3072,2048 real)")
@click.option("--no-generate-batch", is_flag=True, help="skip continuous batching")
@click.option("--json", "as_json", is_flag=True, help="the full report as JSON")
@click.option("--out", type=FILE, help="also write the JSON report here")
def verify_model(archs: str, device: str, dtype_: Optional[str], solution: Optional[str], size: str, page_sizes: str,
                 each_kernel: bool, new_tokens: int, prompt_lengths: Optional[str], no_generate_batch: bool,
                 as_json: bool, out: Optional[str]) -> None:
    """Run real transformers architectures through kernelsel against eager attention (exit 1 on any failure)."""
    try:
        import torch

        from selector.tools import model_conformance as mc
    except ImportError as exc:
        raise _transformers_failure(exc) from None
    names = list(mc.ARCHITECTURES) if archs == "all" else _list(archs, "--arch")
    unknown = [a for a in names if a not in mc.ARCHITECTURES]
    if unknown:
        raise Failure(f"--arch: {unknown[0]!r} is not one of {', '.join(mc.ARCHITECTURES)}"
                      f"{did_you_mean(unknown[0], list(mc.ARCHITECTURES))}", EXIT_USAGE)
    if device == "cuda" and not torch.cuda.is_available():
        raise Failure("--device cuda: torch sees no CUDA device here; use --device cpu", EXIT_USAGE)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype_) if dtype_ else None
    lengths = tuple(_list(prompt_lengths, "--prompt-lengths", int)) if prompt_lengths else None
    def write(report: dict) -> None:  # after every run: a run stopped by a time limit keeps what it checked
        if out:
            _write_json(out, report)

    report = mc.verify_models(names, device=device, dtype=dtype, solution=solution, size=size,
                              page_sizes=tuple(_list(page_sizes, "--page-size", int)), each_kernel=each_kernel,
                              new_tokens=new_tokens, prompt_lengths=lengths, continuous_batching=not no_generate_batch,
                              log=lambda msg: click.echo(msg, err=True), on_result=write)
    write(report)
    if as_json:
        _echo_json(report)
    else:
        click.echo(mc.render_report(report))
    if report["failed"]:
        sys.exit(EXIT_INVALID)


def _list(text: Optional[str], flag: str, kind: type = str) -> list[Any]:
    """A comma-separated option as a list (ints checked), or [None] when not given."""
    if text is None:
        return [None]
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    if not values:
        raise Failure(f"{flag}: give at least one value", EXIT_USAGE)
    if kind is int:  # ASCII digits, at most 18 (int() would take '²' and choke on 5,000 digits)
        bad = [v if v.isascii() and v.isprintable() and len(v) <= 20 else brief(v, 20)
               for v in values if not re.fullmatch(r"[0-9]{1,18}", v) or int(v) < 1]
        if bad:
            raise Failure(f"{flag}: {', '.join(bad)} is not a positive integer (comma-separated list)", EXIT_USAGE)
        return [int(v) for v in values]
    return values


@cli.command()
@click.option("--op", type=_choice(Op.values()), help="the op to time over the grid below (or give --suite)")
@click.option("--suite", "suite_path", type=FILE, help="time exactly the requests of this suite file")
@click.option("--batch", default="1,8,64", show_default=True, help="batch sizes (comma-separated)")
@click.option("--kv-len", default="512,4096,32768", show_default=True,
              help="KV tokens per request, new ones included (comma-separated)")
@click.option("--new-len", help="mha_extend: new tokens per request (comma-separated)")
@click.option("--q-len", default="1", show_default=True, help="decode ops: query tokens per request (comma-separated)")
@click.option("--q-dtype", default="bf16", show_default=True, help="comma-separated")
@click.option("--kv-dtype", help="comma-separated (default: the q dtype)")
@click.option("--out-dtype")
@click.option("--head-dim", "head_dim_qk", type=int, help="query/key head dim")
@click.option("--head-dim-v", "head_dim_vo", type=int, help="value/output head dim (default: --head-dim)")
@click.option("--num-qo-heads", type=int)
@click.option("--num-kv-heads", type=int)
@click.option("--page-size", type=int)
@click.option("--kv-lora-rank", type=int)
@click.option("--qk-rope-head-dim", type=int)
@click.option("--qk-nope-head-dim", type=int)
@click.option("--topk", type=int, help="sparse MLA: positions per query token")
@click.option("--kernel", "kernels", multiple=True,
              help="time only these kernels (repeat, or comma-separated); a reference kernel is timed only when named")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True, help="timed runs per kernel (median)")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="untimed runs first")
@click.option("--device", type=DEVICE, default="cuda", show_default=True, help="cuda, cuda:N, or cpu (wall-clock timing; needs --arch)")
@click.option("--arch", help="with --device cpu: the nominal arch selection runs for (on a GPU: its own)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--manifest", "manifest_path", type=FILE, help="manifest or overlay (default: bundled)")
@allow_adapter_option
@click.option("--out", type=FILE, help="perf table to merge into (default: perf/<gpu>-<arch>.yaml under the current directory)")
@click.option("--json", "as_json", is_flag=True, help="also print every timing as JSON")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="also draw achieved bandwidth per op and context length into this PNG (pip install 'kernelsel[plot]')")
@click.option("--from", "from_path", type=click.Path(dir_okay=False),
              help="with --plot: draw this results JSON (bench --json, bench/regret.py) instead of timing; no GPU")
def bench(op: Optional[str], suite_path: Optional[str], kernels: tuple, repeats: int, warmup: int, device: str,
          arch: Optional[str], seed: int, manifest_path: Optional[str], out: Optional[str], as_json: bool,
          plot_path: Optional[str], from_path: Optional[str], **kw: Any) -> None:
    """Time every eligible kernel per request on this GPU; merge the medians into a perf table.

    The grid is the cartesian product of the comma-separated options; each
    request carries its batch_size, kv_len and new_len buckets.  A kernel that
    fails is reported and skipped.  Progress goes to stderr, one line per
    request.  --plot draws the run (or, with --from, a results file).
    """
    import importlib.util

    from selector.tools import bench as bench_module

    if from_path is not None:
        _plot_results(from_path, plot_path, op, suite_path)
        return
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise Failure("--plot needs matplotlib: pip install 'kernelsel[plot]'", EXIT_USAGE)
    if (op is None) == (suite_path is None):
        raise Failure("give --op (and the grid options) or --suite, not both", EXIT_USAGE)
    axes: dict[str, list[Any]] = {}
    if suite_path is None:  # the grid's flags are checked before the machine is
        sizes = {"batch": _list(kw.pop("batch"), "--batch", int), "kv_len": _list(kw.pop("kv_len"), "--kv-len", int),
                 "new_len": _list(kw.pop("new_len"), "--new-len", int)}
        axes = {"q_dtype": _list(kw.pop("q_dtype"), "--q-dtype"), "kv_dtype": _list(kw.pop("kv_dtype"), "--kv-dtype"),
                "q_len": _list(kw.pop("q_len"), "--q-len", int), **sizes}
        if op in (Op.MHA_EXTEND.value, Op.MHA_PREFILL.value):
            if axes.pop("q_len") != [1]:
                raise Failure(f"--q-len: {op} takes its new tokens from --new-len", EXIT_USAGE)
        elif axes["new_len"] != [None]:
            raise Failure(f"--new-len is for mha_extend and mha_prefill; {op} takes --q-len", EXIT_USAGE)
        axes = {k: v for k, v in axes.items() if v != [None]}
        bench_module.check_grid_size(axes)
    if importlib.util.find_spec("torch") is None:
        raise Failure("bench needs torch (pip install torch)", EXIT_USAGE)
    overrides = Overrides.from_env()
    manifest = _manifest(manifest_path, overrides)
    env = bench_module.environment(manifest, device, arch)
    if suite_path is not None:
        cases = bench_module.load_suite(suite_path, env.arch)
    else:
        fixed = {k: v for k, v in kw.items() if v is not None}
        cases = bench_module.grid(op, env.arch, fixed, axes)
    names = [n.strip() for k in kernels for n in k.split(",") if n.strip()]
    for name in names:
        if name not in manifest.by_name:
            raise Failure(f"--kernel: no kernel named {name!r}{did_you_mean(name, list(manifest.by_name))}", EXIT_USAGE)
    selector = Selector(manifest, env.platform, overrides)
    path = out or str(bench_module.default_table_path(env.gpu, env.arch))  # in the current directory
    report = bench_module.run_bench(cases, selector, env, timer=bench_module.default_timer(device, repeats, warmup),
                                    out=path, kernels=names or None, seed=seed)
    if plot_path is not None and report.table is not None:
        report.copy_tbps = bench_module.copy_bandwidth(device, bench_module.default_timer(device, repeats, warmup))
        ranked = Selector(manifest, env.platform, overrides, report.table)
        report.selected = {i: sel.kernel.name for i, r in enumerate(report.results)
                           if (sel := ranked.solve(r.case.request)).kernel is not None}
    if as_json:
        _echo_json(report.to_dict())
    if report.table is None:
        raise Failure(f"nothing recorded ({report.errors} kernel errors); {path} not written", EXIT_INVALID)
    click.echo(f"wrote {path}: {len(report.table.entries)} buckets ({report.recorded} kernel timings from this run, "
               f"{report.errors} errors); {report.method}", err=True)
    if plot_path is not None:
        from selector.tools import plot

        plot.plot(report.to_dict(), Path(plot_path), title=f"{env.gpu} ({env.arch.value})")
        click.echo(f"wrote {plot_path}", err=True)


def _plot_results(from_path: str, plot_path: Optional[str], op: Optional[str], suite_path: Optional[str]) -> None:
    """``bench --plot PNG --from RESULTS.json``: draw a results file; nothing is timed."""
    from selector.tools import plot

    if plot_path is None:
        raise Failure("--from draws a results file: give --plot PATH.png too", EXIT_USAGE)
    if op is not None or suite_path is not None:
        raise Failure("--from draws an existing results file; --op and --suite time new ones (give one or the other)",
                      EXIT_USAGE)
    try:
        data = plot.load_results(Path(from_path))
        meta = data.get("meta") or {}
        title = " ".join(str(meta[k]) for k in ("gpu", "arch") if meta.get(k))
        plot.plot(data, Path(plot_path), title=title)
    except KernelselError as exc:
        raise Failure(f"--from: {exc}" if str(exc).startswith(str(from_path)) else f"--plot: {exc}", EXIT_USAGE) from None
    click.echo(f"wrote {plot_path} ({len(data['cases'])} requests from {from_path})", err=True)


@cli.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="a Hugging Face config.json (heads, KV heads, head_dim, sliding window, soft cap, MLA dims)")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="tensor parallelism: heads per GPU")
@click.option("--batch", default=",".join(map(str, DEFAULT_BATCHES)), show_default=True, help="batch sizes (comma-separated)")
@click.option("--kv-len", default=",".join(map(str, DEFAULT_KV_LENS)), show_default=True,
              help="context lengths: KV tokens per request, new ones included (comma-separated)")
@click.option("--new-len", default=",".join(map(str, DEFAULT_NEW_LENS)), show_default=True,
              help="mha_extend: new tokens per request (comma-separated)")
@click.option("--ops", default="decode,extend", show_default=True,
              help="decode, extend or both (MLA models: decode); comma-separated")
@click.option("--q-dtype", default="bf16", show_default=True)
@click.option("--kv-dtype", help="default: the q dtype")
@click.option("--page-size", type=int, help="default: 16 for MHA, 64 for MLA")
@click.option("--solution", type=_choice(Solution.values()), help="tune only this solution's kernels")
@click.option("--budget-ms", type=click.FloatRange(min=1), default=200, show_default=True,
              help="timing budget per bucket, shared by its kernels")
@click.option("--max-gib", type=click.FloatRange(min=0.01), default=16, show_default=True,
              help="largest synthetic inputs a bucket may take")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="tuned tables folder (default: KERNELSEL_TUNE_CACHE "
              "or the user cache directory)")
@click.option("--device", default="cuda", show_default=True, help="cuda, or cpu (wall clock; needs --arch)")
@click.option("--arch", help="with --device cpu: the nominal arch")
@click.option("--perf", "perf_path", type=click.Path(dir_okay=False), help="the perf table tuning adds to "
              "(default: the committed one for this GPU)")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), help="manifest or overlay (default: bundled)")
@click.option("--dry-run", is_flag=True, help="list the requests and how each is ranked now; time nothing")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def tune(model_path: str, tp: int, batch: str, kv_len: str, new_len: str, ops: str, q_dtype: str,
         kv_dtype: Optional[str], page_size: Optional[int], solution: Optional[str], budget_ms: float, max_gib: float,
         cache_dir: Optional[str], device: str, arch: Optional[str], perf_path: Optional[str],
         manifest_path: Optional[str], dry_run: bool, as_json: bool) -> None:
    """Pre-tune every bucket a model will hit on this GPU (tuning on first use, ahead of time).

    Buckets the committed perf table or this machine's tuned table already
    measured are skipped; the others' eligible kernels are timed within the
    budget and added to the tuned table, which later processes load.
    """
    import importlib.util

    from rich.console import Console
    from rich.progress import Progress

    from selector.tools import bench as bench_module
    from selector.tools import tune as tune_module
    from selector.tools.model_config import read_model_config
    from selector.tuning import TuneBudget, TuneCache, budget_method, cache_dir as default_cache_dir, software_key

    op_words = {w.strip() for w in ops.split(",") if w.strip()}
    if not op_words or op_words - {"decode", "extend"}:
        raise Failure(f"--ops: {ops!r}: expected decode, extend or decode,extend", EXIT_USAGE)
    sizes = {"batch": _list(batch, "--batch", int), "kv_len": _list(kv_len, "--kv-len", int),
             "new_len": _list(new_len, "--new-len", int)}
    try:
        model = read_model_config(Path(model_path), tp=tp)
    except KernelselError as exc:
        raise Failure(f"--model: {exc}", EXIT_USAGE) from None
    if importlib.util.find_spec("torch") is None:
        raise Failure("tune needs torch (pip install torch)", EXIT_USAGE)
    overrides = Overrides.from_env()
    manifest = _manifest(manifest_path, overrides)
    env = bench_module.environment(manifest, device, arch)
    try:
        base = choose_perf_table(perf_path or overrides.perf, env.gpu, env.arch,
                                 setting_name="--perf" if perf_path else ENV_PERF).table
    except ManifestError as exc:
        raise _manifest_failure(exc, "--perf" if perf_path else ENV_PERF) from None
    plan = tune_module.plan_requests(
        model, env.arch, q_dtype=q_dtype, kv_dtype=kv_dtype, page_size=page_size, batches=sizes["batch"],
        kv_lens=sizes["kv_len"], new_lens=sizes["new_len"], ops=[f"mha_{w}" for w in sorted(op_words)])
    if solution is not None:
        plan = [(k, r.restricted(solution)) for k, r in plan]
    cache = TuneCache.for_machine(env.gpu, env.arch, software_key(env.platform),
                                  Path(cache_dir) if cache_dir else default_cache_dir())
    budget = TuneBudget(seconds=budget_ms / 1e3, max_bytes=int(max_gib * 2**30))
    timer_method = bench_module.default_timer(device).method()

    def make_selector(table: Optional[PerfTable]) -> Selector:
        return Selector(manifest, env.platform, overrides, table)

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"tuning {Path(model_path).name}", total=len(plan))
        report = tune_module.run_tune(
            plan, make_selector, base, cache, device=device, budget=budget,
            method=budget_method(budget, timer_method), dry_run=dry_run,
            progress=lambda i, row: bar.update(task, completed=i, description=f"{row.kind}: {row.request.op.value}"))
    report.model = str(model_path)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for line in tune_module.summary_lines(report):
            click.echo(line)
@cli.command()
@click.option("--arch", type=ARCH, help="inspect a hypothetical GPU of this arch (sm_90, 9.0) with this machine's libraries")
@click.option("--manifest", "manifest_path", type=FILE, help="manifest or overlay (default: bundled)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@allow_adapter_option
def doctor(arch: Optional[str], manifest_path: Optional[str], as_json: bool) -> None:
    """This machine's GPU, driver, torch/CUDA/FlashInfer/Triton, manifest, perf table, overrides,
    and which kernels are available here and why not (imports each library to find broken installs)."""
    from selector.tools.doctor import diagnose, exit_status, render

    report = diagnose(arch=arch, manifest_path=manifest_path, adapter_allowlist=_adapter_allowlist())
    _echo_json(report) if as_json else click.echo(render(report))
    sys.exit(exit_status(report))


def _fail(exc: BaseException, message: str, code: int) -> None:
    """``kernelsel COMMAND: message`` -- one line on stderr -- and the exit code."""
    ctx = getattr(exc, "ctx", None)
    where = getattr(exc, "command_path", None) or (ctx.command_path if ctx is not None else "kernelsel")
    message = _one_line(message)
    name = where.rsplit(" ", 1)[-1]
    if message.startswith(f"{name}: "):  # "verify: no CUDA device" from inside the command
        message = message[len(name) + 2:]
    click.echo(f"{where}: {message}", err=True)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the CLI, turning errors into one-line messages and exit codes (never a traceback
    for bad input: 2 for a bad flag, value, file or request, 3 when no kernel can serve the request)."""
    try:
        cli.main(args=argv, prog_name="kernelsel", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `kernelsel` or a group without a command
        click.echo(exc.ctx.get_help() if exc.ctx is not None else "")
        _fail(exc, f"give a command: {', '.join(sorted(cli.commands))}", EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc, _usage_message(exc), EXIT_USAGE)
    except click.exceptions.Abort as exc:
        _fail(exc, "aborted", EXIT_USAGE)
    except Failure as exc:
        _fail(exc, str(exc), exc.code)
    except NoKernelError as exc:  # the full listing: every kernel of the op and why not
        click.echo(f"{getattr(exc, 'command_path', 'kernelsel')}: {exc}", err=True)
        sys.exit(EXIT_NO_KERNEL)
    except RequestError as exc:
        _fail(exc, _request_message(exc), EXIT_USAGE)
    except ManifestError as exc:
        _fail(exc, str(_manifest_failure(exc, "manifest")), EXIT_USAGE)
    except KernelselError as exc:
        _fail(exc, str(exc), EXIT_USAGE)
    except OSError as exc:  # a file named on the command line that cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(exc, f"{where}{exc.strerror or exc}", EXIT_USAGE)


if __name__ == "__main__":
    main()
