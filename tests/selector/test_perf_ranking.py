"""Measured selection: a perf table ranks eligible kernels; it never makes an ineligible one eligible.

Cases use the toy manifest; the last tests check the committed tables are found for the current GPU.
"""

from __future__ import annotations


import pytest

import selector
from registry.errors import ManifestError
from registry.loader import bundled_perf_dir, load_perf_table
from selector import KernelRequest, Platform, Selector
from selector.platform import EVERYTHING, GPU_SOURCES, Gpu

DECODE = dict(op="mha_decode", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
              page_size=16, batch_size=64, kv_len=4096)


def _table(tmp_path, times: dict, *, shape=None, arch="sm_90", name="h200.yaml"):
    shape = shape or {"q_dtype": "bf16", "kv_dtype": "bf16", "head_dim_qk": 128, "head_dim_vo": 128,
                      "num_qo_heads": 32, "num_kv_heads": 8, "page_size": 16, "q_len": 1,
                      "batch_size": 64, "kv_len": 4096}
    lines = ["gpu: NVIDIA H200", f"arch: {arch}", "method: test", "entries:", "  - op: mha_decode", "    shape:"]
    lines += [f"      {k}: {v}" for k, v in shape.items()]
    lines += ["    median_us:"] + [f"      {k}: {v}" for k, v in times.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return load_perf_table(path)


def _solve(manifest, perf, **fields):
    return Selector(manifest, Platform.hypothetical(fields["arch"]), perf=perf).solve(KernelRequest(**fields))


def test_measured_times_rank_eligible_kernels(toy, tmp_path):
    by_priority = _solve(toy, None, **DECODE)
    slowest_first = {k.name: 100.0 + 10 * i for i, k in enumerate(by_priority.eligible)}
    perf = _table(tmp_path, slowest_first)
    sel = _solve(toy, perf, **DECODE)
    assert [k.name for k in sel.eligible] == [k.name for k in by_priority.eligible]  # same order: times agree
    reversed_times = {k.name: 100.0 - 10 * i for i, k in enumerate(by_priority.eligible)}
    sel = _solve(toy, _table(tmp_path, reversed_times), **DECODE)
    assert [k.name for k in sel.eligible] == [k.name for k in reversed(by_priority.eligible)]
    assert sel.why.startswith("fastest measured of")
    assert sel.perf_source.endswith("h200.yaml, NVIDIA H200") and sel.measured == reversed_times
    text = sel.explain()
    assert "h200.yaml, NVIDIA H200 (measured times rank the eligible kernels)" in text.split("\nperf      ")[1]
    assert f"{reversed_times[sel.kernel.name]:.1f} us" in text


def test_a_perf_entry_never_makes_an_ineligible_kernel_eligible(toy, tmp_path):
    perf = _table(tmp_path, {"layout-decode": 1.0, "portable-decode": 500.0})  # layout-decode: sm_100 only
    sel = _solve(toy, perf, **DECODE)
    assert sel.kernel.name == "portable-decode" and sel.why == "only eligible kernel measured (500.0 us) [" + sel.perf_source + "]"
    assert "layout-decode" not in [k.name for k in sel.eligible]


def test_unmeasured_kernels_rank_after_measured_ones_by_priority(toy, tmp_path):
    by_priority = _solve(toy, None, **DECODE)
    last = by_priority.eligible[-1]
    sel = _solve(toy, _table(tmp_path, {last.name: 50.0}), **DECODE)
    assert sel.eligible[0] is last
    assert [k.name for k in sel.eligible[1:]] == [k.name for k in by_priority.eligible[:-1]]


def test_other_buckets_and_archs_fall_back_to_priority(toy, tmp_path):
    by_priority = _solve(toy, None, **DECODE)
    times = {k.name: 100.0 - i for i, k in enumerate(by_priority.eligible)}
    perf = _table(tmp_path, times)
    other_bucket = _solve(toy, perf, **{**DECODE, "batch_size": 8})
    assert other_bucket.eligible == by_priority.eligible and not other_bucket.perf_source
    same_bucket = _solve(toy, perf, **{**DECODE, "batch_size": 40, "kv_len": 3000})  # buckets to 64 / 4096
    assert same_bucket.perf_source and same_bucket.kernel.name == by_priority.eligible[-1].name
    other_arch = _solve(toy, _table(tmp_path, times, arch="sm_80", name="a100.yaml"), **DECODE)
    assert not other_arch.perf_source and other_arch.eligible == by_priority.eligible


def test_a_table_of_another_arch_is_named_in_explain_not_passed_over_in_silence(toy, tmp_path):
    """KERNELSEL_PERF at an A100 table on an H200 (or --arch sm_100 on a GPU with a committed table): it times
    nothing, priority ranks, and the perf line says why."""
    by_priority = _solve(toy, None, **DECODE)
    perf = _table(tmp_path, {k.name: 1.0 for k in by_priority.eligible}, arch="sm_80", name="a100.yaml")
    sel = _solve(toy, perf, **DECODE)
    assert sel.kernel.name == by_priority.kernel.name and not sel.measured and not sel.predicted
    line = next(ln for ln in sel.explain().splitlines() if ln.startswith("perf "))
    assert "a100.yaml, NVIDIA H200" in line
    assert "the table was recorded on sm_80, the request is for sm_90; priority ranks the eligible kernels" in line
    assert "sm_80" not in _solve(toy, None, **DECODE).explain()


def test_selection_with_a_perf_table_is_deterministic(toy, tmp_path):
    perf = _table(tmp_path, {"fast-decode": 10.0, "portable-decode": 10.0})
    orders = {tuple(k.name for k in _solve(toy, perf, **DECODE).eligible) for _ in range(5)}
    assert orders == {("fast-decode", "portable-decode")}  # equal times: priority decides


def test_kernelsel_perf_environment_variable(toy_env, tmp_path, monkeypatch):
    by_priority = _solve(toy_env, None, **DECODE)
    times = {k.name: 100.0 - i for i, k in enumerate(by_priority.eligible)}
    _table(tmp_path, times)
    monkeypatch.setenv("KERNELSEL_PERF", str(tmp_path / "h200.yaml"))
    selector.reset()
    sel = selector.default_selector().solve(KernelRequest(**DECODE))
    assert sel.perf_source and f"KERNELSEL_PERF={tmp_path / 'h200.yaml'}" in sel.overrides
    monkeypatch.setenv("KERNELSEL_PERF", "off")
    selector.reset()
    assert not selector.default_selector().solve(KernelRequest(**DECODE)).perf_source


def test_cli_explain_with_perf(toy, toy_file, toy_allowlist, tmp_path, cli):
    by_priority = _solve(toy, None, **DECODE)
    times = {k.name: 100.0 - i for i, k in enumerate(by_priority.eligible)}
    _table(tmp_path, times)
    code, out, err = cli("explain", "--manifest", toy_file, "--allow-adapter", toy_allowlist,
                         "--op", "mha_decode", "--arch", "sm_90", "--head-dim", "128", "--num-qo-heads", "32",
                         "--num-kv-heads", "8", "--page-size", "16", "--batch-size", "64", "--kv-len", "4096",
                         "--perf", tmp_path / "h200.yaml")
    assert code == 0, err
    assert "why       fastest measured of 2 eligible: 99.0 us vs fast-decode 100.0 us (1.01x)" in out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("arch: sm_90", "arch: sm_95"), r"arch: 'sm_95' is not an SM like sm_90"),
        (lambda t: t.replace("batch_size: 64", "batch_size: 48"), r"batch_size 48 is not a bucket \(a power of two\); use 64"),
        (lambda t: t.replace("page_size: 16", "pagesize: 16"), r"unknown shape field 'pagesize' \(did you mean 'page_size'\?\)"),
        (lambda t: t.replace("xqa-decode: 10.0", "xqa-decode: -1"), r"median_us\[xqa-decode\]: -1.0 is not a positive time"),
        (lambda t: t.replace("method: test", "methd: test"), r"unknown key 'methd' \(did you mean 'method'\?\)"),
    ],
)
def test_broken_perf_tables_are_located(tmp_path, edit, message):
    _table(tmp_path, {"xqa-decode": 10.0})
    path = tmp_path / "h200.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ManifestError, match=r"h200\.yaml:\d+:\d+: .*" + message):
        load_perf_table(path)


