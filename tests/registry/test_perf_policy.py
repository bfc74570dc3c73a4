"""The perf-table policy: a path, ``off``, or the committed table for this GPU -- one rule for every caller."""

from __future__ import annotations

import pytest

from registry.errors import ManifestError
from registry.loader import bundled_perf_dir, load_perf_table
from registry.perf_policy import choose_perf_table, committed_perf_table
from registry.vocab import Arch


@pytest.fixture(scope="module")
def committed():
    path = sorted(bundled_perf_dir().glob("*.yaml"))[0]
    return load_perf_table(path)


def test_a_path_loads_that_table_whatever_the_gpu(committed):
    choice = choose_perf_table(committed.path, "", None, setting_name="--perf")
    assert choice.table.path == committed.path and choice.source == "--perf" and not choice.needs_gpu


@pytest.mark.parametrize("setting", ["off", "OFF", " off "])
def test_off_ranks_by_priority(committed, setting):
    choice = choose_perf_table(setting, committed.gpu, committed.arch, setting_name="KERNELSEL_PERF")
    assert choice.table is None and choice.source == "KERNELSEL_PERF=off"
    assert choice.note == "eligible kernels rank by priority"


def test_no_setting_takes_the_committed_table_of_this_gpu(committed):
    choice = choose_perf_table(None, committed.gpu, committed.arch)
    assert choice.table.path == committed.path and choice.source == f"committed table for {committed.gpu}"
    assert committed_perf_table(committed.gpu, committed.arch).path == committed.path


def test_no_setting_and_no_known_gpu_waits_for_one(committed):
    choice = choose_perf_table(None)
    assert choice.table is None and choice.needs_gpu and choice.note == "no GPU detected: eligible kernels rank by priority"


def test_no_committed_table_for_another_gpu_or_arch(committed):
    other = next(a for a in Arch if a is not committed.arch)
    choice = choose_perf_table(None, committed.gpu, other)
    assert choice.table is None and not choice.needs_gpu
    assert choice.note == f"no committed table for {committed.gpu} {other.value}: eligible kernels rank by priority"
    assert choose_perf_table(None, "Some Other GPU", committed.arch).table is None


def test_a_broken_table_is_a_located_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu: X\narch: sm_95\n")
    with pytest.raises(ManifestError, match=r"bad\.yaml:\d+:\d+: "):
        choose_perf_table(str(bad), setting_name="KERNELSEL_PERF")
