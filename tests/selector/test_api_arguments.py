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
