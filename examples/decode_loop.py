"""A minimal paged-KV decode loop that picks its attention kernel through kernelsel.

A few transformer layers with random weights generate tokens for a small
batch.  The cache grows page by page through a block table, exactly the
layout of ``registry.contracts``.  The kernel is selected once at start-up
(``select_kernel``); each step plans once (``adapter.plan``) and every layer
runs the same adapter.  What kernelsel saves an engine is visible here: no
``if arch ...`` and no per-kernel call code, only the request.

    python examples/decode_loop.py --device cuda        # the best kernel for this GPU
    python examples/decode_loop.py --device cpu         # the torch reference (solution=reference)
    python examples/decode_loop.py --explain            # why that kernel
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from registry.contracts import DecodeMetadata
from selector import select_kernel


@dataclass
class Config:
    layers: int = 2
    batch: int = 3
    num_qo_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    page_size: int = 16
    vocab: int = 256
    max_tokens: int = 512
    dtype: str = "bf16"

    @property
    def hidden(self) -> int:
        return self.num_qo_heads * self.head_dim


class PagedKVCache:
    """One K and one V cache per layer over a shared page pool, with a block table per request."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        pages_per_request = -(-cfg.max_tokens // cfg.page_size)
        pool = cfg.batch * pages_per_request
        shape = (pool, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.page_size = cfg.page_size
        self.free = list(range(pool - 1, -1, -1))
        self.block_table = torch.zeros(cfg.batch, pages_per_request, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(cfg.batch, dtype=torch.int32, device=device)
        self._lens = [0] * cfg.batch  # host copy: page allocation is host bookkeeping

    def append_slot(self) -> torch.Tensor:
        """Reserve the next position of every request (a new page when one fills); return flat slots."""
        slots = []
        for b, n in enumerate(self._lens):
            if n % self.page_size == 0:
                self.block_table[b, n // self.page_size] = self.free.pop()
            page = int(self.block_table[b, n // self.page_size])
            slots.append(page * self.page_size + n % self.page_size)
            self._lens[b] = n + 1
        self.seq_lens.copy_(torch.tensor(self._lens, dtype=torch.int32))
        return torch.tensor(slots, device=self.seq_lens.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].view(-1, *self.k[layer].shape[2:])[slots] = k
        self.v[layer].view(-1, *self.v[layer].shape[2:])[slots] = v


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class TinyModel:
    """Random weights: embedding, LM head, and per layer a fused QKV and an output projection."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        qkv = (cfg.num_qo_heads + 2 * cfg.num_kv_heads) * cfg.head_dim

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).to(device=device, dtype=dtype)

        self.cfg = cfg
        self.embed = w(cfg.vocab, cfg.hidden)
        self.head = w(cfg.hidden, cfg.vocab)
        self.wqkv = [w(cfg.hidden, qkv) for _ in range(cfg.layers)]
        self.wo = [w(cfg.hidden, cfg.hidden) for _ in range(cfg.layers)]

    def step(self, tokens: torch.Tensor, cache: PagedKVCache, attention) -> torch.Tensor:
        """One decode step for every request: plan once, run the kernel in every layer."""
        cfg = self.cfg
        slots = cache.append_slot()
        attention.plan(DecodeMetadata(block_table=cache.block_table, seq_lens=cache.seq_lens, q_len=1))
        x = self.embed[tokens]
        for layer in range(cfg.layers):
            q, k, v = (rms_norm(x) @ self.wqkv[layer]).split(
                [cfg.num_qo_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1
            )
            cache.write(layer, slots, k.view(-1, cfg.num_kv_heads, cfg.head_dim), v.view(-1, cfg.num_kv_heads, cfg.head_dim))
            out = attention.run(q.reshape(-1, cfg.num_qo_heads, cfg.head_dim), cache.k[layer], cache.v[layer]).out
            x = x + out.reshape(len(tokens), -1) @ self.wo[layer]
        return (rms_norm(x) @ self.head).argmax(-1)


def select_attention(cfg: Config, device: str, arch: Optional[str]):
    """The one place the engine talks to kernelsel: describe the call site, get a kernel."""
    cpu = not device.startswith("cuda")
    return select_kernel(
        op="mha_decode",
        arch=arch or ("sm_90" if cpu else None),  # on CPU the arch is nominal: only the reference runs there
        solution="reference" if cpu else None,
        q_dtype=cfg.dtype,
        kv_dtype=cfg.dtype,
        head_dim_qk=cfg.head_dim,
        num_qo_heads=cfg.num_qo_heads,
        num_kv_heads=cfg.num_kv_heads,
        page_size=cfg.page_size,
        q_len=1,
    )


def generate(cfg: Config, *, steps: int, device: str = "cpu", arch: Optional[str] = None, explain: bool = False):
    """Run ``steps`` decode steps; return (selection, tokens [B, steps + 1], cache)."""
    from registry.adapters.base import torch_dtype

    selection = select_attention(cfg, device, arch)
    print(selection.explain() if explain else f"attention kernel: {selection.name} ({selection.why})", file=sys.stderr)
    dtype = torch_dtype(cfg.dtype)
    model = TinyModel(cfg, torch.device(device), dtype)
    cache = PagedKVCache(cfg, torch.device(device), dtype)
    tokens = torch.arange(cfg.batch, device=device) % cfg.vocab
    history = [tokens]
    for _ in range(steps):
        tokens = model.step(tokens, cache, selection.adapter)
        history.append(tokens)
    return selection, torch.stack(history, dim=1), cache


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default=None, help="override the detected arch (nominal on CPU)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layers", type=int, default=Config.layers)
    p.add_argument("--batch", type=int, default=Config.batch)
    p.add_argument("--page-size", type=int, default=Config.page_size)
    p.add_argument("--dtype", default=Config.dtype)
    p.add_argument("--explain", action="store_true", help="print why the kernel was chosen")
    args = p.parse_args(argv)
    cfg = Config(layers=args.layers, batch=args.batch, page_size=args.page_size, dtype=args.dtype)
    _, tokens, cache = generate(cfg, steps=args.steps, device=args.device, arch=args.arch, explain=args.explain)
    for b, row in enumerate(tokens.tolist()):
        print(f"request {b}: {row} (cache {int(cache.seq_lens[b])} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
