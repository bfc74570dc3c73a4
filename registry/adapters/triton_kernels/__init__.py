"""kernelsel's own Triton attention kernels: the portable fallback.

One module per kernel family, each with the ``@triton.jit`` kernel and a
launcher that takes torch tensors:

* ``paged_mha``  -- paged MHA/GQA over an NHD cache, uniform (decode) or
  ragged (extend) new tokens, split-KV;
* ``mla``        -- absorbed MLA decode over a latent cache, split-KV;
* ``sparse_mla`` -- MLA decode over per-token top-k positions, split-KV;
* ``merge``      -- the shared epilogue (sink, normalise, LSE) and the
  split-KV merge kernel;
* ``common``     -- small jit helpers (scales, the soft cap, log2(e)) and the dot dtype;
* ``planning``   -- pure-Python launch heuristics (block sizes, splits).

Nothing is imported here: ``import registry`` must not import triton, and the
adapters in ``registry.adapters.triton`` import these modules on first use.
"""
