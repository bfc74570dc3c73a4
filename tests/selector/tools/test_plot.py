"""``kernelsel bench --plot``: a figure per results file, built on the CPU from synthetic results."""

from __future__ import annotations

import json
import re
import sys

import pytest

pytest.importorskip("matplotlib")

from selector.tools import plot  # noqa: E402
from selector.tools.cli import main  # noqa: E402

KERNELS = ("kernel-a", "kernel-b")


def results(copy_tbps=4.3) -> dict:
    """Two ops; decode at two batches over three contexts, extend at one batch; kernel-b selected except once."""
    cases = []
    for batch in (1, 8):
        for kv_len in (512, 4096, 32768):
            cases.append({"op": "mha_decode", "fields": {"q_dtype": "bf16", "kv_dtype": "bf16"}, "batch": batch,
                          "kv_len": kv_len, "new_len": None,
                          "kernels": [{"kernel": k, "median_us": 10.0 + i, "tbps": 1.0 + i + kv_len / 32768}
                                      for i, k in enumerate(KERNELS)],
                          "strategies": {"perf_table": {"kernel": "kernel-b" if kv_len > 512 else "kernel-a"}}})
    cases.append({"op": "mha_extend", "fields": {"q_dtype": "bf16", "kv_dtype": "bf16"}, "batch": 4, "kv_len": 8192,
                  "new_len": 64, "kernels": [{"kernel": "kernel-a", "median_us": 50.0, "tbps": 0.5}],
                  "selected": "kernel-a"})
    return {"meta": {"gpu": "Test GPU", "copy_tbps": copy_tbps}, "cases": cases}


def test_the_figure_has_a_panel_per_op_and_batch_the_ceiling_and_the_selection(tmp_path):
    out = tmp_path / "plot.png"
    fig = plot.plot(results(), out, title="Test GPU")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in visible) == [
        "mha_decode  q bf16 / kv bf16, batch 1", "mha_decode  q bf16 / kv bf16, batch 8",
        "mha_extend  q bf16 / kv bf16, batch 4"]
    decode = next(ax for ax in visible if ax.get_title().endswith("batch 8"))
    assert decode.get_xlabel() == "context length (KV tokens per request)"
    assert decode.get_ylabel() == "achieved KV bandwidth (TB/s)" and decode.get_xscale() == "log"
    lines = {ln.get_label(): ln for ln in decode.get_lines()}
    assert list(lines["kernel-b"].get_xdata()) == [512, 4096, 32768]
    assert list(lines["kernel-b"].get_ydata()) == pytest.approx([2 + 512 / 32768, 2.125, 3.0])
    ceiling = [ln for ln in decode.get_lines() if ln.get_label() == "_ceiling"]
    assert len(ceiling) == 1 and list(ceiling[0].get_ydata()) == [4.3, 4.3]
    rings = [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in decode.get_lines() if ln.get_label() == "_selected"]
    assert rings == [(512, 1.0 + 512 / 32768), (4096, 2.125), (32768, 3.0)]  # kernel-a, then kernel-b
    extend = next(ax for ax in visible if ax.get_title().startswith("mha_extend"))
    assert [t.get_text() for t in extend.texts if t.get_text().startswith("new")] == ["new 64"]
    assert fig.legends and {t.get_text() for t in fig.legends[0].get_texts()} >= {*KERNELS, "selected by kernelsel"}


def test_without_a_measured_ceiling_there_is_no_ceiling_line(tmp_path):
    fig = plot.plot(results(copy_tbps=None), tmp_path / "p.png")
    assert not [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "_ceiling"]


def test_a_copy_a_little_below_read_only_kernels_is_drawn_and_the_title_says_they_pass_it(tmp_path):
    """Kernels reach 3.0 TB/s here; a 2.8 TB/s SM copy (read + write) is still the line to draw, with the reason."""
    fig = plot.plot(results(copy_tbps=2.8), tmp_path / "p.png")
    assert {ln.get_ydata()[0] for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "_ceiling"} == {2.8}
    note = fig.get_suptitle()
    assert "2.80 TB/s read + write" in note and "only read reached 3.00 TB/s" in note


