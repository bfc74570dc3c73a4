"""Whether a perf table fits a manifest: every kernel it names exists for the entry's op, and every bucket is
one that some request falls into.

A table is validated on its own when loaded (``registry.perf``); these checks need the manifest and the
request model, so they run where a table given by the user meets them (``--perf``, ``KERNELSEL_PERF``).
Either mistake is silent otherwise: a misspelt kernel name or a bucket no request can produce (a missing
``kv_dtype``, which every request has) simply never ranks anything.
"""

from __future__ import annotations

from registry.errors import RequestError
from registry.perf import PERF_KEY, PerfTable, request_key
from registry.schema import Manifest
from registry.vocab import did_you_mean
from selector.request import KernelRequest


def perf_table_problems(table: PerfTable, manifest: Manifest) -> list[str]:
    """Every problem of ``table`` against ``manifest``, each ``file:line:col: path: message``; [] when it fits."""
    names = list(manifest.by_name)
    out = []
    for i, entry in enumerate(table.entries):
        for times in ("median_us", "tbps"):
            for name in getattr(entry, times):
                spec = manifest.by_name.get(name)
                if spec is None:
                    problem = f"no kernel named {name!r} in {manifest.path or 'the manifest'}{did_you_mean(name, names)}"
                elif spec.op is not entry.op:
                    problem = f"kernel {name!r} implements {spec.op.value}, not {entry.op.value}"
                else:
                    continue
                out.append(table.located(("entries", i, times, name), problem))
        out += bucket_problems(table, i)
    return out


def bucket_problems(table: PerfTable, i: int) -> list[str]:
    """Why no request falls into entry ``i``'s bucket (its fields refused, or fields every such request has)."""
    entry = table.entries[i]
    try:
        request = KernelRequest(op=entry.op, arch=table.arch, **entry.shape)
    except RequestError as exc:
        out = []
        for problem in exc.problems:
            field, _, message = problem.partition(": ")
            name = field.removeprefix("request.")
            where = ("entries", i, "shape", name) if name in entry.shape else ("entries", i, "shape")
            out.append(table.located(where, f"no request has this bucket: {message or problem}"))
        return out
    key = request_key(entry.op, request)
    if key == entry.key:
        return []
    differ = [(name, value, given) for name, value, given in zip(("op",) + PERF_KEY, key, entry.key) if value != given]
    verb = "add" if all(given is None for _, _, given in differ) else "write"
    return [table.located(("entries", i, "shape"), f"no request has this bucket: every request with these fields has "
                                                   f"{', '.join(f'{n}: {v}' for n, v, _ in differ)}; {verb} "
                                                   f"{'it' if len(differ) == 1 else 'them'} in the shape")]

