"""Perf tables: measured kernel times per request bucket, on one GPU model, as reviewable data.

A perf table lives in ``perf/<gpu>-<arch>.yaml`` and is validated like the
manifest (strict pydantic models, ``file:line:col`` errors through
``registry.loader``).  Each entry is one request bucket -- the op plus the
request fields in ``PERF_KEY`` (``batch_size``, ``kv_len`` and ``new_len`` are
bucketed to powers of two by the request) -- and the median time of every
kernel that was eligible and measured there.  Lookups are one dict hit.

``new_len`` (new tokens per request) is part of an ``mha_extend`` /
``mha_prefill`` bucket: a few new tokens over a long cache and a long chunk
over a short one read the same cache but favour different kernels (FA2 against
FA3 by up to 4x on an H200).  Decode ops carry theirs as ``q_len``.

Measured times only *rank* eligible kernels: a perf entry never makes an
ineligible kernel eligible (the solver checks eligibility first).
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Annotated, Any, Callable, Optional, TypeVar

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from registry.errors import brief
from registry.ops import RAGGED_OPS
from registry.schema import Int, StrictModel
from registry.vocab import Arch, DType, Op, did_you_mean, parse_arch

PERF_KEY: tuple[str, ...] = (
    "q_dtype", "kv_dtype", "head_dim_qk", "head_dim_vo", "num_qo_heads", "num_kv_heads",
    "page_size", "q_len", "kv_lora_rank", "qk_rope_head_dim", "topk", "batch_size", "kv_len", "new_len",
)
"""Request fields that identify a perf bucket (features are not part of it: they decide eligibility)."""

BUCKETED = ("batch_size", "kv_len", "new_len")
"""Sizes a request rounds up to a power of two, so nearby shapes share a bucket."""

_DTYPE_KEYS = ("q_dtype", "kv_dtype")
_DERIVED_LOCK = threading.Lock()
T = TypeVar("T")


def bucket(n: Optional[int]) -> Optional[int]:
    """The power-of-two bucket of a batch size or KV length (next power of two, at least 1).

    A bucket is its own bucket, the same int object: a request built from
    another's values (the selector's completed request) shares its numbers.
    """
    if n is None:
        return None
    n = int(n)
    if n <= 1:
        return 1
    return n if n & (n - 1) == 0 else 1 << (n - 1).bit_length()


def _number(value: Any) -> Any:
    """A time or a bandwidth as written: a number, not a quoted '12' or a true."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {brief(value)}")
    return value


Number = Annotated[float, BeforeValidator(_number)]


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def request_key(op: Any, fields: Any) -> tuple:
    """The lookup key of a request (or of a mapping of its fields)."""
    get = fields.get if isinstance(fields, dict) else (lambda f: getattr(fields, f, None))
    return (_plain(op),) + tuple(_plain(get(f)) for f in PERF_KEY)


