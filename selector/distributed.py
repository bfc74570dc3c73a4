"""One kernel for every rank of a process group: ``select_kernel(req, group=pg)``.

Ranks of one engine can sit on different machines: one node without
FlashInfer, one whose FlashInfer does not import, a different perf table.
Choosing locally would then make ranks run different kernels (different
numerics, KV-cache settings, CUDA-graph behaviour).  With ``group`` the
choice is a collective, made identically on every rank from gathered facts:

1. every rank solves the request locally (its own platform, overrides,
   recorded unavailable kernels) -- never raising before the collective, so
   a rank with a bad request cannot leave the others waiting;
2. ``all_gather_object`` shares each rank's ranked eligible kernels, its
   reasons for the others, its platform, manifest digest and request;
3. every rank checks the group is coherent (one manifest, one request up to
   the arch, one forced kernel) and keeps the kernels eligible on **every**
   rank, in the order of the group's first rank (its perf table and
   priorities decide: ranks with different perf tables would otherwise
   disagree);
4. every rank builds the best remaining kernel's adapter and the outcome is
   gathered again; if any rank cannot build it, it is dropped everywhere and
   the next one is tried;
5. every rank returns a ``Selection`` of that kernel, whose rejected list
   says which rank lacked each dropped kernel and why -- or every rank
   raises the same ``GroupSelectionError`` naming the ranks without a
   candidate and their reasons.

The agreed selection is cached per (request, group): later identical calls
communicate nothing.  It is a collective, so call it on every rank in the
same order, from one thread per rank.  ``torch.distributed`` is imported
only here, only when ``group`` is given.

NCCL: ``all_gather_object`` on an NCCL group moves the pickled objects
through the current CUDA device, so call ``torch.cuda.set_device(local_rank)``
first -- or, better, pass a CPU group made once at start-up:
``dist.new_group(backend="gloo")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from registry.errors import KernelselError
from selector.availability import UNAVAILABLE, build
from selector.request import KernelRequest

if TYPE_CHECKING:
    from selector.api import Selector
    from selector.selection import Selection


class GroupSelectionError(KernelselError, LookupError):
    """The ranks of a process group cannot agree on a kernel; the same message on every rank."""


def select_in_group(selector: "Selector", request: KernelRequest, group: Any) -> "Selection":
    """The selection every rank of ``group`` adopts (a collective; cached per request and group)."""
    key = (request, group)
    hit = selector._agreed.get(key)
    if hit is not None:
        return hit
    with selector._group_lock:  # not the selector's lock: other threads' cache misses go on during the collective
        hit = selector._agreed.get(key)
        if hit is None:
            hit = _agree(selector, request, group)
            selector._agreed[key] = hit
    return hit


def _view(selector: "Selector", request: KernelRequest, me: int) -> tuple[dict, Optional[KernelRequest], Any]:
    """What this rank tells the others (plain data, identical keys on every rank); never raises."""
    view: dict[str, Any] = {"rank": me, "platform": _machine(selector.platform), "arch": "unknown arch",
                            "manifest": f"{selector.manifest.path} (sha {selector.manifest.digest})"}
    try:
        full = selector.complete(request)
        view["arch"] = full.arch.value
        local = selector._solve(full)
    except Exception as exc:  # noqa: BLE001 - reported to every rank instead of leaving them waiting
        view["error"] = f"{type(exc).__name__}: {exc}"
        return view, None, None
    view.update(
        platform=_machine(selector.platform),
        request={k: v for k, v in full.given().items() if k not in ("arch", "kernel")},
        forced=(request.kernel or selector.overrides.forced(request.op)),
        eligible=[k.name for k in local.eligible],
        rejected={v.kernel.name: list(v.reasons) for v in local.rejected},
    )
    return view, full, local


def _machine(platform: Any) -> str:
    """The platform without its arch (shown apart): device and libraries."""
    text = platform.describe()
    return text[text.index("(") + 1 : -1] if "(" in text else text


def _gather(obj: Any, group: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _ranks(views: list[dict]) -> str:
    return ", ".join(f"rank {v['rank']}" for v in views)


def _incoherent(views: list[dict]) -> Optional[str]:
    """Why the ranks' inputs cannot be compared (same text on every rank), or None."""
    failed = [v for v in views if "error" in v]
    if failed:
        return "\n".join(f"  rank {v['rank']} ({v['arch']}; {v['platform']}): {v['error']}" for v in failed)
    shown = {"manifest": lambda v: v["manifest"], "request": _describe, "forced": lambda v: v["forced"] or "none"}
    for key, what in (("manifest", "manifests"), ("request", "requests (the arch may differ)"),
                      ("forced", "forced kernels")):
        values: dict[str, list[dict]] = {}
        for v in views:
            values.setdefault(shown[key](v), []).append(v)
        if len(values) > 1:
            lines = [f"  {_ranks(vs)}: {text}" for text, vs in values.items()]
            return f"the ranks use different {what}:\n" + "\n".join(lines)
    return None


