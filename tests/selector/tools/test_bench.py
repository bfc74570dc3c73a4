"""``kernelsel bench`` on the CPU: sized workloads, the timing harness, the perf table it writes and merges.

Timings are never asserted: tests use the reference kernels (named, as a
reference kernel is timed only when named), wall-clock timing or a fake
timer, and check what is recorded where.  Request fields come from each
kernel's declared capability (``selector.tools.verify.plan_cases``).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")

from registry.errors import KernelselError, RequestError  # noqa: E402
from registry.loader import load_manifest, load_perf_table  # noqa: E402
from registry.perf import bucket  # noqa: E402
from registry.vocab import Arch, Op  # noqa: E402
from selector import KernelRequest, Platform, Selector  # noqa: E402
from selector.tools import bench  # noqa: E402
from selector.tools.cli import main  # noqa: E402
from selector.tools.verify import plan_cases, tolerance_for, within  # noqa: E402
from registry.workloads import PREFIX_LENS, make_workload, sized_lengths  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]
MANIFEST = load_manifest()
REFERENCE = [k for k in MANIFEST.kernels if k.solution.value == "reference"]
ARCH = "sm_90"
PAGED = (Op.MHA_DECODE, Op.MHA_EXTEND, Op.MLA_DECODE, Op.SPARSE_MLA_DECODE)


def base_fields(spec) -> dict:
    """The kernel's first declared value of every field (verify's quick base case)."""
    return {k: getattr(v, "value", v) for k, v in plan_cases(spec, quick=True, device="cpu")[0].fields.items()}


def new_len(spec) -> int | None:
    return 5 if spec.op is Op.MHA_EXTEND else None


def reference_for(op: str):
    return next(k for k in REFERENCE if k.op.value == op)


def cpu_env() -> bench.BenchEnvironment:
    return bench.environment(MANIFEST, "cpu", ARCH)


def selector(env=None) -> Selector:
    return Selector(MANIFEST, (env or cpu_env()).platform)


# ------------------------------------------------------------ sized workloads


@pytest.mark.parametrize("spec", REFERENCE, ids=lambda k: k.name)
def test_sized_workload_has_the_sizes_asked_for_and_matches_the_reference(spec):
    request = KernelRequest(op=spec.op, arch=ARCH, kernel=spec.name, **base_fields(spec))
    new, kv = sized_lengths(request, 3, 40, new_len(spec))
    work = make_workload(request, batch=3, kv_len=40, new_len=new_len(spec), seed=1)
    assert work.inputs[0].shape[0] == sum(new) and work.out_shape[0] == sum(new)
    if spec.op in PAGED:
        assert work.metadata.seq_lens.tolist() == kv == [40] * 3
        assert tuple(work.metadata.block_table.shape) == (3, math.ceil(40 / request.page_size))
        pages = work.metadata.block_table.flatten().tolist()
        assert len(set(pages)) == len(pages)  # every request owns its pages
    else:
        assert work.metadata.cu_seqlens_kv.tolist() == [0, 40, 80, 120]
    adapter = Selector(MANIFEST, Platform.hypothetical(ARCH)).select(request).make_adapter()
    adapter.plan(work.metadata)
    want, _ = work.reference()
    assert within(work.run(adapter).out, want, tolerance_for(request))
    double = make_workload(request, batch=6, kv_len=40, new_len=new_len(spec))
    assert double.kv_bytes == 2 * work.kv_bytes > 0


def test_without_sizes_the_workload_is_the_small_edge_case_batch():
    spec = reference_for("mha_decode")
    work = make_workload(KernelRequest(op=spec.op, arch=ARCH, **base_fields(spec)))
    assert work.metadata.seq_lens.shape[0] == len(PREFIX_LENS)


@pytest.mark.parametrize(
    "op, sizes, message",
    [
        ("mha_extend", dict(batch=2, kv_len=40), r"^a sized mha_extend workload needs new_len >= 1"),
        ("mha_decode", dict(batch=2, kv_len=40, new_len=3), r"^new_len is for the ragged ops .*mha_decode takes"),
        ("mha_extend", dict(batch=2, kv_len=4, new_len=5), r"^5 new tokens per request do not fit in kv_len 4"),
        ("mha_decode", dict(batch=2), r"^a sized mha_decode workload needs kv_len"),
        ("mha_prefill", dict(kv_len=8, new_len=5), r"^mha_prefill: every token is new"),
    ],
)
def test_sized_lengths_say_what_is_missing(op, sizes, message):
    spec = reference_for(op)
    with pytest.raises(RequestError, match=message):
        make_workload(KernelRequest(op=spec.op, arch=ARCH, **base_fields(spec)), **sizes)


# ------------------------------------------------------------ cases and suites


def test_a_grid_is_the_cartesian_product_and_requests_carry_the_buckets():
    spec = reference_for("mha_decode")
    cases = bench.grid("mha_decode", ARCH, base_fields(spec), {"batch": [1, 3], "kv_len": [40, 100]})
    assert [(c.batch, c.kv_len) for c in cases] == [(1, 40), (1, 100), (3, 40), (3, 100)]
    assert [(c.request.batch_size, c.request.kv_len) for c in cases] == [
        (bucket(c.batch), bucket(c.kv_len)) for c in cases
    ]


def test_cases_in_one_bucket_are_refused_before_timing():
    spec = reference_for("mha_decode")
    cases = bench.grid("mha_decode", ARCH, base_fields(spec), {"batch": [2], "kv_len": [40, 50]})
    with pytest.raises(RequestError, match=r"^these cases fall into one perf bucket .*\n  mha_decode .*kv_len=40 and "):
        bench.check_buckets(cases)


def test_the_regret_suite_is_a_fixed_set_of_distinct_buckets_each_with_eligible_kernels():
    cases = bench.load_suite(ROOT / "bench" / "regret_suite.yaml", ARCH)
    assert len(cases) >= 40
    bench.check_buckets(cases)
    assert {c.request.op.value for c in cases} >= {"mha_decode", "mha_extend", "mla_decode"}
    sel = Selector(MANIFEST, Platform.hypothetical(ARCH))
    for case in cases:
        specs, _ = bench.candidates(sel, case.request)
        assert specs, case.label


def test_the_record_and_held_out_suites_are_disjoint_and_every_held_out_request_has_a_choice():
    """The held-out suite scores predictions: none of its buckets may be recorded, each must offer two kernels."""
    recorded = bench.load_suite(ROOT / "bench" / "regret_suite.yaml", ARCH) + bench.load_suite(
        ROOT / "bench" / "record_suite.yaml", ARCH)
    bench.check_buckets(recorded)  # one table: no two cases in one bucket
    held_out = bench.load_suite(ROOT / "bench" / "heldout_suite.yaml", ARCH)
    bench.check_buckets(held_out)
    assert len(held_out) >= 25 and {c.request.op.value for c in held_out} == {"mha_decode", "mha_extend", "mla_decode"}
    assert not {c.key for c in held_out} & {c.key for c in recorded}
    sel = Selector(MANIFEST, Platform.hypothetical(ARCH))
    for case in held_out + recorded:
        specs, _ = bench.candidates(sel, case.request)
        assert len(specs) >= 2, case.name
    assert all(c.group for c in held_out) and len({c.name for c in held_out}) == len(held_out)


def test_suite_problems_are_located(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("schema_version: 1\ngroups:\n  - name: d\n    op: mha_decode\n    gird: {batch: [1]}\n")
    with pytest.raises(KernelselError, match=r"suite.yaml:5:5: groups\[0\]\.gird: unknown key"):
        bench.load_suite(path, ARCH)
    path.write_text("groups:\n  - name: d\n    op: mha_decode\n    request: {head_dim: 64}\n    grid: {kv_len: [8]}\n")
    with pytest.raises(KernelselError, match=r"suite.yaml:2:5: groups\[0\]: \(d\) request.head_dim: unknown"):
        bench.load_suite(path, ARCH)
    path.write_text("groups:\n  - name: d\n    op: mha_decode\n    cases:\n      - {kv_len: 8}\n      - {kv_len: 0}\n")
    with pytest.raises(KernelselError, match=r"suite.yaml:6:9: groups\[0\]\.cases\[1\]: \(d\) kv_len: expected a positive whole number, got 0"):
        bench.load_suite(path, ARCH)


def test_a_grid_or_suite_over_the_case_limit_is_refused_before_any_case_is_built(tmp_path, monkeypatch):
    """Two axes of 3,000 values were 3.7 GB of cases before timing started."""
    built = []
    monkeypatch.setattr(bench, "make_case", lambda *a: built.append(a))
    many = list(range(1, 3001))
    with pytest.raises(RequestError, match=r"^the grid has 9,000,000 cases \(3,000 batch x 3,000 kv_len\), over the limit of "):
        bench.grid("mha_decode", ARCH, {}, {"batch": many, "kv_len": many})
    path = tmp_path / "suite.yaml"
    path.write_text(f"groups:\n  - {{name: a, op: mha_decode, grid: {{batch: {many[:100]}, kv_len: {many[:50]}}}}}\n")
    with pytest.raises(KernelselError, match=r"suite\.yaml: the suite has 5,000 cases \(100 batch x 50 kv_len\), over the limit"):
        bench.load_suite(path, ARCH)
    assert built == []


@pytest.mark.parametrize("case, message", [
    ("{batch: '8', kv_len: 64}", r"batch: expected a positive whole number, got '8'"),
    ("{batch: 8, kv_len: 64.5}", r"kv_len: expected a positive whole number, got 64\.5"),
    ("{batch: true, kv_len: 64}", r"batch: expected a positive whole number, got True"),
    ("{op: mla_decode, kv_len: 64}", r"request\.op: set by the group, not here"),
    ("{arch: sm_100, kv_len: 64}", r"request\.arch: set by the run"),
])
def test_suite_case_sizes_and_fields_of_the_wrong_kind_are_located(tmp_path, case, message):
    """A quoted size reached the workload as text (TypeError); op or arch in a case was a TypeError too."""
    path = tmp_path / "suite.yaml"
    path.write_text(f"groups:\n  - name: d\n    op: mha_decode\n    cases:\n      - {case}\n")
    with pytest.raises(KernelselError, match=r"suite\.yaml:5:9: groups\[0\]\.cases\[0\]: \(d\) " + message):
        bench.load_suite(path, ARCH)


def test_a_workload_too_large_for_the_device_fails_the_case_not_the_run(monkeypatch):
    """Building the workload is outside the per-kernel guard: an out-of-memory error was a traceback."""
    import registry.workloads

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory\nmore")

    monkeypatch.setattr(registry.workloads, "make_workload", no_memory)
    case = decode_cases()[0]
    result = bench.time_case(case, Selector(MANIFEST, Platform.hypothetical(ARCH)), timer=FakeTimer(1.0), device="cpu",
                             kernels=[reference_for("mha_decode").name])
    assert [t.error for t in result.kernels] == ["the workload: RuntimeError: DefaultCPUAllocator: can't allocate memory"]


def test_the_default_table_is_under_the_current_directory_never_site_packages():
    """A wheel install keeps the bundled tables in site-packages: bench must not write there by default."""
    path = bench.default_table_path("NVIDIA H200", Arch.SM_90)
    assert path == pathlib.Path("perf") / "nvidia-h200-sm_90.yaml" and not path.is_absolute()


# ------------------------------------------------------------ the harness and the table


class FakeTimer:
    """Hands out the given times in order (calls ``fn`` once, so the adapter really runs); raises for ``None``."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self, fn):
        us = self.times.pop(0)
        if us is None:
            raise RuntimeError("kernel exploded\nsecond line")
        fn()
        return bench.Timing(us, "eager (FakeCaptureError)" if us == 7.0 else "graph")

    def method(self, eager=()):
        return "fake" + (f"; eager: {', '.join(sorted(eager))}" if eager else "")


