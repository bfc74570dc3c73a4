"""Conformance of the transformers backend: real transformers models through kernelsel vs their eager attention.

Six architectures cover what kernelsel selects on -- GQA (Llama, Qwen3), sliding windows (Mistral, Qwen3's
sliding layers, alternating layers in Gemma 2 and GPT-OSS), a logit soft cap and head_dim 256 (Gemma 2),
attention sinks (GPT-OSS), MLA (DeepSeek-V3) -- each built from a transformers config with random weights
(no download): ``tiny`` sizes for CI (yet shapes every kernel family accepts: head dims 64/256, MLA 512/64
with 16 heads) and ``real`` attention shapes for a GPU (hidden 2-4k, head dims 64/128/256, few layers).

What is compared, per model: prompt logits (an unpadded and a left-padded batch), greedy tokens of
``generate`` (both batches) and of ``generate_batch`` (continuous batching, per prompt).

**The rule** (``Tolerance``), against a float32 eager run of the same weights:

* float32: every non-padded logit within ``1e-4``;
* bf16/fp16: the largest logit error of kernelsel's run at most ``2 x`` that of transformers' own eager
  attention in the same dtype, plus ``0.02`` (eager's error is the measure of what the dtype costs);
* greedy tokens: every token kernelsel generated is, under the float32 eager model run over kernelsel's own
  sequence (teacher-forced), the best token or within ``delta`` of it -- ``1e-4`` in float32, the logit
  tolerance above otherwise.  So sequences are equal except where the float32 top two are a near-tie, and
  a divergence there is followed, not counted again.

Reports say which kernels ran (the backend's call counts) and that every output is non-empty: transformers'
continuous batching logs a failing request and returns no tokens rather than raising.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

ARCHITECTURES = ("llama", "qwen3", "mistral", "gemma2", "gpt_oss", "deepseek_v3")
VOCAB = 256


def _transformers() -> Any:
    import transformers

    return transformers


def tiny_config(arch: str) -> Any:
    """A two-layer random model of ``arch`` small enough for the CPU (and the Triton interpreter)."""
    T = _transformers()
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                  initializer_range=0.1, max_position_embeddings=512)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, **common)
    if arch == "qwen3":
        return T.Qwen3Config(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                             layer_types=["full_attention", "sliding_attention"], **common)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=64, sliding_window=6, **common)
    if arch == "gemma2":
        return T.Gemma2Config(hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=256, query_pre_attn_scalar=144, attn_logit_softcapping=3.0,
                              final_logit_softcapping=30.0, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "gpt_oss":
        return T.GptOssConfig(hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(hidden_size=128, intermediate_size=128, moe_intermediate_size=32,
                                  num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=64,
                                  qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=4,
                                  num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                                  n_shared_experts=1, rope_parameters=_yarn(64, 512), **common)
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")


def real_config(arch: str, layers: int = 2) -> Any:
    """Real-size attention shapes (a few layers, a small vocabulary and MLP: attention is what is checked)."""
    T = _transformers()
    common = dict(vocab_size=32000, num_hidden_layers=layers, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                  max_position_embeddings=16384)
    if arch == "llama":  # Llama-3-8B attention
        return T.LlamaConfig(hidden_size=4096, intermediate_size=4096, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, rope_theta=500000.0, **common)
    if arch == "qwen3":  # Qwen3-8B attention, every other layer sliding
        return T.Qwen3Config(hidden_size=4096, intermediate_size=4096, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, use_sliding_window=True, sliding_window=1024, max_window_layers=1,
                             layer_types=["full_attention", "sliding_attention"] * (layers // 2) + ["full_attention"] * (layers % 2),
                             **common)
    if arch == "mistral":  # Mistral-7B-v0.1 attention (window 4096 there; 2048 so 4k contexts cross it)
        return T.MistralConfig(hidden_size=4096, intermediate_size=4096, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, sliding_window=2048, **common)
    if arch == "gemma2":  # Gemma-2-9B attention
        return T.Gemma2Config(hidden_size=3584, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, sliding_window=1024,
                              layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
                              **common)
    if arch == "gpt_oss":  # gpt-oss-20b attention
        return T.GptOssConfig(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                              head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                              layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
                              **common)
    if arch == "deepseek_v3":  # DeepSeek-V2-Lite-sized MLA (16 heads, the V3 latent and head dims)
        return T.DeepseekV3Config(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=512,
                                  num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                                  qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=8,
                                  num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                                  n_shared_experts=1, rope_parameters=_yarn(4096, 16384), **common)
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")


def _yarn(original: int, longest: int) -> dict:
    """DeepSeek's YaRN rope: its mscale changes the softmax scale, so ``scaling`` must reach the kernel."""
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": longest / original, "original_max_position_embeddings": original,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}


