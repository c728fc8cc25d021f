"""Every reference from code and docs to a document resolves inside the repository.

Comments and docstrings cite the design record as ``docs/design/<name>.md#<anchor>`` and the
user docs as ``docs/<name>.md#<anchor>``. This test scans the repository's source, tests,
examples and docs and fails on:

- a cited ``docs/...md`` file that does not exist, or an anchor that no heading (GitHub's
  slug rule) or ``<a id=...>`` of that file defines;
- a relative Markdown link in README or docs whose target or anchor does not exist;
- a numbered section reference (a section sign followed by a number) or a "design
  note"/"design spec" mention: those pointed at notes outside the repository, which a
  reader of a clone cannot follow;
- a path into the planning notes outside the repository.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
#: Top-level entries scanned (files or folders); the rest (virtualenvs, caches, outputs) is not ours.
SCANNED = ("ccomm", "netsim", "deco_sgd", "compactfusion", "tests", "examples", "docs",
           "README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}
SKIP_DIRS = {"__pycache__", ".venv", ".git", ".pytest_cache"}

SECTION_SIGN = "\u00a7"
#: A cited document: docs/<path>.md with an optional #anchor (not part of a longer path).
DOC_REF = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(#[\w-]+)?")
#: A relative Markdown link target: [text](target).
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
FORBIDDEN = (
    (re.compile(SECTION_SIGN + r"\s*\d"), "numbered section reference"),
    (re.compile(r"\bdesign (?:note|spec)\b", re.I), "reference to the out-of-repository design notes"),
    (re.compile(r"\b(?:spec|\.md),? \(?section \d", re.I), "numbered section of the out-of-repository notes"),
    (re.compile(r"shared/design"), "path outside the repository"),
)


def _files() -> list[Path]:
    """The scanned files, this test excepted (its docstring and patterns name what it forbids)."""
    out: list[Path] = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            out.append(top)
        elif top.is_dir():
            for p in sorted(top.rglob("*")):
                if p.is_file() and (p.suffix in SUFFIXES or p.name == "Makefile") and p != SELF and \
                        not SKIP_DIRS.intersection(p.relative_to(ROOT).parts):
                    out.append(p)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Every anchor a Markdown file defines (headings outside code fences, explicit ids)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if fence:
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return frozenset(found)


def _check(target: Path, anchor: str | None, where: str, problems: list[str]) -> None:
    if not target.exists():
        problems.append(f"{where}: {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target} does not exist")
    elif anchor and target.suffix == ".md" and anchor not in anchors(target):
        problems.append(f"{where}: no anchor #{anchor} in {target.relative_to(ROOT)}")


def test_slug_follows_github() -> None:
    assert slug("Staleness model") == "staleness-model"
    assert slug("Clock validation (virtual vs real elapsed time)") == "clock-validation-virtual-vs-real-elapsed-time"
    assert slug("`netsim.netns`: hosts") == "netsimnetns-hosts"
    assert slug("What follows the paper and what is ours") == "what-follows-the-paper-and-what-is-ours"


def test_cited_documents_and_anchors_exist() -> None:
    problems: list[str] = []
    cited = 0
    for path in _files():
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in DOC_REF.finditer(line):
                cited += 1
                anchor = m.group(2)[1:] if m.group(2) else None
                _check(ROOT / m.group(1), anchor, f"{path.relative_to(ROOT)}:{no}", problems)
    assert cited > 50, f"only {cited} docs/ references found: is the scan looking at the code?"
    assert not problems, "unresolvable references:\n" + "\n".join(problems)


def test_markdown_links_resolve() -> None:
    problems: list[str] = []
    for path in _files():
        if path.suffix != ".md":
            continue
        fence = False
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith(("```", "~~~")):
                fence = not fence
            if fence:
                continue
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                _check(dest, anchor or None, f"{path.relative_to(ROOT)}:{no}", problems)
    assert not problems, "broken Markdown links:\n" + "\n".join(problems)


@pytest.mark.parametrize("pattern,what", FORBIDDEN, ids=[w for _, w in FORBIDDEN])
def test_no_references_outside_the_repository(pattern: re.Pattern[str], what: str) -> None:
    hits = [f"{p.relative_to(ROOT)}:{no}: {line.strip()[:100]}"
            for p in _files()
            for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, f"{what} (cite docs/design/<name>.md#<anchor> instead):\n" + "\n".join(hits)
