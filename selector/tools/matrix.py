"""``kernelsel matrix``: the manifest as a Markdown support matrix (docs/support-matrix.md).

One table per op with a row per kernel (the shape of vLLM's attention-backend
feature table), then "what wins by default": for each arch and op, the kernel
the solver picks for a plain request.  Every cell is rendered from the
manifest; nothing here knows which kernel supports what.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from registry.ops import FEATURE_FIELDS_BY_OP, SHAPE_FIELDS_BY_OP
from registry.priority import band_name, priority_rank_key
from registry.provenance import provenance
from registry.schema import Features, KernelSpec, Manifest, Shapes
from registry.vocab import Arch, DType, Op
from selector.platform import Platform
from selector.request import KernelRequest
from selector.solver import solve

DEFAULT_PATH = "docs/support-matrix.md"
REGENERATE = f"kernelsel matrix --out {DEFAULT_PATH}"

YES, NO, NA = "✅", "❌", "n/a"

_FEATURE_COLUMNS = (("sinks", "sinks"), ("sliding_window", "sliding window"),
                    ("logits_soft_cap", "soft cap"), ("return_lse", "LSE (DCP)"))
"""Features with a column of their own; the others are listed under "other"."""

_HEAD_DIM_FIELDS = ("head_dim_qk", "head_dim_vo", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")
_OWN_COLUMN = set(_HEAD_DIM_FIELDS) | {"page_size", "q_len"}


def _describe(constraint: Any) -> str:
    return "any" if constraint is None else constraint.describe()


def _head_dims(k: KernelSpec) -> str:
    fields = [f for f in _HEAD_DIM_FIELDS if f in SHAPE_FIELDS_BY_OP[k.op]]
    declared = {f: getattr(k.shapes, f) for f in fields}
    if "head_dim_qk" in declared and declared.get("head_dim_vo") == declared["head_dim_qk"]:
        return _describe(declared["head_dim_qk"])
    parts = [f"{f} {_describe(c)}" for f, c in declared.items() if c is not None]
    return "; ".join(parts) or "any"


def _max_q_len(k: KernelSpec) -> str:
    if "q_len" not in SHAPE_FIELDS_BY_OP[k.op]:
        return f"{NA} (ragged)"
    c = k.shapes.q_len
    if c is None:
        return "any"
    if getattr(c, "max", None) is not None and c.describe() == f"..{c.max}":
        return str(c.max)
    return c.describe()


def _other(k: KernelSpec) -> str:
    parts = [f"{f} {_describe(getattr(k.shapes, f))}" for f in Shapes.model_fields
             if f not in _OWN_COLUMN and getattr(k.shapes, f) is not None]
    if k.dtypes.out_dtype is not None:
        parts.append(f"out_dtype {k.dtypes.out_dtype.describe()}")
    own = {f for f, _ in _FEATURE_COLUMNS}
    parts += [f for f in Features.model_fields if f not in own and getattr(k.features, f)]
    if k.exclude:
        parts.append(f"{len(k.exclude)} exclusion{'s' if len(k.exclude) != 1 else ''} (below)")
    return "; ".join(parts) or "—"


def _feature(k: KernelSpec, name: str) -> str:
    if name not in FEATURE_FIELDS_BY_OP[k.op]:
        return NA
    return YES if getattr(k.features, name) else NO


def _verified(k: KernelSpec) -> str:
    """Where ``kernelsel verify`` ran the kernel (committed results), or that it never did."""
    runs = provenance(k).ran_on(None)
    if not runs:
        return "never (facts from sources)"
    where = dict.fromkeys(f"{r.gpu.removeprefix('NVIDIA ')} ({r.arch.value if r.arch else '?'})" for r in runs)
    return ", ".join(where)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _op_table(manifest: Manifest, op: Op) -> list[str]:
    kernels = sorted(manifest.by_op[op], key=priority_rank_key)
    if not kernels:
        return []
    header = ["kernel", "solution / backend", "arch", "q dtype", "kv dtype", "head dims", "page sizes",
              *(label for _, label in _FEATURE_COLUMNS), "max query tokens", "other", "priority", "run by kernelsel"]
    lines = [f"### {op.value}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for k in kernels:
        row = [
            f"`{k.name}`",
            f"{k.solution.value} / {k.backend.value}",
            k.arch.describe(),
            _describe(k.dtypes.q_dtype),
            _describe(k.dtypes.kv_dtype),
            _head_dims(k),
            _describe(k.shapes.page_size) if "page_size" in SHAPE_FIELDS_BY_OP[op] else NA,
            *(_feature(k, f) for f, _ in _FEATURE_COLUMNS),
            _max_q_len(k),
            _other(k),
            f"{k.priority} {band_name(k.priority)}",
            _verified(k),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    excluded = [k for k in kernels if k.exclude]
    if excluded:
        lines += ["", "Known-bad combinations (rejected even when every constraint above fits):", ""]
        for k in excluded:
            for e in k.exclude:
                lines.append(f"- `{k.name}`: {e.describe()} — {e.reason} ({e.ref})")
    return lines + [""]


def common_dtype(manifest: Manifest) -> DType:
    """The query dtype the most kernels declare (ties: vocabulary order)."""
    counts = Counter(d for k in manifest.kernels for d in getattr(k.dtypes.q_dtype, "values", ()))
    order = list(DType)
    return max(order, key=lambda d: (counts[d], -order.index(d)))


def default_winners(manifest: Manifest, dtype: Optional[DType] = None) -> dict[Arch, dict[Op, Optional[str]]]:
    """For every arch some kernel admits and every op: the kernel a plain request selects (None: none)."""
    dtype = dtype or common_dtype(manifest)
    archs = [a for a in Arch if any(k.arch.allows(a) for k in manifest.kernels)]
    out: dict[Arch, dict[Op, Optional[str]]] = {}
    for arch in archs:
        platform = Platform.hypothetical(arch)
        out[arch] = {}
        for op in Op:
            if not manifest.by_op[op]:
                continue
            sel = solve(manifest, platform, KernelRequest(op=op, arch=arch, q_dtype=dtype))
            out[arch][op] = sel.kernel.name if sel.kernel else None
    return out


def _winners_table(manifest: Manifest) -> list[str]:
    dtype = common_dtype(manifest)
    winners = default_winners(manifest, dtype)
    ops = [op for op in Op if manifest.by_op[op]]
    example = KernelRequest(op=ops[0], q_dtype=dtype).given()
    request = " ".join(f"{k}={v}" for k, v in example.items() if k != "op")
    lines = [
        "## What wins by default",
        "",
        f"The kernel selected for a plain request `op=OP arch=ARCH {request}`: the query dtype most kernels "
        "declare, `kv_dtype` and `out_dtype` defaulted from it, shape fields unset (not checked), no "
        "features, no solution restriction, on a hypothetical platform with every library installed.  "
        "Shapes, features or dtypes a kernel lacks change the answer: "
        "`kernelsel explain --op OP --arch ARCH ...` shows why for a real request.",
        "",
        "| arch | " + " | ".join(op.value for op in ops) + " |",
        "|" + " --- |" * (len(ops) + 1),
    ]
    for arch, row in winners.items():
        cells = [f"`{row[op]}`" if row[op] else "— (none)" for op in ops]
        lines.append(f"| {arch.value} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_matrix(manifest: Manifest) -> str:
    """The whole support-matrix document (Markdown)."""
    lines = [
        "# Attention kernel support matrix",
        "",
        f"<!-- Generated from the capability manifest by `{REGENERATE}`; do not edit by hand. -->",
        "",
        f"{len(manifest.kernels)} kernels, manifest schema {manifest.schema_version}.  "
        f"{YES} supported, {NO} not supported, {NA} means nothing for the op.  "
        "Ranges are inclusive (`1..` has no maximum, `(x16)` a step, `(2^n)` powers of two); "
        "`= FIELD` means equal to the request's FIELD (so limited to FIELD's values), `or` lists values allowed besides; "
        "rows are in selection order (priority, then name).  "
        "Reference kernels are never chosen automatically.  \"run by kernelsel\" names the GPUs whose committed "
        "`kernelsel verify` results (bench/results/verify-*.json) ran the kernel; \"never\" means its facts were "
        "read from the library's source and the pull requests it cites, not executed here.",
        "",
        "## Kernels per op",
        "",
    ]
    for op in Op:
        lines += _op_table(manifest, op)
    lines += _winners_table(manifest)
    return "\n".join(lines)