def _committed():
    tables = sorted(bundled_perf_dir().glob("*.yaml"))
    assert tables, "a perf table is committed under perf/"
    return tables[0], load_perf_table(tables[0])


def test_a_selector_finds_the_committed_table_once_it_knows_the_gpu(manifest, monkeypatch):
    path, table = _committed()
    monkeypatch.setitem(GPU_SOURCES, "torch", lambda: ((Gpu(table.gpu, "", table.arch),), ""))
    every_library = Platform(arch=None, libraries=((EVERYTHING, EVERYTHING),))
    entry = table.entries[0]
    sel = Selector(manifest, every_library, auto_perf=True).solve(KernelRequest(op=entry.op, **entry.shape))
    assert sel.request.arch is table.arch and sel.perf_source.endswith(f"{path.name}, {table.gpu}")
    fastest = min((k for k in sel.eligible if k.name in entry.median_us), key=lambda k: entry.median_us[k.name])
    assert sel.kernel is fastest


def test_the_default_selector_uses_the_committed_table_for_the_current_gpu(toy_env, monkeypatch):
    path, table = _committed()
    monkeypatch.setitem(GPU_SOURCES, "torch", lambda: ((Gpu(table.gpu, "", table.arch),), ""))
    entry = next(e for e in table.entries if e.op.value == "mha_decode")
    sel = selector.default_selector().solve(KernelRequest(op=entry.op, **entry.shape))  # no arch: detected
    # the table applies (its source is named), though it times none of the toy kernels: priority ranks them
    assert sel.estimates.source.endswith(f"{path.name}, {table.gpu}") and not sel.perf_source
    monkeypatch.setenv("KERNELSEL_PERF", "off")
    selector.reset()
    assert not selector.default_selector().solve(KernelRequest(op=entry.op, **entry.shape)).estimates.source


