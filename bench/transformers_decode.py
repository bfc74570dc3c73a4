"""Decode throughput of transformers' continuous batching with kernelsel's attention vs transformers' own (GPU).

One random model with Llama-3-8B's attention shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128) and a
few layers, bf16, on the GPU; the same prompts through ``generate_batch`` once per attention implementation:
kernelsel (``paged|kernelsel``), transformers' ``paged|sdpa``, and flash attention where it imports
(``paged|flash_attention_2`` / ``_3``).  Decode-heavy by default (short prompts, many new tokens).  Per
implementation: tokens/s over the whole ``generate_batch`` call (after a warm-up run that compiles
kernels), and where the time goes -- CUDA events around every attention call (the attention function as
transformers calls it, cache update included) against the rest of the wall time.  Greedy outputs are
compared between implementations (first token that differs).

    python bench/transformers_decode.py [--quick] [--out bench/results/transformers_decode-h200.json]

Prints JSON.  Needs a CUDA GPU and a transformers release whose continuous batching calls registered
``paged|`` functions (5.17-5.18); on later releases kernelsel's run is reported as refused by transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Callable, Optional


def _args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="requests")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--page-size", type=int, default=256, help="transformers' paged-cache block size")
    p.add_argument("--impls", default="kernelsel,sdpa,flash", help="comma-separated: kernelsel, sdpa, flash")
    p.add_argument("--quick", action="store_true", help="2 layers, 32 requests, 128 new tokens (about a minute)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.new_tokens = 2, 32, 128
    return args


class AttentionTimer:
    """CUDA events around every call of the wrapped attention functions; the total read once at the end."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, Any]] = []

    def wrap(self, fn: Callable) -> Callable:
        import torch

        def timed(*args: Any, **kwargs: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out

        timed.__name__ = getattr(fn, "__name__", "attention")
        return timed

    def seconds(self) -> float:
        import torch

        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.events) / 1000.0


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
    flash = _flash_name()
    if flash:
        names["flash"] = f"paged|{flash}" if paged else flash
    wanted = [w.strip() for w in args.impls.split(",") if w.strip()]

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=8192,
                         eos_token_id=None, bos_token_id=None, pad_token_id=0, rope_theta=500000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]

    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(), "transformers": transformers.__version__, "torch": torch.__version__,
        "model": {"attention": "Llama-3-8B (hidden 4096, 32/8 heads, head_dim 128)", "layers": args.layers,
                  "dtype": "bf16", "vocab": 32000},
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "page_size": args.page_size,
        "implementations": {},
    }
    outputs: dict[str, list] = {}
    for impl in wanted:
        if impl not in names:
            report["implementations"][impl] = {"error": "not available here" if impl == "flash" else "unknown implementation"}
            continue
        name = names[impl]
        timer = AttentionTimer()
        original = AttentionInterface._global_mapping.get(name)
        try:
            _run(model, name, prompts[: min(4, len(prompts))], args, 8)  # warm-up: JIT compiles, first plans
            if original is not None:
                AttentionInterface._global_mapping[name] = timer.wrap(original)
            backend.reset_counts()
            wall, seqs = _run(model, name, prompts, args, args.new_tokens)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next implementation
            report["implementations"][impl] = {"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        finally:
            if original is not None:
                AttentionInterface._global_mapping[name] = original
        generated = sum(len(s) for s in seqs)
        attention = timer.seconds()
        entry = {"name": name, "wall_s": round(wall, 3), "generated_tokens": generated,
                 "tokens_per_s": round(generated / wall, 1) if wall else None,
                 "attention_s": round(attention, 3), "attention_fraction": round(attention / wall, 3) if wall else None,
                 "empty_outputs": sum(1 for s in seqs if not s)}
        if impl == "kernelsel":
            entry["kernels"] = backend.kernels_used()
        report["implementations"][impl] = entry
        outputs[impl] = seqs
    ks_rate = report["implementations"].get("kernelsel", {}).get("tokens_per_s")
    others = {k: v.get("tokens_per_s") for k, v in report["implementations"].items() if k != "kernelsel" and v.get("tokens_per_s")}
    if ks_rate and others:
        best = max(others, key=others.get)
        report["speedup_vs_best_transformers"] = {"against": best, "ratio": round(ks_rate / others[best], 3)}
    if "kernelsel" in outputs:
        agree = {}
        for impl, seqs in outputs.items():
            if impl == "kernelsel":
                continue
            first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(outputs["kernelsel"], seqs)]
            agree[impl] = {"identical_sequences": sum(f is None for f in first), "of": len(first),
                           "first_difference_median": sorted(f for f in first if f is not None)[len([f for f in first if f is not None]) // 2]
                           if any(f is not None for f in first) else None}
        report["greedy_agreement"] = agree
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
