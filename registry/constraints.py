"""The closed set of constraint kinds a manifest can declare, each checked generically.

A constraint is attached to one request field (its key in the manifest is
the request field's name) and knows how to check a value and how to word
the failure.  ``check(field, value)`` returns ``None`` when the value is
allowed, else one plain-words reason naming the field, the requested value
and what is allowed.  The solver loops over fields; it never branches on a
field's name.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, conlist, field_validator, model_validator
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

    def check(self, field: str, value: Any) -> Optional[str]:
        if value in self.values:
            return None
        return f"{field} {_fmt(value)} not in {_fmt_list(self.values)}"

    def describe(self) -> str:
        return ", ".join(_fmt(v) for v in self.values)

    def allows(self, value: Any) -> bool:
        return value in self.values


class IntRange(_Strict):
    """An inclusive integer range with an optional step (a YAML mapping):
    ``page_size: {min: 16, max: 128, multiple_of: 16}``."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    min: Optional[int] = Field(default=None, ge=0)
    max: Optional[int] = Field(default=None, ge=0)
    multiple_of: Optional[int] = Field(default=None, ge=1)
    power_of_two: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        if self.min is None and self.max is None and self.multiple_of is None and not self.power_of_two:
            raise ValueError("give at least one of min, max, multiple_of, power_of_two")
        return self

    def check(self, field: str, value: int) -> Optional[str]:
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

    def allows(self, value: int) -> bool:
        return self.check("", value) is None


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
    if isinstance(raw, list):
        if not raw:
            raise ValueError("list at least one allowed value")
        for v in raw:
            if not _is_int(v):
                raise ValueError(f"{brief(v)} is not an integer (list the allowed values as integers)")
        return OneOf(values=tuple(raw))
    if _is_int(raw):
        return OneOf(values=(raw,))
    if isinstance(raw, dict):
        for key in raw:
            if key not in IntRange.model_fields:
                raise ValueError(f"{brief(key)} is not a range key{did_you_mean(str(key), list(IntRange.model_fields))}; "
                                 f"expected some of: {', '.join(IntRange.model_fields)}")
        return IntRange(**raw)
    raise ValueError(f"expected a list of allowed integers or a mapping with min/max/multiple_of/power_of_two, got {brief(raw)}")


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

    def check(self, field: str, value: DType) -> Optional[str]:
        if value in self.values:
            return None
        return f"{field} {_fmt(value)} not in {_fmt_list(self.values)}"

    def describe(self) -> str:
        return ", ".join(_fmt(v) for v in self.values)

    def allows(self, value: DType) -> bool:
        return value in self.values


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

    def check(self, field: str, value: Arch) -> Optional[str]:
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

    def allows(self, value: Arch) -> bool:
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
