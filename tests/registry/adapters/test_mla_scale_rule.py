"""MLA's ``qk_nope_head_dim`` rule through every MLA adapter's ``plan()``, on CPU.

The rule (``registry.contracts.sm_scale``): a request may leave
``qk_nope_head_dim`` out; ``plan()`` then needs an explicit ``sm_scale``, and
without one raises an error naming ``request.qk_nope_head_dim`` and
``DecodeMetadata(sm_scale=...)``.  FlashInfer is replaced by a fake module in
``sys.modules`` that records what the adapters hand it.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from registry.adapters import flashinfer_common  # noqa: E402
from registry.adapters import reference as ref  # noqa: E402
from registry.contracts import DecodeMetadata, softmax_scale  # noqa: E402
from registry.errors import AdapterInputError  # noqa: E402
from registry.loader import load_manifest  # noqa: E402
from selector.api import Selector  # noqa: E402
from selector.platform import Platform  # noqa: E402
from selector.request import KernelRequest  # noqa: E402

MANIFEST = load_manifest()
MLA_OPS = ("mla_decode", "sparse_mla_decode")
FEATURES = ("sinks", "sliding_window", "logits_soft_cap", "return_lse", "non_causal", "noncontiguous_kv", "cuda_graph")
INSTALLED = (("flashinfer-python", "0.7.2"), ("torch", "2.13.0"), ("triton", "3.6.0"))
NO_NOPE = (
    r"DecodeMetadata\.sm_scale is not set and its default 1/sqrt\(qk_nope_head_dim \+ qk_rope_head_dim\) needs "
    r"request\.qk_nope_head_dim, which the request leaves unset; pass DecodeMetadata\(sm_scale=\.\.\.\) or select "
    r"with qk_nope_head_dim=\.\.\.$"
)


class FakeFlashInfer(types.ModuleType):
    """``flashinfer`` as far as the MLA adapters' constructors and ``plan()`` reach: records each plan's keywords."""

    def __init__(self):
        super().__init__("flashinfer")
        self.plans: list[dict] = []
        fake = self

        class Wrapper:
            def __init__(self, *args, **kwargs):
                pass

            def plan(self, **kwargs):
                fake.plans.append(kwargs)

        self.mla = SimpleNamespace(
            BatchMLAPagedAttentionWrapper=Wrapper, MLAPlanMetadata=SimpleNamespace(csr=lambda *a: a),
        )
        self.utils = SimpleNamespace(
            device_support_pdl=lambda device: False,
            get_device_sm_count=lambda device: 132,
            get_trtllm_gen_multi_ctas_kv_counter_bytes=lambda batch, heads, sms: 64,
        )


@pytest.fixture
def flashinfer(monkeypatch):
    """The fake in ``sys.modules``, CPU tensors accepted as the adapters' device, small workspaces."""
    fake = FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)

    def bind_cpu(self, t):
        self._device, self._device_index, self._pdl = t.device, t.get_device(), False

    monkeypatch.setattr(flashinfer_common.FlashInferAdapter, "_bind_device", bind_cpu)
    monkeypatch.setattr(flashinfer_common, "workspace", lambda device, nbytes, tag="float": torch.zeros(8, dtype=torch.uint8))
    return fake


def the_request(**fields) -> KernelRequest:
    """DeepSeek-style MLA decode on an H200, ``qk_nope_head_dim`` left out."""
    return KernelRequest(**{**dict(op="mla_decode", arch="sm_90", q_dtype="bf16", num_qo_heads=16, kv_lora_rank=512,
                                   qk_rope_head_dim=64, page_size=4), **fields})


def metadata(**options) -> DecodeMetadata:
    block_table = torch.tensor([[3, 1, 0], [2, 5, 4]], dtype=torch.int32)
    return DecodeMetadata(block_table=block_table, seq_lens=torch.tensor([9, 5], dtype=torch.int32), **options)


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_the_request_selects_flashinfer_mla_and_plan_names_the_fix(flashinfer, backend):
    selection = Selector(MANIFEST, Platform(arch="sm_90", libraries=INSTALLED)).select(
        the_request(solution="flashinfer", backend=backend)
    )
    assert "qk_nope_head_dim" in selection.request.unchecked()  # selected although the field is unset
    adapter = selection.make_adapter()
    with pytest.raises(AdapterInputError, match=rf"^{selection.kernel.name}: {NO_NOPE}"):
        adapter.plan(metadata())
    assert flashinfer.plans == []  # refused before FlashInfer is planned, not inside it (no `None + 64`)
    adapter.plan(metadata(sm_scale=0.07))
    assert flashinfer.plans[-1]["sm_scale"] == 0.07


def test_with_qk_nope_head_dim_flashinfer_gets_the_contract_default(flashinfer):
    selection = Selector(MANIFEST, Platform(arch="sm_90", libraries=INSTALLED)).select(
        the_request(solution="flashinfer", backend="fa2", qk_nope_head_dim=128)
    )
    selection.make_adapter().plan(metadata())
    assert flashinfer.plans[-1]["sm_scale"] == softmax_scale(128 + 64)


def mla_specs():
    return [pytest.param(k, id=k.name) for k in MANIFEST.kernels if k.op.value in MLA_OPS]


def request_for(spec) -> SimpleNamespace:
    """Every field the MLA adapters read; ``qk_nope_head_dim`` unset.  The DSv4 row is 512 wide with no rope."""
    rope = 0 if spec.op.value == "sparse_mla_decode" else 64
    return SimpleNamespace(
        op=spec.op.value, arch="sm_90", q_dtype="bf16", kv_dtype="bf16", out_dtype="bf16", num_qo_heads=16,
        num_kv_heads=None, head_dim_qk=None, head_dim_vo=None, page_size=4, q_len=1, kv_lora_rank=512 - rope,
        qk_rope_head_dim=rope, qk_nope_head_dim=None, topk=4, **{f: False for f in FEATURES},
    )


@pytest.mark.parametrize("spec", mla_specs())
def test_every_mla_adapter_refuses_a_plan_without_a_scale_the_same_way(flashinfer, spec):
    module, name = spec.adapter.split(":")
    adapter = getattr(importlib.import_module(module), name)(spec, request_for(spec))
    with pytest.raises(AdapterInputError, match=rf"^{spec.name}: {NO_NOPE}"):
        adapter.plan(metadata())
    adapter.plan(metadata(sm_scale=0.07))  # an explicit scale is all it needs


PORTABLE_MLA = [pytest.param(k, id=k.name) for k in MANIFEST.kernels
                if k.op.value == "mla_decode" and k.solution.value in ("triton", "reference")]


@pytest.mark.parametrize("spec", PORTABLE_MLA)
def test_portable_mla_runs_without_qk_nope_head_dim_given_a_scale(spec):
    """The Triton (interpreter) and torch adapters compute with the explicit scale, as the reference does."""
    r = request_for(spec)
    r.kv_lora_rank, r.qk_rope_head_dim = 64, 16  # interpreter-sized
    module, name = spec.adapter.split(":")
    adapter = getattr(importlib.import_module(module), name)(spec, r)
    md = metadata(sm_scale=0.3)
    adapter.plan(md)
    g = torch.Generator().manual_seed(0)
    q_nope, q_pe = (torch.randn(2, 16, w, generator=g).bfloat16() for w in (64, 16))
    kv = torch.randn(6, 4, 80, generator=g).bfloat16()
    got = adapter.run(q_nope, q_pe, kv).out
    want, _ = ref.mla_paged(q_nope, q_pe, kv, md.block_table, md.seq_lens, sm_scale=0.3)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
