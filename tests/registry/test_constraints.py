"""Each constraint kind checks generically and words its own failure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from registry.constraints import ArchSpec, DTypeSet, Equals, IntRange, OneOf, equals_constraint, int_values, shape_constraint
from registry.vocab import Arch, DType, parse_arch, parse_dtype


def test_one_of_lists_allowed_values():
    c = OneOf(values=(64, 128, 256))
    assert c.check("head_dim_qk", 128) is None
    assert c.check("head_dim_qk", 96) == "head_dim_qk 96 not in [64, 128, 256]"


@pytest.mark.parametrize(
    "rng, value, text",
    [
        (IntRange(min=16), 8, "page_size 8 below minimum 16"),
        (IntRange(max=1), 2, "page_size 2 above maximum 1"),
        (IntRange(multiple_of=4), 6, "page_size 6 not a multiple of 4"),
        (IntRange(power_of_two=True), 48, "page_size 48 not a power of two"),
    ],
)
def test_int_range_words_each_failure(rng, value, text):
    assert rng.check("page_size", value) == text


@given(lo=st.integers(0, 50), span=st.integers(0, 50), step=st.integers(1, 8), value=st.integers(0, 200))
def test_int_range_allows_exactly_the_values_in_range_and_step(lo, span, step, value):
    rng = IntRange(min=lo, max=lo + span, multiple_of=step)
    assert rng.allows(value) == (lo <= value <= lo + span and value % step == 0)


def test_int_range_rejects_min_above_max_and_empty():
    with pytest.raises(ValidationError, match="min 8 is greater than max 4"):
        IntRange(min=8, max=4)
    with pytest.raises(ValidationError, match="at least one of"):
        IntRange()


def test_shape_constraint_reads_yaml_forms():
    assert isinstance(shape_constraint([1, 2]), OneOf)
    assert isinstance(shape_constraint(7), OneOf)
    assert isinstance(shape_constraint({"min": 1}), IntRange)
    with pytest.raises(ValueError):
        shape_constraint(True)


def test_arch_range_and_list():
    rng = ArchSpec(min=Arch.SM_100, max=Arch.SM_103)
    assert rng.check("arch", Arch.SM_90) == "arch sm_90 below minimum sm_100"
    assert rng.check("arch", Arch.SM_120) == "arch sm_120 above maximum sm_103"
    only = ArchSpec(only=(Arch.SM_120, Arch.SM_121))
    assert only.check("arch", Arch.SM_90) == "arch sm_90 not in [sm_120, sm_121]"
    assert only.members() == [Arch.SM_120, Arch.SM_121]


def test_arch_ordering_is_by_capability_not_text():
    assert Arch.SM_90 < Arch.SM_100 < Arch.SM_120
    assert ArchSpec(min=Arch.SM_80).allows(Arch.SM_100)


def test_manifest_arch_spelling_is_strict_with_a_hint():
    with pytest.raises(ValidationError, match=r"'sm90' is not an SM like sm_90 \(write 'sm_90'\)"):
        ArchSpec(min="sm90")
    with pytest.raises(ValidationError, match=r"'sm_9' is not an SM like sm_90"):
        ArchSpec(min="sm_9")


def test_dtype_set():
    c = DTypeSet(values=(DType.BF16, DType.FP16))
    assert c.check("kv_dtype", DType.FP8_E4M3) == "kv_dtype fp8_e4m3 not in [bf16, fp16]"


class _Request:
    """Just the request fields a relation reads (KernelRequest itself is tested in tests/selector)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_equals_compares_with_the_request_field_it_names():
    c = Equals(equals="head_dim_qk")
    assert c.check("head_dim_vo", 128, _Request(head_dim_qk=128)) is None
    assert c.check("head_dim_vo", 256, _Request(head_dim_qk=128)) == "head_dim_vo 256 must equal head_dim_qk 128"
    assert c.allows(128, _Request(head_dim_qk=128)) and not c.allows(64, _Request(head_dim_qk=128))


