"""The closed set of constraint kinds a manifest can declare, each checked generically.

A constraint is attached to one request field (its key in the manifest is
the request field's name) and knows how to check a value and how to word
the failure.  ``check(field, value, request)`` returns ``None`` when the
value is allowed, else one plain-words reason naming the field, the
requested value and what is allowed.  Value kinds (one-of, range, dtype set,
arch spec) look at the value alone; a relation (``Equals``) also reads the
request field it relates to.  The solver loops over fields; it never
branches on a field's name.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, conlist, field_validator, model_validator
from typing_extensions import TypedDict

from registry.errors import brief
from registry.vocab import Arch, DType, did_you_mean, parse_arch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _fmt(value: Any) -> str:
    return str(value.value) if hasattr(value, "value") else str(value)


def _fmt_list(values: Any) -> str:
    return "[" + ", ".join(_fmt(v) for v in values) + "]"


class OneOf(_Strict):
    """An explicit set of allowed values (a YAML list): ``head_dim_qk: [64, 128, 256]``."""

    values: tuple[Any, ...]

    def check(self, field: str, value: Any, request: Any = None) -> Optional[str]:
        if value in self.values:
            return None
        return f"{field} {_fmt(value)} not in {_fmt_list(self.values)}"

    def describe(self) -> str:
        return ", ".join(_fmt(v) for v in self.values)

    def allows(self, value: Any, request: Any = None) -> bool:
        return value in self.values


class IntRange(_Strict):
    """An inclusive integer range with an optional step (a YAML mapping):
    ``page_size: {min: 16, max: 128, multiple_of: 16}``."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    # strict: a quoted '16' or a 16.0 is a typo in a manifest, not a bound to convert
    min: Optional[StrictInt] = Field(default=None, ge=0)
    max: Optional[StrictInt] = Field(default=None, ge=0)
    multiple_of: Optional[StrictInt] = Field(default=None, ge=1)
    power_of_two: StrictBool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        if self.min is None and self.max is None and self.multiple_of is None and not self.power_of_two:
            raise ValueError("give at least one of min, max, multiple_of, power_of_two")
        return self

    def check(self, field: str, value: int, request: Any = None) -> Optional[str]:
        if self.min is not None and value < self.min:
            return f"{field} {value} below minimum {self.min}"
        if self.max is not None and value > self.max:
            return f"{field} {value} above maximum {self.max}"
        if self.multiple_of is not None and value % self.multiple_of:
            return f"{field} {value} not a multiple of {self.multiple_of}"
        if self.power_of_two and (value <= 0 or value & (value - 1)):
            return f"{field} {value} not a power of two"
        return None

    def describe(self) -> str:
        lo = "" if self.min is None else str(self.min)
        hi = "" if self.max is None else str(self.max)
        text = f"{lo}..{hi}" if (lo or hi) else "any"
        if self.multiple_of:
            text += f" (x{self.multiple_of})"
        if self.power_of_two:
            text += " (2^n)"
        return text

    def allows(self, value: int, request: Any = None) -> bool:
        return self.check("", value) is None

    def first_allowed(self, lowest: int) -> Optional[int]:
        """The smallest value >= ``lowest`` the range admits, or None when it admits none (unsatisfiable)."""
        lo = lowest if self.min is None else max(lowest, self.min)
        step = self.multiple_of or 1
        if self.power_of_two:
            if step & (step - 1):  # no power of two is a multiple of 3, 6, 12, ...
                return None
            first = 1 << (max(lo, step, 1) - 1).bit_length()
        else:
            first = -(-lo // step) * step
        return first if self.max is None or first <= self.max else None


Shape = Union[OneOf, IntRange]
"""A shape constraint: a list (one-of) or a mapping (range)."""

SHAPE_INPUT = Union[list[int], int, IntRange]
"""How a shape constraint is written in YAML (for the JSON schema): a list, one value, or a range mapping."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shape_constraint(raw: Any) -> Any:
    """YAML list -> OneOf, one integer -> OneOf of one, mapping -> IntRange (pydantic before-validator).

    Values are integers: a quoted ``"128"``, a ``128.5`` or ``true`` would never
    equal a request's value, so the kernel would silently never match -- an error instead.
    """
    if isinstance(raw, (OneOf, IntRange)):
        return raw
    if raw is None:  # a key written without a value; leave the key out to leave the field unconstrained
        raise ValueError("no value: list the allowed integers or give a {min, max} range "
                         "(leave the key out to allow any value)")
    if isinstance(raw, list) or _is_int(raw):
        return OneOf(values=int_values(raw))
    if isinstance(raw, dict):
        for key in raw:
            if key not in IntRange.model_fields:
                raise ValueError(f"{brief(key)} is not a range key{did_you_mean(str(key), list(IntRange.model_fields))}; "
                                 f"expected some of: {', '.join(IntRange.model_fields)}")
        return IntRange(**raw)
    raise ValueError(f"expected a list of allowed integers or a mapping with min/max/multiple_of/power_of_two, got {brief(raw)}")


def check_reachable(field: str, constraint: Any, lowest: int, highest: int) -> None:
    """ValueError unless ``constraint`` admits some value in ``lowest..highest`` (what a request can give).

    A list value or a range outside what any request can give would silently
    never match, so a kernel (or an exclusion) would be dead without a word.
    """
    if isinstance(constraint, Equals):  # its `or` values are values of the field like a list's
        if constraint.alternatives:
            check_reachable(field, OneOf(values=constraint.alternatives), lowest, highest)
        return
    if isinstance(constraint, OneOf):
        low = [v for v in constraint.values if _is_int(v) and v < lowest]
        if low:
            raise ValueError(f"{_fmt(low[0])} is below {lowest}, the smallest {field} a request can give")
        high = [v for v in constraint.values if _is_int(v) and v > highest]
        if high:
            raise ValueError(f"{brief(high[0])} is above {highest}, the largest {field} a request can give")
    elif isinstance(constraint, IntRange):
        first = constraint.first_allowed(lowest)
        if first is None or first > highest:
            written = ", ".join(f"{k}: {str(v).lower()}" for k, v in constraint.model_dump(exclude_defaults=True).items())
            raise ValueError(f"{{{written}}} admits no {field} a request can give ({lowest}..{highest}): "
                             f"no request can match it")


def value_set(raw: Any, allowed: list[str], what: str) -> OneOf:
    """One word or a list of words of a closed vocabulary (an exclusion's ``q_dtype: [bf16, fp16]``)."""
    values = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, dict) or not values:
        raise ValueError(f"expected one {what} or a list of them, got {'a mapping' if isinstance(raw, dict) else '[]'}")
    for v in values:
        if not isinstance(v, str) or v not in allowed:
            hint = did_you_mean(v, allowed) if isinstance(v, str) else ""
            raise ValueError(f"{brief(v)} is not one of {', '.join(allowed)}{hint}")
    return OneOf(values=tuple(values))


class DTypeSet(_Strict):
    """Allowed dtypes for one tensor role: ``q_dtype: [bf16, fp16]``."""

    values: tuple[DType, ...]

    @field_validator("values")
    @classmethod
    def _non_empty(cls, v: tuple[DType, ...]) -> tuple[DType, ...]:
        if not v:
            raise ValueError("list at least one dtype")
        return v

    def check(self, field: str, value: DType, request: Any = None) -> Optional[str]:
        if value in self.values:
            return None
        return f"{field} {_fmt(value)} not in {_fmt_list(self.values)}"

    def describe(self) -> str:
        return ", ".join(_fmt(v) for v in self.values)

    def allows(self, value: DType, request: Any = None) -> bool:
        return value in self.values


class Equals(_Strict):
    """Equal to another request field of the same kind, or one of ``or``:
    ``head_dim_vo: {equals: head_dim_qk}``, ``kv_dtype: {equals: q_dtype, or: [fp8_e4m3, fp8_e5m2]}``.

    A relation, not a value set: the field takes the allowed values of the field it equals
    (plus ``or``).  When a request leaves that field unset there is nothing to compare, so the
    value is checked against the kernel's own constraint on it (``bound``), as if it stood for it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    equals: str = Field(description="the request field this one must equal")
    or_: Optional[tuple[Any, ...]] = Field(default=None, alias="or", description="values allowed besides equality")

    _target: Any = PrivateAttr(default=None)  # the kernel's constraint on ``equals`` (see ``bound``)

    def bound(self, target: Any) -> "Equals":
        """A copy that falls back on ``target`` (the kernel's constraint on ``equals``) when the request leaves it unset."""
        copy = self.model_copy()
        copy._target = target
        return copy

    @property
    def alternatives(self) -> tuple[Any, ...]:
        return self.or_ or ()

    @property
    def target(self) -> Any:
        """The kernel's constraint on ``equals`` that ``bound`` attached (None: none), checked when it is unset."""
        return self._target

    def check(self, field: str, value: Any, request: Any = None) -> Optional[str]:
        if value in self.alternatives:
            return None
        other = getattr(request, self.equals, None)
        if other is None:
            problem = None if self._target is None else self._target.check(field, value, request)
            return problem and f"{problem} (the values of {self.equals}, which it must equal)"
        if value == other:
            return None
        also = f" or be one of {_fmt_list(self.alternatives)}" if self.alternatives else ""
        return f"{field} {_fmt(value)} must equal {self.equals} {_fmt(other)}{also}"

    def describe(self) -> str:
        text = f"= {self.equals}"
        return f"{text} or {', '.join(_fmt(v) for v in self.alternatives)}" if self.alternatives else text

    def allows(self, value: Any, request: Any = None) -> bool:
        return self.check("", value, request) is None


EQUALS_KEYS = ("equals", "or")
"""The keys of an equals constraint in YAML."""


def equals_constraint(raw: Mapping[str, Any], field: str, kinds: Mapping[str, str],
                      alternatives: Callable[[Any], tuple[Any, ...]]) -> Equals:
    """``{equals: FIELD, or: [...]}`` on ``field`` -> Equals (pydantic before-validator helper).

    ``kinds`` maps every request field to its kind (``dtype``, ``shape``, ...): a field can
    equal only another field of its own kind.  ``alternatives`` reads the ``or`` list as
    values of that kind.  A message about ``equals`` starts with that word, so the loader
    points at the key.
    """
    kind = kinds[field]
    same = [f for f, k in kinds.items() if k == kind and f != field]
    for key in raw:
        if key not in EQUALS_KEYS:
            raise ValueError(f"{brief(key)} is not a key of an equals constraint{did_you_mean(str(key), list(EQUALS_KEYS))}; "
                             f"expected equals and optionally or")
    if "equals" not in raw:
        raise ValueError("or is given without equals: write {equals: FIELD, or: [...]}")
    target = raw["equals"]
    if not isinstance(target, str) or target not in kinds:
        hint = did_you_mean(target, same) if isinstance(target, str) else ""
        raise ValueError(f"equals names {brief(target)}, not a request field{hint}; a {kind} field can equal one of: "
                         f"{', '.join(same)}")
    if target == field:
        raise ValueError(f"equals names {field} itself; name another {kind} field: {', '.join(same)}")
    if kinds[target] != kind:
        other = kinds[target]
        raise ValueError(f"equals names {target}, {'an' if other[0] in 'aeiou' else 'a'} {other} field; {field} is a "
                         f"{kind} field and can equal only one of: {', '.join(same)}")
    values = None
    if "or" in raw:
        try:
            values = alternatives(raw["or"])
        except ValueError as exc:
            raise ValueError(f"or {exc}") from None
    return Equals(equals=target, or_=values)


def int_values(raw: Any) -> tuple[int, ...]:
    """One integer or a non-empty list of them (a shape's allowed values, an equals constraint's ``or``)."""
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise ValueError("list at least one allowed value")
    for v in values:
        if not _is_int(v):
            raise ValueError(f"{brief(v)} is not an integer (list the allowed values as integers)")
    return tuple(values)


class ArchSpec(_Strict):
    """Supported SMs: an inclusive range ``{min: sm_80, max: sm_121}`` or a list ``[sm_120, sm_121]``."""

    min: Optional[Arch] = None
    max: Optional[Arch] = None
    only: Optional[tuple[Arch, ...]] = None

    @field_validator("min", "max", mode="before")
    @classmethod
    def _arch(cls, v: Any) -> Any:
        return v if v is None else manifest_arch(v)

    @field_validator("only", mode="before")
    @classmethod
    def _archs(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (list, tuple)):
            raise ValueError(f"expected a list of SMs like [sm_120, sm_121], got {brief(v)}")
        return v if v is None else tuple(manifest_arch(a) for a in v)

    @model_validator(mode="after")
    def _shape(self) -> "ArchSpec":
        if self.only is not None:
            if self.min is not None or self.max is not None:
                raise ValueError("give either a list of SMs or a {min, max} range, not both")
            if not self.only:
                raise ValueError("list at least one SM")
        elif self.min is None and self.max is None:
            raise ValueError("give min and/or max, or a list of SMs")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min.value} is above max {self.max.value}")
        return self

    def check(self, field: str, value: Arch, request: Any = None) -> Optional[str]:
        if self.only is not None:
            if value in self.only:
                return None
            return f"{field} {value.value} not in {_fmt_list(self.only)}"
        if self.min is not None and value < self.min:
            return f"{field} {value.value} below minimum {self.min.value}"
        if self.max is not None and value > self.max:
            return f"{field} {value.value} above maximum {self.max.value}"
        return None

    def describe(self) -> str:
        if self.only is not None:
            return ", ".join(a.value for a in self.only)
        lo = self.min.value if self.min else ""
        hi = self.max.value if self.max else ""
        return f"{lo}..{hi}"

    def allows(self, value: Arch, request: Any = None) -> bool:
        return self.check("", value) is None

    def members(self) -> list[Arch]:
        """Every known SM this spec admits, in capability order."""
        return [a for a in sorted(Arch) if self.allows(a)]


def manifest_arch(v: Any) -> Arch:
    """The manifest spells SMs one way (``sm_90``); say which spelling was meant otherwise."""
    if isinstance(v, Arch):
        return v
    if isinstance(v, str) and v in Arch.values():
        return Arch(v)
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise ValueError(f"expected an SM like sm_90, got {brief(v)}")
    try:
        hint = f" (write {parse_arch(v).value!r})"
    except ValueError:
        hint = did_you_mean(str(v), Arch.values())
    raise ValueError(f"{brief(v)} is not an SM like sm_90{hint}; expected one of {', '.join(Arch.values())}")


class ArchRange(TypedDict, total=False):
    """The mapping form of an arch spec as written in YAML: ``{min: sm_80, max: sm_121}``."""

    __pydantic_config__ = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})  # type: ignore[misc]

    min: Arch
    max: Arch


ARCH_INPUT = Union[conlist(Arch, min_length=1), ArchRange]
"""How an arch spec is written in YAML (for the JSON schema): a list of SMs or a min/max mapping."""

DTYPES_INPUT = Union[conlist(DType, min_length=1), DType]
"""How a dtype set is written in YAML (for the JSON schema): a list of dtypes or one dtype."""


def arch_spec(raw: Any) -> Any:
    """YAML list -> ArchSpec(only=...), mapping -> ArchSpec(min/max) (pydantic before-validator)."""
    if isinstance(raw, list):
        return {"only": raw}
    return raw
