"""Public values and errors survive pickling (process pools, torch.distributed's all_gather_object, caches).

Each comes back equal, with its message, its problems and what it remembers about where it came from.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import errors
from registry.loader import bundled_perf_dir, load_manifest, load_perf_table
from registry.vocab import Arch, DType, Op
from selector import KernelRequest, Overrides, Platform


def roundtrip(value):
    return pickle.loads(pickle.dumps(value))


ERRORS = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.KernelselError)]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_keeps_its_message_and_problems(cls):
    exc = cls(["a.yaml:1:2: x: bad", "a.yaml:3:4: y: worse"]) if cls is errors.ManifestError else cls("bad thing")
    if cls is errors.RequestError:
        exc = cls("invalid kernel request:\n  request.x: bad", ["request.x: bad"])
    back = roundtrip(exc)
    assert type(back) is cls and str(back) == str(exc)
    assert getattr(back, "problems", None) == getattr(exc, "problems", None)


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(Op.values()), arch=st.sampled_from(Arch.values()), q=st.sampled_from(DType.values()),
       batch=st.none() | st.integers(1, 10**6))
def test_requests_come_back_equal_with_the_same_hash(op, arch, q, batch):
    request = KernelRequest(op=op, arch=arch, q_dtype=q, batch_size=batch)
    back = roundtrip(request)
    assert back == request and hash(back) == hash(request)


def test_a_request_pickled_in_one_process_hashes_as_the_next_process_does():
    """A str enum's hash depends on the process's hash seed: a request that carried its hash over would equal the
    same request made there but miss it in every dict (a cache, a process group's agreed selections)."""
    request = "KernelRequest(op='mla_decode', arch='sm_90', kv_dtype='fp8_e4m3', batch_size=8)"
    dump = f"import pickle, sys\nfrom selector import KernelRequest\nr = {request}\nhash(r)\nsys.stdout.buffer.write(pickle.dumps(r))"
    load = (f"import pickle, sys\nfrom selector import KernelRequest\nback, here = pickle.loads(sys.stdin.buffer.read()), {request}\n"
            "print(back == here, hash(back) == hash(here), {here: 'hit'}.get(back))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    pickled = subprocess.run([sys.executable, "-c", dump], capture_output=True, check=True,
                             env={**env, "PYTHONHASHSEED": "1"}).stdout
    out = subprocess.run([sys.executable, "-c", load], input=pickled, capture_output=True, check=True,
                         env={**env, "PYTHONHASHSEED": "2"}).stdout.decode().split()
    assert out == ["True", "True", "hit"]


def test_manifests_tables_platforms_and_overrides_keep_where_they_came_from():
    manifest = load_manifest()
    back = roundtrip(manifest)
    assert back == manifest and (back.path, back.digest) == (manifest.path, manifest.digest)
    assert [k.origin for k in back.kernels] == [k.origin for k in manifest.kernels]
    table = load_perf_table(sorted(bundled_perf_dir().glob("*.yaml"))[0])
    assert roundtrip(table) == table and roundtrip(table).path == table.path
    for value in (Platform.hypothetical("sm_90"), Overrides(disable=frozenset({"x"}))):
        assert roundtrip(value) == value


def test_selections_and_selection_errors_come_back_with_the_same_decision_and_text():
    """A Selection held the selector's lock (unpicklable); NoKernelError rebuilt itself from its message."""
    from selector import NoKernelError, Selector
    from selector.distributed import GroupSelectionError
    from selector.selection import KernelUnavailableError

    selector = Selector(load_manifest(), Platform.hypothetical("sm_90"))
    selection = selector.select(KernelRequest(op="mha_decode", arch="sm_90", q_dtype="bf16"))
    back = roundtrip(selection)
    assert (back.name, back.why, back.explain(), back.to_dict()) == (selection.name, selection.why, selection.explain(),
                                                                       selection.to_dict())
    with pytest.raises(NoKernelError) as info:
        selector.select(KernelRequest(op="mha_decode", arch="sm_90", q_dtype="fp32", head_dim_qk=7))
    for exc in (info.value, KernelUnavailableError(selection, [("k", "cannot import x")], "note"),
                GroupSelectionError("no kernel for mha_decode\n  rank 1: none")):
        again = roundtrip(exc)
        assert type(again) is type(exc) and str(again) == str(exc)
        assert getattr(again, "failures", None) == getattr(exc, "failures", None)