class PerfEntry(StrictModel):
    """One request bucket and the median time of each kernel measured there."""

    op: Op
    shape: dict[str, Any] = Field(description="request fields from PERF_KEY identifying the bucket")
    median_us: dict[str, Number] = Field(min_length=1, description="kernel name -> median time in microseconds")
    tbps: dict[str, Number] = Field(default_factory=dict, description="kernel name -> achieved KV bandwidth, TB/s")

    @field_validator("shape")
    @classmethod
    def _known(cls, shape: dict[str, Any]) -> dict[str, Any]:
        """Known fields with values of the request's types: a bucket that no request can match is an error."""
        for key, value in shape.items():
            if key not in PERF_KEY:
                raise ValueError(f"unknown shape field {brief(key)}{did_you_mean(str(key), list(PERF_KEY))}; "
                                 f"expected some of: {', '.join(PERF_KEY)}")
            if value is None:  # the same as leaving the key out, which is what to write
                raise ValueError(f"{key}: no value; leave the key out for a bucket without it")
            if key in _DTYPE_KEYS:
                if not isinstance(value, str) or value not in DType.values():
                    raise ValueError(f"{key}: {brief(value)} is not one of {', '.join(DType.values())}"
                                     f"{did_you_mean(str(value), DType.values()) if isinstance(value, str) else ''}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}: {brief(value)} is not a non-negative integer")
            elif key in BUCKETED and bucket(value) != value:
                raise ValueError(f"{key} {value} is not a bucket (a power of two); use {bucket(value)}")
        return shape

    @model_validator(mode="after")
    def _new_tokens(self) -> "PerfEntry":
        """Ragged ops' buckets carry their new tokens per request; decode ops carry them as q_len."""
        given = self.shape.get("new_len") is not None
        if self.op in RAGGED_OPS and not given:
            raise ValueError(
                f"shape: an {self.op.value} bucket needs new_len (new tokens per request, a power of two), which "
                "decides between kernels; a table recorded before new_len was part of the bucket must be "
                "re-recorded (kernelsel bench, or bench/regret.py --record)"
            )
        if self.op not in RAGGED_OPS and given:
            raise ValueError(f"shape.new_len: means nothing for {self.op.value} (its new tokens per request are q_len)")
        return self

    @field_validator("median_us")
    @classmethod
    def _positive(cls, times: dict[str, float]) -> dict[str, float]:
        for name, t in times.items():
            if not (t > 0 and math.isfinite(t)):
                raise ValueError(f"median_us[{name}]: {t} is not a positive time (finite microseconds > 0)")
        return times

    @field_validator("tbps")
    @classmethod
    def _bandwidth(cls, rates: dict[str, float]) -> dict[str, float]:
        for name, r in rates.items():
            if not (r >= 0 and math.isfinite(r)):
                raise ValueError(f"tbps[{name}]: {r} is not a non-negative, finite bandwidth")
        return rates

    @property
    def key(self) -> tuple:
        return request_key(self.op, self.shape)


class PerfTable(StrictModel):
    """Measured times on one GPU model and arch."""

    schema_version: Int = Field(1, ge=1, le=1)
    gpu: str = Field(min_length=1, description="torch.cuda.get_device_name(), e.g. 'NVIDIA H200'")
    arch: Arch
    software: dict[str, str] = Field(default_factory=dict, description="library versions when measured")
    method: str = Field(default="", description="how times were taken (events, warm-up, repeats, L2 flush)")
    recorded: str = Field(default="", description="when (ISO date)")
    entries: tuple[PerfEntry, ...] = ()

    _path: str = ""
    _derived: dict = PrivateAttr(default_factory=dict)
    _marks: Any = None  # registry.yaml_reader.Marks of the file it was read from, to locate later problems

    @field_validator("arch", mode="before")
    @classmethod
    def _arch(cls, v: Any) -> Any:
        return parse_arch(v)

    @model_validator(mode="after")
    def _unique(self) -> "PerfTable":
        seen: dict[tuple, int] = {}
        for i, e in enumerate(self.entries):
            if e.key in seen:
                raise ValueError(f"entries[{i}]: the same bucket as entries[{seen[e.key]}]")
            seen[e.key] = i
        return self

    @functools.cached_property
    def by_key(self) -> dict[tuple, PerfEntry]:
        return {e.key: e for e in self.entries}

    def lookup(self, request: Any) -> Optional[PerfEntry]:
        """The entry for the request's bucket, or None (one dict lookup)."""
        return self.by_key.get(request_key(request.op, request))

    @property
    def path(self) -> str:
        return self._path

    def derived(self, name: str, build: Callable[["PerfTable"], T]) -> T:
        """``build(self)``, computed once per table and kept with it (e.g. a model fitted to its entries).

        A table is immutable, so what is derived from it never goes stale.  Thread-safe.
        """
        with _DERIVED_LOCK:
            if name not in self._derived:
                self._derived[name] = build(self)
            return self._derived[name]

    def located(self, loc: tuple, message: str) -> str:
        """``file:line:col: path: message`` for a problem found after loading (e.g. against a manifest)."""
        from registry.yaml_reader import Marks, located

        return located(self._marks or Marks(None), self._path or "perf table", loc, message)

    def matches(self, gpu: str, arch: Optional[Arch]) -> bool:
        return self.arch is arch and (not gpu or gpu == self.gpu)


