"""The user documentation stays true to the code and free of project history.

* docs/options.md is generated from RunConfig; it must equal ``options_markdown()``.
* README.md stays short enough to read (the reference material lives in docs/).
* Relative links between README.md and docs/*.md point at files that exist.
* README, docs, package code and notebooks carry no dates, no citations of files outside the
  repository and no "round"/"session" narratives: they describe what the code does now.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clip_refine_lab.config import OPTIONS_COMMAND, options_markdown

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

HISTORY_PATTERNS = {
    "a date": re.compile(r"\b20\d{2}-\d{2}-\d{2}\b"),
    "a citation of REFERENCE.md": re.compile(r"REFERENCE"),
    "a numbered round": re.compile(
        r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|\d+(st|nd|rd|th))\s+round\b",
        re.IGNORECASE),
    "a session": re.compile(r"\bsessions?\b", re.IGNORECASE),
}


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _scanned_files() -> list[Path]:
    code = sorted((ROOT / "clip_refine_lab").rglob("*.py"))
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    return [*_doc_pages(), *code, *notebooks]


def test_options_page_is_generated_from_run_config():
    page = ROOT / "docs" / "options.md"
    assert page.is_file(), f"docs/options.md is missing; create it with: {OPTIONS_COMMAND}"
    assert page.read_text(encoding="utf-8") == options_markdown(), (
        f"docs/options.md differs from RunConfig's fields and FIELD_HELP; regenerate it with: {OPTIONS_COMMAND}")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}); move reference material to docs/")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web addresses and in-page anchors
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_no_history_in_docs_code_or_notebooks():
    found = []
    for path in _scanned_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for what, pattern in HISTORY_PATTERNS.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()[:100]}")
    assert not found, ("describe what the code does now, not its history (dates, rounds, sessions, "
                       "REFERENCE.md):\n" + "\n".join(found))
