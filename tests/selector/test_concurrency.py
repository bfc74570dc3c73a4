"""Concurrency and determinism: select_kernel under many threads, and the same answer in every process.

* 32 threads hammer the default selector (reading the toy manifest from the environment) with mixed
  requests (every request class the manifest can tell apart, some raising NoKernelError or RequestError);
  every result must equal a single-threaded run, and every thread must get the *same* Selection object per
  request (no request solved twice).
* Subprocesses with different PYTHONHASHSEED values and a reversed import order must select the same
  kernel and the same full ranking for every request of every op.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import selector
from registry.errors import KernelselError
from registry.vocab import Op
from selector import KernelRequest, Platform, Selector, select_kernel
from selector.tools.request_space import request_space

ROOT = Path(__file__).resolve().parents[2]


def _requests(manifest) -> list[KernelRequest]:
    """Every request class of every op, plus forced kernels (of the op and of another op: RequestError)."""
    reqs = [p.request for op in Op for p in request_space(op, manifest, manifest)]
    names = sorted(manifest.by_name)
    rng = random.Random(7)
    for r in rng.sample(reqs, 60):
        fields = r.model_dump(exclude_defaults=True)
        fields.pop("solution", None)
        reqs.append(KernelRequest(**fields, kernel=rng.choice(names)))
    return reqs


def _outcome(call, request):
    try:
        s = call(request)
        return ("ok", s.kernel.name, tuple(k.name for k in s.eligible)), s
    except KernelselError as exc:
        return (type(exc).__name__, str(exc)), getattr(exc, "selection", None)


def test_select_kernel_is_thread_safe_and_matches_a_single_threaded_run(toy_env):
    requests = _requests(toy_env)
    reference = Selector.from_env()  # same environment as the default selector, its own cache
    expected = {r: _outcome(reference.select, r)[0] for r in requests}
    kinds = {o[0] for o in expected.values()}
    assert {"ok", "NoKernelError", "RequestError"} <= kinds, kinds

    selector.reset()
    threads, calls = 32, 1500
    barrier = threading.Barrier(threads)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up

    def hammer(seed: int):
        rng = random.Random(seed)
        order = [rng.choice(requests) for _ in range(calls)]
        barrier.wait()
        return [(r, *_outcome(select_kernel, r)) for r in order]

    try:
        with ThreadPoolExecutor(threads) as pool:
            results = [x for chunk in pool.map(hammer, range(threads)) for x in chunk]
    finally:
        sys.setswitchinterval(old)
    seen: dict = {}
    for request, outcome, selection in results:
        assert outcome == expected[request], request.describe()
        if selection is not None:  # one Selection object per request, whichever thread solved it
            assert seen.setdefault(request, selection) is selection, f"solved twice: {request.describe()}"
    assert len(seen) > len(requests) // 2


def test_concurrent_misses_on_a_fresh_selector_solve_each_request_once(manifest, monkeypatch):
    import selector.api as api

    solved = []
    real = api.solve

    def counting(*args, **kw):
        solved.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(api, "solve", counting)
    sel = Selector(manifest, Platform.hypothetical("sm_90"))
    request = KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128)
    barrier = threading.Barrier(16)

    def one(_):
        barrier.wait()
        return sel.solve(request)

    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, range(16)))
    assert all(s is out[0] for s in out) and solved == [request]


# ------------------------------------------------------------------ determinism across processes

PROBE = r"""
import json, sys, importlib
modules = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else []
for m in modules:
    importlib.import_module(m)
from registry.loader import load_manifest, bundled_perf_dir, load_perf_table
from registry.vocab import Op
from selector import KernelRequest, Platform, Selector, Overrides
from selector.tools.request_space import request_space

manifest = load_manifest()
tables = [load_perf_table(p) for p in sorted(bundled_perf_dir().glob("*.yaml"))]
requests = [p.request for op in Op for p in request_space(op, manifest, manifest)]
requests += [KernelRequest(op=e.op, arch=t.arch, **e.shape) for t in tables for e in t.entries]
platforms = {
    "hypothetical": lambda arch: Platform.hypothetical(arch),
    "torch+triton": lambda arch: Platform(arch=arch, libraries=(("triton", "3"), ("torch", "2"))),
}
disable = Overrides(disable=frozenset(sorted(manifest.by_name)[::5]))
out = []
for pname, make in platforms.items():
    for overrides in (Overrides(), disable):
        selectors = {}
        for r in requests:
            if r.arch not in selectors:
                perf = next((t for t in tables if t.arch is r.arch), None)
                selectors[r.arch] = Selector(manifest, make(r.arch), overrides, perf)
            s = selectors[r.arch].solve(r)
            out.append([pname, sorted(overrides.disable), r.describe(), s.name, [k.name for k in s.eligible], s.why,
                        [[v.kernel.name, list(v.reasons)] for v in s.rejected]])