def build_model(config: Any, *, seed: int = 0, device: str = "cpu") -> Any:
    """A float32 model of ``config`` with random weights (attention sinks drawn too), in eval mode."""
    import torch

    T = _transformers()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            sinks = getattr(module, "sinks", None)
            if isinstance(sinks, torch.nn.Parameter):
                sinks.normal_(0.0, 1.0)
    return model.to(device).eval()


# ------------------------------------------------------------------ the rule


@dataclass(frozen=True)
class Tolerance:
    """How close kernelsel must be to a float32 eager run (see the module docstring)."""

    logits: float  # largest allowed |logit - float32 eager logit| over non-padded positions
    near_tie: float  # a greedy token may differ from float32's best by at most this logit

    @classmethod
    def for_dtype(cls, dtype: Any, eager_error: float) -> "Tolerance":
        """float32: 1e-4 both; otherwise twice eager's own error in that dtype plus 0.02, for both."""
        import torch

        if dtype == torch.float32:
            return cls(1e-4, 1e-4)
        bound = 2.0 * eager_error + 0.02
        return cls(bound, bound)


def greedy_violations(reference: Any, tokens: list[list[int]], prompt_lengths: list[int], near_tie: float) -> list[dict]:
    """Tokens a greedy run picked that the float32 ``reference`` model ranks more than ``near_tie`` below its best.

    ``tokens[i]`` is prompt ``i`` followed by what was generated; each sequence is scored in one teacher-forced
    float32 eager forward.
    """
    import torch

    bad = []
    device = next(reference.parameters()).device
    for i, (seq, n) in enumerate(zip(tokens, prompt_lengths)):
        if len(seq) <= n:
            continue
        with torch.no_grad():
            logits = reference(torch.tensor([seq], device=device)).logits[0].float()
        for t in range(n, len(seq)):
            row = logits[t - 1]
            best = int(row.argmax())
            gap = float(row[best] - row[seq[t]])
            if gap > near_tie:
                bad.append({"sequence": i, "step": t - n, "token": seq[t], "best": best, "gap": gap})
                break  # later steps follow a sequence float32 would not have produced
    return bad


# ------------------------------------------------------------------ runs