def decode_cases(kv_lens=(40,)):
    spec = reference_for("mha_decode")
    return bench.grid("mha_decode", ARCH, base_fields(spec), {"batch": [3], "kv_len": list(kv_lens)})


def test_bench_records_each_bucket_with_its_times_and_bandwidth(tmp_path):
    out, lines = tmp_path / "cpu.yaml", []
    report = bench.run_bench(decode_cases((40, 100)), selector(), cpu_env(), timer=FakeTimer(7.0, 20.0), out=out,
                             kernels=["torch-mha-decode"], progress=lines.append)
    table = load_perf_table(out)
    assert table.gpu == "cpu" and table.arch.value == ARCH and table.method == "fake; eager: torch-mha-decode"
    assert table.software["torch"] == torch.__version__ and re.fullmatch(r"\d{4}-\d\d-\d\d", table.recorded)
    assert [(e.shape["batch_size"], e.shape["kv_len"]) for e in table.entries] == [(4, 64), (4, 128)]
    assert [e.median_us for e in table.entries] == [{"torch-mha-decode": 7.0}, {"torch-mha-decode": 20.0}]
    kv_bytes = [r.kv_bytes for r in report.results]
    assert [e.tbps["torch-mha-decode"] for e in table.entries] == [float(f"{b / t / 1e6:.4g}") for b, t in zip(kv_bytes, (7.0, 20.0))]
    assert lines[0].startswith("bench [1/2] mha_decode q=bf16 kv=bf16 B=3 kv_len=40: torch-mha-decode 7.0 us")
    sel = Selector(MANIFEST, Platform.hypothetical(ARCH), perf=table).solve(decode_cases()[0].request)
    assert sel.measured == {}  # a reference kernel is measured but never eligible by default: no effect


