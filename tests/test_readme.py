"""The README's examples run as written.

Every command and code block of README.md is extracted and run:

* a block whose first line starts with ``$ kernelsel`` is a session: each command runs (through the console
  entry point, in the checkout) and its output -- stdout and stderr together -- must match the lines shown
  under it, where ``…`` stands for any text within a line, a line holding only ``…`` for any number of lines,
  and runs of spaces compare equal;
* a block of ``kernelsel ...`` lines (no prompt, no output) runs each line in a scratch directory: exit 0;
* a ``python`` block is executed in a fresh interpreter; a ``yaml`` block holding kernel entries validates;
* anything else (output, a layout) is text.

A block the README cannot run as written is marked by the HTML comment just before it:
``<!-- readme-test: skip (why) -->``, or ``<!-- readme-test: cpu (why) -->`` for output that holds only on a
machine without a GPU and without FlashInfer.  Blocks another test runs keep that test's marker
(``<!-- test-command -->``: CI's own command; ``<!-- transformers-example -->``).  The list of
skipped blocks is pinned below, so marking another one is a visible decision.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- (?:readme-test: (?P<kind>skip|cpu) \((?P<why>[^)]*)\)|(?P<other>test-command|transformers-example)) -->")
OTHER_TESTS = {"test-command": ".ci/run runs it", "transformers-example": "tests/selector/integrations/test_transformers_smollm2.py runs it"}
"""Blocks another test runs, by the marker it reads."""


@dataclass
class Block:
    line: int  # 1-based line of the block's first content line
    lang: str  # "python", "yaml", "" (shell or text)
    text: list[str]
    mark: str = ""  # "skip", "cpu", "other" (another test runs it) or ""
    why: str = ""


def blocks(text: str) -> list[Block]:
    """Fenced and indented code blocks, each with the marker comment just before it (blank lines between allowed)."""
    lines = text.split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.fullmatch(prev.strip())
        kind, why = (mark["kind"] or "other", mark["why"] or OTHER_TESTS.get(mark["other"], "")) if mark else ("", "")
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out.append(Block(i + 2, line[3:].strip(), lines[i + 1:end], kind, why))
            i = end + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip() or MARKER.fullmatch(lines[i - 1].strip())):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or (not lines[end].strip() and end + 1 < len(lines)
                                                                            and lines[end + 1].startswith("    "))):
                end += 1
            if not prev.lstrip().startswith(("*", "-", "1.", "2.", "3.", "4.")) or mark:  # not a list item's continuation
                out.append(Block(i + 1, "", [ln[4:] for ln in lines[i:end]], kind, why))
            i = end
            continue
        i += 1
    return out


BLOCKS = blocks(README.read_text(encoding="utf-8"))


def _id(b: Block) -> str:
    return f"README.md:{b.line}"


def _kind(b: Block) -> str:
    first = next((ln for ln in b.text if ln.strip()), "")
    if b.lang == "python":
        return "python"
    if b.lang == "yaml":
        return "yaml"
    if first.startswith("$ kernelsel"):
        return "session"
    if first.startswith("kernelsel "):
        return "commands"
    return "text"


RUNNABLE = [b for b in BLOCKS if _kind(b) != "text"]


def test_the_skipped_blocks_are_few_and_each_says_why():
    skipped = {b.why for b in BLOCKS if b.mark == "skip"}
    assert all(skipped), "a skip marker without a reason"
    assert len(skipped) <= 8, skipped
    assert {b.why for b in BLOCKS if b.mark == "other"} == set(OTHER_TESTS.values())
    assert len([b for b in RUNNABLE if not b.mark]) >= 6, "the README test found too few blocks to run"


def _kernelsel(command: str) -> list[str]:
    argv = shlex.split(command, comments=True)
    assert argv[0] == "kernelsel", command
    return [sys.executable, "-m", "selector.tools.cli", *argv[1:]]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELSEL_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _pattern(expected: list[str]) -> re.Pattern:
    """Expected output as a regex: '…' is any text, a line of only '…' any lines, spaces compare loosely."""
    parts = []
    for line in expected:
        if line.strip() == "…":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            words = [re.escape(w) for w in line.strip().split()]
            parts.append(r" *" + r" +".join(words).replace(re.escape("…"), r"[^\n]*?") + r" *\n")
    return re.compile("".join(parts))


def _sessions(block: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each ``$`` prompt of a block (``\\`` continues a command)."""
    out: list[tuple[str, list[str]]] = []
    lines = iter(block.text)
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + " " + next(lines).strip()
            out.append((command, []))
        elif out and line.strip():
            out[-1][1].append(line)
    return out


def _runnable_here(block: Block) -> None:
    if block.mark in ("skip", "other"):
        pytest.skip(f"marked in the README: {block.why}")
    if block.mark == "cpu" and (shutil.which("nvidia-smi") or importlib.util.find_spec("flashinfer")):
        pytest.skip(f"the README shows a machine without a GPU or FlashInfer: {block.why}")


@pytest.mark.parametrize("block", [b for b in RUNNABLE if _kind(b) == "session"], ids=_id)
def test_a_session_prints_what_the_readme_shows(block):
    _runnable_here(block)
    for command, expected in _sessions(block):
        proc = subprocess.run(_kernelsel(command), capture_output=True, text=True, cwd=ROOT, env=_environment(),
                              timeout=300)
        shown = "".join(" ".join(ln.split()) + "\n" for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip())
        assert expected, f"README.md:{block.line}: `{command}` shows no output"
        assert _pattern(expected).fullmatch(shown), (
            f"README.md:{block.line}: `{command}` printed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


def _scratch(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the checkout to run commands in: every top-level entry linked, ``docs/`` (which they write) copied."""
    scratch = tmp_path / "checkout"
    scratch.mkdir()
    for entry in ROOT.iterdir():
        if entry.name == "docs":
            shutil.copytree(entry, scratch / "docs")
        elif not entry.name.startswith("."):
            (scratch / entry.name).symlink_to(entry)
    return scratch


@pytest.mark.parametrize("block", [b for b in RUNNABLE if _kind(b) == "commands"], ids=_id)
def test_commands_run_with_exit_0(block, tmp_path):
    _runnable_here(block)
    scratch = _scratch(tmp_path)
    for line in block.text:
        if line.strip() and not line.lstrip().startswith("#"):
            if not line.lstrip().startswith("kernelsel "):
                pytest.skip(f"README.md:{block.line}: not only kernelsel commands: `{line}`")
            proc = subprocess.run(_kernelsel(line), capture_output=True, text=True, cwd=scratch, env=_environment(),
                                  timeout=300)
            assert proc.returncode == 0, f"README.md:{block.line}: `{line}`: {proc.stderr}"


@pytest.mark.parametrize("block", [b for b in RUNNABLE if _kind(b) == "python"], ids=_id)
def test_python_runs(block, tmp_path):
    _runnable_here(block)
    proc = subprocess.run([sys.executable, "-c", "\n".join(block.text)], capture_output=True, text=True,
                          cwd=tmp_path, env=_environment(), timeout=300)
    assert proc.returncode == 0, f"README.md:{block.line}:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in RUNNABLE if _kind(b) == "yaml"], ids=_id)
def test_yaml_kernel_entries_validate(block):
    from registry.schema import KernelSpec

    _runnable_here(block)
    data = yaml.safe_load("\n".join(block.text))
    assert isinstance(data, list) and data, f"README.md:{block.line}: not a list of kernel entries; mark it if it is elided"
    for entry in data:
        KernelSpec.model_validate(entry, context={"adapter_allowlist": ()})