def test_a_copy_figure_far_below_what_kernels_reached_is_not_drawn_as_a_ceiling(tmp_path):
    """Kernels reach 3.0 TB/s here; a 2.0 TB/s copy (the copy engines, as older reports timed it) would be a false
    ceiling: said, not drawn."""
    fig = plot.plot(results(copy_tbps=2.0), tmp_path / "p.png")
    assert not [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "_ceiling"]
    note = fig.get_suptitle()
    assert "not drawn as a ceiling" in note and "2.00" in note


def test_cli_plots_an_existing_results_file_without_a_gpu(tmp_path, capsys):
    src, out = tmp_path / "results.json", tmp_path / "docs" / "plot.png"
    src.write_text(json.dumps(results()))
    main(["bench", "--plot", str(out), "--from", str(src)])
    assert out.stat().st_size > 10_000
    assert re.search(r"wrote .*plot\.png \(7 requests from .*results\.json\)", capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from", "{src}"], r"--from draws a results file: give --plot PATH\.png too"),
        (["--plot", "{out}", "--from", "{src}", "--op", "mha_decode"], r"--from draws an existing results file"),
        (["--plot", "{out}", "--from", "{bad}"], r"--from: .*bad\.json: expected a bench or regret results file"),
        (["--plot", "{out}", "--from", "{missing}"], r"--from: .*missing\.json: cannot read"),
    ],
)
def test_cli_plot_bad_input_is_one_line(tmp_path, capsys, argv, message):
    src, bad = tmp_path / "results.json", tmp_path / "bad.json"
    src.write_text(json.dumps(results()))
    bad.write_text(json.dumps({"cases": [{"no": "op"}]}))
    paths = {"src": src, "bad": bad, "out": tmp_path / "p.png", "missing": tmp_path / "missing.json"}
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *[a.format(**paths) for a in argv]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(plot.KernelselError, match=r"plotting needs matplotlib .*pip install 'kernelsel\[plot\]'"):
        plot.figure(results())


def test_a_cpu_bench_run_draws_its_own_plot(tmp_path, capsys):
    pytest.importorskip("torch")
    out, png = tmp_path / "cpu.yaml", tmp_path / "bench.png"
    main(["bench", "--device", "cpu", "--arch", "sm_90", "--op", "mha_decode", "--head-dim", "64", "--num-qo-heads", "4",
          "--num-kv-heads", "2", "--page-size", "16", "--batch", "1,2", "--kv-len", "16,64", "--kernel", "torch-mha-decode",
          "--repeats", "1", "--warmup", "0", "--out", str(out), "--plot", str(png), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 10_000 and data["meta"]["copy_tbps"] > 0
    # the reference kernel is timed when named but never selected automatically: nothing is ringed
    assert all("selected" not in c or c["selected"] != "torch-mha-decode" for c in data["cases"])


def test_points_of_different_shapes_are_not_joined(tmp_path):
    """Two models' heads in one panel (a held-out suite): one line per shape, one legend entry per kernel."""
    data = results()
    for c in data["cases"]:
        if c["op"] == "mha_decode" and c["batch"] == 1 and c["kv_len"] == 4096:
            c["fields"] = {**c["fields"], "num_qo_heads": 64, "num_kv_heads": 8}
    fig = plot.plot(data, tmp_path / "p.png")
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("mha_decode") and "batch 1" in ax.get_title())
    kernel_a = [ln for ln in panel.get_lines() if ln.get_label() in ("kernel-a", "_kernel-a")]
    assert sorted(len(ln.get_xdata()) for ln in kernel_a) == [1, 2]
    assert [ln.get_label() for ln in kernel_a].count("kernel-a") == 1
