"""Decode throughput of transformers' continuous batching with kernelsel's attention vs transformers' own (GPU).

One random model with Llama-3-8B's attention shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP
14336) and a few layers, bf16, built on the GPU from a config in code (nothing is downloaded); the same weights
and the same prompts through ``generate_batch`` once per attention implementation: kernelsel
(``paged|kernelsel``), transformers' ``paged|sdpa``, and flash attention where it imports
(``paged|flash_attention_3`` / ``_2``).  Decode-heavy by default: 64 requests, 512-token prompts, 512 new
tokens each, transformers' default block size 256 (kernelsel selects for that page size).

Per implementation, after a warm-up ``generate_batch`` (JIT builds, first plans, allocator):

* **decode throughput**: a forward pre-hook stamps every step of the timed run with the host clock and
  whether it is a decode step (every scheduled request has one new token: ``max_seqlen_q`` /
  ``max_length_q == 1``); decode tokens/s = tokens of the decode steps / the time from the first decode
  step's start to the last one's (each step's interval covers its forward, sampling and transformers'
  scheduling of the next step: the whole loop, not just the model).  The whole call's tokens/s (prefill
  included) is reported too;
* **where the time goes**: a second, instrumented run with CUDA events around every attention call (the
  attention function as transformers calls it, the cache update included); the decode steps' attention time
  against their wall time (the rest: the model's other layers, sampling, transformers' host loop).

``--impls kernelsel_gather`` adds kernelsel with its in-place decode turned off (every layer reads the keys
transformers' ``cache.update`` gathers): what reading the cache in place is worth.  Greedy outputs are compared
between implementations (first token that differs: bf16 kernels differ in
rounding, and random weights make near-ties common; correctness is ``kernelsel verify-model``'s job).
kernelsel's selected kernel per layer comes from the backend's call counts.

    python bench/transformers_decode.py [--quick] [--out bench/results/transformers_decode-h200.json]

Prints JSON.  Needs a CUDA GPU and a transformers release whose continuous batching calls registered
``paged|`` functions (5.17-5.18); on later releases kernelsel's run is reported as refused by transformers.
About 2-3 minutes on an H200 (``--quick``: about 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional


def _args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="requests")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--page-size", type=int, default=256, help="transformers' paged-cache block size")
    p.add_argument("--impls", default="kernelsel,sdpa,flash",
                   help="comma-separated: kernelsel, sdpa, flash, kernelsel_gather (kernelsel reading transformers' gather)")
    p.add_argument("--quick", action="store_true", help="2 layers, 32 requests, 128 new tokens (about a minute)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.new_tokens = 2, 32, 128
    return args


class StepClock:
    """Host time and kind of every forward of ``generate_batch`` (a forward pre-hook on the model)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, bool, int]] = []  # (start, decode step, requests)
        self.decoding = False

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        longest = kwargs.get("max_seqlen_q", kwargs.get("max_length_q"))
        cu_q = kwargs.get("cu_seq_lens_q")
        requests = int(cu_q.shape[0]) - 1 if cu_q is not None else 0
        self.decoding = longest == 1
        self.steps.append((time.perf_counter(), self.decoding, requests))

    def decode_phase(self) -> dict[str, Any]:
        """Tokens and seconds of the decode steps, each step timed to the next step's start (the last one, whose
        end is not stamped, is left out)."""
        tokens, seconds, steps, other_steps, other_seconds = 0, 0.0, 0, 0, 0.0
        for (start, decode, requests), (nxt, _, _) in zip(self.steps, self.steps[1:]):
            if decode:
                tokens, seconds, steps = tokens + requests, seconds + (nxt - start), steps + 1
            else:
                other_steps, other_seconds = other_steps + 1, other_seconds + (nxt - start)
        return {"steps": steps, "tokens": tokens, "seconds": round(seconds, 4),
                "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                "step_ms": round(1000 * seconds / steps, 3) if steps else None,
                "prompt_steps": other_steps, "prompt_steps_seconds": round(other_seconds, 4)}


