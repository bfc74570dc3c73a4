"""The manifest's pydantic models: the authority on what ``kernels.yaml`` may say.

Frozen, ``extra`` keys rejected with a did-you-mean, closed vocabularies,
cross-field checks (op/field fit, priority band vs solution, unique names,
adapter paths inside ``registry.adapters`` or an explicit allowlist: ``registry.adapter_policy``).
Loading from YAML with line numbers is ``registry.loader``'s job.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Iterable, Literal, Optional, Sequence, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    Tag,
    ValidationInfo,
    conlist,
    field_validator,
    model_validator,
)
from typing_extensions import Required, TypedDict

from registry.adapter_policy import check_adapter_path
from registry.constraints import (
    ARCH_INPUT,
    DTYPES_INPUT,
    SHAPE_INPUT,
    ArchSpec,
    DTypeSet,
    Equals,
    IntRange,
    OneOf,
    arch_spec,
    check_reachable,
    equals_constraint,
    int_values,
    shape_constraint,
    value_set,
)
from registry.ops import FEATURE_FIELDS_BY_OP, SHAPE_FIELDS_BY_OP, SHAPE_MAXIMUM, shape_minimum
from registry.errors import brief
from registry.priority import PRIORITY_MAX, Band, band_of
from registry.vocab import Arch, Backend, DType, Op, Solution, did_you_mean
from registry.yaml_reader import path_text



class StrictModel(BaseModel):
    """Frozen, and an unknown key is an error that lists the known ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            unknown = [k for k in data if k not in known]
            if unknown:
                key = unknown[0]
                raise ValueError(
                    f"unknown key {brief(key)}{did_you_mean(str(key), sorted(known))}; "
                    f"expected one of: {', '.join(sorted(known))}"
                )
        return data


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


Text = Annotated[str, AfterValidator(_not_blank)]
"""Text that says something: a reason, a ref, an install command (an empty one would show nothing)."""
Int = Annotated[int, Strict()]
"""An integer as written: a quoted '5', a 5.0 or a true is a typo, not a number to convert."""


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # True == 1 to Python: `schema_version: true` would pass as 1
        raise ValueError(f"expected an integer, got {v}")
    return v


def _dtypes(raw: Any, info: ValidationInfo) -> Any:
    if raw is None:  # `q_dtype:` with nothing after it
        raise ValueError("no value: list the allowed dtypes, e.g. [bf16, fp16]")
    if isinstance(raw, dict) and (raw.keys() & {"equals", "or"}):
        return equals_constraint(raw, info.field_name, FIELD_KINDS, _dtype_values)
    if isinstance(raw, list):
        return {"values": raw}
    if isinstance(raw, str):
        return {"values": [raw]}
    if not isinstance(raw, (dict, DTypeSet, Equals)):
        raise ValueError(f"expected a dtype, a list of dtypes or {{equals: FIELD}}, got {brief(raw)}")
    return raw


def _dtype_values(raw: Any) -> tuple[DType, ...]:
    return tuple(DType(v) for v in value_set(raw, DType.values(), "dtype").values)


def _shape(raw: Any, info: ValidationInfo) -> Any:
    if isinstance(raw, dict) and (raw.keys() & {"equals", "or"}):
        return equals_constraint(raw, info.field_name, FIELD_KINDS, int_values)
    return shape_constraint(raw)  # a key without a value (None) is an error there


def _set_or_equals(value: Any) -> str:
    return "equals" if isinstance(value, Equals) else "set"


DTYPE_FIELDS = ("q_dtype", "kv_dtype", "out_dtype")
SHAPE_FIELDS = tuple(sorted(frozenset().union(*SHAPE_FIELDS_BY_OP.values())))

# How an equals constraint is written in YAML (for the JSON schema); 'or' is a Python keyword, hence the call form.
DTypeEqualsInput = TypedDict(
    "DTypeEqualsInput",
    {"equals": Required[Literal[DTYPE_FIELDS]], "or": Union[conlist(DType, min_length=1), DType]},
    total=False,
)
DTypeEqualsInput.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]