@contextmanager
def attention(model: Any, name: str) -> Iterator[Any]:
    """``model`` with ``attn_implementation=name`` for the duration (restored after)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def prompts(count: int = 3, lengths: tuple[int, ...] = (12, 7, 9), vocab: int = VOCAB, seed: int = 1) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(count)]


def left_padded(batch: list[list[int]], device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def logits_error(a: Any, b: Any, mask: Any) -> float:
    return float((a.float() - b.float()).abs()[mask.bool()].max())


def prompt_logits(model: Any, name: str, ids: Any, mask: Any) -> Any:
    import torch

    with attention(model, name), torch.no_grad():
        return model(ids, attention_mask=mask).logits.float()


def greedy(model: Any, name: str, ids: Any, mask: Any, new_tokens: int) -> list[list[int]]:
    """``generate`` greedily; each row is the prompt (unpadded) followed by its new tokens."""
    import torch

    with attention(model, name), torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    rows = []
    for i in range(ids.shape[0]):
        start = int((mask[i] == 0).sum())
        rows.append(out[i, start:].tolist())
    return rows


CONTINUOUS_BATCHING_REFUSAL = (
    "transformers >= 5.19 runs continuous batching only with its own attention implementations: "
    "ContinuousBatchingManager.switch_to_cb_friendly_attn raises for any other name"
)


MLA_CONTINUOUS_BATCHING_BROKEN = (
    "transformers 5.17-5.18 size the continuous-batching cache with head_dim = qk_rope_head_dim (cache.py "
    "find_head_dim): it holds neither the expanded 192/128 keys nor the latent, so DeepSeek-V3 cannot run "
    "there (paged|eager and paged|sdpa fail the same way); kernelsel refuses the layer with that reason"
)


def continuous_batching_skipped(arch: str) -> Optional[str]:
    """Why ``generate_batch`` cannot run ``arch`` through kernelsel with this transformers, or None."""
    if refuses_custom_continuous_batching():
        return CONTINUOUS_BATCHING_REFUSAL
    if arch == "deepseek_v3":
        return MLA_CONTINUOUS_BATCHING_BROKEN
    return None


def refuses_custom_continuous_batching() -> bool:
    """transformers >= 5.19 (no ``paged|`` registry entries): continuous batching refuses kernelsel."""
    from transformers import AttentionInterface

    return "paged|sdpa" not in AttentionInterface._global_mapping


def continuous_batching_name(name: str) -> str:
    """The implementation name ``generate_batch`` needs: ``paged|NAME`` where transformers has ``paged|`` entries."""
    return name if refuses_custom_continuous_batching() else f"paged|{name}"


def generate_batch(model: Any, name: str, batch: list[list[int]], new_tokens: int, *, page_size: int = 16,
                   max_batch_tokens: int = 16) -> list[list[int]]:
    """Continuous batching, greedily: per prompt, the prompt followed by its new tokens ([] if it produced none).

    ``max_batch_tokens`` below the prompts' total makes transformers split prompts into chunks, so chunked
    prefill (new tokens over a cached prefix) runs too.
    """
    import dataclasses

    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    size = {"page_size": page_size} if "page_size" in fields else {"block_size": page_size}
    total = sum(len(p) + new_tokens for p in batch)
    cb = ContinuousBatchingConfig(num_blocks=4 * (total // page_size + len(batch)) + 8, max_batch_tokens=max_batch_tokens, **size)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with attention(model, continuous_batching_name(name)), torch.no_grad():
        outputs = model.generate_batch(batch, generation_config=gen, continuous_batching_config=cb)
    by_prompt = {}
    for request_id, out in outputs.items():
        index = int(str(request_id).rsplit("_", 1)[-1])
        by_prompt[index] = list(out.generated_tokens or [])
    return [p + by_prompt.get(i, [])[:new_tokens] if by_prompt.get(i) else [] for i, p in enumerate(batch)]


def verify(model32: Any, name: str, *, dtype: Any, backend: Any, new_tokens: int = 6, batch_prompts: Optional[list] = None,
           check_generate_batch: bool = True, generate_batch_runner: Optional[Callable] = None) -> dict[str, Any]:
    """Compare ``name`` (a registered kernelsel backend) with eager on ``model32`` (float32) cast to ``dtype``.

    Returns a report: prompt-logit errors and their tolerance, greedy violations of ``generate`` (unpadded and
    left-padded) and of ``generate_batch``, the kernels that ran, and ``passed``.
    """
    import torch

    device = next(model32.parameters()).device
    model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype)
    batch = batch_prompts or prompts()
    equal = [p[: min(len(q) for q in batch)] for p in batch]  # same-length prompts: no padding at all
    report: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "prompt_logits": {}, "generate": {}}
    backend.reset_counts()
    worst_eager = 0.0
    errors: dict[str, float] = {}
    for label, rows in (("unpadded", equal), ("left_padded", batch)):
        ids, mask = left_padded(rows, device)
        reference = prompt_logits(model32, "eager", ids, mask)
        eager = prompt_logits(model, "eager", ids, mask) if dtype != torch.float32 else reference
        ours = prompt_logits(model, name, ids, mask)
        worst_eager = max(worst_eager, logits_error(eager, reference, mask))
        errors[label] = logits_error(ours, reference, mask)
    tol = Tolerance.for_dtype(dtype, worst_eager)
    report["tolerance"] = {"logits": tol.logits, "near_tie": tol.near_tie, "eager_error": worst_eager}
    for label, err in errors.items():
        report["prompt_logits"][label] = {"error": err, "ok": err <= tol.logits}
    for label, rows in (("unpadded", equal), ("left_padded", batch)):
        ids, mask = left_padded(rows, device)
        seqs = greedy(model, name, ids, mask, new_tokens)
        bad = greedy_violations(model32, seqs, [len(p) for p in rows], tol.near_tie)
        report["generate"][label] = {"violations": bad, "ok": not bad and all(len(s) == len(p) + new_tokens for s, p in zip(seqs, rows))}
    if check_generate_batch:
        runner = generate_batch_runner or generate_batch
        try:
            seqs = runner(model, name, batch, new_tokens)
            empty = [i for i, s in enumerate(seqs) if not s]
            bad = greedy_violations(model32, [s for s in seqs if s], [len(p) for p, s in zip(batch, seqs) if s], tol.near_tie)
            report["generate_batch"] = {"violations": bad, "empty_outputs": empty, "ok": not bad and not empty}
        except Exception as exc:  # noqa: BLE001 - transformers may refuse the implementation: reported, not raised
            report["generate_batch"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "ok": False}
    report["kernels"] = backend.kernels_used()
    parts = [*report["prompt_logits"].values(), *report["generate"].values()]
    if check_generate_batch:
        parts.append(report["generate_batch"])
    report["passed"] = all(p["ok"] for p in parts) and bool(report["kernels"])
    return report


# ------------------------------------------------------------------ kernelsel verify-model


def verify_models(archs: Any = ARCHITECTURES, *, device: str = "cpu", dtype: Any = None, solution: Optional[str] = None,
                  size: str = "tiny", page_sizes: tuple[int, ...] = (16,), each_kernel: bool = False,
                  new_tokens: int = 6, prompt_lengths: Optional[tuple[int, ...]] = None,
                  continuous_batching: bool = True, log: Optional[Callable[[str], None]] = None,
                  on_result: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """The conformance report of ``kernelsel verify-model``: per architecture and page size, the backend with
    the kernels kernelsel selects, then (``each_kernel``) with each eligible kernel of each op forced in turn.
    The page size is both the dense backend's and transformers' continuous-batching block size.

    ``device="cpu"`` defaults to float32 and the torch reference; ``"cuda"`` to bf16 and the best kernels.
    ``on_result`` gets the report so far (``complete: False``) after every run, so a long run that is
    stopped keeps what it checked.
    """
    import torch
    import transformers

    import selector.integrations.transformers as ks
    from selector.integrations.transformers.explain import explain_model
    from selector.integrations.transformers.kernels import BackendOptions, KernelResolver
    from selector.integrations.transformers.layers import mha_spec

    default_dtype = {"cuda": torch.bfloat16, "cpu": torch.float32}  # what each device's kernels are checked in
    dtype = dtype or default_dtype[device]
    lengths = prompt_lengths or ((4096, 3072, 2048) if size == "real" else (12, 7, 9))
    vocab = 32000 if size == "real" else VOCAB
    results = []
    say = log or (lambda _msg: None)
    for arch in archs:
        skipped = continuous_batching_skipped(arch) if continuous_batching else None
        config = real_config(arch) if size == "real" else tiny_config(arch)
        model = build_model(config, device=device)
        batch = prompts(lengths=lengths, vocab=vocab)
        for page in page_sizes:
            runs: list[Optional[dict]] = [None]
            if each_kernel:
                resolver = KernelResolver(BackendOptions.make(page_size=page))
                explanation = explain_model(model, dtype=dtype, page_size=page, device=device)
                ops = set()
                for group in explanation.groups:
                    name = "bf16" if dtype == torch.bfloat16 else ("fp16" if dtype == torch.float16 else "fp32")
                    mha = mha_spec(group.spec)
                    for op, spec in ((group.decode_op, group.spec), ("mha_prefill", mha), ("mha_extend", mha)):
                        for kernel in resolver.eligible(op, spec, name, page, on_cuda=device == "cuda"):
                            ops.add((op, kernel))
                runs += [{op: kernel} for op, kernel in sorted(ops)]
            for forced in runs:
                backend = ks.register("kernelsel-verify", solution=solution if forced is None else None,
                                      kernels=forced, page_size=page)
                label = f"{arch} page_size={page} " + ("selected" if forced is None else f"forced {forced}")
                say(f"verify-model: {label}")
                try:
                    report = verify(model, "kernelsel-verify", dtype=dtype, backend=backend, new_tokens=new_tokens,
                                    batch_prompts=batch, check_generate_batch=continuous_batching and not skipped and forced is None,
                                    generate_batch_runner=functools.partial(generate_batch, page_size=page))
                except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the others
                    report = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "passed": False}
                finally:
                    ks.unregister("kernelsel-verify")
                if skipped and forced is None and "prompt_logits" in report:
                    report["generate_batch"] = {"skipped": skipped, "ok": True}
                results.append({"arch": arch, "page_size": page, "forced": forced, **report})
                say(f"verify-model: {'pass' if report.get('passed') else 'FAIL'} {label}")
                if on_result is not None:
                    on_result(_report(results, device, dtype, size, lengths, complete=False))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return _report(results, device, dtype, size, lengths, complete=True)


def _report(results: list[dict[str, Any]], device: str, dtype: Any, size: str, lengths: tuple[int, ...], *,
            complete: bool) -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    return {"transformers": transformers.__version__, "torch": torch.__version__, "device": device, "gpu": gpu,
            "dtype": str(dtype).removeprefix("torch."), "size": size, "prompt_lengths": list(lengths),
            "complete": complete, "results": list(results), "passed": sum(r["passed"] for r in results),
            "failed": sum(not r["passed"] for r in results)}


def render_report(report: dict[str, Any]) -> str:
    """One line per run: pass/FAIL, what ran, the prompt-logit errors against their bound."""
    lines = [f"transformers {report['transformers']}, torch {report['torch']}, {report['device']}"
             + (f" ({report['gpu']})" if report.get("gpu") else "") + f", {report['dtype']}, {report['size']} models"]
    for r in report["results"]:
        what = "selected" if r["forced"] is None else "forced " + ",".join(f"{k}={v}" for k, v in r["forced"].items())
        head = f"{'pass' if r['passed'] else 'FAIL'}  {r['arch']:<12} page {r['page_size']:<3} {what}"
        if "error" in r and "prompt_logits" not in r:
            lines.append(f"{head}: {r['error']}")
            continue
        errs = ", ".join(f"{k} {v['error']:.2e}" for k, v in r["prompt_logits"].items())
        kernels = "; ".join(f"{op}: {', '.join(sorted(names))}" for op, names in r["kernels"].items())
        tail = [f"logits {errs} (bound {r['tolerance']['logits']:.2e})", kernels]
        gen_bad = [k for k, v in r["generate"].items() if not v["ok"]]
        if gen_bad:
            tail.append(f"generate differs: {', '.join(gen_bad)}")
        if "skipped" in r.get("generate_batch", {}):
            tail.append("generate_batch not run: " + r["generate_batch"]["skipped"])
        elif "generate_batch" in r and not r["generate_batch"]["ok"]:
            gb = r["generate_batch"]
            tail.append("generate_batch: " + (gb.get("error") or f"empty {gb.get('empty_outputs')} / violations {gb.get('violations')}"))
        lines.append(f"{head}: " + " | ".join(tail))
    lines.append(f"{report['passed']} passed, {report['failed']} failed")
    return "\n".join(lines)
