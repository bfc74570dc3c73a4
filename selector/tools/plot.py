"""``kernelsel bench --plot``: achieved bandwidth against context length, per op, every eligible kernel.

Reads the results a bench or regret run writes (``bench/regret.py``'s JSON,
``kernelsel bench --json``): per case the op, the request's fields, the sizes
and every kernel's median and achieved KV bandwidth, the kernel kernelsel
selects, and the device-copy bandwidth measured in the same run
(``meta.copy_tbps``, read and write counted), drawn as the ceiling a
memory-bound kernel can approach (a kernel that only reads may pass it by a
little, which the title then says).

One row of panels per op and dtype pair, one panel per batch size; in a panel
one line per kernel over the context length (log scale), a ring around the
kernel kernelsel selects at each point (and, for ``mha_extend``, the new tokens
per request written beside it).  matplotlib is imported only here, on use
(``pip install 'kernelsel[plot]'``); figures are built on ``Figure`` objects, no
global pyplot state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from registry.errors import KernelselError

INSTALL = "pip install 'kernelsel[plot]'"
COPY_ENGINE_GAP = 1.25
"""Kernels this much faster than the copy mean the copy was not timed on the SMs: no ceiling is drawn then.

A read + write copy on the SMs runs within about 10% of what read-only kernels reach
(H200: 4.22 against 4.57 TB/s); a copy-engine copy ran at 2.70."""


def load_results(path: Path) -> dict[str, Any]:
    """A results JSON with ``cases`` (a regret report or ``kernelsel bench --json``); a clear error otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KernelselError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise KernelselError(f"{path}: not JSON: {exc}") from None
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "op" in c and "kernels" in c for c in cases):
        raise KernelselError(f"{path}: expected a bench or regret results file (an object with 'cases', each with "
                             "'op' and 'kernels'), e.g. bench/results/regret-nvidia-h200.json")
    return data


def selected_kernel(case: dict[str, Any]) -> Optional[str]:
    """The kernel kernelsel selected for a case: ``selected`` (bench), or the perf-table strategy's (regret)."""
    if case.get("selected"):
        return case["selected"]
    return (case.get("strategies", {}).get("perf_table") or {}).get("kernel")


def _group(case: dict[str, Any]) -> str:
    fields = case.get("fields") or {}
    q, kv = fields.get("q_dtype"), fields.get("kv_dtype")
    if q is None:  # older reports: the dtypes are in the label
        words = dict(w.split("=", 1) for w in str(case.get("request", "")).split() if "=" in w)
        q, kv = words.get("q"), words.get("kv")
    return f"{case['op']}  q {q or '?'} / kv {kv or q or '?'}"


def _shape(case: dict[str, Any]) -> tuple:
    """What besides batch and context sets a case's shape: points of different shapes are never joined by a line."""
    fields = case.get("fields") or {}
    return tuple(fields.get(k) for k in ("num_qo_heads", "num_kv_heads", "head_dim_qk", "head_dim_vo", "page_size",
                                         "q_len", "kv_lora_rank"))


def figure(data: dict[str, Any], title: str = "") -> Any:
    """The figure for ``data`` (see ``load_results``): a matplotlib ``Figure``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise KernelselError(f"plotting needs matplotlib ({exc}): {INSTALL}") from None

    cases = [c for c in data["cases"] if c.get("kernels")]
    groups: dict[str, dict[int, list[dict]]] = {}
    for c in cases:
        groups.setdefault(_group(c), {}).setdefault(int(c.get("batch") or 1), []).append(c)
    if not groups:
        raise KernelselError("nothing to plot: no case has a kernel timing")
    ncols = max(len(b) for b in groups.values())
    fig = Figure(figsize=(4.2 * ncols, 3.4 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), ncols, squeeze=False)
    kernels = sorted({t["kernel"] for c in cases for t in c["kernels"]})
    colors = {k: f"C{i % 10}" for i, k in enumerate(kernels)}
    ceiling = (data.get("meta") or {}).get("copy_tbps")
    fastest = max((t.get("tbps") or 0.0 for c in cases for t in c["kernels"]), default=0.0)
    note = ""
    if ceiling and fastest > ceiling * COPY_ENGINE_GAP:  # older reports timed the copy engines (2.7 TB/s on an H200)
        note = (f"this run's device-copy figure ({ceiling:.2f} TB/s) is far below what kernels reached "
                f"({fastest:.2f} TB/s): not drawn as a ceiling")
        ceiling = None
    elif ceiling and fastest > ceiling:  # a copy also writes: kernels that only read may pass it by a little
        note = (f"dashed: device copy, {ceiling:.2f} TB/s read + write; kernels that only read reached "
                f"{fastest:.2f} TB/s")
    for row, (group, by_batch) in enumerate(sorted(groups.items())):
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(by_batch):
                ax.set_visible(False)
                continue
            batch = sorted(by_batch)[col]
            _panel(ax, sorted(by_batch[batch], key=lambda c: c["kv_len"]), colors, ceiling)
            ax.set_title(f"{group}, batch {batch}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (KV tokens per request)")
            ax.set_ylabel("achieved KV bandwidth (TB/s)")
            ax.grid(True, which="major", alpha=0.3)
    handles = [ax_line for ax_line in axes[0][0].get_lines() if not ax_line.get_label().startswith("_")]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8)
    if title or note:
        fig.suptitle("\n".join(t for t in (title, note) if t))
    return fig


def _panel(ax: Any, cases: list[dict[str, Any]], colors: dict[str, str], ceiling: Optional[float]) -> None:
    by_kernel: dict[str, dict[tuple, list[tuple[int, float]]]] = {}
    for c in cases:
        for t in c["kernels"]:
            if t.get("tbps"):
                by_kernel.setdefault(t["kernel"], {}).setdefault(_shape(c), []).append((c["kv_len"], t["tbps"]))
    for kernel in sorted(colors):
        lines = by_kernel.get(kernel)
        if not lines:  # keep every kernel in the legend of the first panel
            ax.plot([], [], marker="o", color=colors[kernel], label=kernel)
            continue
        for i, points in enumerate(lines.values()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color=colors[kernel],
                    label=kernel if i == 0 else f"_{kernel}")
    for c in cases:
        chosen = selected_kernel(c)
        timing = next((t for t in c["kernels"] if t["kernel"] == chosen and t.get("tbps")), None)
        if timing is None:
            continue
        ax.plot([c["kv_len"]], [timing["tbps"]], marker="o", markersize=11, markerfacecolor="none",
                markeredgecolor="black", linewidth=0, label="_selected")
        if c.get("new_len"):
            ax.annotate(f"new {c['new_len']}", (c["kv_len"], timing["tbps"]), fontsize=6, xytext=(4, 4),
                        textcoords="offset points")
    if ceiling:
        ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label="_ceiling")
        ax.annotate(f"device copy {ceiling:.2f} TB/s", (0.01, ceiling), xycoords=("axes fraction", "data"),
                    fontsize=7, color="gray", xytext=(0, 3), textcoords="offset points")
    ax.plot([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black", linewidth=0,
            label="selected by kernelsel")
    top = max([ceiling or 0.0] + [y for lines in by_kernel.values() for points in lines.values() for _, y in points])
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)


def plot(data: dict[str, Any], out: Path, title: str = "") -> Any:
    """Draw ``data`` into ``out`` (PNG, or any format matplotlib knows by the suffix); the figure."""
    fig = figure(data, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return fig