# json_schema_input_type: the JSON schema describes the YAML spelling (lists, range mappings), not the models.
# A key written without a value (null) is an error, never "unconstrained": leave the key out for that.
DTypes_ = Annotated[
    Optional[Annotated[Union[Annotated[DTypeSet, Tag("set")], Annotated[Equals, Tag("equals")]],
                       Discriminator(_set_or_equals)]],
    BeforeValidator(_dtypes, json_schema_input_type=Union[DTYPES_INPUT, DTypeEqualsInput]),
]

ShapeEqualsInput = TypedDict(
    "ShapeEqualsInput",
    {"equals": Required[Literal[SHAPE_FIELDS]], "or": Union[conlist(int, min_length=1), int]},
    total=False,
)
ShapeEqualsInput.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]

ShapeC = Annotated[
    Optional[Union[OneOf, IntRange, Equals]],
    BeforeValidator(_shape, json_schema_input_type=Union[SHAPE_INPUT, ShapeEqualsInput]),
]


class DTypes(StrictModel):
    """Allowed dtypes per tensor role; the keys are the request fields they constrain.

    A list (or one dtype) is a set of allowed values; ``{equals: q_dtype, or: [fp8_e4m3]}`` a relation.
    """

    q_dtype: DTypes_ = Field(description="query dtype")
    kv_dtype: DTypes_ = Field(description="KV-cache (or K/V) dtype")
    out_dtype: DTypes_ = Field(default=None, description="output dtype; unconstrained when absent")


class Shapes(StrictModel):
    """Shape constraints: a list is a set of allowed values, a mapping a range (min/max/multiple_of)
    or a relation (``{equals: head_dim_qk}``)."""

    head_dim_qk: ShapeC = Field(default=None, description="query/key head dim (MHA)")
    head_dim_vo: ShapeC = Field(default=None, description="value/output head dim (MHA)")
    num_qo_heads: ShapeC = Field(default=None, description="query heads")
    num_kv_heads: ShapeC = Field(default=None, description="KV heads (MHA)")
    gqa_group_size: ShapeC = Field(default=None, description="num_qo_heads / num_kv_heads")
    page_size: ShapeC = Field(default=None, description="tokens per KV-cache page")
    q_len: ShapeC = Field(default=None, description="query tokens per request in one decode step (MTP / speculative)")
    kv_lora_rank: ShapeC = Field(default=None, description="MLA latent (compressed KV) width")
    qk_rope_head_dim: ShapeC = Field(default=None, description="MLA rope part of the query/key head")
    qk_nope_head_dim: ShapeC = Field(default=None, description="MLA non-rope query/key head dim before absorption")
    topk: ShapeC = Field(default=None, description="sparse MLA: selected positions per query token")

    @field_validator("*")
    @classmethod
    def _reachable(cls, v: Any, info: ValidationInfo) -> Any:
        """A value or range no request can give would make the kernel silently unreachable."""
        check_reachable(info.field_name, v, shape_minimum(info.field_name), SHAPE_MAXIMUM)
        return v


class Features(StrictModel):
    """What a kernel supports.  Anything not declared ``true`` is unsupported (``'yes'`` or ``1`` is an error)."""

    sinks: StrictBool = Field(default=False, description="attention sinks: one fp32 logit per head in the softmax denominator")
    sliding_window: StrictBool = Field(default=False, description="sliding-window (local) attention via window_left")
    logits_soft_cap: StrictBool = Field(default=False, description="cap * tanh(score / cap) on the scaled logits")
    return_lse: StrictBool = Field(default=False, description="returns the log-sum-exp, needed by decode-context-parallel (DCP) merging")
    non_causal: StrictBool = Field(default=False, description="non-causal (bidirectional) attention over the new tokens")
    noncontiguous_kv: StrictBool = Field(default=False, description="K/V given as strided (non-contiguous) views")
    cuda_graph: StrictBool = Field(default=False, description="run() is capturable in a CUDA graph")


