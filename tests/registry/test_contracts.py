"""The facts of the op contract, each owned by one function of ``registry.contracts``.

The default ``sm_scale``, the output dtype of an FP8 query and the FP8 scale
argument rule are decided there; these tests pin the rules, and a source scan
keeps any other module from deciding them again.
"""

from __future__ import annotations

import math
import pathlib
import re
from types import SimpleNamespace

import pytest

from registry import contracts
from registry.contracts import DecodeMetadata, ExtendMetadata, PrefillMetadata
from registry.errors import AdapterInputError
from registry.vocab import DType, Op

ROOT = pathlib.Path(__file__).resolve().parents[2]


def request(op: str, **fields):
    return SimpleNamespace(op=op, head_dim_qk=None, qk_nope_head_dim=None, qk_rope_head_dim=None, **fields)


# --------------------------------------------------------------------- sm_scale


def test_every_op_names_the_head_dims_of_its_default_scale():
    assert set(contracts.SCALE_HEAD_DIMS) == set(Op.values())


@pytest.mark.parametrize("op", Op.values())
def test_the_default_scale_is_one_over_the_root_of_the_summed_head_dims(op):
    fields = {name: 16 * (i + 1) for i, name in enumerate(contracts.SCALE_HEAD_DIMS[op])}
    r = request(op, **{k: v for k, v in fields.items() if k not in ("head_dim_qk", "qk_nope_head_dim", "qk_rope_head_dim")})
    for name, value in fields.items():
        setattr(r, name, value)
    want = 1.0 / math.sqrt(sum(fields.values()))
    assert contracts.default_sm_scale(r) == want
    assert contracts.sm_scale(DecodeMetadata(), r, kernel="k") == want


def test_mla_scales_by_the_head_dim_before_absorption():
    """DeepSeek: 1/sqrt(128 + 64), not 1/sqrt(kv_lora_rank + 64)."""
    r = request("mla_decode", kv_lora_rank=512)
    r.qk_nope_head_dim, r.qk_rope_head_dim = 128, 64
    assert contracts.default_sm_scale(r) == 1.0 / math.sqrt(192)


def test_an_explicit_scale_wins_and_needs_no_head_dim():
    assert contracts.sm_scale(DecodeMetadata(sm_scale=0.125), request("mla_decode"), kernel="k") == 0.125
    assert contracts.sm_scale(PrefillMetadata(sm_scale=0.5), request("mha_prefill"), kernel="k") == 0.5


def test_mla_without_qk_nope_head_dim_and_without_a_scale_names_both_fixes():
    r = request("mla_decode")
    r.qk_rope_head_dim = 64
    assert contracts.default_sm_scale(r) is None
    message = (
        r"^triton-mla-decode: DecodeMetadata\.sm_scale is not set and its default "
        r"1/sqrt\(qk_nope_head_dim \+ qk_rope_head_dim\) needs request\.qk_nope_head_dim, which the request leaves "
        r"unset; pass DecodeMetadata\(sm_scale=\.\.\.\) or select with qk_nope_head_dim=\.\.\.$"
    )
    with pytest.raises(AdapterInputError, match=message):
        contracts.sm_scale(DecodeMetadata(), r, kernel="triton-mla-decode")


def test_the_missing_field_error_names_the_metadata_type_it_came_with():
    with pytest.raises(AdapterInputError, match=r"^k: ExtendMetadata\.sm_scale is not set .* needs request\.head_dim_qk, "
                                                 r".*pass ExtendMetadata\(sm_scale=\.\.\.\) or select with head_dim_qk=\.\.\.$"):
        contracts.sm_scale(ExtendMetadata(), request("mha_extend"), kernel="k")


# ----------------------------------------------------------------- output dtype


@pytest.mark.parametrize("q", list(DType))
def test_the_output_is_bf16_for_an_fp8_query_else_the_query_dtype(q):
    assert contracts.output_dtype(q) is (DType.BF16 if q in (DType.FP8_E4M3, DType.FP8_E5M2) else q)
    assert contracts.output_dtype(q.value) is contracts.output_dtype(q)
    assert contracts.output_dtype(q, "fp16") is DType.FP16


@pytest.mark.parametrize("q", list(DType))
def test_a_request_takes_its_default_output_dtype_from_the_contract(q):
    from selector.request import KernelRequest

    assert KernelRequest(op="mha_decode", q_dtype=q).out_dtype is contracts.output_dtype(q)


# ----------------------------------------------------------------- FP8 scales


def test_a_python_number_is_a_float_scale():
    assert contracts.scale_arg("q_scale", 2) == 2.0 and isinstance(contracts.scale_arg("q_scale", 2), float)
    assert contracts.scale_arg("q_scale", 0.5) == 0.5


def test_a_one_element_fp32_tensor_is_passed_through_unread():
    torch = pytest.importorskip("torch")
    for t in (torch.tensor([0.5]), torch.tensor(0.5)):
        assert contracts.scale_arg("kv_scale", t, device="cpu") is t


@pytest.mark.parametrize("make,message", [
    (lambda torch: torch.ones(2), r"expected a float or a one-element fp32 tensor, got tensor\(\[1\., 1\.\]\)"),
    (lambda torch: torch.ones(1, dtype=torch.float16), r"dtype float16 not in \[float32\]"),
    (lambda torch: torch.ones(1, dtype=torch.int32), r"dtype int32 not in \[float32\]"),
    (lambda torch: "1.0", r"expected a float or a one-element fp32 tensor, got '1\.0'"),
    (lambda torch: True, r"expected a float or a one-element fp32 tensor, got True"),
    (lambda torch: None, r"expected a float or a one-element fp32 tensor, got None"),
], ids=["two-elements", "fp16", "int32", "text", "bool", "none"])
def test_anything_else_is_refused_naming_the_argument(make, message):
    torch = pytest.importorskip("torch")
    with pytest.raises(AdapterInputError, match=rf"^k_scale: {message} \(mha_decode\)$"):
        contracts.scale_arg("k_scale", make(torch), contract="mha_decode")


def test_a_scale_tensor_must_be_on_the_kernels_device():
    torch = pytest.importorskip("torch")
    with pytest.raises(AdapterInputError, match=r"^v_scale: on cpu, expected meta$"):
        contracts.scale_arg("v_scale", torch.ones(1), device="meta")


# ------------------------------------------------------------ one owner per fact

_RULES = {
    "a softmax scale (sqrt)": re.compile(r"\bsqrt\("),
    "the FP8-query output dtype": re.compile(r"(?:bfloat16|BF16) if |float8_e4m3fn, torch\.float8_e5m2\)"),
    "the FP8 scale check": re.compile(r"numel\(\) != 1|numel\(\) == 1"),
}


@pytest.mark.parametrize("fact", list(_RULES))
def test_no_other_module_decides_a_contract_fact_again(fact):
    """Only ``registry/contracts.py`` computes these; adapters, request, workloads, tools and bench call it."""
    offenders = []
    for folder in ("registry", "selector", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "registry" / "contracts.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _RULES[fact].search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, f"{fact} decided outside registry/contracts.py:\n" + "\n".join(offenders)
