"""What kernelsel's continuous-batching decode path costs besides its kernel, measured on any machine (CPU is fine).

A tiny random Llama through ``generate_batch`` with kernelsel's torch reference kernels, twice: decode steps
in place (the physical pages and a per-step block table) and, for comparison, with the in-place path turned
off (transformers' ``cache.update`` gathers every key of every request, the kernel reads one-token pages).
Per decode call of an attention layer it reports, split into the step's layout and block table (built once
per step), transformers' cache update, the adapter's ``plan()`` (once per step), the kernel (``run()``) and
the rest (kernelsel's own Python per layer: selection lookup, reshapes, output):

* the aten ops dispatched (each one kernel launch on a GPU) and the bytes they copy (gathers, index_copy,
  cat, contiguous);
* host wall time per call and per step.

    python bench/transformers_host_overhead.py [--requests 64] [--prompt-len 96] [--new-tokens 16]

Prints JSON.  Needs transformers 5.17-5.18 (the protocol in which the attention function updates the cache);
the kernel's own time on a CPU is meaningless and is reported only to be subtracted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Optional

COPYING_OPS = ("index_select", "index", "index_copy", "index_put", "cat", "clone", "copy_", "_to_copy",
               "masked_scatter", "gather")


def _args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--page-size", type=int, default=16)
    return p.parse_args(argv)


class Spans:
    """aten ops, copied bytes and host time per span of decode calls: ``step`` (the step's layout and block table,
    once per step), ``update`` (transformers' cache write / gather), ``plan``, ``run``, ``ours`` (the rest)."""

    def __init__(self) -> None:
        self.ops: dict[str, Counter] = {}
        self.bytes: Counter = Counter()
        self.seconds: Counter = Counter()
        self.stack: list[str] = []

    def open(self, name: str) -> None:
        self.stack.append(name)

    def close(self) -> None:
        self.stack.pop()

    def record(self, func: Any, out: Any) -> None:
        if not self.stack:
            return
        import torch

        span = self.stack[-1]
        name = func.__name__.split(".")[0]
        self.ops.setdefault(span, Counter())[name] += 1
        if name in COPYING_OPS:
            for t in (out if isinstance(out, (list, tuple)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.bytes[span] += t.numel() * t.element_size() if name not in ("index_copy", "index_put") else 0


def measure(in_place: bool, args: argparse.Namespace, count_ops: bool) -> dict[str, Any]:
    """One ``generate_batch``: aten ops and copied bytes per span (``count_ops``; the dispatch mode that counts
    them slows every op, so times come from a run without it), or host time per span."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import selector.integrations.transformers as ks
    from selector.integrations.transformers import paged, paged_cache
    from selector.tools import model_conformance as mc

    spans = Spans()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            out = func(*args_, **(kwargs or {}))
            spans.record(func, out)
            if func.__name__.split(".")[0] in ("index_copy", "index_copy_") and spans.stack:
                src = args_[3] if len(args_) > 3 else None
                if isinstance(src, torch.Tensor):
                    spans.bytes[spans.stack[-1]] += src.numel() * src.element_size()
            return out

    def timed(span: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            if not spans.stack:
                return fn(*a, **k)
            t0 = time.perf_counter()
            spans.open(span)
            try:
                return fn(*a, **k)
            finally:
                spans.close()
                spans.seconds[span] += time.perf_counter() - t0
        return wrapper

    backend = ks.register("kernelsel-overhead", solution="reference")
    model = mc.build_model(mc.tiny_config("llama"))
    name = mc.continuous_batching_name("kernelsel-overhead")
    from transformers import AttentionInterface
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    original_fn = AttentionInterface._global_mapping[name]
    original_update = PagedAttentionCache.update
    original_pages = paged_cache.layer_pages
    calls = {"decode": 0, "steps": 0}

    def attention(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        cu_q = kwargs["cu_seq_lens_q"]
        decode = int(cu_q.shape[0]) - 1 == query.shape[2]  # one query token per request
        if not decode:
            return original_fn(module, query, key, value, mask, **kwargs)
        calls["decode"] += 1
        calls["steps"] += module.layer_idx == 0  # a step's first layer
        t0 = time.perf_counter()
        spans.open("ours")
        try:
            if count_ops:
                with Count():
                    return original_fn(module, query, key, value, mask, **kwargs)
            return original_fn(module, query, key, value, mask, **kwargs)
        finally:
            spans.close()
            spans.seconds["total"] += time.perf_counter() - t0

    selection_adapters: list = []
    real_decode = backend.kernels.decode

    def decode_selection(*a: Any, **k: Any) -> Any:
        sel = real_decode(*a, **k)
        adapter = sel.adapter
        if adapter not in selection_adapters:
            selection_adapters.append(adapter)
            adapter.plan = timed("plan", adapter.plan)
            adapter.run = timed("run", adapter.run)
        return sel

    backend.kernels.decode = decode_selection
    AttentionInterface._global_mapping[name] = attention
    PagedAttentionCache.update = timed("update", original_update)
    original_batch, original_table = paged.PackedBatch.__init__, paged.PackedBatch.in_place
    paged.PackedBatch.__init__ = timed("step", original_batch)
    paged.PackedBatch.in_place = timed("step", original_table)
    if not in_place:
        paged_cache.layer_pages = lambda cache, layer_idx: None
    try:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, mc.VOCAB, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
        seqs = mc.generate_batch(model, "kernelsel-overhead", prompts, args.new_tokens, page_size=args.page_size,
                                 max_batch_tokens=args.requests * args.prompt_len)
    finally:
        AttentionInterface._global_mapping[name] = original_fn
        PagedAttentionCache.update = original_update
        paged_cache.layer_pages = original_pages
        paged.PackedBatch.__init__, paged.PackedBatch.in_place = original_batch, original_table
        ks.unregister("kernelsel-overhead")
    n, steps = calls["decode"], calls["steps"]
    assert all(seqs) and n, "no decode call ran"
    if count_ops:
        per_call = lambda span: {op: round(c / n, 2) for op, c in sorted(spans.ops.get(span, Counter()).items())}  # noqa: E731
        return {"decode_calls": n, "decode_steps": steps,
                "aten_ops_per_call": {span: per_call(span) for span in ("ours", "step", "update", "plan", "run")},
                "copied_bytes_per_call": {span: int(spans.bytes[span] / n) for span in ("ours", "step", "update", "run")}}
    own = spans.seconds["total"] - sum(spans.seconds[s] for s in ("update", "plan", "run", "step"))
    return {"decode_calls": n, "decode_steps": steps,
            "host_us": {"kernelsel_per_call": round(1e6 * own / n, 1),
                        "kernelsel_per_step": round(1e6 * spans.seconds["step"] / max(1, steps), 1),
                        "adapter_plan_per_step": round(1e6 * spans.seconds["plan"] / max(1, steps), 1),
                        "cache_update_per_call": round(1e6 * spans.seconds["update"] / n, 1),
                        "kernel_run_per_call_cpu": round(1e6 * spans.seconds["run"] / n, 1)}}


def main(argv: Optional[list[str]] = None) -> int:
    args = _args(argv)
    import transformers

    from selector.tools import model_conformance as mc

    if mc.refuses_custom_continuous_batching():
        print(json.dumps({"error": f"transformers {transformers.__version__} updates the cache before the attention "
                                   f"function (>= 5.19): nothing for kernelsel to measure here; use 5.17-5.18"}))
        return 2
    report = {"transformers": transformers.__version__, "requests": args.requests, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "page_size": args.page_size,
              "model": "tiny Llama (4/2 heads, head_dim 64, 2 layers), float32, torch reference kernels",
              "in_place": {**measure(True, args, True), **measure(True, args, False)},
              "gather": {**measure(False, args, True), **measure(False, args, False)}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