class AttentionTimer:
    """CUDA events around every call of the wrapped attention function, tagged decode or not; read at the end."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.events: list[tuple[bool, Any, Any]] = []

    def wrap(self, fn: Callable) -> Callable:
        import torch

        def timed(*args: Any, **kwargs: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.events.append((self.clock.decoding, start, end))
            return out

        timed.__name__ = getattr(fn, "__name__", "attention")
        return timed

    def seconds(self, decode: bool) -> float:
        import torch

        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for d, s, e in self.events if d == decode) / 1000.0


def _flash_name() -> Optional[str]:
    from transformers.utils import is_flash_attn_2_available

    try:
        from transformers.utils import is_flash_attn_3_available

        if is_flash_attn_3_available():
            return "flash_attention_3"
    except ImportError:
        pass
    return "flash_attention_2" if is_flash_attn_2_available() else None


def _cb_config(args: argparse.Namespace, batch: int, new_tokens: int) -> Any:
    from transformers import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    size = {"page_size": args.page_size} if "page_size" in fields else {"block_size": args.page_size}
    blocks = batch * (-(-(args.prompt_len + new_tokens) // args.page_size) + 1) + 8
    return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=max(2048, batch), **size)


def _run(model: Any, name: str, prompts: list[list[int]], args: argparse.Namespace, new_tokens: int) -> tuple[float, list]:
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.set_attn_implementation(name)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate_batch(prompts, generation_config=gen,
                                   continuous_batching_config=_cb_config(args, len(prompts), new_tokens))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    seqs = [list(out[k].generated_tokens or []) for k in sorted(out, key=lambda r: int(str(r).rsplit("_", 1)[-1]))]
    return wall, seqs


def _measure(model: Any, name: str, prompts: list, args: argparse.Namespace, backend: Any) -> tuple[dict, list]:
    """Warm-up, the timed run, the instrumented run: one implementation's entry and its greedy outputs."""
    from transformers import AttentionInterface

    _run(model, name, prompts[: min(4, len(prompts))], args, 8)  # warm-up: JIT builds, first plans
    clock = StepClock()
    handle = model.register_forward_pre_hook(clock.hook, with_kwargs=True)
    try:
        backend.reset_counts()
        wall, seqs = _run(model, name, prompts, args, args.new_tokens)
        kernels, by_layer, in_place = backend.kernels_used(), backend.kernels_by_layer(), backend.in_place_decodes()
        decode = clock.decode_phase()
        clock.steps.clear()
        timer = AttentionTimer(clock)
        original = AttentionInterface._global_mapping.get(name)
        if original is not None:
            AttentionInterface._global_mapping[name] = timer.wrap(original)
        try:
            _run(model, name, prompts, args, args.new_tokens)
        finally:
            if original is not None:
                AttentionInterface._global_mapping[name] = original
        profiled = clock.decode_phase()
    finally:
        handle.remove()
    generated = sum(len(s) for s in seqs)
    attention = timer.seconds(decode=True)
    entry = {
        "name": name,
        "decode": decode,
        "whole_call": {"seconds": round(wall, 3), "generated_tokens": generated,
                       "tokens_per_s": round(generated / wall, 1) if wall else None},
        "decode_time_split": {
            "wall_s": profiled["seconds"], "attention_s": round(attention, 4),
            "attention_fraction": round(attention / profiled["seconds"], 3) if profiled["seconds"] else None,
            "attention_ms_per_step": round(1000 * attention / profiled["steps"], 3) if profiled["steps"] else None,
            "note": "instrumented run: CUDA events around every attention call of the decode steps",
        },
        "empty_outputs": sum(1 for s in seqs if not s),
    }
    if name.endswith("kernelsel"):  # (kernelsel_gather too: same backend)
        entry["kernels"] = kernels
        entry["kernels_by_layer"] = by_layer
        entry["in_place_decode_calls_by_page_size"] = in_place
    return entry, seqs


@contextmanager
def _gathering(on: bool) -> Iterator[None]:
    """kernelsel with its in-place decode turned off: every layer reads the keys ``cache.update`` gathers (the
    ``kernelsel_gather`` implementation: what reading the cache in place is worth)."""
    if not on:
        yield
        return
    from selector.integrations.transformers import paged_cache

    original = paged_cache.layer_pages
    paged_cache.layer_pages = lambda cache, layer_idx: None
    try:
        yield
    finally:
        paged_cache.layer_pages = original


def main(argv: Optional[list[str]] = None) -> int:
    args = _args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA GPU"}))
        return 2
    import transformers
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    import selector.integrations.transformers as ks

    backend = ks.register()
    paged = "paged|sdpa" in AttentionInterface._global_mapping  # transformers 5.17-5.18
    names = {"kernelsel": "paged|kernelsel" if paged else "kernelsel", "sdpa": "paged|sdpa" if paged else "sdpa"}
    names["kernelsel_gather"] = names["kernelsel"]
    flash = _flash_name()
    if flash:
        names["flash"] = f"paged|{flash}" if paged else flash
    wanted = [w.strip() for w in args.impls.split(",") if w.strip()]

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=8192,
                         eos_token_id=None, bos_token_id=None, pad_token_id=0, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: seconds, not minutes
        model = LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]

    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(), "transformers": transformers.__version__, "torch": torch.__version__,
        "model": {"attention": "Llama-3-8B (hidden 4096, 32/8 heads, head_dim 128, MLP 14336)", "layers": args.layers,
                  "dtype": "bf16", "vocab": 32000, "weights": "random (torch.manual_seed(0)), shared by every implementation"},
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "page_size": args.page_size,
        "implementations": {},
    }
    outputs: dict[str, list] = {}
    for impl in wanted:
        if impl not in names:
            report["implementations"][impl] = {"error": "not available here" if impl == "flash" else "unknown implementation"}
            continue
        try:
            with _gathering(impl == "kernelsel_gather"):
                entry, seqs = _measure(model, names[impl], prompts, args, backend)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next implementation
            report["implementations"][impl] = {"name": names[impl], "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        report["implementations"][impl] = entry
        outputs[impl] = seqs
    rate = lambda impl: (report["implementations"].get(impl, {}).get("decode") or {}).get("tokens_per_s")  # noqa: E731
    others = {k: rate(k) for k in report["implementations"] if not k.startswith("kernelsel") and rate(k)}
    if rate("kernelsel") and others:
        best = max(others, key=others.get)
        report["decode_speedup_vs_best_transformers"] = {"against": best, "ratio": round(rate("kernelsel") / others[best], 3)}
    if "kernelsel" in outputs:
        agree = {}
        for impl, seqs in outputs.items():
            if impl == "kernelsel":
                continue
            first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(outputs["kernelsel"], seqs)]
            differing = sorted(f for f in first if f is not None)
            agree[impl] = {"identical_sequences": len(first) - len(differing), "of": len(first),
                           "first_difference_median": differing[len(differing) // 2] if differing else None}
        report["greedy_agreement"] = agree
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
