"""One kernel for every rank of a process group: ``select_kernel(req, group=pg)``.

Ranks of one engine can sit on different machines: one node without
FlashInfer, one whose FlashInfer does not import, a different perf table.
Choosing locally would then make ranks run different kernels (different
numerics, KV-cache settings, CUDA-graph behaviour).  With ``group`` the
choice is a collective, made identically on every rank from gathered facts:

1. every rank solves the request locally (its own platform, overrides,
   recorded unavailable kernels) -- never raising before the collective, so
   a rank with a bad request cannot leave the others waiting;
2. ``all_gather_object`` shares each rank's ``RankView``: its ranked eligible
   kernels, its reasons for the others, its platform, manifest digest and
   request;
3. every rank decides the same way from the same views (``agree``, pure):
   the group must be coherent (one manifest, one request up to the arch,
   one forced kernel), and the candidates are the kernels eligible on
   **every** rank, in the order of the group's first rank (its perf table
   and priorities decide: ranks with different perf tables would otherwise
   disagree);
4. every rank builds the best candidate's adapter and the outcome is
   gathered again; if any rank cannot build it, it is dropped everywhere
   (``GroupDecision.drop``) and the next one is tried;
5. every rank returns a ``Selection`` of that kernel, whose rejected list
   says which rank lacked each dropped kernel and why -- or every rank
   raises the same ``GroupSelectionError`` naming the ranks without a
   candidate and their reasons.

The decision (``RankView``, ``agree``, ``GroupDecision``) is plain data and
pure functions, testable without processes.  The collective
(``select_in_group``) is thin: it gathers, builds, and talks to the local
selector only through ``GroupMember``, a protocol of public methods that
``Selector`` implements.  The Selector caches the agreed selection per
(request, group): later identical calls communicate nothing.  It is a
collective, so call it on every rank in the same order, from one thread per
rank.  ``torch.distributed`` is imported only here, only when ``group`` is
given.

NCCL: ``all_gather_object`` on an NCCL group moves the pickled objects
through the current CUDA device, so call ``torch.cuda.set_device(local_rank)``
first -- or, better, pass a CPU group made once at start-up:
``dist.new_group(backend="gloo")``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Protocol, Sequence

from registry.errors import KernelselError, RequestError, brief
from selector.availability import UNAVAILABLE
from selector.request import KernelRequest
from selector.selection import Selection

if TYPE_CHECKING:
    from registry.schema import Manifest
    from selector.platform import Platform


class GroupSelectionError(KernelselError, LookupError):
    """The ranks of a process group cannot agree on a kernel; the same message on every rank."""


# ------------------------------------------------------------------ the decision (pure)


@dataclass(frozen=True)
class RankView:
    """What one rank tells the others: plain data, pickled by ``all_gather_object``."""

    rank: int
    op: str
    platform: str  # the machine without its arch (shown apart): device and libraries
    manifest: str  # "<path> (sha <digest>)"
    arch: str = "unknown arch"
    request: tuple[tuple[str, Any], ...] = ()  # the request's given fields, without arch and kernel
    forced: Optional[str] = None  # the kernel forced on this rank
    kernels: tuple[str, ...] = ()  # every kernel of the op, in manifest order
    eligible: tuple[str, ...] = ()  # ranked
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()  # kernel -> every reason, for the others
    error: Optional[str] = None  # the local selection failed: "Type: message"

    @property
    def where(self) -> str:
        return f"rank {self.rank} ({self.arch}; {self.platform})"

    def reasons(self, kernel: str) -> tuple[str, ...]:
        """Why ``kernel`` is not eligible on this rank."""
        return dict(self.rejected).get(kernel, ("not eligible",))

    def describe_request(self) -> str:
        return " ".join(f"{k}={'true' if v is True else v}" for k, v in self.request)


@dataclass(frozen=True)
class GroupDecision:
    """The kernels every rank can run, in the group's order, and why each other one cannot run everywhere.

    Made by ``agree`` and narrowed by ``drop``; identical on every rank
    because it is computed from the gathered views only.
    """

    views: tuple[RankView, ...]
    candidates: tuple[str, ...]  # best first; the forced kernel alone when one is forced
    dropped: tuple[tuple[str, str], ...] = ()  # kernel -> why it cannot run on every rank
    forced: Optional[str] = None

    @property
    def world(self) -> int:
        return len(self.views)

    @property
    def where(self) -> str:
        return f"a {self.world}-rank process group"

    @property
    def best(self) -> str:
        return self.candidates[0]

    def drop(self, kernel: str, failures: Sequence[tuple[int, str]]) -> "GroupDecision":
        """This decision without ``kernel``, whose adapter failed on the ``(rank, reason)`` ranks.

        Raises ``GroupSelectionError`` when no candidate is left.
        """
        why = "unavailable on " + "; ".join(f"rank {r}: {reason}" for r, reason in failures)
        left = replace(self, candidates=tuple(n for n in self.candidates if n != kernel),
                       dropped=self.dropped + ((kernel, why),))
        if not left.candidates:
            dropped = dict(left.dropped)
            first = self.views[0]
            lines = [f"  {n}: {dropped[n]}" for n in first.eligible]
            raise GroupSelectionError(
                f"no kernel for {first.op} eligible on all {self.where} can be used on every rank\n"
                f"request: {first.describe_request()}\n" + "\n".join(lines)
            )
        return left

    def rejections(self, eligible: Sequence[str]) -> dict[str, str]:
        """Why each of a rank's ``eligible`` kernels was dropped: the reasons its agreed selection shows."""
        dropped = dict(self.dropped)
        return {n: dropped[n] for n in eligible if n in dropped}

    def why(self, forced_by: Optional[str] = None) -> str:
        """The agreed selection's one sentence (``forced_by``: this rank's ``Selection.forced_by``)."""
        if forced_by:
            return f"forced by {forced_by} on every rank"
        if len(self.candidates) == 1:
            return f"only kernel eligible and usable on all {self.world} ranks"
        return (f"best of {len(self.candidates)} kernels eligible on all {self.world} ranks, "
                f"in rank {self.views[0].rank}'s order")


