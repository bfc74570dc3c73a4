"""The project's text cites public sources only: pull requests, library source lines, committed results.

No file (code, comments, docs, the manifest, bench scripts, tests) speaks of the private notes the
project was started from: their paths (``shared/...``), "issue N", or the "seed" wording for the five
reference systems ("the first seed", "S1").  ``seed`` as a random-number seed is fine.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".json", ".cfg"}
SKIP = {"bench/results", ".git", ".ci-venv", ".hypothesis", ".pytest_cache", "kernelsel.egg-info", "build"}
FORBIDDEN = re.compile(
    r"shared/"                                                  # a private note's path
    r"|\bissues? \d"                                            # "issue 5"
    r"|\bS[1-5]\b"                                              # "S1".."S5"
    r"|\b(?:first|second|third|fourth|fifth) seeds?\b"          # "the first seed"
    r"|\bseeds\b|\bseed(?:'s| system| \d)",                     # "seeds", "seed's", "seed system", "seed 003"
    re.IGNORECASE,
)


def _text_files() -> list[pathlib.Path]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if path.suffix in SUFFIXES and path.is_file() and not any(rel == s or rel.startswith(s + "/") for s in SKIP):
            out.append(path)
    return out


def test_the_rule_catches_each_wording_it_names():
    for text in ("see shared/facts/x.md", "(issue 5)", "S1 says", "the first seed's regression", "Seeds (copies)",
                 "seed 003", "the five seed systems"):
        assert FORBIDDEN.search(text), text
    for text in ("torch.Generator().manual_seed(seed)", "PYTHONHASHSEED", "seed: int = 0", "--seed", "shared volume"):
        assert not FORBIDDEN.search(text), text


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_private_note_wording(path):
    if path.name == pathlib.Path(__file__).name:
        return  # the rule's own examples
    hits = [f"{i}: {line.strip()[:120]}" for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, hits
