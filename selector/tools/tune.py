"""``kernelsel tune --model CONFIG.json``: pre-tune every bucket a deployment will hit, before it serves.

From a Hugging Face ``config.json`` (``selector.tools.model_config``) and the
batch sizes, context lengths and new-token counts given, it lists the requests
each attention layer kind makes -- ``mha_decode`` and ``mha_extend`` for MHA
models, ``mla_decode`` for MLA ones -- and, for each bucket that neither the
committed perf table nor the tuned table of this machine has measured, times
its eligible kernels exactly as tuning on first use does (``selector.tuning``)
and adds them to the tuned table.  Later processes (``KERNELSEL_TUNE`` or not)
rank by those times.  The summary says, per request, which kernel was selected
before and after, and how: measured, predicted or by priority.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from registry.errors import RequestError
from registry.perf import PerfTable, overlay
from selector.request import KernelRequest
from selector.tools.model_config import ModelAttention
from selector.tuning import TuneBudget, TuneCache, TuneResult, TuningError, eligible_to_tune, tune

DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_KV_LENS = (1024, 4096, 16384)
DEFAULT_NEW_LENS = (64, 512, 2048)


@dataclass
class TunedRequest:
    """One request of the plan: what was selected before and after, how, and what tuning found."""

    kind: str
    request: KernelRequest
    before: str = ""
    before_how: str = ""
    after: str = ""
    after_how: str = ""
    result: Optional[TuneResult] = None
    skipped: str = ""  # why it was not tuned (already measured, cannot be tuned here)

    @property
    def changed(self) -> bool:
        return bool(self.before and self.after and self.before != self.after)

    def to_dict(self) -> dict[str, Any]:
        return {"layer_kind": self.kind, "request": self.request.given(), "before": self.before,
                "before_ranked_by": self.before_how, "after": self.after, "after_ranked_by": self.after_how,
                "changed": self.changed, "skipped": self.skipped or None,
                "tuning": self.result.to_dict() if self.result else None}


@dataclass
class TuneReport:
    model: str
    cache: str
    rows: list[TunedRequest] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        tuned = [r for r in self.rows if r.result is not None]
        return {"model": self.model, "cache": self.cache, "requests": len(self.rows), "tuned": len(tuned),
                "changed": sum(r.changed for r in self.rows), "seconds": round(self.seconds, 3),
                "rows": [r.to_dict() for r in self.rows]}


def plan_requests(model: ModelAttention, arch: Any, *, q_dtype: str, kv_dtype: Optional[str], page_size: Optional[int],
                  batches: Sequence[int], kv_lens: Sequence[int], new_lens: Sequence[int],
                  ops: Sequence[str]) -> list[tuple[str, KernelRequest]]:
    """Every (layer kind, request) to tune: each op of each layer kind over the sizes; one per bucket."""
    seen: set[KernelRequest] = set()
    out = []
    for kind in model.kinds:
        kind_ops = ["mla_decode"] if kind.mla else [o for o in ("mha_decode", "mha_extend") if o in ops]
        pages = page_size or (64 if kind.mla else 16)
        for op in kind_ops:
            extend = op == "mha_extend"
            for batch, kv_len, new in itertools.product(batches, kv_lens, new_lens if extend else [None]):
                if new is not None and new > kv_len:
                    continue
                request = KernelRequest(op=op, arch=arch, q_dtype=q_dtype, kv_dtype=kv_dtype, page_size=pages,
                                        batch_size=batch, kv_len=kv_len, **({"new_len": new} if extend else {}),
                                        **kind.fields)
                if request not in seen:
                    seen.add(request)
                    out.append((kind.name, request))
    return out


def _how(selection: Any) -> str:
    return selection.estimates.kind or "priority"


def run_tune(
    plan: Sequence[tuple[str, KernelRequest]],
    make_selector: Callable[[Optional[PerfTable]], Any],
    base: Optional[PerfTable],
    cache: TuneCache,
    *,
    device: str,
    budget: TuneBudget,
    method: str,
    progress: Optional[Callable[[int, TunedRequest], None]] = None,
    dry_run: bool = False,
) -> TuneReport:
    """Tune each planned request whose bucket no table measured; persist after each; the report."""
    started = time.perf_counter()
    report = TuneReport("", str(cache.path))
    table = overlay(base, cache.load())
    for i, (kind, request) in enumerate(plan, 1):
        row = TunedRequest(kind, request)
        selector = make_selector(table)
        before = selector.solve(request)
        row.before, row.before_how = (before.kernel.name if before.kernel else ""), _how(before)
        names = eligible_to_tune(before)
        if not names:
            row.skipped = "no eligible kernel"
        elif set(names) <= before.measured.keys():
            row.skipped = "already measured"
        elif dry_run:
            row.skipped = "dry run"
        else:
            try:
                row.result = tune(request, names, lambda name: selector.select(request.forcing(name)).make_adapter(),
                                  device=device, budget=budget)
            except (TuningError, RequestError) as exc:
                row.skipped = str(exc)
            if row.result is not None and row.result.times:
                table = overlay(base, cache.add([row.result], method))
        after = make_selector(table).solve(request)
        row.after, row.after_how = (after.kernel.name if after.kernel else ""), _how(after)
        report.rows.append(row)
        if progress is not None:
            progress(i, row)
    report.seconds = time.perf_counter() - started
    return report


def summary_lines(report: TuneReport) -> list[str]:
    """What changed, for people: counts, then each request whose selection changed."""
    tuned = [r for r in report.rows if r.result is not None]
    lines = [f"tuned {len(tuned)} of {len(report.rows)} requests in {report.seconds:.1f} s "
             f"({sum(r.changed for r in report.rows)} selections changed); tuned table: {report.cache}"]
    skipped: dict[str, int] = {}
    for r in report.rows:
        if r.skipped:
            skipped[r.skipped] = skipped.get(r.skipped, 0) + 1
    lines += [f"  not tuned ({n}): {why}" for why, n in sorted(skipped.items())]
    for r in report.rows:
        if r.changed:
            t = r.result.times if r.result else {}
            lines.append(f"  {r.kind}: {r.request.describe()}\n      {r.before} ({r.before_how}) -> {r.after} "
                         f"({r.after_how}{f', {t[r.after]:.1f} us' if r.after in t else ''})")
    return lines