def agree(views: Sequence[RankView]) -> GroupDecision:
    """The kernels every rank can run, in the first rank's order; or GroupSelectionError (same text everywhere).

    Pure: the same views give the same decision on every rank.
    """
    views = tuple(views)
    first = views[0]
    where = f"a {len(views)}-rank process group"
    problem = _incoherent(views)
    if problem:
        raise GroupSelectionError(f"cannot select a kernel for {first.op} in {where}:\n{problem}")
    dropped: dict[str, str] = {}
    for name in first.kernels:
        missing = [f"rank {v.rank}: {v.reasons(name)[0]}" for v in views if name not in v.eligible]
        if missing and any(name in v.eligible for v in views):
            dropped[name] = "not eligible on " + "; ".join(missing)
    forced = first.forced
    if forced is not None:  # the same on every rank (checked above): it runs everywhere or nowhere
        lacking = [v for v in views if forced not in v.eligible]
        if lacking:
            lines = [f"  {v.where}: {'; '.join(v.reasons(forced))}" for v in lacking]
            raise GroupSelectionError(
                f"kernel {forced} (forced on every rank) is not eligible on {_ranks(lacking)} of {where}\n"
                f"request: {first.describe_request()}\n" + "\n".join(lines)
            )
        candidates: tuple[str, ...] = (forced,)
    else:
        candidates = tuple(n for n in first.eligible if n not in dropped)
    if not candidates:
        raise GroupSelectionError(_no_common(where, views))
    return GroupDecision(views=views, candidates=candidates, dropped=tuple(dropped.items()), forced=forced)


def _ranks(views: Sequence[RankView]) -> str:
    return ", ".join(f"rank {v.rank}" for v in views)


def _incoherent(views: Sequence[RankView]) -> Optional[str]:
    """Why the ranks' inputs cannot be compared (same text on every rank), or None."""
    failed = [v for v in views if v.error is not None]
    if failed:
        return "\n".join(f"  {v.where}: {v.error}" for v in failed)
    shown = {"manifest": lambda v: v.manifest, "request": RankView.describe_request,
             "forced": lambda v: v.forced or "none"}
    for key, what in (("manifest", "manifests"), ("request", "requests (the arch may differ)"),
                      ("forced", "forced kernels")):
        values: dict[str, list[RankView]] = {}
        for v in views:
            values.setdefault(shown[key](v), []).append(v)
        if len(values) > 1:
            lines = [f"  {_ranks(vs)}: {text}" for text, vs in values.items()]
            return f"the ranks use different {what}:\n" + "\n".join(lines)
    return None


