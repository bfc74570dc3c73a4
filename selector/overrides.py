"""Environment overrides, read in one place, once per default selector, and shown by explain.

* ``KERNELSEL_MANIFEST=PATH``        another manifest, or an overlay (``base: bundled``)
* ``KERNELSEL_FORCE_<OP>=NAME``      force a kernel for one op, e.g. KERNELSEL_FORCE_MLA_DECODE
* ``KERNELSEL_DISABLE=NAME,NAME``    remove kernels from consideration
* ``KERNELSEL_PERF=PATH|off``        rank by this perf table, or by priority only (default: the
                                     committed table matching the current GPU, when there is one)
* ``KERNELSEL_TUNE=1``               tune buckets no perf table measured, on first use (``selector.tuning``)
* ``KERNELSEL_PREDICT=off``          rank only by times measured in the request's own perf bucket
                                     (default ``on``: predict the others from the table's other buckets)
* ``KERNELSEL_ADAPTER_ALLOWLIST=PREFIX,...``  packages besides registry.adapters whose classes a
                                     manifest's ``adapter:`` may name (read by ``load_manifest``; shown here)
* ``KERNELSEL_CACHE_SIZE=N``         how many selections the default selector keeps (default 4096);
                                     changes memory, never a choice, so explain does not show it
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from registry.errors import RequestError
from registry.adapter_policy import ENV_ADAPTER_ALLOWLIST
from registry.vocab import Op, did_you_mean

if TYPE_CHECKING:
    from registry.schema import Manifest

PREFIX_FORCE = "KERNELSEL_FORCE_"
ENV_MANIFEST = "KERNELSEL_MANIFEST"
ENV_DISABLE = "KERNELSEL_DISABLE"
ENV_PERF = "KERNELSEL_PERF"
ENV_PREDICT = "KERNELSEL_PREDICT"
ENV_TUNE = "KERNELSEL_TUNE"
ENV_CACHE_SIZE = "KERNELSEL_CACHE_SIZE"
_SWITCH = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


@dataclass(frozen=True)
class Overrides:
    manifest: Optional[str] = None
    force: tuple[tuple[Op, str], ...] = ()
    disable: frozenset[str] = frozenset()
    perf: Optional[str] = None
    adapter_allowlist: tuple[str, ...] = ()
    predict: bool = True
    tune: bool = False
    cache_size: Optional[int] = None  # None: the Selector's default

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Overrides":
        """The overrides in ``environ``, read key by key: another thread may change the environment meanwhile
        (iterating ``os.environ.items()`` raises KeyError when a variable goes away under it)."""
        force = []
        for key in sorted(k for k in list(environ) if k.startswith(PREFIX_FORCE)):
            value = environ.get(key)
            if value is None or not value.strip():  # unset since the keys were listed, or empty
                continue
            op_text = key[len(PREFIX_FORCE):].lower()
            if op_text not in Op.values():
                raise RequestError(
                    f"{key}: {op_text!r} is not an op{did_you_mean(op_text, Op.values())}; "
                    f"use one of: {', '.join(PREFIX_FORCE + o.upper() for o in Op.values())}"
                )
            force.append((Op(op_text), value.strip()))
        disable = frozenset(n.strip() for n in environ.get(ENV_DISABLE, "").split(",") if n.strip())
        allow = tuple(p.strip() for p in environ.get(ENV_ADAPTER_ALLOWLIST, "").split(",") if p.strip())
        predict = _switch(environ, ENV_PREDICT, True)
        tune = _switch(environ, ENV_TUNE, False)
        size = environ.get(ENV_CACHE_SIZE, "").strip()
        if size and not (size.isascii() and size.isdigit() and len(size) <= 18 and int(size) >= 1):
            raise RequestError(f"{ENV_CACHE_SIZE}: {size[:40]!r} is not a whole number of selections >= 1 (e.g. 4096)")
        return cls(manifest=environ.get(ENV_MANIFEST) or None, force=tuple(force), disable=disable,
                   perf=environ.get(ENV_PERF) or None, adapter_allowlist=allow, predict=predict, tune=tune,
                   cache_size=int(size) if size else None)

    def problems(self, manifest: "Manifest") -> list[str]:
        """Why these overrides cannot apply to ``manifest`` (a name it lacks, a kernel of another op); [] if none.

        With any of these, every selection of the affected ops fails: the solver raises them, and
        ``kernelsel doctor`` reports them (exit 1).
        """
        out = [f"{ENV_DISABLE}: no kernel named {name!r}{did_you_mean(name, list(manifest.by_name))}"
               for name in sorted(self.disable) if name not in manifest.by_name]
        for op, name in self.force:
            problem = forced_kernel_problem(manifest, op, name, self.forced_by(op) or name)
            if problem:
                out.append(problem)
        return out

    def forced(self, op: Op) -> Optional[str]:
        for forced_op, name in self.force:
            if forced_op is op:
                return name
        return None

    def forced_by(self, op: Op) -> Optional[str]:
        """``KERNELSEL_FORCE_<OP>=NAME`` when a kernel is forced for ``op`` by the environment, else None."""
        name = self.forced(op)
        return f"{PREFIX_FORCE}{op.value.upper()}={name}" if name is not None else None

    def applied(self, op: Op) -> list[str]:
        """The overrides that touch ``op``, as ``VAR=value`` lines for explain."""
        lines = []
        if self.manifest:
            lines.append(f"{ENV_MANIFEST}={self.manifest}")
        forced = self.forced_by(op)
        if forced:
            lines.append(forced)
        if self.disable:
            lines.append(f"{ENV_DISABLE}={','.join(sorted(self.disable))}")
        if self.perf:
            lines.append(f"{ENV_PERF}={self.perf}")
        if not self.predict:
            lines.append(f"{ENV_PREDICT}=off")
        if self.tune:
            lines.append(f"{ENV_TUNE}=on")
        if self.adapter_allowlist:
            lines.append(f"{ENV_ADAPTER_ALLOWLIST}={','.join(self.adapter_allowlist)}")
        return lines


def _switch(environ: Mapping[str, str], name: str, default: bool) -> bool:
    """An on/off variable: on, off, 1, 0, true, false (any case); unset or empty is ``default``."""
    text = environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in _SWITCH:
        raise RequestError(f"{name}: {environ[name]!r} is not a switch; use on or off (1/0, true/false)")
    return _SWITCH[text]


def forced_kernel_problem(manifest: "Manifest", op: Op, name: str, forced_by: str) -> Optional[str]:
    """Why ``name`` cannot be forced for ``op`` (not in the manifest, or a kernel of another op), or None."""
    spec = manifest.by_name.get(name)
    if spec is None:
        return (f"{forced_by}: no kernel named {name!r}{did_you_mean(name, list(manifest.by_name))}; "
                f"kernels for {op.value}: {', '.join(k.name for k in manifest.by_op[op])}")
    if spec.op is not op:
        return f"{forced_by}: kernel {name!r} implements {spec.op.value}, not {op.value}"
    return None
