"""Fuzzing the command line: any argv gives an exit code kernelsel documents and, for bad input, one line.

Argv are drawn per command from the command's own click parameters (a new flag is fuzzed without edits)
and a pool of hostile values: empty and blank strings, option look-alikes, huge and non-ASCII numbers,
vocabulary words and near misses, kernel names, missing, broken and real files, git objects.  Whatever
the argv: ``main`` exits 0, 1, 2 or 3 and never lets another exception out; exit 2 is exactly one line on
stderr naming the command; nothing prints a traceback.  ``bench``, ``verify`` and ``verify-model`` run
everything up to the timing, the GPU run or the models (replaced by stubs that record what they were asked).
"""

from __future__ import annotations

import os
import pathlib

import click
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from registry.loader import load_manifest
from registry.vocab import Arch, Backend, DType, Op, Solution
from selector.tools import cli as cli_module

ROOT = pathlib.Path(__file__).resolve().parents[3]
MANIFEST = load_manifest()
INPUTS = {  # copied into a fresh working directory for every example: the fuzz never names a file of the checkout
    "kernels.yaml": ROOT / "kernels.yaml", "valid.yaml": ROOT / "tests/registry/broken/_valid.yaml",
    "perf.yaml": ROOT / "perf/nvidia-h200-sm_90.yaml", "suite.yaml": ROOT / "bench/regret_suite.yaml",
    **{f"broken-{p.name}": p for p in sorted((ROOT / "tests/registry/broken").glob("*.yaml"))[1:7]},
}
BROKEN = [n for n in INPUTS if n.startswith("broken-")]


def examples(n: int) -> settings:
    """``n`` examples per property (KERNELSEL_PROPERTY_EXAMPLES=N runs N each, for a longer hunt)."""
    return settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", n)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


WORDS = (Op.values() + DType.values() + Arch.values() + Solution.values() + Backend.values()
         + [k.name for k in MANIFEST.kernels][:8] + ["sm90", "9.0", "90a", "fp8", "cuda", "cpu", "cuda:0", "tpu"])
HOSTILE = [
    "", " ", "-", "--", "-x", "--bogus", "--op", "--output=out:x", "-p", "0", "-1", "1", "16", "3,4", ",", "1,,2",
    "9" * 30, "9" * 5000, "\u00b2", "\u0669\u0660", "1e3", "nan", "inf", "16.0", "0x10", "true", "yes",
    "\u00e9", "a\nb", "x" * 300, "HEAD:kernels.yaml", "HEAD:", "HEAD", "no-such-ref:kernels.yaml",
    "missing.yaml", "kernels.yaml", "perf.yaml", "suite.yaml", "subdir", "out.txt", "nodir/out.txt",
] + BROKEN
values = st.sampled_from(HOSTILE) | st.sampled_from(WORDS) | st.sampled_from(WORDS).map(lambda w: w[:-1]) \
    | st.text(max_size=8).filter(lambda t: "\x00" not in t)


def _options(command: click.Command) -> list[tuple[str, click.Option]]:
    """(flag, option) for every option of the command."""
    return [(flag, p) for p in command.params if isinstance(p, click.Option) for flag in p.opts if flag not in ("-h", "--help")]


INTS = st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 576, 1024, 4096]).map(str) | st.integers(-2, 5000).map(str)
FILES = st.sampled_from(list(INPUTS) + ["out.txt"])


BAD_INTS = st.sampled_from(["0", "-1", "9" * 30, "9" * 5000, "\u00b2", "\u0669", "1e3", "16.0", "", " ", "a,b", ","])
BAD_FILES = st.sampled_from(["", " ", "missing.yaml", "subdir", "nodir/x", "-", "--output=x:y", "HEAD:", "HEAD:kernels.yaml"])
BAD_WORDS = st.sampled_from(["", " ", "tpu", "sm_95", "9" * 5000, "x\n", "-x", "\u00e9", "bf17", "a,,b"])


def _typed(option: click.Option) -> st.SearchStrategy:
    """A value of the option's own type (a choice, an integer, a file, a word) -- or a wrong one for that type."""
    t = option.type
    name = option.name or ""
    if isinstance(t, click.Choice):
        good, bad = st.sampled_from([str(c) for c in t.choices]), st.sampled_from([str(c)[:-1] for c in t.choices]) | BAD_WORDS
    elif isinstance(t, (click.types.IntParamType, click.IntRange)):
        good, bad = INTS, BAD_INTS
    elif isinstance(t, click.Path):
        good, bad = FILES, BAD_FILES
    elif "dtype" in name:
        good = st.sampled_from(DType.values() + ["fp8", "bfloat16"]) | st.lists(st.sampled_from(DType.values()), min_size=1, max_size=3).map(",".join)
        bad = BAD_WORDS
    elif name == "arch":
        good, bad = st.sampled_from(Arch.values() + ["9.0", "sm90"]), BAD_WORDS | BAD_INTS
    elif name in ("kernel", "kernels"):
        good, bad = st.sampled_from([k.name for k in MANIFEST.kernels]), BAD_WORDS
    elif name == "device":
        good, bad = st.sampled_from(["cpu", "cuda", "cuda:1"]), BAD_WORDS
    else:
        good, bad = st.lists(INTS, min_size=1, max_size=3).map(",".join) | st.sampled_from(WORDS), BAD_INTS | BAD_WORDS
    return st.one_of(good, good, bad)


