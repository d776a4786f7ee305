"""The documentation's relative links resolve: every file or folder a link names exists, every ``#anchor`` names a
heading of the page it points to, and every page of ``docs/`` is reachable from the README.

Links to other sites are not fetched (the suite runs offline). Fenced code blocks and inline code are skipped, so
a command that happens to contain brackets is not read as a link.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str, keep_numbers: bool = False):
    """The lines outside fenced code blocks, with their line numbers (``keep_numbers``: a fenced line as an empty
    one, so that the lines keep their places)."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            if keep_numbers:
                yield number, ""
            continue
        if not fenced:
            yield number, line
        elif keep_numbers:
            yield number, ""


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page (a repeated heading gets GitHub's ``-1``, ``-2`` suffixes)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = _slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path):
    """(line number, target) of every link of a page that is not to another site; a link's text may run over
    lines."""
    text = "\n".join(line for _, line in _prose_lines(page.read_text(encoding="utf-8"), keep_numbers=True))
    # inline code is read as text, so `[x](y)` inside backticks is not a link, while a link whose text is code
    # keeps its target
    text = INLINE_CODE.sub(lambda m: "code" + "\n" * m.group(0).count("\n"), text)
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        yield text.count("\n", 0, match.start()) + 1, target


def broken(page: Path) -> list[str]:
    """What is wrong with each relative link of ``page``, one line each."""
    problems = []
    for number, target in links(page):
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: no such file or folder")
        elif fragment:
            if resolved.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif fragment not in anchors(resolved):
                problems.append(f"{where}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert not broken(page), "\n".join(broken(page))


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md")}
    orphans = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_checker_finds_a_broken_link_and_a_broken_anchor(tmp_path, monkeypatch):
    """The checker itself: a missing file and a missing heading are reported, a good link and a link inside code
    are not."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, with commas\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-heading-with-commas) [gone](missing.md) [bad\nanchor](other.md#nowhere)\n"
        "`[not a link](missing-too.md)`\n```\n[in a fence](missing-three.md)\n```\n[site](https://example.org/x)\n",
        encoding="utf-8")
    problems = broken(page)
    assert len(problems) == 2, problems
    assert "missing.md: no such file" in problems[0]
    assert "page.md:1: other.md#nowhere: no heading #nowhere" in problems[1]  # its text ran over two lines