def _agree(selector: "Selector", request: KernelRequest, group: Any) -> "Selection":
    import dataclasses

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise GroupSelectionError(
            "group= needs an initialised torch.distributed (dist.init_process_group) and one of its process groups"
        )
    me = dist.get_rank()
    world = dist.get_world_size(group)
    where = f"a {world}-rank process group"
    view, full, local = _view(selector, request, me)
    views = _gather(view, group)
    op = request.op.value
    problem = _incoherent(views)
    if problem:
        raise GroupSelectionError(f"cannot select a kernel for {op} in {where}:\n{problem}")

    # kernel -> why it cannot run on every rank; built from gathered data only, so identical on every rank
    dropped: dict[str, str] = {}
    for name in (k.name for k in selector.manifest.by_op[request.op]):
        missing = [f"rank {v['rank']}: {v['rejected'].get(name, ['not eligible'])[0]}"
                   for v in views if name not in v["eligible"]]
        if missing and any(name in v["eligible"] for v in views):
            dropped[name] = "not eligible on " + "; ".join(missing)
    forced = views[0]["forced"]
    if forced is not None:  # the same on every rank (checked above): it runs everywhere or nowhere
        lacking = [v for v in views if forced not in v["eligible"]]
        if lacking:
            lines = [f"  rank {v['rank']} ({v['arch']}; {v['platform']}): "
                     f"{'; '.join(v['rejected'].get(forced, ['not eligible']))}" for v in lacking]
            raise GroupSelectionError(
                f"kernel {forced} (forced on every rank) is not eligible on {_ranks(lacking)} of {where}\n"
                f"request: {_describe(views[0])}\n" + "\n".join(lines)
            )
        candidates = [forced]
    else:
        candidates = [n for n in views[0]["eligible"] if n not in dropped]
    if not candidates:
        raise GroupSelectionError(_no_common(op, where, views))

    # build the best candidate's adapter on every rank; drop it everywhere if any rank cannot
    adapter = None
    while candidates:
        name = candidates[0]
        spec = selector.manifest.by_name[name]
        known = selector.unavailable_reason(name, full)
        if known is not None:
            adapter, reason = None, known.removeprefix(UNAVAILABLE)
        else:
            install = selector.manifest.solutions[spec.solution].install
            adapter, reason, per_request = build(spec, full, _resolve(), install)
            if reason is not None:
                selector.mark_unavailable(name, UNAVAILABLE + reason, full if per_request else None)
        outcomes = _gather(reason, group)
        failed = [(v["rank"], r) for v, r in zip(views, outcomes) if r is not None]
        if not failed:
            break
        dropped[name] = "unavailable on " + "; ".join(f"rank {r}: {why}" for r, why in failed)
        candidates.pop(0)
        adapter = None
    if not candidates:
        lines = [f"  {n}: {dropped[n]}" for n in views[0]["eligible"]]
        raise GroupSelectionError(
            f"no kernel for {op} eligible on all {where} can be used on every rank\n"
            f"request: {_describe(views[0])}\n" + "\n".join(lines)
        )

    # this rank's selection: its own verdicts, with the kernels other ranks lack rejected and why
    agreed = selector._solve(full, {n: r for n, r in dropped.items() if n in view["eligible"]})
    by_name = selector.manifest.by_name
    first = views[0]
    if len(candidates) == 1:
        why = f"only kernel eligible and usable on all {world} ranks"
    else:
        why = f"best of {len(candidates)} kernels eligible on all {world} ranks, in rank {first['rank']}'s order"
    if local.forced_by:
        why = f"forced by {local.forced_by} on every rank"
    selection = dataclasses.replace(
        agreed, kernel=by_name[candidates[0]], eligible=tuple(by_name[n] for n in candidates), why=why,
        group=f"the {world} ranks of its process group", _adapter=[adapter], _fallback=[],
    )
    return selection


def _resolve():
    from selector import selection

    return selection._adapter_class


def _describe(view: dict) -> str:
    return " ".join(f"{k}={'true' if v is True else v}" for k, v in view["request"].items())


def _no_common(op: str, where: str, views: list[dict]) -> str:
    """The error every rank raises when no kernel is eligible on all of them (same text everywhere)."""
    empty = [v for v in views if not v["eligible"]]
    if empty:
        head = f"no kernel for {op} is eligible on every rank of {where}: {_ranks(empty)} " \
               f"{'has' if len(empty) == 1 else 'have'} no eligible kernel"
    else:
        head = f"no kernel for {op} is eligible on every rank of {where}: the ranks' eligible kernels do not overlap"
    lines = [head, f"request: {_describe(views[0])}"]
    anywhere = [n for n in dict.fromkeys(n for v in views for n in v["eligible"])]
    for v in views:
        eligible = ", ".join(v["eligible"]) or "none"
        lines.append(f"  rank {v['rank']} ({v['arch']}; {v['platform']}): eligible {eligible}")
        for name in anywhere:
            if name not in v["eligible"]:
                lines.append(f"      {name}: {'; '.join(v['rejected'].get(name, ['not eligible']))}")
        if not v["eligible"] and not anywhere:
            for name, reasons in v["rejected"].items():
                lines.append(f"      {name}: {'; '.join(reasons)}")
    return "\n".join(lines)
