"""``explain_model``: per layer type of a transformers model, which kernel each op resolves to and why.

Works on a loaded model or on a config alone (a ``PretrainedConfig``, a ``config.json`` path or its dict):
the model is then built on torch's ``meta`` device -- no weights, no memory -- so the layers are the real
modules of that architecture and their specs are read exactly as at run time (``layers.module_spec``).
Layers with the same module class and spec form one group; each group gets the same two answers the
backend would use (``kernels.KernelResolver``): the decode kernel and the prompt plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from registry.errors import KernelselError
from selector.integrations.transformers.kernels import BackendOptions, KernelResolver, PrefillChoice
from selector.integrations.transformers.layers import LayerSpec, is_mla, mha_spec, module_spec
from selector.selection import NoKernelError, Selection


@dataclass
class LayerGroup:
    """Layers of one module class and one spec, and what their ops resolve to (or why nothing does)."""

    module: str
    layers: list[int]
    spec: LayerSpec
    decode: Optional[Selection] = None
    prompt: Optional[PrefillChoice] = None
    errors: dict[str, str] = field(default_factory=dict)  # op -> why no kernel

    @property
    def decode_op(self) -> str:
        return "mla_decode" if self.spec.mla else "mha_decode"

    def to_dict(self) -> dict[str, Any]:
        spec = {k: v for k, v in self.spec.__dict__.items() if v is not None}
        spec["window_left"] = self.spec.window_left
        return {
            "module": self.module,
            "layers": self.layers,
            "spec": spec,
            "decode": self.decode.to_dict() if self.decode is not None else None,
            "prompt": None if self.prompt is None else {
                "mode": self.prompt.mode, "why": self.prompt.why, "selection": self.prompt.selection.to_dict()},
            "errors": dict(self.errors),
        }


@dataclass
class ModelExplanation:
    """``explain_model``'s answer: text (``explain()``) and JSON (``to_dict()``) render this one object."""

    model: str
    dtype: str
    page_size: int
    device: str
    groups: list[LayerGroup]

    @property
    def ok(self) -> bool:
        """Every op of every layer has a kernel."""
        return all(not g.errors for g in self.groups)

    def explain(self, verbose: bool = False) -> str:
        layers = sum(len(g.layers) for g in self.groups)
        lines = [f"model     {self.model}: {layers} attention layers, {self.dtype}, page_size {self.page_size}"]
        platform = next((_platform(s) for g in self.groups for s in (g.decode, g.prompt and g.prompt.selection) if s), None)
        if platform:
            lines.append(f"platform  {platform}" + ("" if self.device == "cuda" else " (no CUDA device: the torch reference)"))
        for g in self.groups:
            lines.append("")
            lines.append(f"layers {_ranges(g.layers)} ({len(g.layers)})  {g.module}: {g.spec.describe()}")
            for label, op, sel, why in self._rows(g):
                if sel is None:
                    lines.append(f"  {label:<8} {op:<22} no kernel: {why}")
                    continue
                k = sel.kernel
                lines.append(f"  {label:<8} {op:<22} {k.name} ({k.solution.value}/{k.backend.value}, priority {k.priority})")
                lines.append(f"  {'':<8} {'':<22} {why}")
                if verbose:
                    lines.extend("      " + line for line in sel.explain().splitlines())
        return "\n".join(lines)

    def _rows(self, g: LayerGroup) -> list[tuple[str, str, Optional[Selection], str]]:
        rows = []
        if g.decode is not None:
            rows.append(("decode", g.decode_op, g.decode, g.decode.why))
        else:
            rows.append(("decode", g.decode_op, None, g.errors.get("decode", "")))
        prompt_op = "mha_prefill/mha_extend" + (" (un-absorbed)" if g.spec.mla else "")
        if g.prompt is not None:
            op = f"{g.prompt.mode} {g.prompt.selection.request.op.value}"
            rows.append(("prompt", op, g.prompt.selection, g.prompt.why))
        else:
            rows.append(("prompt", prompt_op, None, g.errors.get("prompt", "")))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "page_size": self.page_size, "device": self.device,
                "ok": self.ok, "groups": [g.to_dict() for g in self.groups]}


def _platform(selection: Selection) -> str:
    """The platform a selection was made for, with the arch its request named."""
    from dataclasses import replace

    return replace(selection.platform, arch=selection.request.arch).describe()