def test_equals_or_admits_the_listed_values_and_names_them_in_the_failure():
    c = Equals(equals="q_dtype", **{"or": (DType.FP8_E4M3, DType.FP8_E5M2)})
    assert c.check("kv_dtype", DType.FP8_E5M2, _Request(q_dtype=DType.BF16)) is None
    assert c.check("kv_dtype", DType.BF16, _Request(q_dtype=DType.BF16)) is None
    assert (c.check("kv_dtype", DType.FP16, _Request(q_dtype=DType.BF16))
            == "kv_dtype fp16 must equal q_dtype bf16 or be one of [fp8_e4m3, fp8_e5m2]")


def test_equals_with_the_other_field_unset_checks_the_bound_constraint_of_that_field():
    raw = Equals(equals="head_dim_qk")
    unset = _Request(head_dim_qk=None)
    assert raw.check("head_dim_vo", 512, unset) is None  # nothing to compare, nothing bound
    bound = raw.bound(OneOf(values=(64, 128, 256)))
    assert bound.check("head_dim_vo", 128, unset) is None
    assert (bound.check("head_dim_vo", 512, unset)
            == "head_dim_vo 512 not in [64, 128, 256] (the values of head_dim_qk, which it must equal)")
    assert bound.check("head_dim_vo", 512, _Request(head_dim_qk=512)) is None  # set: equality decides
    assert raw.model_dump() == bound.model_dump()  # the binding is not part of the manifest's data


def test_equals_describes_itself_as_written():
    assert Equals(equals="head_dim_qk").describe() == "= head_dim_qk"
    assert Equals(equals="q_dtype", **{"or": (DType.FP8_E4M3,)}).describe() == "= q_dtype or fp8_e4m3"
    assert Equals(equals="q_dtype", **{"or": (DType.FP8_E4M3,)}).model_dump(mode="json", by_alias=True) == {
        "equals": "q_dtype", "or": ["fp8_e4m3"]}


KINDS = {"q_dtype": "dtype", "kv_dtype": "dtype", "head_dim_qk": "shape", "head_dim_vo": "shape", "sinks": "feature"}


@pytest.mark.parametrize("raw, message", [
    ({"equals": "head_dim_q"}, r"^equals names 'head_dim_q', not a request field \(did you mean 'head_dim_qk'\?\)"),
    ({"equals": "q_dtype"}, r"^equals names q_dtype, a dtype field; head_dim_vo is a shape field and can equal only one of: head_dim_qk$"),
    ({"equals": "head_dim_vo"}, r"^equals names head_dim_vo itself; name another shape field: head_dim_qk$"),
    ({"equals": 7}, r"^equals names 7, not a request field"),
    ({"equals": "head_dim_qk", "orr": [1]}, r"^'orr' is not a key of an equals constraint \(did you mean 'or'\?\)"),
    ({"or": [1]}, r"^or is given without equals"),
    ({"equals": "head_dim_qk", "or": ["1"]}, r"^or '1' is not an integer"),
])
def test_equals_constraint_refuses_misuse_in_words(raw, message):
    with pytest.raises(ValueError, match=message):
        equals_constraint(raw, "head_dim_vo", KINDS, int_values)


def test_equals_constraint_reads_the_or_values_with_the_given_reader():
    c = equals_constraint({"equals": "head_dim_qk", "or": 512}, "head_dim_vo", KINDS, int_values)
    assert c == Equals(equals="head_dim_qk", **{"or": (512,)})


@pytest.mark.parametrize("text, arch", [("sm_90", "sm_90"), ("sm90", "sm_90"), ("9.0", "sm_90"), ("90a", "sm_90"), ("12.1", "sm_121"), ((10, 3), "sm_103")])
def test_parse_arch_friendly_spellings(text, arch):
    assert parse_arch(text).value == arch


def test_parse_arch_and_dtype_errors_name_the_accepted_values():
    with pytest.raises(ValueError, match=r"'sm_95' is not an SM like sm_90; expected one of sm_70, .*sm_121"):
        parse_arch("sm_95")
    with pytest.raises(ValueError, match=r"'bf61' is not a dtype; expected one of .*\(did you mean 'bf16'\?\)"):
        parse_dtype("bf61")
    assert parse_dtype("torch.bfloat16") is DType.BF16
    assert parse_dtype("fp8") is DType.FP8_E4M3
