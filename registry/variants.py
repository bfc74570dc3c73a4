"""Launch variants: one kernel entry, several launches, one function choosing between them.

A kernel may have more than one way to launch for the same request -- the
Triton MLA decode runs a Gluon kernel on Hopper and a portable one
elsewhere.  Both compute exactly what the manifest entry declares, so the
choice is no capability (the manifest says nothing of it); it is a launch
decision that depends on the GPU, the installed libraries and the shapes.

An adapter with variants implements ``launch_variant(request, env)``
returning a ``VariantChoice``; its ``plan()`` launches what that function
chooses, and ``kernelsel explain`` shows what it chooses, so the two cannot
disagree.  The function reads the request and a ``LaunchEnv`` only, and
imports nothing heavy: explain calls it without torch or triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from registry.vocab import Arch


@dataclass(frozen=True)
class LaunchEnv:
    """What a variant decision reads besides the request: the GPU and the installed library versions.

    ``plan()`` fills it from its device and this process's libraries;
    explain from the selection's arch and platform, where ``assumed`` marks a
    hypothetical platform (``--arch``) whose library versions are not known.
    """

    arch: Optional[Arch]  # None: no CUDA device (Triton's CPU interpreter)
    versions: Mapping[str, str] = field(default_factory=dict)  # distribution or module -> version
    assumed: bool = False


@dataclass(frozen=True)
class Variant:
    """One launch of a kernel: a short name and what it runs."""

    name: str
    runs: str


@dataclass(frozen=True)
class Condition:
    """One condition of a variant: ``holds`` True, False, or None when it depends on something not known yet.

    ``text`` says what holds, or why not; ``depends_on`` names what is
    missing (a request field left unset, or a plan-time value).
    """

    text: str
    holds: Optional[bool]
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantChoice:
    """Which variant runs and why; ``variant`` None when that depends on ``depends_on``.

    ``why``: the chosen variant's conditions (all held), or, when the choice
    depends, the undecided conditions of ``candidate``, with ``otherwise``
    what runs if they fail.  ``passed_over``: each variant skipped before,
    with the conditions that failed.
    """

    variant: Optional[Variant]
    why: tuple[str, ...]
    passed_over: tuple[tuple[str, tuple[str, ...]], ...] = ()
    depends_on: tuple[str, ...] = ()
    candidate: Optional[Variant] = None
    otherwise: Optional["VariantChoice"] = None

    @property
    def name(self) -> Optional[str]:
        return self.variant.name if self.variant else None

    def describe(self) -> str:
        """One line for explain.

        ``hopper (what it runs): why; why``, ``portable (what it runs), not
        hopper: what failed``, or ``depends on X: hopper (...) if ..., else ...``.
        """
        skipped = "".join(f", not {name}: {'; '.join(texts)}" for name, texts in self.passed_over)
        if self.variant is not None:
            held = f": {'; '.join(self.why)}" if self.why else ""
            return f"{self.variant.name} ({self.variant.runs}){held}{skipped}"
        head = f"depends on {', '.join(self.depends_on)}{skipped}: "
        return (f"{head}{self.candidate.name} ({self.candidate.runs}) if {'; '.join(self.why)}, "
                f"else {self.otherwise.describe()}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runs": self.variant.runs if self.variant else None,
            "why": list(self.why),
            "passed_over": {name: list(texts) for name, texts in self.passed_over},
            "depends_on": list(self.depends_on),
            "candidate": self.candidate.name if self.candidate else None,
            "otherwise": self.otherwise.to_dict() if self.otherwise else None,
            "text": self.describe(),
        }


def choose(candidates: Sequence[tuple[Variant, Sequence[Condition]]]) -> VariantChoice:
    """The first variant whose conditions all hold (the last should have none: it always runs).

    A variant with a failed condition is passed over; one whose conditions
    hold or are undecided, at least one undecided, makes the choice depend
    on what is missing.
    """
    passed_over: list[tuple[str, tuple[str, ...]]] = []
    for i, (variant, conditions) in enumerate(candidates):
        failed = tuple(c.text for c in conditions if c.holds is False)
        if failed:
            passed_over.append((variant.name, failed))
            continue
        undecided = [c for c in conditions if c.holds is None]
        if undecided:
            missing = tuple(dict.fromkeys(d for c in undecided for d in c.depends_on))
            return VariantChoice(None, tuple(c.text for c in undecided), tuple(passed_over), missing, variant,
                                 choose(candidates[i + 1:]))
        return VariantChoice(variant, tuple(c.text for c in conditions), tuple(passed_over))
    raise ValueError("no launch variant can run: the last variant must have no conditions")
