"""``kernelsel matrix``: the committed support matrix is the manifest's, and every cell comes from it."""

from __future__ import annotations

import pathlib

import pytest

from registry.loader import load_manifest
from registry.vocab import Arch, DType, Op
from selector.tools.matrix import DEFAULT_PATH, NO, REGENERATE, YES, common_dtype, default_winners, render_matrix

ROOT = pathlib.Path(__file__).resolve().parents[3]
COMMITTED = ROOT / DEFAULT_PATH
MANIFEST = load_manifest(ROOT / "kernels.yaml")
TEXT = render_matrix(MANIFEST)


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under ``heading``, as cell lists."""
    lines = text.split(heading + "\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_committed_matrix_is_up_to_date():
    assert COMMITTED.is_file(), f"{DEFAULT_PATH} is missing; run: {REGENERATE}"
    assert COMMITTED.read_text(encoding="utf-8") == TEXT, f"{DEFAULT_PATH} is stale; run: {REGENERATE}"


def test_check_flags_a_stale_file_and_out_writes_a_fresh_one(cli, tmp_path):
    target = tmp_path / "matrix.md"
    target.write_text(TEXT.replace(MANIFEST.kernels[0].name, "renamed"))
    code, _, err = cli("matrix", "--check", "--out", target)
    assert code == 1 and f"is stale; regenerate it with: {REGENERATE}" in err
    code, out, _ = cli("matrix", "--out", target)
    assert code == 0 and out.strip() == f"wrote {target}"
    code, out, _ = cli("matrix", "--check", "--out", target)
    assert code == 0 and "up to date" in out
    code, _, err = cli("matrix", "--check", "--out", tmp_path / "missing.md")
    assert code == 1 and "is missing" in err


def test_plain_matrix_prints_the_document(cli):
    code, out, _ = cli("matrix")
    assert code == 0 and out == TEXT


@pytest.mark.parametrize("op", [op for op in Op if MANIFEST.by_op[op]])
def test_each_op_table_has_a_row_per_kernel_in_selection_order(op):
    rows = table_rows(TEXT, f"### {op.value}")
    kernels = sorted(MANIFEST.by_op[op], key=lambda k: (-k.priority, k.name))
    assert [r[0] for r in rows] == [f"`{k.name}`" for k in kernels]
    header = TEXT.split(f"### {op.value}\n", 1)[1].splitlines()[1]
    columns = [c.strip() for c in header.strip("|").split(" | ")]
    for k, row in zip(kernels, rows):
        cell = dict(zip(columns, row))
        assert cell["arch"] == k.arch.describe()
        assert cell["q dtype"] == k.dtypes.q_dtype.describe() and cell["kv dtype"] == k.dtypes.kv_dtype.describe()
        assert cell["priority"].split()[0] == str(k.priority)
        for feature, column in (("sinks", "sinks"), ("sliding_window", "sliding window"),
                                ("logits_soft_cap", "soft cap"), ("return_lse", "LSE (DCP)")):
            assert cell[column] == (YES if getattr(k.features, feature) else NO), (k.name, feature)
        if k.shapes.page_size is not None:
            assert cell["page sizes"] == k.shapes.page_size.describe()
        if k.exclude:
            assert all(e.reason in TEXT for e in k.exclude)


def test_default_winner_table_is_what_the_solver_picks_for_the_stated_request():
    dtype = common_dtype(MANIFEST)
    assert f"q_dtype={dtype.value}" in TEXT.split("## What wins by default", 1)[1]
    winners = default_winners(MANIFEST)
    rows = table_rows(TEXT, "## What wins by default")
    assert [r[0] for r in rows] == [a.value for a in winners]
    ops = [op for op in Op if MANIFEST.by_op[op]]
    for row in rows:
        arch = Arch(row[0])
        for op, cell in zip(ops, row[1:]):
            name = winners[arch][op]
            assert cell == (f"`{name}`" if name else "— (none)")
    # every arch any kernel admits has a row
    assert set(winners) == {a for k in MANIFEST.kernels for a in k.arch.members()}


def test_most_common_dtype_is_counted_from_the_manifest():
    counts = {d: sum(d in k.dtypes.q_dtype.values for k in MANIFEST.kernels) for d in DType}
    assert counts[common_dtype(MANIFEST)] == max(counts.values())


def test_equals_constraints_render_as_written_in_their_columns():
    related = [k for k in MANIFEST.kernels if any(getattr(c, "equals", None) for _, c in k.constraints)]
    assert related, "the bundled manifest states a relation with an equals constraint"
    for k in related:
        row = next(r for r in table_rows(TEXT, f"### {k.op.value}") if r[0] == f"`{k.name}`")
        kv = k.dtypes.kv_dtype
        assert row[4] == kv.describe().replace("|", "\\|")
        vo = k.shapes.head_dim_vo
        if getattr(vo, "equals", None):
            assert f"head_dim_vo {vo.describe()}" in row[5]
        out = k.dtypes.out_dtype
        if getattr(out, "equals", None):
            assert f"out_dtype {out.describe()}" in row[-3]  # "other" (then priority, run by kernelsel)
