"""An equals constraint decides exactly like the exclusions it replaces.

``kv_dtype: {equals: q_dtype, or: O}`` must admit the same requests as a value list
plus one exclusion per unequal pair, and ``head_dim_vo: {equals: head_dim_qk}`` the
same as a head-dim list plus its exclusions -- for any value sets, including requests
that leave the related field unset.  The manifests are synthetic, built per example.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.loader import load_manifest
from registry.vocab import DType
from selector.platform import Platform
from selector.request import KernelRequest
from selector.solver import reasons

HEAD = """schema_version: 1
solutions:
  triton: {requires: [triton], install: "pip install 'kernelsel[triton]'"}
attention_plan: {postwrite_min_priority: 12, refs: [test]}
kernels:
"""


def _kernel(name: str, dtypes: str, shapes: str, exclude: list[str]) -> str:
    text = (f"  - name: {name}\n    op: mha_decode\n    solution: triton\n    backend: triton\n"
            f"    adapter: registry.adapters.triton:TritonMHADecode\n    arch: {{min: sm_80}}\n"
            f"    dtypes: {dtypes}\n    shapes: {shapes}\n    priority: 5\n    refs: [test]\n")
    if exclude:
        text += "    exclude:\n" + "".join(f"      - when: {w}\n        reason: unequal\n        ref: test\n" for w in exclude)
    return text


def _words(values) -> str:
    return "[" + ", ".join(getattr(v, "value", str(v)) for v in values) + "]"


def _pair(relation: str, exclusions: str, names: tuple[str, str]):
    manifest = load_manifest("synthetic.yaml", text=HEAD + relation + exclusions)
    return manifest, manifest.by_name[names[0]], manifest.by_name[names[1]]


def _eligible(manifest, kernel, request) -> bool:
    return not reasons(kernel, request, manifest, Platform.hypothetical("sm_90"))


dtype_sets = st.sets(st.sampled_from(list(DType)), min_size=1)


@settings(max_examples=40, deadline=None)
@given(qs=dtype_sets, alternatives=st.sets(st.sampled_from(list(DType))))
def test_kv_dtype_equals_q_dtype_or_matches_its_exclusion_form(qs, alternatives):
    qs, alternatives = sorted(qs), sorted(alternatives)
    or_ = f", or: {_words(alternatives)}" if alternatives else ""
    kvs = sorted(set(qs) | set(alternatives))
    excluded = [f"{{q_dtype: {q.value}, kv_dtype: {_words(bad)}}}"
                for q in qs if (bad := [kv for kv in kvs if kv != q and kv not in alternatives])]
    manifest, rel, exc = _pair(
        _kernel("relation", f"{{q_dtype: {_words(qs)}, kv_dtype: {{equals: q_dtype{or_}}}}}", "{}", []),
        _kernel("exclusions", f"{{q_dtype: {_words(qs)}, kv_dtype: {_words(kvs)}}}", "{}", excluded),
        ("relation", "exclusions"))
    for q, kv in itertools.product(DType, [None, *DType]):
        request = KernelRequest(op="mha_decode", arch="sm_90", q_dtype=q, kv_dtype=kv)
        assert _eligible(manifest, rel, request) == _eligible(manifest, exc, request), request.describe()


@settings(max_examples=40, deadline=None)
@given(qks=st.sets(st.sampled_from([64, 96, 128, 192, 256]), min_size=1), alternatives=st.sets(st.sampled_from([128, 512])))
def test_head_dim_vo_equals_head_dim_qk_matches_its_exclusion_form(qks, alternatives):
    qks, alternatives = sorted(qks), sorted(alternatives)
    or_ = f", or: {list(alternatives)}" if alternatives else ""
    vos = sorted(set(qks) | set(alternatives))
    excluded = [f"{{head_dim_qk: {qk}, head_dim_vo: {bad}}}"
                for qk in qks if (bad := [vo for vo in vos if vo != qk and vo not in alternatives])]
    manifest, rel, exc = _pair(
        _kernel("relation", "{q_dtype: [bf16], kv_dtype: [bf16]}", f"{{head_dim_qk: {qks}, head_dim_vo: {{equals: head_dim_qk{or_}}}}}", []),
        _kernel("exclusions", "{q_dtype: [bf16], kv_dtype: [bf16]}", f"{{head_dim_qk: {qks}, head_dim_vo: {vos}}}", excluded),
        ("relation", "exclusions"))
    probes = [None, 32, 64, 96, 128, 192, 256, 512]
    for qk, vo in itertools.product(probes, probes):
        request = KernelRequest(op="mha_decode", arch="sm_90", head_dim_qk=qk, head_dim_vo=vo)
        assert _eligible(manifest, rel, request) == _eligible(manifest, exc, request), request.describe()


def test_a_mismatch_is_one_plain_reason_naming_both_values():
    manifest, rel, _ = _pair(
        _kernel("relation", "{q_dtype: [bf16, fp16], kv_dtype: {equals: q_dtype, or: [fp8_e4m3]}}",
                "{head_dim_qk: [64, 128, 256], head_dim_vo: {equals: head_dim_qk}}", []),
        _kernel("other", "{q_dtype: [bf16], kv_dtype: [bf16]}", "{}", []),
        ("relation", "other"))
    request = KernelRequest(op="mha_decode", arch="sm_90", q_dtype="fp16", kv_dtype="bf16", head_dim_qk=128, head_dim_vo=256)
    assert reasons(rel, request, manifest, Platform.hypothetical("sm_90")) == (
        "kv_dtype bf16 must equal q_dtype fp16 or be one of [fp8_e4m3]",
        "head_dim_vo 256 must equal head_dim_qk 128",
    )
    lone = KernelRequest(op="mha_decode", arch="sm_90", head_dim_vo=512)
    assert reasons(rel, lone, manifest, Platform.hypothetical("sm_90")) == (
        "head_dim_vo 512 not in [64, 128, 256] (the values of head_dim_qk, which it must equal)",
    )