def test_a_failing_kernel_is_reported_and_never_recorded(tmp_path):
    out, lines = tmp_path / "cpu.yaml", []
    cases = decode_cases()
    env = cpu_env()
    report = bench.run_bench(cases, selector(env), env, timer=FakeTimer(None), out=out,
                             kernels=["torch-mha-decode"], progress=lines.append)
    assert report.table is None and not out.exists() and report.errors == 1
    assert lines[0].splitlines()[1] == "  error  torch-mha-decode: RuntimeError: kernel exploded"
    lines.clear()
    report = bench.run_bench(cases, selector(env), env, timer=FakeTimer(3.0, None), out=out,
                             kernels=["torch-mha-decode", "triton-mha-decode"], progress=lines.append)
    assert [e.median_us for e in load_perf_table(out).entries] == [{"torch-mha-decode": 3.0}]
    assert re.search(r"^  error  triton-mha-decode: ", lines[0], re.M)
    spec = reference_for("mha_extend")
    extend = bench.grid("mha_extend", ARCH, base_fields(spec), {"batch": [2], "kv_len": [40], "new_len": [5]})
    # a named kernel of another op is a bad request, not a kernel failure
    with pytest.raises(RequestError, match=r"kernel 'torch-mha-decode' implements mha_decode, not mha_extend"):
        bench.run_bench(extend, selector(env), env, timer=FakeTimer(3.0), kernels=["torch-mha-decode"])