BASE = {  # a valid start for each command, so the draws reach past the first check
    "explain": ["--op", "mha_decode", "--arch", "sm_90"], "plan": ["--arch", "sm_90"], "list": [], "matrix": [],
    "show": [MANIFEST.kernels[0].name], "validate": [], "diff": ["valid.yaml", "kernels.yaml"],
    "schema": [], "doctor": ["--arch", "sm_90"], "verify": ["--device", "cpu"],
    "bench": ["--op", "mha_decode", "--device", "cpu", "--arch", "sm_90"],
}


@st.composite
def argv(draw) -> list[str]:
    """Mostly well-typed options on top of a valid start, and now and then one hostile token anywhere."""
    name = draw(st.sampled_from(sorted(cli_module.cli.commands)))
    command = cli_module.cli.commands[name]
    out = [name] + BASE.get(name, [])
    if name == "explain":
        out[2], out[4] = draw(st.sampled_from(Op.values())), draw(st.sampled_from(Arch.values()))
    options = _options(command)
    for _ in range(draw(st.integers(0, 5))):
        flag, option = draw(st.sampled_from(options))
        out += [flag] if option.is_flag else [flag, draw(_typed(option))]
    if draw(st.integers(0, 2)) == 0:  # one hostile token: a value, a flag without its value, a stray word
        token = draw(values)
        at = draw(st.integers(1, len(out)))
        if at < len(out) and out[at - 1].startswith("--") and draw(st.booleans()):
            out[at] = token  # replace a value
        else:
            out.insert(at, token)
    return out


class _Stub:
    """Stands in for the GPU run: remembers the call, returns what the CLI needs."""

    def __init__(self, result):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


class _Report:
    ok, table, errors, recorded, method = True, None, 0, 0, "stub"

    def to_dict(self):
        return {}

    def render(self):
        return "stub report"


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    from selector.tools import bench, verify

    monkeypatch.setattr(bench, "run_bench", _Stub(_Report()))
    monkeypatch.setattr(verify, "verify", _Stub(_Report()))
    monkeypatch.setattr(bench, "environment", lambda manifest, device, arch: _env(device, arch))
    try:  # verify-model runs real models: everything up to that is fuzzed
        from selector.tools import model_conformance
    except ImportError:
        pass
    else:
        monkeypatch.setattr(model_conformance, "verify_models", _Stub({"failed": 0}))
        monkeypatch.setattr(model_conformance, "render_report", lambda report: "stub report")
    monkeypatch.chdir(tmp_path)
    for name in ("KERNELSEL_MANIFEST", "KERNELSEL_PERF", "KERNELSEL_DISABLE", "KERNELSEL_ADAPTER_ALLOWLIST"):
        monkeypatch.delenv(name, raising=False)


def _env(device, arch):
    from registry.errors import RequestError
    from selector.platform import Platform
    from selector.tools.bench import BenchEnvironment

    if str(device).startswith("cuda"):
        raise RequestError("bench: no CUDA device here; run on a GPU machine, or pass --device cpu --arch ARCH")
    if arch is None:
        raise RequestError("bench --device cpu needs --arch (the nominal arch that selection runs for)")
    platform = Platform.hypothetical(arch)
    return BenchEnvironment(device, "cpu", platform.arch, platform, {})


@examples(200)
@given(args=argv())
def test_any_argv_exits_with_a_documented_code_and_one_line_for_bad_input(cli, stubbed, tmp_path, args):
    for name, source in INPUTS.items():  # fresh inputs: an earlier example may have written over one (--out)
        (tmp_path / name).write_bytes(source.read_bytes())
    (tmp_path / "subdir").mkdir(exist_ok=True)
    code, out, err = cli(*args)
    event(f"{args[0]} exit {code}")
    assert code in (0, 1, 2, 3), (args, code, err[-500:])
    assert "Traceback" not in out + err, (args, err[-2000:])
    if code == 2:
        assert err.count("\n") == 1 and err.endswith("\n"), (args, err[-2000:])
        assert err.startswith(f"kernelsel {args[0]}: ") or err.startswith("kernelsel: "), (args, err)
