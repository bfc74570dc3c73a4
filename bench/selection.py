"""Selection cost: cached hit, uncached solve (bundled and 1000-kernel manifests), load+validate.

Prints JSON.  Targets (ratios within this one run, never asserted in tests):
cached hit <= 5x a plain dict lookup with an equivalent key; uncached solve on
the bundled manifest <= 200 us; the 1000-kernel solve grows linearly.

    python bench/selection.py [--repeat N] [--out bench/results/selection-<host>.json]
"""

from __future__ import annotations

import argparse
import json
import platform as host
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.loader import bundled_manifest_path, load_manifest  # noqa: E402
from selector import KernelRequest, Platform, select_kernel  # noqa: E402
from selector.solver import solve  # noqa: E402

REQUEST = dict(op="mla_decode", arch="sm_120", q_dtype="bf16", kv_dtype="fp8_e4m3", num_qo_heads=128,
               kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, page_size=64)


def median_ns(fn, *, number: int, repeat: int) -> float:
    """Median over ``repeat`` rounds of the mean time per call of ``number`` calls, in ns."""
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter_ns() - t0) / number)
    return statistics.median(rounds)


def synthetic_manifest(n: int, directory: Path) -> Path:
    """An overlay adding ``n`` MLA kernels with varied constraints on top of the bundled manifest."""
    lines = ["base: " + str(bundled_manifest_path()), "kernels:"]
    for i in range(n):
        lines.append(
            f"  - {{name: synth-{i:04d}, op: mla_decode, solution: triton, backend: triton,"
            f" adapter: 'registry.adapters.triton:TritonMLADecode', arch: {{min: sm_80, max: sm_{[90, 100, 120][i % 3]}}},"
            f" dtypes: {{q_dtype: [bf16], kv_dtype: [bf16, fp8_e4m3]}},"
            f" shapes: {{kv_lora_rank: [512], page_size: {{min: {1 + i % 64}}}, q_len: {{max: {1 + i % 8}}}}},"
            f" features: {{return_lse: {str(i % 2 == 0).lower()}}}, priority: {4 + i % 8}, refs: [synthetic]}}"
        )
    path = directory / f"synthetic-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    manifest = load_manifest()
    request = KernelRequest(**REQUEST)
    platform = Platform.hypothetical(request.arch)
    select_kernel(request)  # warm the default selector's cache
    key = tuple(request.__dict__.values())
    table = {key: object()}

    results = {
        "python": sys.version.split()[0],
        "host": host.node(),
        "kernels_bundled": len(manifest.kernels),
        "dict_lookup_ns": median_ns(lambda: table[tuple(request.__dict__.values())], number=20000, repeat=args.repeat),
        "dict_lookup_prebuilt_key_ns": median_ns(lambda: table[key], number=200000, repeat=args.repeat),
        "cached_select_ns": median_ns(lambda: select_kernel(request), number=200000, repeat=args.repeat),
        "uncached_solve_bundled_ns": median_ns(lambda: solve(manifest, platform, request), number=500, repeat=args.repeat),
        "load_validate_bundled_ns": median_ns(lambda: load_manifest(), number=5, repeat=args.repeat),
    }
    with tempfile.TemporaryDirectory() as tmp:
        scaling = {}
        for n in (250, 500, 1000):
            m = load_manifest(synthetic_manifest(n, Path(tmp)))
            scaling[str(len(m.by_op[request.op]))] = median_ns(lambda: solve(m, platform, request), number=20, repeat=args.repeat)
        results["uncached_solve_mla_kernels_ns"] = scaling
    per_kernel = [t / int(n) for n, t in scaling.items()]
    results["ratios"] = {
        "cached_select_over_dict_lookup": results["cached_select_ns"] / results["dict_lookup_ns"],
        "cached_select_over_prebuilt_key_lookup": results["cached_select_ns"] / results["dict_lookup_prebuilt_key_ns"],
        "uncached_solve_bundled_us": results["uncached_solve_bundled_ns"] / 1000,
        "ns_per_kernel_at_250_500_1000": per_kernel,
        "linearity_1000_over_250_per_kernel": per_kernel[-1] / per_kernel[0],
    }
    results["targets"] = {
        "cached_select_over_dict_lookup<=5": results["ratios"]["cached_select_over_dict_lookup"] <= 5,
        "uncached_solve_bundled_us<=200": results["ratios"]["uncached_solve_bundled_us"] <= 200,
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