def test_merging_updates_kernel_by_kernel_and_adds_buckets(tmp_path):
    env = cpu_env()
    out = tmp_path / "cpu.yaml"
    (c40,) = decode_cases((40,))
    (c100,) = decode_cases((100,))

    def result(case, **times):
        return bench.CaseResult(case, [bench.KernelTiming(k.replace("_", "-"), median_us=t, tbps=1.0, mode="graph")
                                       for k, t in times.items()])

    first = bench.write_table(out, env, "m1", [result(c40, kernel_a=10.0, kernel_b=20.0)])
    second = bench.write_table(out, env, "m2", [result(c40, kernel_b=15.0, kernel_c=5.0), result(c100, kernel_a=1.0)],
                               existing=first)
    assert [e.median_us for e in second.entries] == [
        {"kernel-a": 10.0, "kernel-b": 15.0, "kernel-c": 5.0}, {"kernel-a": 1.0}
    ]
    assert second.method == "m2" and load_perf_table(out).entries == second.entries


def test_a_table_of_another_gpu_is_not_merged_into(tmp_path):
    out = tmp_path / "h200.yaml"
    out.write_text("gpu: NVIDIA H200\narch: sm_90\nentries: []\n")
    with pytest.raises(KernelselError, match=r"h200.yaml: recorded on NVIDIA H200 \(sm_90\); this is cpu \(sm_90\)"):
        bench.run_bench(decode_cases(), selector(), cpu_env(), timer=FakeTimer(1.0), out=out)


# ------------------------------------------------------------ the CLI


def run(capsys, *argv):
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _flags(fields: dict) -> list[str]:
    names = {"head_dim_qk": "--head-dim", "head_dim_vo": "--head-dim-v"}
    return [x for k, v in fields.items() for x in (names.get(k, "--" + k.replace("_", "-")), str(v))]


