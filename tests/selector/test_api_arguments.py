"""select_kernel with arguments of any type: a Selection or a KernelselError naming what it takes, never another.

A dict or a bare string for the request, a path for ``manifest=``, an arch for ``platform=``, a list for
``group=``: each used to end in TypeError or AttributeError from deep inside.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import KernelselError, RequestError
from selector import KernelRequest, Platform, Selection, select_kernel

GOOD = dict(op="mha_decode", arch="sm_90", q_dtype="bf16")
ANYTHING = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.binary(max_size=4)
            | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
            | st.sampled_from(["mha_decode", "sm_90", "kernels.yaml", object(), KernelRequest, Platform, ...]))


@pytest.mark.parametrize("call, message", [
    (lambda: select_kernel({"op": "mha_decode"}), r"^select_kernel takes a KernelRequest or keyword fields .*got dict"),
    (lambda: select_kernel("mha_decode"), r"^select_kernel takes a KernelRequest or keyword fields .*got str 'mha_decode'"),
    (lambda: select_kernel(**GOOD, manifest="kernels.yaml"), r"^manifest= takes a Manifest \(registry\.load_manifest\(path\)\), got str"),
    (lambda: select_kernel(**GOOD, platform="sm_90"), r"^platform= takes a Platform \(Platform\.hypothetical\('sm_90'\)"),
    (lambda: select_kernel(KernelRequest(**GOOD), platform=Platform.hypothetical("sm_90"), q_dtype="bf16"),
     r"^pass either a KernelRequest or keyword fields, not both"),
])
def test_wrong_argument_types_say_what_is_accepted(toy_env, call, message):
    with pytest.raises(RequestError, match=message):
        call()


def test_a_group_that_is_no_process_group_is_a_kernelsel_error(toy_env):
    pytest.importorskip("torch.distributed")
    with pytest.raises(KernelselError, match=r"group="):
        select_kernel(**GOOD, group=[1])
    with pytest.raises(KernelselError, match=r"group="):
        select_kernel(KernelRequest(**GOOD), group=[1])


@settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=ANYTHING, manifest=st.none() | ANYTHING, platform=st.none() | ANYTHING | st.just(Platform.hypothetical("sm_90")),
       keywords=st.booleans())
def test_any_argument_gives_a_selection_or_a_kernelsel_error(toy_env, request, manifest, platform, keywords):
    kw = {"manifest": manifest, "platform": platform}
    try:
        result = select_kernel(**GOOD, **kw) if keywords else select_kernel(request, **kw)
    except KernelselError:
        return
    assert isinstance(result, Selection)




EQUAL_ACROSS_TYPES = [1, True, 1.0, "1", 0, False, 0.0, 9, 9.0, "9.0", 10.0, 64, 64.0, 128, 128.0, 2**63 - 1, 2**63,
                      "bf16", "BF16 ", "sm_90", None]
"""Values equal to one another across types or spellings (``True == 1 == 1.0``, ``9 == 9.0``, ``bf16`` and
``BF16 ``), and a bucket's last value next to one out of range: one cache key must not answer for two of them."""


def _twins(value) -> list:
    """The values of EQUAL_ACROSS_TYPES equal to ``value`` but of another type, or spelled alike."""
    def near(other):
        try:
            same = bool(other == value) or (isinstance(other, str) and isinstance(value, str)
                                             and other.strip().lower() == value.strip().lower())
        except Exception:  # an object whose == raises is nobody's twin
            return False
        return same and (type(other) is not type(value) or other != value)
    return [other for other in EQUAL_ACROSS_TYPES if near(other)] + ([value + 1] if type(value) is int else [])


def _outcome(call) -> tuple:
    """What a call answers: the kernel and why, or the error's type and text."""
    try:
        selection = call()
    except KernelselError as exc:
        return type(exc), str(exc)
    return selection.name, selection.why


@settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.sampled_from(sorted(set(KernelRequest.model_fields) - {"op"})), min_size=1, max_size=3,
                      unique=True),
       data=st.data())
def test_keyword_values_of_any_type_answer_as_the_request_does_whether_cached_or_not(toy_env, names, data):
    """The keyword form keys raw arguments before any is checked: a hit must never answer what the request refuses.

    A call, then one whose values equal the first's across types or spellings (``9`` after ``9.0``, ``True``
    after ``1``, the next integer); each made twice (a miss, then -- when it could be keyed -- a hit), each
    answering exactly what selecting its KernelRequest answers.  The default selector lives across examples.
    """
    first = {name: data.draw(st.sampled_from(EQUAL_ACROSS_TYPES) | ANYTHING, label=name) for name in names}
    second = {name: data.draw(st.sampled_from(_twins(v)) if _twins(v) else ANYTHING, label=f"then {name}")
              for name, v in first.items()}
    for values in (first, second):
        fields = {**GOOD, **values}
        expected = _outcome(lambda: select_kernel(KernelRequest(**fields)))
        assert _outcome(lambda: select_kernel(**fields)) == expected, fields
        assert _outcome(lambda: select_kernel(**fields)) == expected, fields
