"""kernelsel as a transformers attention backend.

    import selector.integrations.transformers as ks
    ks.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kernelsel")

``register()`` adds to transformers' registries (``AttentionInterface``, ``AttentionMaskInterface``):

* ``"kernelsel"``: the attention function of ``forward``/``generate`` and the mask function it needs;
* ``"paged|kernelsel"``: the attention function of continuous batching (``generate_batch``), for the
  transformers releases whose continuous batching calls registered ``paged|`` functions (see ``paged.py``).

Every attention layer then runs through the kernel kernelsel selects for it (``kernels.py`` says how, and
``explain_model`` shows it without running anything).  What kernelsel cannot honour is refused with an error
naming the layer and the feature (``layers.LayerError``), never run some other way.

Importing this package imports neither torch nor transformers; ``register()`` and ``explain_model`` do.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from selector.integrations.transformers.kernels import BackendOptions
from selector.integrations.transformers.layers import LayerError, LayerSpec

__all__ = ["BackendOptions", "LayerError", "LayerSpec", "explain_model", "register", "registered", "unregister"]

_BACKENDS: dict[str, Any] = {}


def register(name: str = "kernelsel", *, arch: Optional[str] = None, solution: Optional[str] = None,
             kernels: Optional[Mapping[str, str]] = None, page_size: int = 16) -> Any:
    """Register kernelsel under ``name`` (and ``paged|name``); returns the backend (``.kernels_used()``).

    ``arch``, ``solution``, ``kernels`` (a kernel forced per op) and ``page_size`` are ``BackendOptions``:
    by default the best kernel for the CUDA device, and the torch reference kernels on a machine without
    one.  Registering a name again replaces its backend.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from selector.integrations.transformers import mla
    from selector.integrations.transformers.attention import Backend
    from selector.integrations.transformers.layout import kernelsel_mask
    from selector.integrations.transformers.paged import paged_attention_function

    if not isinstance(name, str) or not name or "|" in name or "flash" in name or "sdpa" in name:
        raise LayerError(f"kernelsel: register: name {name!r} must be a non-empty name without '|', 'flash' or "
                         f"'sdpa' (transformers gives those special meanings)")
    backend = Backend(name, BackendOptions.make(arch=arch, solution=solution, kernels=kernels, page_size=page_size))
    AttentionInterface.register(name, backend.attention)
    AttentionInterface.register(f"paged|{name}", paged_attention_function(backend))
    AttentionMaskInterface.register(name, kernelsel_mask)
    _BACKENDS[name] = backend
    mla.set_latent_implementations(set(_BACKENDS) | {f"paged|{n}" for n in _BACKENDS})
    return backend


def unregister(name: str = "kernelsel") -> None:
    """Remove ``name`` and ``paged|name`` from transformers' registries; with none left, un-route MLA classes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from selector.integrations.transformers import mla

    _BACKENDS.pop(name, None)
    for registry, key in ((AttentionInterface, name), (AttentionInterface, f"paged|{name}"), (AttentionMaskInterface, name)):
        registry._global_mapping.pop(key, None)
    mla.set_latent_implementations(set(_BACKENDS) | {f"paged|{n}" for n in _BACKENDS})
    if not _BACKENDS:
        mla.restore_all()


def registered(name: str = "kernelsel") -> Any:
    """The backend registered under ``name`` (its ``kernels_used()`` says what ran), or None."""
    return _BACKENDS.get(name)


def explain_model(model_or_config: Any, **kwargs: Any) -> Any:
    """Per layer type, what each op resolves to and why; see ``explain.explain_model``."""
    from selector.integrations.transformers.explain import explain_model as _explain

    return _explain(model_or_config, **kwargs)