def _ranges(values: list[int]) -> str:
    """``0-3,5,7-9``."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def load_config(source: Any) -> Any:
    """A transformers config from a ``PretrainedConfig``, a dict, a ``config.json`` path or a directory holding one."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            try:
                source = json.load(f)
            except json.JSONDecodeError as exc:
                raise KernelselError(f"{path}: not JSON: {exc}") from None
    if not isinstance(source, Mapping):
        raise KernelselError(f"expected a model, a transformers config, a config dict or a config.json path, got {type(source).__name__}")
    data = dict(source)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise KernelselError("the config has no model_type: transformers cannot tell which architecture it describes")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise KernelselError(f"model_type {model_type!r}: {str(exc).splitlines()[0]}") from None


def _meta_model(config: Any) -> Any:
    """The model of ``config`` on the meta device (no weights allocated)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def attention_modules(model: Any) -> list[Any]:
    """The model's attention layers: modules with a ``layer_idx`` whose class is an attention (``...Attention``)."""
    found = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") and hasattr(module, "config"):
            found.append(module)
    return found


def _dtype_of(model: Any, config: Any, dtype: Any) -> str:
    from selector.integrations.transformers.kernels import dtype_name

    if dtype is not None:
        return dtype if isinstance(dtype, str) else dtype_name(dtype)
    if model is not None:
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type != "meta":
            return dtype_name(param.dtype)
    configured = getattr(config, "dtype", None)
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    text = str(configured).removeprefix("torch.") if configured is not None else "bfloat16"
    return names.get(text, "bf16")


def explain_model(model_or_config: Any, *, arch: Optional[str] = None, solution: Optional[str] = None,
                  kernels: Optional[Mapping[str, str]] = None, page_size: int = 16, dtype: Any = None,
                  device: Optional[str] = None, selector: Any = None) -> ModelExplanation:
    """What every attention layer of a model would run through kernelsel, grouped by layer type.

    ``device``: explain for a ``cuda`` device (the best kernels for ``arch``, or the detected GPU) or for
    ``cpu`` (the torch reference, as the backend runs without CUDA); default ``cuda`` when ``arch`` is
    given or a CUDA device is present.  ``selector``: select against this ``Selector`` (a manifest and
    platform) instead of the default one.  Other options are ``register()``'s.
    """
    from transformers import PreTrainedModel

    if isinstance(model_or_config, PreTrainedModel):
        model, config = model_or_config, model_or_config.config
    else:
        config = load_config(model_or_config)
        model = _meta_model(config)
    if device is None:
        import torch

        device = "cuda" if arch is not None or selector is not None or torch.cuda.is_available() else "cpu"
    on_cuda = device == "cuda"
    options = BackendOptions.make(arch=arch, solution=solution, kernels=kernels, page_size=page_size)
    resolver = KernelResolver(options, selector)
    name = _dtype_of(model if isinstance(model_or_config, PreTrainedModel) else None, config, dtype)
    groups: dict[tuple, LayerGroup] = {}
    for module in attention_modules(model):
        spec = module_spec(module)
        key = (type(module).__name__, spec)
        group = groups.get(key)
        if group is None:
            group = groups[key] = LayerGroup(type(module).__name__, [], spec)
            _resolve(group, resolver, name, page_size, on_cuda)
        group.layers.append(int(module.layer_idx))
    title = f"{type(model).__name__} ({getattr(config, 'model_type', '?')})"
    return ModelExplanation(title, name, page_size, device, sorted(groups.values(), key=lambda g: g.layers[0]))


def _resolve(group: LayerGroup, resolver: KernelResolver, dtype: str, page_size: int, on_cuda: bool) -> None:
    spec = group.spec
    try:
        group.decode = resolver.decode(spec, dtype, page_size, on_cuda=on_cuda)
    except NoKernelError as exc:
        group.decode = None
        group.errors["decode"] = f"no {group.decode_op} kernel ({exc.selection.why or 'none eligible'}); `kernelsel explain` lists every reason"
        group.errors["decode_selection"] = exc.selection.explain()
    except KernelselError as exc:
        group.errors["decode"] = str(exc).splitlines()[0]
    mha = mha_spec(spec)
    try:
        group.prompt = resolver.prefill(mha, dtype, page_size, on_cuda=on_cuda)
    except NoKernelError as exc:
        group.errors["prompt"] = f"no mha_prefill or mha_extend kernel ({exc.selection.why or 'none eligible'})"
        group.errors["prompt_selection"] = exc.selection.explain()
    except KernelselError as exc:
        group.errors["prompt"] = str(exc).splitlines()[0]


__all__ = ["LayerGroup", "ModelExplanation", "attention_modules", "explain_model", "is_mla", "load_config"]
