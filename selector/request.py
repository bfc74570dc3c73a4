"""KernelRequest: what the caller needs, as a frozen, hashable value.

Field names are the manifest's constraint keys, so the solver can check a
kernel by looping over its declared constraints.  Shape fields left unset
are not checked (explain lists them); features default to "not needed".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.contracts import output_dtype
from registry.errors import RequestError, brief
from registry.ops import (FEATURE_FIELDS_BY_OP, MLA_OPS, RAGGED_OPS, SHAPE_FIELDS_BY_OP, SHAPE_MAXIMUM,
                          mla_dims_from_head_dims, shape_minimum)
from registry.perf import bucket
from registry.schema import Features, Shapes
from registry.vocab import Arch, Backend, DType, Op, Solution, did_you_mean, parse_arch, parse_dtype

MAX_INT = SHAPE_MAXIMUM
"""Largest shape a request may give (an int64); a larger one is an error, not a number to format."""


def _shape(name: str, description: str = "") -> Any:
    """An optional shape field, at least its minimum (``registry.ops.shape_minimum``) and at most an int64."""
    return Field(default=None, ge=shape_minimum(name), le=MAX_INT, description=description or None)

_GIVEN_SETS: "OrderedDict[frozenset, set]" = OrderedDict()
"""One shared set per combination of given fields: a selection cache holds thousands of requests, most alike.