REQUEST_FIELDS: tuple[str, ...] = (
    ("arch",) + tuple(DTypes.model_fields) + tuple(Shapes.model_fields) + tuple(Features.model_fields)
)
"""Every request field a constraint or an exclusion can name."""

FIELD_KINDS: dict[str, str] = {
    "arch": "arch",
    **{f: "dtype" for f in DTypes.model_fields},
    **{f: "shape" for f in Shapes.model_fields},
    **{f: "feature" for f in Features.model_fields},
}
"""The kind of every request field: an equals constraint relates two fields of one kind."""

_FIELD_VOCAB = {"arch": Arch, "q_dtype": DType, "kv_dtype": DType, "out_dtype": DType}

_WHEN_INPUT = dict[Literal[REQUEST_FIELDS], Union[bool, int, str, list[Union[int, str]], IntRange]]  # type: ignore[valid-type]
"""How an exclusion's ``when`` is written in YAML (for the JSON schema)."""


def _when_value(field: str, raw: Any) -> Any:
    """An exclusion value as a constraint, typed like the request field it matches (so it can match)."""
    vocab = _FIELD_VOCAB.get(field)
    if vocab is not None:
        return value_set(raw, vocab.values(), "SM" if field == "arch" else "dtype")
    if field in Features.model_fields:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {brief(raw)}")
        return OneOf(values=(raw,))
    constraint = shape_constraint(raw)
    check_reachable(field, constraint, shape_minimum(field), SHAPE_MAXIMUM)  # else the exclusion could never match
    return constraint


class Exclusion(StrictModel):
    """A known-bad combination: when every ``when`` field matches, the kernel is rejected.

    Each ``when`` value is a single value, a list of values, or a range
    mapping (``{min: 65, max: 127}``), matched against the request field.
    """

    when: Annotated[dict[str, Any], BeforeValidator(lambda v: v, json_schema_input_type=_WHEN_INPUT)] = Field(
        description="request field -> value, list of values, or {min, max} range", json_schema_extra={"minProperties": 1}
    )
    reason: Text = Field(min_length=1)
    ref: Text = Field(min_length=1, description="pull request, library source file or committed result that documents the problem")

    @field_validator("when")
    @classmethod
    def _known_fields(cls, when: dict[str, Any]) -> dict[str, Any]:
        if not when:
            raise ValueError("give at least one request field to match")
        out = {}
        for key, raw in when.items():
            if key not in REQUEST_FIELDS:
                raise ValueError(
                    f"unknown request field {brief(key)}{did_you_mean(str(key), list(REQUEST_FIELDS))}; "
                    f"expected one of: {', '.join(REQUEST_FIELDS)}"
                )
            try:
                out[key] = _when_value(key, raw)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return out

    def matches(self, request: Any) -> bool:
        """True when every field is given and matches; an unset field never matches."""
        for field, c in self.when.items():
            value = getattr(request, field, None)
            if value is None or not c.allows(value):
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{f}={c.describe()}" for f, c in self.when.items())


_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
"""A kernel name, matched with ``fullmatch`` (``$`` would admit a look-alike ending in a newline)."""


FACT_PATHS: tuple[str, ...] = (
    ("arch",)
    + tuple(f"dtypes.{f}" for f in DTypes.model_fields)
    + tuple(f"shapes.{f}" for f in Shapes.model_fields)
    + tuple(f"features.{f}" for f in Features.model_fields)
)
"""The facts of a kernel entry a ``sources`` key can name (``settings.<key>`` too, for a declared setting)."""


def _fact_path(key: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"expected a fact path like shapes.page_size, got {brief(key)}")
    if key in FACT_PATHS or (key.startswith("settings.") and len(key) > len("settings.")):
        return key
    raise ValueError(
        f"unknown fact {brief(key)}{did_you_mean(key, list(FACT_PATHS))}; expected arch, dtypes.<field>, "
        f"shapes.<field>, features.<field> or settings.<key>"
    )