def _no_common(where: str, views: Sequence[RankView]) -> str:
    """The error every rank raises when no kernel is eligible on all of them (same text everywhere)."""
    op = views[0].op
    empty = [v for v in views if not v.eligible]
    if empty:
        head = f"no kernel for {op} is eligible on every rank of {where}: {_ranks(empty)} " \
               f"{'has' if len(empty) == 1 else 'have'} no eligible kernel"
    else:
        head = f"no kernel for {op} is eligible on every rank of {where}: the ranks' eligible kernels do not overlap"
    lines = [head, f"request: {views[0].describe_request()}"]
    anywhere = list(dict.fromkeys(n for v in views for n in v.eligible))
    for v in views:
        lines.append(f"  {v.where}: eligible {', '.join(v.eligible) or 'none'}")
        for name in anywhere:
            if name not in v.eligible:
                lines.append(f"      {name}: {'; '.join(v.reasons(name))}")
        if not v.eligible and not anywhere:
            for name, reasons in v.rejected:
                lines.append(f"      {name}: {'; '.join(reasons)}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the collective (thin)


class GroupMember(Protocol):
    """What a group selection asks of this rank's selector (``Selector`` implements it, all public)."""

    manifest: "Manifest"
    platform: "Platform"

    def complete(self, request: KernelRequest) -> KernelRequest:
        """``request`` with this rank's arch filled in (may raise: no GPU detected)."""

    def solve(self, request: KernelRequest) -> Selection:
        """This rank's own selection for ``request`` (may raise: the error is shared with the other ranks)."""

    def forced_kernel(self, request: KernelRequest) -> Optional[str]:
        """The kernel forced for ``request`` on this rank, or None."""

    def build_adapter(self, kernel: str, request: KernelRequest) -> tuple[Any, Optional[str]]:
        """``(adapter, None)`` or ``(None, why not)``, recorded; never a fallback to another kernel."""

    def solve_excluding(self, request: KernelRequest, excluded: dict[str, str]) -> Selection:
        """A fresh selection with the ``excluded`` kernels rejected for the reasons given."""


def rank_view(member: GroupMember, request: KernelRequest, rank: int) -> tuple[RankView, Optional[Selection]]:
    """This rank's view (and its local selection, None when that failed); never raises."""
    manifest = f"{member.manifest.path} (sha {member.manifest.digest})"
    arch = RankView.arch
    try:
        full = member.complete(request)
        arch = full.arch.value
        local = member.solve(full)
    except Exception as exc:  # noqa: BLE001 - reported to every rank instead of leaving them waiting
        return RankView(rank=rank, op=request.op.value, platform=_machine(member.platform), manifest=manifest,
                        arch=arch, error=f"{type(exc).__name__}: {exc}"), None
    view = RankView(
        rank=rank, op=request.op.value, platform=_machine(local.platform), manifest=manifest, arch=arch,
        request=tuple((k, v) for k, v in full.given().items() if k not in ("arch", "kernel")),
        forced=member.forced_kernel(request),
        kernels=tuple(v.kernel.name for v in local.verdicts),
        eligible=tuple(k.name for k in local.eligible),
        rejected=tuple((v.kernel.name, v.reasons) for v in local.rejected),
    )
    return view, local


def _machine(platform: Any) -> str:
    """The platform without its arch (shown apart): device and libraries."""
    text = platform.describe()
    return text[text.index("(") + 1 : -1] if "(" in text else text


def _gather(obj: Any, group: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_group(group: Any) -> None:
    """RequestError unless ``group`` is a process group of an initialised torch.distributed."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise GroupSelectionError(
            "group= needs an initialised torch.distributed (dist.init_process_group) and one of its process groups"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise RequestError(f"group= takes a torch.distributed process group (dist.new_group(backend='gloo'), "
                           f"dist.group.WORLD), got {type(group).__name__} {brief(group)}")


def fail_in_group(op: Any, error: BaseException, group: Any) -> NoReturn:
    """This rank could not even build its request (or its selector): tell the other ranks, which are waiting in the
    collective, and raise the GroupSelectionError every rank raises (it names this rank and ``error``)."""
    import torch.distributed as dist

    check_group(group)
    view = RankView(rank=dist.get_rank(), op=str(getattr(op, "value", op) or "its op"),
                    platform="its request or selector failed", manifest="none", error=f"{type(error).__name__}: {error}")
    agree(_gather(view, group))  # a failed view: raises on every rank
    raise GroupSelectionError(f"rank {view.rank}: {view.error}")  # not reached


def select_in_group(member: GroupMember, request: KernelRequest, group: Any) -> Selection:
    """The selection every rank of ``group`` adopts (a collective: call it on every rank)."""
    import torch.distributed as dist

    check_group(group)
    view, local = rank_view(member, request, dist.get_rank())
    decision = agree(_gather(view, group))

    # build the best candidate's adapter on every rank; drop it everywhere if any rank cannot
    while True:
        adapter, reason = member.build_adapter(decision.best, request)
        reason = reason.removeprefix(UNAVAILABLE) if reason is not None else None
        outcomes = _gather(reason, group)
        failures = [(v.rank, r) for v, r in zip(decision.views, outcomes) if r is not None]
        if not failures:
            break
        decision = decision.drop(decision.best, failures)

    # this rank's selection: its own verdicts, with the kernels other ranks lack rejected and why
    agreed = member.solve_excluding(request, decision.rejections(view.eligible))
    ranked = [member.manifest.by_name[n] for n in decision.candidates]
    return Selection.agreed(agreed, ranked, decision.why(local.forced_by), f"the {decision.world} ranks of its process group",
                            adapter)
