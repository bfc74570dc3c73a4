"""Attention plan for a prefill step (TokenSpeed's rule, lightseekorg/tokenspeed#445).

* **postwrite**: run an ``mha_prefill`` kernel on the fresh Q/K/V, then write the cache;
* **prewrite**: write the cache first, then run an ``mha_extend`` kernel over it.

Postwrite is used only when a high-priority ``mha_prefill`` kernel is
eligible (priority at least the manifest's ``attention_plan.postwrite_min_priority``)
**and** FP8 attention (an fp8 query) is not in use; otherwise prewrite.

``kernel=NAME`` forces the kernel, and with it the mode: an ``mha_prefill``
kernel runs postwrite, an ``mha_extend`` kernel prewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from registry.errors import RequestError
from registry.ops import SHAPE_FIELDS_BY_OP
from registry.priority import band_name
from registry.vocab import Op, did_you_mean
from selector.api import Selector, default_selector
from selector.request import KernelRequest
from selector.selection import NoKernelError, Selection

_EXTEND_ONLY = SHAPE_FIELDS_BY_OP[Op.MHA_EXTEND] - SHAPE_FIELDS_BY_OP[Op.MHA_PREFILL]
"""Fields of a prewrite request that mean nothing to a postwrite one (the paged cache's page_size)."""


@dataclass(frozen=True)
class AttentionPlan:
    mode: str  # "postwrite" | "prewrite"
    selection: Selection  # the kernel that runs: mha_prefill (postwrite) or mha_extend (prewrite)
    prefill: Optional[Selection]  # the mha_prefill candidate that was weighed (None when FP8 skipped it)
    why: str

    def explain(self) -> str:
        head = [f"plan      {self.mode}", f"why       {self.why}", ""]
        return "\n".join(head) + self.selection.explain()

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "why": self.why,
            "selection": self.selection.to_dict(),
            "prefill_candidate": self.prefill.to_dict() if self.prefill else None,
        }


def select_plan(request: Optional[KernelRequest] = None, /, *, selector: Optional[Selector] = None, **fields: Any) -> AttentionPlan:
    """Decide postwrite vs prewrite for a prefill step described by ``fields`` (or an mha_extend request)."""
    selector = selector or default_selector()
    if request is not None:
        fields = request.model_dump(exclude_defaults=True) | fields
    fields = {k: v for k, v in fields.items() if k != "op"}
    extend_req = KernelRequest(op=Op.MHA_EXTEND, **fields)
    if extend_req.kernel is not None:
        return _forced_plan(selector, fields, extend_req)
    threshold = selector.manifest.attention_plan.postwrite_min_priority
    if extend_req.q_dtype.is_fp8:
        extend = selector.select(extend_req)
        return AttentionPlan("prewrite", extend, None, f"FP8 attention (q_dtype {extend_req.q_dtype.value}) always prewrites")
    prefill_fields = {k: v for k, v in fields.items() if k not in _EXTEND_ONLY}
    if prefill_fields.get("new_len") is not None:  # postwrite attends over the fresh tokens only
        prefill_fields["kv_len"] = prefill_fields["new_len"]
    prefill = selector.solve(KernelRequest(op=Op.MHA_PREFILL, **prefill_fields))
    if prefill.kernel is not None and prefill.kernel.priority >= threshold:
        k = prefill.kernel
        return AttentionPlan(
            "postwrite", prefill, prefill,
            f"mha_prefill kernel {k.name} has priority {k.priority} ({band_name(k.priority)}) >= {threshold} and no FP8 attention",
        )
    extend = selector.solve(extend_req)
    if extend.kernel is None:
        raise NoKernelError(extend)
    if prefill.kernel is None:
        why = "no eligible mha_prefill kernel"
    else:
        why = f"best mha_prefill kernel {prefill.kernel.name} has priority {prefill.kernel.priority} < {threshold}"
    return AttentionPlan("prewrite", extend, prefill, why)


def _forced_plan(selector: Selector, fields: dict[str, Any], extend_req: KernelRequest) -> AttentionPlan:
    """The plan a forced kernel implies: its op decides the mode; it must be eligible (else NoKernelError)."""
    name = extend_req.kernel
    spec = selector.manifest.by_name.get(name)
    if spec is None or spec.op not in (Op.MHA_PREFILL, Op.MHA_EXTEND):
        runs = [k.name for op in (Op.MHA_PREFILL, Op.MHA_EXTEND) for k in selector.manifest.by_op[op]]
        raise RequestError(f"request.kernel: {name!r} is not an mha_prefill (postwrite) or mha_extend (prewrite) "
                           f"kernel; one of: {', '.join(runs)}{did_you_mean(name, runs)}")
    why = f"forced by kernel={name} (an {spec.op.value} kernel: {'postwrite' if spec.op is Op.MHA_PREFILL else 'prewrite'})"
    if spec.op is Op.MHA_EXTEND:
        return AttentionPlan("prewrite", selector.select(extend_req), None, why)
    if extend_req.q_dtype.is_fp8:
        raise RequestError(f"request.kernel: {name!r} runs postwrite, but FP8 attention (q_dtype "
                           f"{extend_req.q_dtype.value}) always prewrites; force an mha_extend kernel")
    prefill = selector.select(KernelRequest(op=Op.MHA_PREFILL, **{k: v for k, v in fields.items() if k not in _EXTEND_ONLY}))
    return AttentionPlan("postwrite", prefill, prefill, why)