FactPath = Annotated[str, BeforeValidator(_fact_path)]


class KernelSpec(StrictModel):
    """One manifest entry: an implementation of one op with its declared capability and priority."""

    name: str = Field(description="unique kernel name, lower-case, e.g. flashinfer-fa2-mla-decode")
    op: Op
    solution: Solution
    backend: Backend
    adapter: str = Field(description="module:Class inside registry.adapters (or an allowlisted package)")
    arch: Annotated[ArchSpec, BeforeValidator(arch_spec, json_schema_input_type=ARCH_INPUT)] = Field(
        description="supported SMs: {min: sm_80, max: sm_121} or [sm_120, sm_121]"
    )
    dtypes: DTypes
    shapes: Shapes = Shapes()
    features: Features = Features()
    exclude: tuple[Exclusion, ...] = ()
    settings: dict[str, Union[bool, int, str]] = Field(
        default_factory=dict, description="settings the engine must adopt when this kernel is chosen (e.g. KV-cache layout)"
    )
    priority: Int = Field(ge=0, le=PRIORITY_MAX, description="see registry.priority for the bands")
    refs: tuple[Text, ...] = Field(min_length=1, description="pull requests, library source files or committed results backing the facts")
    sources: dict[FactPath, Annotated[Text, Field(min_length=1)]] = Field(
        default_factory=dict,
        description="fact path (arch, dtypes.q_dtype, shapes.page_size, features.sinks, settings.<key>) -> the "
                    "source line or pull request that states it, e.g. flashinfer/jit/xqa.py:82-86",
    )
    notes: str = ""

    _origin: str = PrivateAttr(default="")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"{brief(v)} is not a kernel name (lower-case letters, digits, '-', '_', '.')")
        return v

    @field_validator("sources")
    @classmethod
    def _sources_cite_declared_facts(cls, sources: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """A source must back a fact the entry states: a declared dtype, shape or setting (features may be false)."""
        for path in sources:
            group, _, field = path.partition(".")
            declared = info.data.get(group)
            if group in ("dtypes", "shapes") and declared is not None and getattr(declared, field) is None:
                raise ValueError(f"{path}: this kernel declares no {path} to cite a source for")
            if group == "settings" and declared is not None and field not in declared:
                raise ValueError(f"{path}: this kernel declares no setting {brief(field)}")
        return sources

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str, info: ValidationInfo) -> str:
        problem = check_adapter_path(v, (info.context or {}).get("adapter_allowlist", ()))
        if problem:
            raise ValueError(problem)
        return v

    # The checks below read fields validated before them (op, solution) from info.data, so each runs
    # whatever else in the entry failed: validate reports an entry's every problem in one run.
    @field_validator("shapes")
    @classmethod
    def _shapes_fit_op(cls, shapes: "Shapes", info: ValidationInfo) -> "Shapes":
        op = info.data.get("op")
        if op is None:
            return shapes
        fields = SHAPE_FIELDS_BY_OP[op]
        for field in Shapes.model_fields:
            if getattr(shapes, field) is not None and field not in fields:
                raise ValueError(f"shapes.{field} means nothing for op {op.value}; it takes: {', '.join(sorted(fields))}")
            c = getattr(shapes, field)
            if isinstance(c, Equals) and c.equals not in fields:
                raise ValueError(f"shapes.{field}.equals names {c.equals}, which means nothing for op "
                                 f"{op.value}; it takes: {', '.join(sorted(fields))}")
        return shapes

    @model_validator(mode="after")
    def _equals_name_a_plain_field(self) -> "KernelSpec":
        """``{equals: F}`` where F is itself ``{equals: G}``: a chain the solver would not follow."""
        for group, fields in (("dtypes", self.dtypes), ("shapes", self.shapes)):
            for field in type(fields).model_fields:
                c = getattr(fields, field)
                if isinstance(c, Equals) and isinstance(getattr(fields, c.equals), Equals):
                    raise ValueError(f"{group}.{field}.equals names {c.equals}, itself {{equals: "
                                     f"{getattr(fields, c.equals).equals}}}; name that field instead")
        return self

    @field_validator("features")
    @classmethod
    def _features_fit_op(cls, features: "Features", info: ValidationInfo) -> "Features":
        op = info.data.get("op")
        for field in Features.model_fields if op is not None else ():
            if getattr(features, field) and field not in FEATURE_FIELDS_BY_OP[op]:
                raise ValueError(f"features.{field} means nothing for op {op.value}")
        return features

    @field_validator("exclude")
    @classmethod
    def _exclusions_fit_op(cls, exclude: tuple[Exclusion, ...], info: ValidationInfo) -> tuple[Exclusion, ...]:
        """An exclusion on a field the op does not take could never match (or would always): refused."""
        op = info.data.get("op")
        if op is None:
            return exclude
        takes = SHAPE_FIELDS_BY_OP[op] | FEATURE_FIELDS_BY_OP[op]
        for i, e in enumerate(exclude):
            for field in e.when:
                if (field in Shapes.model_fields or field in Features.model_fields) and field not in takes:
                    raise ValueError(f"exclude[{i}].when.{field} means nothing for op {op.value}; "
                                     f"it takes: {', '.join(sorted(takes))}")
        return exclude

    @field_validator("priority")
    @classmethod
    def _priority_fits_solution(cls, priority: int, info: ValidationInfo) -> int:
        solution = info.data.get("solution")
        if solution is None:
            return priority
        if (solution is Solution.REFERENCE) != (band_of(priority) is Band.REFERENCE):
            raise ValueError(
                f"priority {priority} is in band {band_of(priority).name.lower()}, but solution is "
                f"{solution.value}: reference kernels take 0..3 and only they do"
            )
        return priority

    @model_validator(mode="after")
    def _no_exclusion_covers_everything(self) -> "KernelSpec":
        """An exclusion matching every request the kernel admits makes it a kernel that can never be chosen."""
        for i, e in enumerate(self.exclude):
            if all(self._admitted(f) is not None and self._admitted(f) <= set(c.values) for f, c in e.when.items()
                   if isinstance(c, OneOf)) and all(isinstance(c, OneOf) for c in e.when.values()):
                raise ValueError(f"exclude[{i}].when matches every request this kernel admits "
                                 f"({e.describe()}): it could never be chosen")
        return self

    def _admitted(self, field: str) -> Optional[set]:
        """Every value of ``field`` the kernel admits, when that is a finite known set (else None)."""
        if field == "arch":
            return set(self.arch.members())
        if field in DTypes.model_fields:
            c = getattr(self.dtypes, field)
            return set(DType) if c is None else set(c.values) if isinstance(c, DTypeSet) else None
        if field in Features.model_fields:
            return {False, True} if getattr(self.features, field) else {False}
        c = getattr(self.shapes, field, None)
        return set(c.values) if isinstance(c, OneOf) else None

    @property
    def origin(self) -> str:
        """``file:line`` of the entry, for explain and error messages."""
        return self._origin

    @functools.cached_property
    def constraints(self) -> tuple[tuple[str, Any], ...]:
        """(request field, constraint) pairs to check, arch first then dtypes, shapes.

        An equals constraint comes bound to this kernel's constraint on the field it
        equals, which it checks when a request leaves that field unset.
        """
        pairs: list[tuple[str, Any]] = [("arch", self.arch)]
        for group in (self.dtypes, self.shapes):
            for field in type(group).model_fields:
                c = getattr(group, field)
                if isinstance(c, Equals):
                    c = c.bound(getattr(group, c.equals))
                if c is not None:
                    pairs.append((field, c))
        return tuple(pairs)

    @functools.cached_property
    def unsupported_features(self) -> tuple[str, ...]:
        """Feature flags this kernel does not declare (a request needing one is rejected)."""
        return tuple(f for f in Features.model_fields if not getattr(self.features, f))


