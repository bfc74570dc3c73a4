"""Held-out error of perf-table predictions: leave one bucket out, predict it from the rest, score the pick.

For every bucket of a perf table (and of a regret run's measurements) this
removes the bucket, fits ``selector.prediction`` to the others, predicts each
of the bucket's kernels, and compares with what was measured there:

* **regret** -- the figure of merit: the measured time of the kernel the
  predictions rank first over the fastest measured kernel (1.0 = picked the
  fastest), as a geometric mean, the worst case and how often it picked the
  fastest; priority alone on the same buckets for comparison;
* **time error** -- |log(predicted / measured)| per kernel, as the mean and the
  90th percentile (0.08 = 8%).

Three data sets: ``table`` (leave-one-out within the perf table), ``regret_run``
(within the times of a regret report, ``--regret``: every eligible kernel
measured in one run), and ``table_to_run`` (fit to the table minus the bucket,
score against the regret run's times of that bucket, for the table's buckets the run measured: the table and the
measurements from different device sessions, as in real use).  ``--ablations``
repeats all of it for simpler designs (the cost model without the local
correction, each kernel's correction around its own cost model, interpolation
between measured buckets alone) to show what each part is worth.

CPU only; prints JSON (``--out FILE`` writes it too)::

    python bench/predict_loo.py --ablations --out bench/results/predict-loo-h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registry.loader import load_manifest, load_perf_table  # noqa: E402
from registry.perf import PERF_KEY, PerfEntry, PerfTable  # noqa: E402
from selector import prediction  # noqa: E402
from selector.platform import Platform  # noqa: E402
from selector.request import KernelRequest  # noqa: E402
from selector.tools import bench  # noqa: E402

TABLE = ROOT / "perf" / "nvidia-h200-sm_90.yaml"
REGRET = ROOT / "bench" / "results" / "regret-nvidia-h200.json"
DESIGNS: dict[str, dict[str, Any]] = {
    "cost models, shared scale, local correction (runtime)": {},
    "cost model per kernel + its own local correction": {"shared_scale": False},
    "cost model per kernel only": {"prior": math.inf, "shared_scale": False},
    "interpolation between measured buckets only": {"terms": ("launch",), "shared_scale": False},
    "runtime design, cost model of launch + bytes + flops": {"terms": ("launch", "bytes", "flops")},
}


def _request(entry: PerfEntry, arch: Any) -> KernelRequest:
    return KernelRequest(op=entry.op, arch=arch, **entry.shape)


def _priority_pick(manifest: Any, platform: Platform, request: KernelRequest, kernels: Sequence[str]) -> str:
    from selector.api import Selector

    eligible = [k.name for k in Selector(manifest, platform).solve(request).eligible if k.name in kernels]
    return eligible[0] if eligible else min(kernels)


def leave_one_out(train: PerfTable, truth: Sequence[Optional[dict[str, float]]], manifest: Any,
                  design: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Score predictions of each bucket of ``train`` (fitted without it) against ``truth[i]`` (kernel -> us;
    ``None``: a bucket that only trains, not scored)."""
    platform = Platform.hypothetical(train.arch.value)
    rows = []
    for i, entry in enumerate(train.entries):
        if truth[i] is None:
            continue
        rest = PerfTable(gpu=train.gpu, arch=train.arch, entries=train.entries[:i] + train.entries[i + 1:])
        model = prediction.PerfModel(rest, **(design or {}))
        request = _request(entry, train.arch)
        measured = truth[i]
        predicted, missing = model.predict(request, sorted(measured))
        best = min(measured.values())
        row = {"op": entry.op.value, "bucket": {k: v for k, v in entry.shape.items() if k in PERF_KEY},
               "measured_us": {k: round(v, 3) for k, v in measured.items()},
               "predicted_us": {k: round(p.us, 3) for k, p in predicted.items()}, "no_prediction": missing}
        if predicted:
            pick = min(predicted, key=lambda k: (predicted[k].us, k))
            row["picked"], row["regret"] = pick, measured[pick] / best
            row["log_errors"] = [abs(math.log(p.us / measured[k])) for k, p in predicted.items()]
        prio = _priority_pick(manifest, platform, request, list(measured))
        row["priority_pick"], row["priority_regret"] = prio, measured[prio] / best
        rows.append(row)
    return {"summary": summarize(rows), "buckets": rows}


