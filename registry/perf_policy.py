"""Which perf table ranks the eligible kernels: decided here for the runtime, the CLI and ``kernelsel doctor``.

A setting (``KERNELSEL_PERF``, or the CLI's ``--perf``) is a path to a table, ``off`` (rank by priority only),
or absent.  Absent means the committed table (``perf/``, ``bundled_perf_dir()``) whose GPU model and arch
match this machine's GPU -- so it waits until the GPU is known, and is none when no GPU is known or no
committed table matches.  Finding the GPU is the caller's part (``selector.platform.detect_gpus``): each
caller may ask a different source, but all of them apply this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from registry.loader import bundled_perf_dir, load_perf_table
from registry.vocab import Arch

if TYPE_CHECKING:
    from registry.perf import PerfTable

PERF_OFF = "off"
"""The setting that turns measured ranking off."""

BY_PRIORITY = "eligible kernels rank by priority"


@dataclass(frozen=True)
class PerfChoice:
    """The table a setting picks on a machine (or None), where the choice came from, and why there is none."""

    table: Optional["PerfTable"]
    source: str  # the setting's name | "<name>=off" | "committed table for <GPU>" | "none"
    note: str = ""  # why no table ranks the kernels, when none does
    needs_gpu: bool = False  # the committed table applies, but no GPU is known yet: choose again once it is


def committed_perf_table(gpu: str, arch: Optional[Arch]) -> Optional["PerfTable"]:
    """The committed perf table for this GPU model and arch, if there is one."""
    if not gpu or arch is None:
        return None
    directory = bundled_perf_dir()
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        table = load_perf_table(path)
        if table.matches(gpu, arch):
            return table
    return None


def choose_perf_table(setting: Optional[str], gpu: str = "", arch: Optional[Arch] = None, *,
                      setting_name: str = "") -> PerfChoice:
    """The perf table for ``setting`` (a path, ``off``, or None) on a machine whose GPU is ``gpu`` / ``arch``.

    ``gpu`` is empty when no GPU is known (none detected, or a hypothetical
    arch).  ``setting_name`` names the setting in ``source`` and in errors.
    Raises ``ManifestError`` (located) when the table a setting names does not load.
    """
    if setting is not None and setting.strip().lower() == PERF_OFF:
        return PerfChoice(None, f"{setting_name}={PERF_OFF}", BY_PRIORITY)
    if setting:
        return PerfChoice(load_perf_table(setting), setting_name)
    if not gpu:
        return PerfChoice(None, "none", f"no GPU detected: {BY_PRIORITY}", needs_gpu=True)
    table = committed_perf_table(gpu, arch)
    if table is None:
        where = f"{gpu} {arch.value}" if arch is not None else gpu
        return PerfChoice(None, "none", f"no committed table for {where}: {BY_PRIORITY}")
    return PerfChoice(table, f"committed table for {gpu}")
