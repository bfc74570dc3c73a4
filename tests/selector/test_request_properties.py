"""Property tests: random requests resolve, or fail with a RequestError / NoKernelError naming the field.

``KernelRequest(**fields)`` with any mix of good, misspelled, mistyped,
out-of-range and unknown fields either builds a request or raises
``RequestError`` whose every line is ``request.FIELD: message`` for a field
that was given.  A request that builds and is selected against the bundled
manifest on a hypothetical machine of its arch either returns a kernel that
really is eligible -- the solver's own ``reasons()`` finds nothing wrong with
it -- or raises ``NoKernelError`` / ``RequestError``; never another exception.
Values are drawn from the vocabularies and the manifest, not restated.
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from registry.errors import KernelselError, RequestError
from registry.loader import load_manifest
from registry.ops import FEATURE_FIELDS_BY_OP, MLA_OPS, SHAPE_FIELDS_BY_OP
from registry.vocab import Arch, Backend, DType, Op, Solution
from selector import KernelRequest, NoKernelError, Platform, select_kernel
from selector.solver import reasons

MANIFEST = load_manifest()
FIELDS = list(KernelRequest.model_fields)
INT_FIELDS = [f for f, info in KernelRequest.model_fields.items() if "int" in str(info.annotation)]
BOOL_FIELDS = [f for f, info in KernelRequest.model_fields.items() if info.annotation in (bool, "bool")]
# values the manifest's own constraints name, so requests land on both sides of every boundary
DECLARED_INTS = sorted({v for k in MANIFEST.kernels for _, c in k.constraints if hasattr(c, "values")
                        for v in c.values if isinstance(v, int) and not isinstance(v, bool)}
                       | {b + d for k in MANIFEST.kernels for _, c in k.constraints
                          for b in (getattr(c, "min", None), getattr(c, "max", None)) if isinstance(b, int)
                          for d in (-1, 0, 1)})


def examples(n: int) -> settings:
    """``n`` examples per property (KERNELSEL_PROPERTY_EXAMPLES=N runs N each, for a longer hunt)."""
    return settings(max_examples=int(os.environ.get("KERNELSEL_PROPERTY_EXAMPLES", n)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _word(words: list[str]) -> st.SearchStrategy:
    """A vocabulary word, a near miss, another case, or garbage."""
    return (
        st.sampled_from(words)
        | st.sampled_from(words).map(lambda w: w[:-1])
        | st.sampled_from(words).map(str.upper)
        | st.text(max_size=12) | st.integers(-5, 300) | st.none() | st.booleans() | st.lists(st.integers(), max_size=2)
    )


garbage = st.none() | st.booleans() | st.text(max_size=8) | st.floats() | st.lists(st.integers(), max_size=2) | st.integers(-(10**4000), 10**4000)
ints = (st.sampled_from(DECLARED_INTS) | st.integers(-3, 1024) | st.integers(-(2**80), 2**80)
        | st.floats(-1e3, 1e3) | st.sampled_from(["128", "0x10", "1e3", " 64 "]) | garbage)
VALUES = {
    "op": _word(Op.values()),
    "arch": _word(Arch.values()) | st.sampled_from(["sm90", "9.0", "90a", "sm_90a", "100f", "compute_90", "12.1"]),
    "q_dtype": _word(DType.values()) | st.sampled_from(["bfloat16", "torch.float16", "fp8", "e5m2", "half"]),
    "kv_dtype": _word(DType.values()) | st.sampled_from(["bfloat16", "fp8"]),
    "out_dtype": _word(DType.values()),
    "solution": _word(Solution.values()),
    "backend": _word(Backend.values()),
    "kernel": _word(sorted(MANIFEST.by_name)),
    **{f: ints for f in INT_FIELDS},
    **{f: st.booleans() | garbage for f in BOOL_FIELDS},
}
assert set(VALUES) == set(FIELDS), set(FIELDS) ^ set(VALUES)  # a new request field must get a strategy


@st.composite
def request_fields(draw, *, valid_op: bool = False):
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True))
    fields = {n: draw(VALUES[n]) for n in names}
    if valid_op or draw(st.booleans()):
        fields["op"] = draw(st.sampled_from(Op.values()))
        fields["arch"] = draw(st.sampled_from(Arch.values()))
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.sampled_from(["head_dim", "page", "qdtype", "x", "Op"]))] = draw(garbage)
    return fields


def assert_names_fields(exc: RequestError, fields: dict) -> None:
    text = str(exc)
    assert "Traceback" not in text
    assert exc.problems, text
    for line in exc.problems:
        m = re.match(r"^request\.(\w+): \S", line)
        assert m, f"not field-named: {line!r}"
        required = m[1] == "op" and "op" not in fields
        assert m[1] in fields or required, (line, sorted(fields))
        assert "\n" not in line and len(line) < 600, line


@examples(300)
@given(fields=request_fields())
@example(fields={"head_dim_vo": 1, "op": "mla_decode", "arch": "sm_70"})  # MLA head sizes become the latent dims
def test_random_requests_build_or_name_the_field(fields):
    try:
        request = KernelRequest(**fields)
    except RequestError as exc:
        assert_names_fields(exc, fields)
        return
    assert request == KernelRequest(**fields) and hash(request) == hash(KernelRequest(**fields))
    if request.op in MLA_OPS:  # head sizes given the vLLM way are kept as the MLA dims they mean
        spelled = {"head_dim_qk": None, "head_dim_vo": None, "kv_lora_rank": request.kv_lora_rank,
                   "qk_rope_head_dim": request.qk_rope_head_dim}
    else:
        spelled = {"head_dim_vo": request.head_dim_vo}
    explicit = KernelRequest(**{**fields, "kv_dtype": request.kv_dtype, "out_dtype": request.out_dtype, **spelled})
    assert explicit == request and hash(explicit) == hash(request), "defaults spelled out must hash the same"
    assert request.op in Op and (request.arch is None or request.arch in Arch)
    for f in SHAPE_FIELDS_BY_OP[request.op] & set(FIELDS):
        v = getattr(request, f)
        assert v is None or (isinstance(v, int) and not isinstance(v, bool))


@examples(200)
@given(fields=request_fields(valid_op=True))
def test_selection_is_eligible_or_an_error_naming_why(fields):
    try:
        request = KernelRequest(**fields)
    except RequestError as exc:
        assert_names_fields(exc, fields)
        return
    platform = Platform.hypothetical(request.arch)
    try:
        selection = select_kernel(request, manifest=MANIFEST, platform=platform)
    except NoKernelError as exc:
        selection = exc.selection
        assert selection.kernel is None or selection.forced_by
        assert all(v.reasons for v in selection.rejected), "a rejected kernel without a reason"
        assert str(exc).strip()
        return
    except RequestError as exc:  # a forced kernel of another op or an unknown name, named with what is accepted
        assert "kernel" in str(exc) and "\n" not in str(exc).strip(), str(exc)
        return
    kernel = selection.kernel
    assert kernel.op is request.op
    assert reasons(kernel, request, MANIFEST, platform, forced=request.kernel is not None) == ()
    assert all(v.reasons for v in selection.rejected)
    explained = selection.explain()
    assert kernel.name in explained and "unknown" not in explained


@examples(100)
@given(fields=request_fields(valid_op=True))
def test_never_a_raw_exception(fields):
    """Whatever goes in, only kernelsel's own errors come out (KernelselError is their root)."""
    try:
        request = KernelRequest(**fields)
        select_kernel(request, manifest=MANIFEST, platform=Platform.hypothetical(request.arch)).to_dict()
    except KernelselError:
        pass


def test_feature_and_shape_fields_come_from_the_op_tables():
    """The strategies above are built from the request model; the op tables name only request fields."""
    assert all(fs <= set(FIELDS) | {"gqa_group_size"} for fs in SHAPE_FIELDS_BY_OP.values())
    assert all(fs <= set(BOOL_FIELDS) for fs in FEATURE_FIELDS_BY_OP.values())