def _stats(regrets: list[float], errors: list[float]) -> dict[str, Any]:
    if not regrets:
        return {"buckets": 0}
    errors = sorted(errors)
    p90 = errors[min(len(errors) - 1, int(math.ceil(0.9 * len(errors))) - 1)] if errors else None
    return {"buckets": len(regrets),
            "regret_geomean": round(math.exp(sum(map(math.log, regrets)) / len(regrets)), 4),
            "regret_worst": round(max(regrets), 4), "picked_fastest": sum(r <= 1.0 for r in regrets),
            "time_error_mean": round(math.exp(sum(errors) / len(errors)) - 1, 4) if errors else None,
            "time_error_p90": round(math.exp(p90) - 1, 4) if p90 is not None else None}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per op and overall: prediction regret and time error, and priority's regret on the same buckets."""
    out = {}
    for op in sorted({r["op"] for r in rows}) + ["all"]:
        mine = [r for r in rows if op in ("all", r["op"])]
        scored = [r for r in mine if "regret" in r]
        s = _stats([r["regret"] for r in scored], [e for r in scored for e in r["log_errors"]])
        s["unpredicted"] = len(mine) - len(scored)
        prio = [r["priority_regret"] for r in mine]
        s["priority_regret_geomean"] = round(math.exp(sum(map(math.log, prio)) / len(prio)), 4)
        s["priority_regret_worst"] = round(max(prio), 4)
        out[op] = s
    return out


def regret_run_table(path: Path, suite: Path, arch: Any) -> tuple[PerfTable, list[dict[str, float]]]:
    """A regret report's measurements as a perf table (one entry per case), with each case's times."""
    data = json.loads(path.read_text())
    cases = {name: c for c in bench.load_suite(suite, arch) for name in (c.name, c.label)}
    entries, truth = [], []
    for row in data["cases"]:
        times = {k["kernel"]: k["median_us"] for k in row["kernels"] if k.get("median_us")}
        if "fields" in row:  # the request itself (reports since requests carry their fields)
            r = KernelRequest(**row["fields"])
        elif row["request"] in cases:  # older reports: the label of a case of the suite they ran
            r = cases[row["request"]].request
        else:
            continue
        if not times:
            continue
        shape = {f: getattr(getattr(r, f), "value", getattr(r, f)) for f in PERF_KEY if getattr(r, f) is not None}
        entries.append(PerfEntry(op=r.op, shape=shape, median_us=times))
        truth.append(times)
    return PerfTable(gpu=data["meta"]["gpu"], arch=data["meta"]["arch"], entries=tuple(entries)), truth


def run(table_path: Path, regret_path: Optional[Path], suite: Path, ablations: bool) -> dict[str, Any]:
    manifest = load_manifest()
    table = load_perf_table(table_path)
    sets: dict[str, Callable[[dict], dict[str, Any]]] = {
        "table": lambda d: leave_one_out(table, [e.median_us for e in table.entries], manifest, d),
    }
    if regret_path is not None and regret_path.exists():
        run_table, run_truth = regret_run_table(regret_path, suite, table.arch)
        by_key = {e.key: t for e, t in zip(run_table.entries, run_truth)}
        sets["regret_run"] = lambda d: leave_one_out(run_table, run_truth, manifest, d)
        if any(e.key in by_key for e in table.entries):  # the run's buckets, each predicted from the rest of the table
            sets["table_to_run"] = lambda d: leave_one_out(table, [by_key.get(e.key) for e in table.entries], manifest, d)
    designs = DESIGNS if ablations else {k: v for k, v in list(DESIGNS.items())[:1]}
    result: dict[str, Any] = {
        "meta": {"table": str(table_path.relative_to(ROOT) if table_path.is_relative_to(ROOT) else table_path),
                 "regret_run": str(regret_path.relative_to(ROOT)) if regret_path and regret_path.is_relative_to(ROOT) else
                 (str(regret_path) if regret_path else None),
                 "model": {"terms": list(prediction.TERMS), "bandwidth_log2": prediction.BANDWIDTH,
                           "prior": prediction.PRIOR, "min_buckets": prediction.MIN_BUCKETS},
                 "regret": "measured time of the kernel predicted fastest / fastest measured kernel, per bucket",
                 "time_error": "exp(mean |log(predicted / measured)|) - 1 over every predicted kernel"},
        "designs": {},
    }
    for i, (name, design) in enumerate(designs.items()):
        scored = {k: f(design) for k, f in sets.items()}
        # every bucket's predictions for the runtime design; summaries for the others
        result["designs"][name] = scored if i == 0 else {k: {"summary": v["summary"]} for k, v in scored.items()}
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=str(TABLE), help="perf table (default: the committed H200 table)")
    p.add_argument("--regret", default=str(REGRET), help="regret report JSON with every kernel's time per case")
    p.add_argument("--suite", default=str(ROOT / "bench" / "regret_suite.yaml"), help="the suite that report ran")
    p.add_argument("--ablations", action="store_true", help="also score simpler designs")
    p.add_argument("--buckets", action="store_true", help="print every bucket's predictions, not only summaries")
    p.add_argument("--out", help="write the full JSON (every bucket of the runtime design) here")
    args = p.parse_args(argv)
    result = run(Path(args.table).resolve(), Path(args.regret).resolve() if args.regret else None,
                 Path(args.suite), args.ablations)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    shown = result if args.buckets else {
        "meta": result["meta"],
        "designs": {n: {k: v["summary"] for k, v in sets.items()} for n, sets in result["designs"].items()},
    }
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
