"""Group agreement as a pure decision: hand-built rank views in, the same decision (or error) out.

No processes and no torch.distributed: ``agree`` and ``GroupDecision.drop`` are what every rank computes
from the gathered views (``test_distributed.py`` runs the collective around them over gloo).
"""

from __future__ import annotations

import pickle

import pytest

from selector import GroupSelectionError
from selector.distributed import RankView, agree

KERNELS = ("a-fast", "b-mid", "c-slow")
REQUEST = (("op", "mha_decode"), ("q_dtype", "bf16"), ("page_size", 16))


def view(rank, eligible=KERNELS, rejected=(), **kw) -> RankView:
    fields = dict(rank=rank, op="mha_decode", platform="torch 2, triton 3", manifest="kernels.yaml (sha 0123)",
                  arch="sm_90", request=REQUEST, kernels=KERNELS, eligible=tuple(eligible), rejected=tuple(rejected))
    return RankView(**(fields | kw))


def test_every_rank_eligible_keeps_the_first_ranks_order():
    decision = agree([view(0, ("b-mid", "a-fast", "c-slow")), view(1), view(2, ("c-slow", "b-mid", "a-fast"))])
    assert decision.candidates == ("b-mid", "a-fast", "c-slow") and decision.best == "b-mid"
    assert decision.dropped == () and decision.world == 3
    assert decision.why() == "best of 3 kernels eligible on all 3 ranks, in rank 0's order"


def test_a_kernel_missing_on_one_rank_is_dropped_with_that_ranks_reason():
    lacking = view(1, ("b-mid", "c-slow"), rejected=[("a-fast", ("needs fast-lib, not installed: pip install x",))])
    decision = agree([view(0), lacking])
    assert decision.candidates == ("b-mid", "c-slow")
    assert dict(decision.dropped) == {"a-fast": "not eligible on rank 1: needs fast-lib, not installed: pip install x"}
    # rank 0 rejects the kernel it had, with rank 1's reason; rank 1 has nothing extra to reject
    assert decision.rejections(view(0).eligible) == dict(decision.dropped)
    assert decision.rejections(lacking.eligible) == {}


def test_dropping_an_unbuildable_kernel_moves_to_the_next_and_says_which_ranks_failed():
    decision = agree([view(0), view(1)])
    second = decision.drop("a-fast", [(1, "cannot import fast-lib: ModuleNotFoundError: nope")])
    assert second.best == "b-mid" and decision.best == "a-fast"  # a decision is a value: drop returns a new one
    assert dict(second.dropped)["a-fast"] == "unavailable on rank 1: cannot import fast-lib: ModuleNotFoundError: nope"
    last = second.drop("b-mid", [(0, "x"), (1, "y")]).drop
    with pytest.raises(GroupSelectionError) as err:
        last("c-slow", [(0, "z")])
    assert str(err.value).splitlines() == [
        "no kernel for mha_decode eligible on all a 2-rank process group can be used on every rank",
        "request: op=mha_decode q_dtype=bf16 page_size=16",
        "  a-fast: unavailable on rank 1: cannot import fast-lib: ModuleNotFoundError: nope",
        "  b-mid: unavailable on rank 0: x; rank 1: y",
        "  c-slow: unavailable on rank 0: z",
    ]


def test_one_candidate_and_a_forced_kernel_say_so():
    assert agree([view(0, ("c-slow",)), view(1)]).why() == "only kernel eligible and usable on all 2 ranks"
    forced = agree([view(0, forced="c-slow"), view(1, forced="c-slow")])
    assert forced.candidates == ("c-slow",)
    assert forced.why("request kernel=c-slow") == "forced by request kernel=c-slow on every rank"


def test_a_forced_kernel_not_eligible_everywhere_names_the_ranks():
    rejected = [("c-slow", ("arch sm_80 not in [sm_90]", "needs sinks: unsupported"))]
    with pytest.raises(GroupSelectionError) as err:
        agree([view(0, forced="c-slow"), view(1, ("a-fast",), rejected, forced="c-slow", arch="sm_80")])
    assert str(err.value).splitlines() == [
        "kernel c-slow (forced on every rank) is not eligible on rank 1 of a 2-rank process group",
        "request: op=mha_decode q_dtype=bf16 page_size=16",
        "  rank 1 (sm_80; torch 2, triton 3): arch sm_80 not in [sm_90]; needs sinks: unsupported",
    ]


def test_a_rank_without_candidates_is_named_with_its_reasons():
    empty = view(1, (), rejected=[(n, ("disabled by KERNELSEL_DISABLE",)) for n in KERNELS])
    with pytest.raises(GroupSelectionError) as err:
        agree([view(0, ("a-fast",)), empty])
    lines = str(err.value).splitlines()
    assert lines[0] == "no kernel for mha_decode is eligible on every rank of a 2-rank process group: rank 1 has no eligible kernel"
    assert lines[2:] == ["  rank 0 (sm_90; torch 2, triton 3): eligible a-fast",
                         "  rank 1 (sm_90; torch 2, triton 3): eligible none",
                         "      a-fast: disabled by KERNELSEL_DISABLE"]


def test_disjoint_eligible_sets_do_not_overlap():
    with pytest.raises(GroupSelectionError, match=r"the ranks' eligible kernels do not overlap\n(.|\n)*"
                                                  r"      b-mid: not eligible"):
        agree([view(0, ("a-fast",)), view(1, ("b-mid",))])


@pytest.mark.parametrize("other, what, shown", [
    (dict(manifest="other.yaml (sha 4567)"), "manifests", "other.yaml (sha 4567)"),
    (dict(request=REQUEST[:2] + (("page_size", 32),)), "requests (the arch may differ)", "op=mha_decode q_dtype=bf16 page_size=32"),
    (dict(forced="b-mid"), "forced kernels", "b-mid"),
])
def test_incoherent_ranks_refuse_to_agree(other, what, shown):
    with pytest.raises(GroupSelectionError) as err:
        agree([view(0), view(1), view(2, **other)])
    lines = str(err.value).splitlines()
    assert lines[:2] == ["cannot select a kernel for mha_decode in a 3-rank process group:",
                         f"the ranks use different {what}:"]
    assert lines[3] == f"  rank 2: {shown}" and lines[2].startswith("  rank 0, rank 1: ")


def test_a_rank_whose_local_selection_failed_is_reported_not_waited_for():
    failed = RankView(rank=1, op="mha_decode", platform="no optional libraries", manifest="kernels.yaml (sha 0123)",
                      error="RequestError: request.arch: not given and no CUDA device was detected")
    with pytest.raises(GroupSelectionError) as err:
        agree([view(0), failed])
    assert str(err.value).splitlines()[1:] == [
        "  rank 1 (unknown arch; no optional libraries): RequestError: request.arch: not given and no CUDA device was detected"]


def test_the_same_views_give_the_same_decision_and_views_travel_by_pickle():
    views = [view(0, ("b-mid", "a-fast")), view(1, ("a-fast", "b-mid", "c-slow"))]
    travelled = [pickle.loads(pickle.dumps(v)) for v in views]
    assert travelled == views and agree(travelled) == agree(views)