EXTEND = dict(op="mha_extend", arch="sm_90", q_dtype="bf16", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8,
              page_size=16, batch_size=1, kv_len=32768)
EXTEND_SHAPE = {"q_dtype": "bf16", "kv_dtype": "bf16", "head_dim_qk": 128, "head_dim_vo": 128, "num_qo_heads": 32,
                "num_kv_heads": 8, "page_size": 16, "q_len": 1, "batch_size": 1, "kv_len": 32768}


def _extend_table(tmp_path, buckets: dict[int, dict[str, float]]):
    """One mha_extend entry per new_len bucket."""
    lines = ["gpu: NVIDIA H200", "arch: sm_90", "method: test", "entries:"]
    for new_len, times in buckets.items():
        lines += ["  - op: mha_extend", "    shape:"]
        lines += [f"      {k}: {v}" for k, v in {**EXTEND_SHAPE, "new_len": new_len}.items()]
        lines += ["    median_us:"] + [f"      {k}: {v}" for k, v in times.items()]
    path = tmp_path / "extend.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_perf_table(path)


def test_the_new_tokens_per_request_decide_the_extend_bucket(toy, tmp_path):
    few = {"fast-extend": 877.0, "portable-extend": 218.0}  # a few new tokens over a long cache
    many = {"fast-extend": 890.0, "portable-extend": 1530.0}  # a long chunk
    perf = _extend_table(tmp_path, {64: few, 2048: many})
    assert _solve(toy, perf, **EXTEND, new_len=50).kernel.name == "portable-extend"
    assert _solve(toy, perf, **EXTEND, new_len=2000).kernel.name == "fast-extend"
    sel = _solve(toy, perf, **EXTEND, new_len=50)
    assert sel.measured == few and sel.perf_source


def test_extend_buckets_without_new_len_ask_for_a_re_recording(tmp_path):
    path = tmp_path / "old.yaml"
    lines = ["gpu: NVIDIA H200", "arch: sm_90", "entries:", "  - op: mha_extend", "    shape:"]
    lines += [f"      {k}: {v}" for k, v in EXTEND_SHAPE.items()]
    lines += ["    median_us: {fast-extend: 10.0}"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"old\.yaml:5:\d+: entries\[0\]\.shape: .*an mha_extend bucket needs new_len \(new "
                                            r"tokens per request, a power of two\).* must be re-recorded"):
        load_perf_table(path)
    decode = tmp_path / "decode.yaml"
    _table(tmp_path, {"fast-decode": 10.0}, name="decode.yaml")
    decode.write_text(decode.read_text().replace("kv_len: 4096", "kv_len: 4096\n      new_len: 4"))
    with pytest.raises(ManifestError, match=r"shape\.new_len: means nothing for mha_decode \(its new tokens per request are q_len\)"):
        load_perf_table(decode)
    bad = tmp_path / "bad.yaml"
    _extend_table(tmp_path, {64: {"fast-extend": 1.0}})
    bad.write_text((tmp_path / "extend.yaml").read_text().replace("new_len: 64", "new_len: 48"))
    with pytest.raises(ManifestError, match=r"new_len 48 is not a bucket \(a power of two\); use 64"):
        load_perf_table(bad)


def test_cli_new_len_reaches_the_request(toy, toy_file, toy_allowlist, tmp_path, capsys):
    import json

    from selector.tools.cli import main

    _extend_table(tmp_path, {64: {"fast-extend": 877.0, "portable-extend": 218.0}})
    args = ["explain", "--op", "mha_extend", "--arch", "sm_90", "--head-dim", "128", "--num-qo-heads", "32",
            "--num-kv-heads", "8", "--page-size", "16", "--batch-size", "1", "--kv-len", "30000",
            "--manifest", str(toy_file), "--allow-adapter", toy_allowlist, "--perf", str(tmp_path / "extend.yaml"),
            "--json"]
    main(args + ["--new-len", "50"])
    out = json.loads(capsys.readouterr().out)
    assert out["request"]["new_len"] == 64 and out["selected"]["name"] == "portable-extend"
    assert out["perf"]["median_us"]["fast-extend"] == 877.0


def test_the_committed_h200_table_predicts_the_long_cache_few_new_tokens_extend_case(manifest):
    """Committed data: FA3 paged prefill was measured 4x slower than FA2 with 64 new tokens over 65,536 cached
    tokens on the H200; the table's own buckets (none of them this one) predict it last."""
    perf = load_perf_table(bundled_perf_dir() / "nvidia-h200-sm_90.yaml")
    sel = Selector(manifest, Platform.hypothetical("sm_90"), perf=perf).solve(KernelRequest(
        op="mha_extend", arch="sm_90", head_dim_qk=128, num_qo_heads=32, num_kv_heads=8, page_size=16,
        batch_size=1, kv_len=65536, new_len=64))
    assert not sel.measured and sel.predicted and sel.kernel.name != "flashinfer-fa3-extend"
    assert sel.eligible[-1].name == "flashinfer-fa3-extend"