_DISTRIBUTION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
"""A distribution name as packaging spells it (PEP 508), matched with ``fullmatch``."""


def _distribution(v: str) -> str:
    if not _DISTRIBUTION.fullmatch(v):
        raise ValueError(f"{brief(v)} is not a distribution name like flashinfer-python")
    return v


class SolutionInfo(StrictModel):
    """What a solution needs installed, and how to install it."""

    requires: tuple[Annotated[str, AfterValidator(_distribution)], ...] = Field(
        min_length=1, description="Python distributions the adapters import")
    install: Text = Field(description="the command that installs them, shown when one is missing")


class AttentionPlanRule(StrictModel):
    """TokenSpeed's rule (lightseekorg/tokenspeed#445): postwrite only with a high-priority mha_prefill kernel and no FP8 attention."""

    postwrite_min_priority: Int = Field(ge=0, le=PRIORITY_MAX)
    refs: tuple[Text, ...] = Field(min_length=1)


CROSS_KERNEL_CHECKED = "cross_kernel_checked"
"""Validation-context key: the caller (the loader) reports ``cross_kernel_problems`` itself, located."""


def cross_kernel_problems(kernels: Sequence[Any], solutions: Optional[Iterable[Any]]) -> list[tuple[tuple, str]]:
    """Problems between entries, as (YAML path, message): a name used twice, a solution not listed.

    Reads validated ``KernelSpec`` objects and raw mappings alike, so the loader can report these in the
    same run as each entry's own problems (pydantic runs a model's after-validator only when every
    field validated).  ``solutions`` None: not known (skip that check).
    """
    def get(k: Any, key: str) -> Any:
        return k.get(key) if isinstance(k, dict) else getattr(k, key, None)

    listed = None if solutions is None else {getattr(s, "value", s) for s in solutions}
    seen: dict[str, int] = {}
    out = []
    for i, k in enumerate(kernels):
        name, solution = get(k, "name"), getattr(get(k, "solution"), "value", get(k, "solution"))
        if isinstance(name, str):
            if name in seen:
                out.append((("kernels", i, "name"), f"duplicate kernel name {brief(name)} (first at kernels[{seen[name]}])"))
            else:
                seen[name] = i
        if listed is not None and isinstance(solution, str) and solution in Solution.values() and solution not in listed:
            out.append((("kernels", i, "solution"), f"{solution!r} is not listed under solutions"))
    return out


class Manifest(StrictModel):
    """A whole capability manifest."""

    schema_version: Annotated[Literal[1], BeforeValidator(_not_bool)]
    solutions: dict[Solution, SolutionInfo]
    attention_plan: AttentionPlanRule
    kernels: tuple[KernelSpec, ...]

    _path: str = PrivateAttr(default="")
    _digest: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "Manifest":
        if (info.context or {}).get(CROSS_KERNEL_CHECKED):
            return self
        problems = cross_kernel_problems(self.kernels, self.solutions)
        if problems:
            raise ValueError("; ".join(f"{path_text(loc)}: {message}" for loc, message in problems))
        return self

    @property
    def path(self) -> str:
        return self._path

    @property
    def digest(self) -> str:
        """sha256 prefix of the manifest bytes (all files for an overlay)."""
        return self._digest

    @functools.cached_property
    def by_name(self) -> dict[str, KernelSpec]:
        return {k.name: k for k in self.kernels}

    @functools.cached_property
    def by_op(self) -> dict[Op, tuple[KernelSpec, ...]]:
        out: dict[Op, list[KernelSpec]] = {op: [] for op in Op}
        for k in self.kernels:
            out[k.op].append(k)
        return {op: tuple(ks) for op, ks in out.items()}