def test_cli_bench_writes_a_table_that_loads_and_merges_on_the_next_run(capsys, tmp_path):
    spec = reference_for("mha_decode")
    out = tmp_path / "cpu-sm_90.yaml"
    common = ["bench", "--device", "cpu", "--arch", ARCH, "--op", "mha_decode", *_flags(base_fields(spec)),
              "--kernel", f"{spec.name},flashinfer-fa2-decode", "--repeats", "2", "--warmup", "0", "--out", str(out)]
    code, _, err = run(capsys, *common, "--batch", "1,3", "--kv-len", "40")
    assert code == 0, err
    assert re.search(r"^bench \[1/2\] mha_decode .* B=1 kv_len=40: torch-mha-decode [\d.]+ us", err, re.M)
    assert re.search(r"^  skip   flashinfer-fa2-decode: not eligible: needs flashinfer-python, not installed", err, re.M)
    first = load_perf_table(out)
    assert [(e.shape["batch_size"], e.shape["kv_len"]) for e in first.entries] == [(1, 64), (4, 64)]
    code, _, err = run(capsys, *common, "--batch", "1", "--kv-len", "100")
    assert code == 0, err
    second = load_perf_table(out)
    assert [(e.shape["batch_size"], e.shape["kv_len"]) for e in second.entries] == [(1, 64), (1, 128), (4, 64)]
    assert second.entries[0] == first.entries[0] and second.entries[2] == first.entries[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--op", "mha_decode", "--kv-len", "40,50", "--batch", "1"], r"these cases fall into one perf bucket"),
        (["--op", "mha_decode", "--batch", "0"], r"--batch: 0 is not a positive integer"),
        (["--op", "mha_decode", "--new-len", "4"], r"--new-len is for mha_extend and mha_prefill"),
        (["--op", "mha_decode", "--kernel", "torch-mha-decod"], r"no kernel named 'torch-mha-decod' \(did you mean"),
        ([], r"give --op \(and the grid options\) or --suite"),
    ],
)
def test_cli_bench_bad_input_exits_2_with_a_message(capsys, tmp_path, argv, message):
    spec = reference_for("mha_decode")
    fields = _flags(base_fields(spec)) if argv else []
    code, _, err = run(capsys, "bench", "--device", "cpu", "--arch", ARCH, *argv, *fields,
                       "--out", str(tmp_path / "x.yaml"))
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "x.yaml").exists()


class _FakeCuda:
    """Enough of torch.cuda for CudaTimer's control flow on the CPU: events read a counter of calls."""

    def __init__(self, monkeypatch, capturable: bool):
        self.log: list[str] = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = len(fake.log)
                fake.log.append("record")

            def elapsed_time(self, end):
                return float(end.at - self.at)

        class Graph:
            def replay(self):
                fake.log.append("replay")

        class Capture:
            def __init__(self, graph):
                pass

            def __enter__(self):
                fake.log.append("capture")

            def __exit__(self, *exc):
                if not capturable:
                    raise RuntimeError("operation not permitted when stream is capturing")

        class Stream:
            def wait_stream(self, other):
                pass

        for name, value in dict(Event=Event, CUDAGraph=Graph, graph=Capture, Stream=Stream,
                                current_stream=lambda: Stream(), stream=lambda s: contextlib.nullcontext(),
                                synchronize=lambda: None).items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("capturable", [True, False])
def test_cuda_timer_flushes_before_each_timed_run_and_replays_the_graph(monkeypatch, capturable):
    fake = _FakeCuda(monkeypatch, capturable)
    timer = bench.CudaTimer(repeats=3, warmup=2)
    timer._flush = type("Flush", (), {"zero_": lambda self: fake.log.append("flush")})()
    timing = timer(lambda: fake.log.append("run"))
    call = "replay" if capturable else "run"
    assert timing.mode == ("graph" if capturable else "eager (RuntimeError)")
    assert fake.log[:4] == ["run", "run", "capture", "run"]  # first call, side-stream warm-up, capture
    assert fake.log[4:] == [call] * 2 + ["flush", "record", call, "record"] * 3
    assert timing.us == 2.0 * 1e3  # the events of each timed run enclose exactly one call
    assert "eager where capture failed: k" in timer.method(["k"])


@pytest.mark.gpu
def test_cuda_timer_replays_a_graph_and_times_the_triton_decode(tmp_path):
    spec = next(k for k in MANIFEST.kernels if k.name == "triton-mha-decode")
    manifest_env = bench.environment(MANIFEST, "cuda")
    cases = bench.grid("mha_decode", manifest_env.arch, base_fields(spec), {"batch": [8], "kv_len": [4096]})
    report = bench.run_bench(cases, Selector(MANIFEST, manifest_env.platform), manifest_env,
                             timer=bench.CudaTimer(repeats=5, warmup=2), out=tmp_path / "gpu.yaml", kernels=[spec.name])
    (timing,) = report.results[0].kernels
    assert timing.ok and timing.mode == "graph", timing
    assert load_perf_table(tmp_path / "gpu.yaml").gpu == torch.cuda.get_device_name()
