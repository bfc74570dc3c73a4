"""Finding this machine's GPU: one function, ``detect_gpus``, whose callers choose the sources it may ask."""

from __future__ import annotations

import os
import stat

import pytest

from registry.vocab import Arch
from selector.platform import GPU_SOURCES, NVIDIA_SMI, TORCH, Gpu, detect_gpus, nvidia_smi_gpus

H100 = Gpu("NVIDIA H100", "9.0", Arch("sm_90"))


def test_the_first_source_that_finds_a_gpu_wins_and_earlier_notes_are_kept(monkeypatch):
    asked = []

    def source(name, gpus, note):
        def ask():
            asked.append(name)
            return gpus, note
        return ask

    monkeypatch.setitem(GPU_SOURCES, NVIDIA_SMI, source(NVIDIA_SMI, (), "nvidia-smi not found"))
    monkeypatch.setitem(GPU_SOURCES, TORCH, source(TORCH, (H100,), ""))
    found = detect_gpus((NVIDIA_SMI, TORCH))
    assert found.current == H100 and found.source == TORCH and found.notes == ("nvidia-smi not found",)
    asked.clear()
    assert detect_gpus((NVIDIA_SMI,)).current is None and asked == [NVIDIA_SMI], "only the sources asked for"
    assert detect_gpus((NVIDIA_SMI,)).notes == ("nvidia-smi not found",)


def _fake_smi(tmp_path, monkeypatch, script: str) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script + "\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(os.name != "posix", reason="a shell-script stand-in for nvidia-smi")
def test_nvidia_smi_lines_become_gpus_with_their_driver(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "echo 'NVIDIA H200, 9.0, 570.86.15'; echo 'Some Future GPU, 13.7, 570.86.15'")
    gpus, note = nvidia_smi_gpus()
    assert note == "" and gpus[0] == Gpu("NVIDIA H200", "9.0", Arch("sm_90"), "570.86.15")
    assert gpus[1].arch is None and gpus[1].compute_cap == "13.7"  # an SM kernelsel does not know: no arch


@pytest.mark.skipif(os.name != "posix", reason="a shell-script stand-in for nvidia-smi")
def test_a_failing_nvidia_smi_is_a_note_not_an_error(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2; exit 9")
    gpus, note = nvidia_smi_gpus()
    assert gpus == () and note == "nvidia-smi failed: NVIDIA-SMI has failed because it could not communicate with the driver"
    _fake_smi(tmp_path, monkeypatch, "true")
    assert nvidia_smi_gpus() == ((), "nvidia-smi lists no GPU")
