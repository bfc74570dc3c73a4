"""kernelsel's selector: requests, the solver, explain, the attention plan and the CLI.

Importing it is free: no torch, flashinfer or triton, no GPU probe, no
environment read, no manifest load.  Those happen on first ``select_kernel``.
"""

from registry.errors import KernelselError, ManifestError, RequestError
from selector.api import Selector, default_selector, reset, select_kernel
from selector.distributed import GroupSelectionError
from selector.overrides import Overrides
from selector.plan import AttentionPlan, select_plan
from selector.platform import Platform
from selector.request import KernelRequest
from selector.selection import KernelUnavailableError, NoKernelError, Selection, Verdict
from selector.solver import reasons, solve

__all__ = [
    "AttentionPlan",
    "GroupSelectionError",
    "KernelRequest",
    "KernelUnavailableError",
    "KernelselError",
    "ManifestError",
    "NoKernelError",
    "Overrides",
    "Platform",
    "RequestError",
    "Selection",
    "Selector",
    "Verdict",
    "default_selector",
    "reasons",
    "reset",
    "select_kernel",
    "select_plan",
    "solve",
]