print(json.dumps(out))
"""

ORDER = ["registry.adapters.triton", "registry.adapters.flashinfer", "registry.perf", "registry.schema",
         "selector.solver", "selector.api", "selector.tools.cli", "selector.distributed"]


def _run(seed: str, modules: list[str]) -> list:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    env.pop("KERNELSEL_PERF", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(modules)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_same_manifest_and_request_select_the_same_kernel_in_every_process():
    runs = {
        ("0", "forward"): (["0", ORDER]),
        ("1", "forward"): (["1", ORDER]),
        ("4242", "reversed"): (["4242", ORDER[::-1]]),
        ("random", "none"): (["random", []]),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        outputs = dict(zip(runs, pool.map(lambda a: _run(*a), runs.values())))
    baseline = outputs[("0", "forward")]
    assert len(baseline) > 2000 and any(row[3] for row in baseline) and any(not row[3] for row in baseline)
    assert any(len(row[4]) > 2 for row in baseline), "some requests rank several kernels"
    for key, rows in outputs.items():
        assert len(rows) == len(baseline), key
        for a, b in zip(baseline, rows):
            assert a == b, f"{key}: {a[2]}: {a[3]} {a[4]} vs {b[3]} {b[4]}"


@pytest.mark.parametrize("seed", ["0", "99"])
def test_overrides_parse_the_same_under_any_hash_seed(seed):
    code = ("from selector import Overrides\n"
            "o = Overrides.from_env({'KERNELSEL_DISABLE': 'c,a,b,e,d', 'KERNELSEL_FORCE_MHA_DECODE': 'x'})\n"
            "print(o.applied(__import__('registry.vocab').vocab.Op.MHA_DECODE))")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert "KERNELSEL_DISABLE=a,b,c,d,e" in out.stdout


# ------------------------------------------------------------------ reset and the environment under load


def _hammer(requests, work, seconds_switch=1e-6, threads=8, calls=500):
    """Run ``work`` in a thread beside ``threads`` threads selecting ``requests``; every raw exception they see."""
    raw: list[BaseException] = []
    done = threading.Event()

    def select_many(i):
        for j in range(calls):
            try:
                select_kernel(requests[(i * 31 + j) % len(requests)])
            except KernelselError:
                pass
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                raw.append(exc)

    def disturb():
        while not done.is_set():
            work()

    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds_switch)
    try:
        side = threading.Thread(target=disturb)
        side.start()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(select_many, range(threads)))
        done.set()
        side.join()
    finally:
        sys.setswitchinterval(old)
    return raw


def test_reset_while_threads_select_never_breaks_a_call(toy_env):
    """reset() between default_selector()'s check and its return handed back None (AttributeError in 31 of 12,000)."""
    requests = _requests(toy_env)[:40]
    raw = _hammer(requests, selector.reset)
    assert not raw, f"{len(raw)} raw exceptions, e.g. {raw[0]!r}"


def test_the_environment_changing_while_threads_select_never_breaks_a_call(toy_env, monkeypatch):
    """Reading KERNELSEL_FORCE_* by iterating os.environ raised KeyError when another thread unset a variable."""
    requests = _requests(toy_env)[:40]
    names = [f"KERNELSEL_FORCE_MHA_DECODE_X{i}" for i in range(20)] + [f"UNRELATED_{i}" for i in range(20)]
    for name in names:
        monkeypatch.setenv(name, "x")  # restored by monkeypatch; the side thread unsets and sets them

    def churn():
        for name in names:
            os.environ.pop(name, None)
        selector.reset()
        for name in names[20:]:
            os.environ[name] = "x"

    raw = _hammer(requests, churn)
    assert not raw, f"{len(raw)} raw exceptions, e.g. {raw[0]!r}"