At most ``_GIVEN_SETS_MAX``, the oldest dropped first, so a process that once built many combinations (a
``kernelsel diff`` over every request class, a fuzzer) still shares the sets it uses now."""
_GIVEN_SETS_MAX = 4096

BUCKETED_FIELDS: tuple[str, ...] = ("batch_size", "kv_len", "new_len")
"""Fields a request rounds up to a power of two (``registry.perf.bucket``): nearby shapes share one cache entry."""


class KernelRequest(BaseModel):
    """One attention call site's needs: op, arch, dtypes, shapes, features, restrictions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Op
    arch: Optional[Arch] = Field(default=None, description="None: detected from the current CUDA device")
    q_dtype: DType = DType.BF16
    kv_dtype: Optional[DType] = Field(default=None, description="None: same as q_dtype")
    out_dtype: Optional[DType] = Field(default=None, description="None: q_dtype (bf16 for an fp8 query)")
    head_dim_qk: Optional[int] = _shape("head_dim_qk")
    head_dim_vo: Optional[int] = _shape("head_dim_vo", "None: same as head_dim_qk")
    num_qo_heads: Optional[int] = _shape("num_qo_heads")
    num_kv_heads: Optional[int] = _shape("num_kv_heads")
    page_size: Optional[int] = _shape("page_size")
    q_len: int = Field(default=1, ge=shape_minimum("q_len"), le=MAX_INT, description="query tokens per request in one decode step")
    kv_lora_rank: Optional[int] = _shape("kv_lora_rank")
    qk_rope_head_dim: Optional[int] = _shape("qk_rope_head_dim")
    qk_nope_head_dim: Optional[int] = _shape("qk_nope_head_dim")
    topk: Optional[int] = _shape("topk")
    batch_size: Optional[int] = Field(default=None, ge=1, le=MAX_INT, description="requests in the batch, bucketed up to a power of two (perf lookup)")
    kv_len: Optional[int] = Field(default=None, ge=1, le=MAX_INT, description="longest KV length, bucketed up to a power of two (perf lookup)")
    new_len: Optional[int] = Field(default=None, ge=1, le=MAX_INT, description="new tokens per request (mha_extend, mha_prefill), bucketed up to a power of two (perf lookup)")
    sinks: bool = False
    sliding_window: bool = False
    logits_soft_cap: bool = False
    return_lse: bool = False
    non_causal: bool = False
    noncontiguous_kv: bool = False
    cuda_graph: bool = False
    solution: Optional[Solution] = Field(default=None, description="restrict to one solution")
    backend: Optional[Backend] = Field(default=None, description="restrict to one backend")
    kernel: Optional[str] = Field(default=None, description="force one kernel by name")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = _request_problems(exc)
            raise RequestError("invalid kernel request:\n  " + "\n  ".join(problems), problems) from None

    @field_validator("arch", mode="before")
    @classmethod
    def _arch(cls, v: Any) -> Any:
        return v if v is None else parse_arch(v)

    @field_validator("q_dtype", "kv_dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        return v if v is None else parse_dtype(v)

    @field_validator(*BUCKETED_FIELDS, mode="after")
    @classmethod
    def _bucket(cls, v: Optional[int]) -> Optional[int]:
        """Nearby shapes share one bucket: one cache entry and one perf-table row."""
        return bucket(v)

    @field_validator("op", "solution", "backend", mode="before")
    @classmethod
    def _vocab(cls, v: Any, info: Any) -> Any:
        enum = {"op": Op, "solution": Solution, "backend": Backend}[info.field_name]
        if v is None or isinstance(v, enum):
            return v
        if not isinstance(v, str):
            raise ValueError(f"expected one of {', '.join(enum.values())}, got {type(v).__name__} {brief(v)}")
        text = v.strip().lower()
        if text not in enum.values():
            raise ValueError(f"{brief(v)} is not one of {', '.join(enum.values())}{did_you_mean(text, enum.values())}")
        return enum(text)

    @model_validator(mode="after")
    def _coherent(self) -> "KernelRequest":
        # the documented defaults, filled after validation (a bad head_dim_qk is reported once, as itself)
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.q_dtype)
        if self.out_dtype is None:
            object.__setattr__(self, "out_dtype", output_dtype(self.q_dtype))
        if self.op in MLA_OPS and (self.head_dim_qk is not None or self.head_dim_vo is not None):
            # MLA head sizes given the vLLM way (576 / 512): kept as the latent dims they mean, one canonical request
            rank, rope = mla_dims_from_head_dims(self.head_dim_qk, self.head_dim_vo, self.kv_lora_rank, self.qk_rope_head_dim)
            for name, value in (("kv_lora_rank", rank), ("qk_rope_head_dim", rope), ("head_dim_qk", None), ("head_dim_vo", None)):
                object.__setattr__(self, name, value)
        if self.head_dim_vo is None and self.head_dim_qk is not None:
            object.__setattr__(self, "head_dim_vo", self.head_dim_qk)
        if self.num_qo_heads and self.num_kv_heads and self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads {self.num_qo_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        shapes, features = SHAPE_FIELDS_BY_OP[self.op], FEATURE_FIELDS_BY_OP[self.op]
        for field in Shapes.model_fields:
            if field == "gqa_group_size" or field == "q_len":
                continue
            if getattr(self, field) is not None and field not in shapes:
                raise ValueError(f"{field} means nothing for op {self.op.value}; it takes: {', '.join(sorted(shapes - {'gqa_group_size'}))}")
        if self.q_len > 1 and "q_len" not in shapes:
            raise ValueError(f"q_len {self.q_len} means nothing for op {self.op.value} (ragged ops take their lengths from metadata)")
        for field in Features.model_fields:
            if getattr(self, field) and field not in features:
                raise ValueError(f"{field} means nothing for op {self.op.value}")
        self._new_tokens()
        self._share_given_set()
        return self

    def _new_tokens(self) -> None:
        """``new_len`` belongs to the ragged ops; for ``mha_prefill`` every token is new, so it is ``kv_len``."""
        if self.new_len is None:
            if self.op is Op.MHA_PREFILL and self.kv_len is not None:
                object.__setattr__(self, "new_len", self.kv_len)
            return
        if self.op not in RAGGED_OPS:
            raise ValueError(f"new_len means nothing for op {self.op.value} (a decode step's new tokens per request are q_len)")
        if self.op is Op.MHA_PREFILL:
            if self.kv_len is None:
                object.__setattr__(self, "kv_len", self.new_len)
            elif self.kv_len != self.new_len:
                raise ValueError(f"new_len {self.new_len} and kv_len {self.kv_len} differ after bucketing: for "
                                 "mha_prefill every token is new, so give one of them")
        elif self.kv_len is not None and self.new_len > self.kv_len:
            raise ValueError(f"new_len {self.new_len} exceeds kv_len {self.kv_len} (kv_len counts the new tokens too)")

    def _share_given_set(self) -> None:
        """Use one set object for every request that gave the same fields (pydantic copies it before changing one).

        A frozen model's set of given fields is only read; sharing it saves
        about 700 bytes per cached request.
        """
        given = self.__pydantic_fields_set__
        key = frozenset(given)
        shared = _GIVEN_SETS.get(key)
        if shared is None:
            shared = _GIVEN_SETS.setdefault(key, set(given))
            if len(_GIVEN_SETS) > _GIVEN_SETS_MAX:
                try:
                    _GIVEN_SETS.popitem(last=False)  # requests that hold the dropped set keep it
                except KeyError:  # another thread emptied it meanwhile
                    pass
        object.__setattr__(self, "__pydantic_fields_set__", shared)

    def __getattr__(self, name: str) -> Any:
        """``_key`` (every field's value, defaults filled: what equality compares) and ``_hash``, made on first use.

        Kept in the instance once made, so a hash or a comparison reads them
        as plain attributes (this method runs only while they are missing).
        Made on first use, not when built: a request the selector completes
        for a selection (the detected arch filled in) is read but never
        hashed, and a cached entry then keeps no key for it (~300 bytes).
        """
        if name == "_key" or name == "_hash":
            key = tuple(self.__dict__[f] for f in _FIELD_NAMES)  # the defaults are in: kv_dtype given or not, equal
            object.__setattr__(self, "_key", key)
            object.__setattr__(self, "_hash", hash(key))
            return self.__dict__[name]
        return super().__getattr__(name)

    def __getstate__(self) -> dict[Any, Any]:
        """Pickled without ``_key`` and ``_hash``: an enum's hash differs between processes, so they are made again."""
        state = super().__getstate__()
        state["__dict__"] = {k: v for k, v in state["__dict__"].items() if k != "_key" and k != "_hash"}
        return state

    def __hash__(self) -> int:  # cached: a cache hit must cost about a dict lookup
        return self._hash

    def __eq__(self, other: object) -> bool:
        """Equal field values (one tuple comparison: a cache hit with an equal request stays cheap)."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key == other._key

    def restricted(self, solution: Any) -> "KernelRequest":
        """This request restricted to one solution."""
        return KernelRequest(**{**self.model_dump(exclude_defaults=True), "solution": solution})

    def forcing(self, kernel: str) -> "KernelRequest":
        """This request with ``kernel`` forced (what bench and tuning time each eligible kernel with)."""
        return KernelRequest(**{**self.model_dump(exclude_defaults=True), "kernel": kernel})

    @property
    def gqa_group_size(self) -> Optional[int]:
        if self.num_qo_heads and self.num_kv_heads:
            return self.num_qo_heads // self.num_kv_heads
        return None

    def given(self) -> dict[str, Any]:
        """Fields that are set (not None, not False), in declaration order, for explain."""
        out = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if v is None or v is False or (name == "q_len" and "q_len" not in SHAPE_FIELDS_BY_OP[self.op]):
                continue
            out[name] = v.value if hasattr(v, "value") else v
        return out

    def unchecked(self) -> list[str]:
        """Shape fields of this op the caller left unset: constraints on them are not checked."""
        shapes = SHAPE_FIELDS_BY_OP[self.op]
        return [
            f for f in Shapes.model_fields
            if f in shapes and getattr(self, f) is None and not (f == "gqa_group_size" and not self.num_kv_heads)
        ]

    def describe(self) -> str:
        """``op=mla_decode arch=sm_120 q_dtype=bf16 ...`` (what explain prints)."""
        return " ".join(f"{k}={'true' if v is True else v}" for k, v in self.given().items())


_FIELD_NAMES: tuple[str, ...] = tuple(KernelRequest.model_fields)


def _request_problems(exc: ValidationError) -> list[str]:
    """One ``request.FIELD: message`` line per problem, on one line each, with the bad value cut short."""
    lines = []
    for err in exc.errors(include_url=False):
        kind, loc = err["type"], err["loc"]
        field = str(loc[0]) if loc else "request"
        msg = err["msg"].removeprefix("Value error, ")
        got = brief(err.get("input"))
        if kind == "extra_forbidden":
            known = list(KernelRequest.model_fields)
            msg = f"unknown request field{did_you_mean(field, known)}; expected one of: {', '.join(known)}"
        elif kind == "missing":
            msg = "required" + (f"; one of {', '.join(Op.values())}" if field == "op" else "")
        elif kind == "greater_than_equal":
            msg = f"must be >= {err['ctx']['ge']}, got {got}"
        elif kind == "less_than_equal":
            msg = f"must be <= {err['ctx']['le']}, got {got}"
        elif kind in ("int_parsing", "int_type", "int_from_float"):
            msg = f"expected an integer, got {got}"
        elif kind in ("bool_parsing", "bool_type"):
            msg = f"expected true or false, got {got}"
        elif kind == "string_type":
            msg = f"expected text, got {got}"
        elif kind != "value_error" and "input" in err:
            msg = f"{msg} (got {got})"
        if not loc and msg.split(" ", 1)[0] in KernelRequest.model_fields:  # a cross-field check names its field first
            field = msg.split(" ", 1)[0]
        lines.append(f"request.{field}: {' '.join(msg.split())}")
    return lines