# ------------------------------------------------------------------ writing tables


HEADER = """\
# kernelsel perf table: median time per request bucket of every eligible kernel on one GPU model.
# Written by `kernelsel bench` (merged bucket by bucket, kernel by kernel); review diffs like code.
# Times only rank kernels the manifest already declares eligible (registry/perf.py).
"""


def entry_data(request: Any, times: dict[str, float], tbps: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """One entry as plain data: the request's bucket (``PERF_KEY`` fields it sets) and its kernels' medians."""
    shape = {f: _plain(getattr(request, f)) for f in PERF_KEY if getattr(request, f, None) is not None}
    return {"op": _plain(request.op), "shape": shape,
            "median_us": {k: round(float(v), 3) for k, v in times.items()},
            "tbps": {k: float(f"{v:.4g}") for k, v in (tbps or {}).items()}}


def merge_entries(existing: Optional["PerfTable"], new: Any) -> list[dict[str, Any]]:
    """``existing``'s entries updated kernel by kernel with ``new`` ones (``entry_data``), new buckets added.

    Sorted by op and shape, so a re-recorded table diffs bucket by bucket.
    """
    by_key: dict[tuple, dict[str, Any]] = {}
    for e in existing.entries if existing is not None else ():
        data = e.model_dump(mode="json")
        by_key[e.key] = {"op": data["op"], "shape": data["shape"], "median_us": dict(data["median_us"]),
                         "tbps": dict(data["tbps"])}
    for item in new:
        key = request_key(item["op"], item["shape"])
        old = by_key.setdefault(key, {"op": item["op"], "shape": item["shape"], "median_us": {}, "tbps": {}})
        old["median_us"].update(item["median_us"])
        for name in item["median_us"]:
            old["tbps"].pop(name, None)
        old["tbps"].update(item.get("tbps") or {})

    def order(pair: tuple[tuple, dict]) -> tuple:
        return tuple((v is not None, v if v is not None else 0) for v in pair[0])

    out = []
    for _, e in sorted(by_key.items(), key=order):
        e = dict(e, median_us=dict(sorted(e["median_us"].items())), tbps=dict(sorted(e["tbps"].items())))
        if not e["tbps"]:
            del e["tbps"]
        out.append(e)
    return out


def table_text(*, gpu: str, arch: Any, software: dict[str, str], method: str, recorded: str,
               entries: list[dict[str, Any]], header: str = HEADER) -> str:
    """A perf table's YAML text (``header`` comment first)."""
    import yaml

    data = {"schema_version": 1, "gpu": gpu, "arch": _plain(arch),
            "software": {str(k): str(v) for k, v in sorted(software.items())}, "method": method,
            "recorded": recorded, "entries": entries}
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)


def gpu_slug(gpu: str) -> str:
    """A file-name form of a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    words = "".join(c if c.isalnum() else " " for c in gpu.lower()).split()
    return "-".join(words) or "gpu"


def overlay(base: Optional[PerfTable], top: Optional[PerfTable]) -> Optional[PerfTable]:
    """One table: ``base``'s buckets with ``top``'s times over them kernel by kernel, and ``top``'s new buckets.

    For a committed table plus what this machine tuned (``selector.tuning``);
    its path names both.  Either may be None.
    """
    if top is None or not top.entries:
        return base
    if base is None:
        return top
    entries = tuple(PerfEntry.model_validate(e) for e in merge_entries(base, [
        {"op": e.op.value, "shape": e.shape, "median_us": e.median_us, "tbps": e.tbps} for e in top.entries]))
    table = PerfTable(gpu=base.gpu, arch=base.arch, software=base.software, method=base.method,
                      recorded=base.recorded, entries=entries)
    table._path = f"{base.path} + {top.path}"
    return table

