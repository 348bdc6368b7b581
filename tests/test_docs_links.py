"""README.md and docs/*.md: every relative link and image points at a file that exists, every #anchor at a heading
of the page it names (GitHub's slugs), and the README stays a landing page of at most 300 lines (issue 31)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

# [text](target) and ![alt](target), the target up to the first unescaped ")" (an optional "title" after a space);
# [label]: target reference definitions; <img src="target">.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out unless told not to."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None and not blank_code:
            out.append((number, line))
        elif fence is None:
            out.append((number, re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation other than '-' (and '_') dropped,
    spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(page.read_text(encoding="utf-8"), blank_code=False):  # `code` in a heading counts
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        seen = counts.get(slug, 0)
        counts[slug] = seen + 1
        found.add(slug if seen == 0 else f"{slug}-{seen}")  # GitHub numbers repeated headings
    return found


def link_targets(page: Path) -> list[tuple[int, str]]:
    targets = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for pattern in (INLINE_LINK, REFERENCE_DEFINITION, IMG_SRC):
            for match in pattern.finditer(line):
                targets.append((number, match.group(1).strip("<>")))
    return targets


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in link_targets(page):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(root)}:{number}: ({target})"
        if path_part:
            linked = (page.parent / unquote(path_part)).resolve()
            if not linked.exists():
                problems.append(f"{where} points at a missing file")
                continue
        else:
            linked = page  # a pure #anchor: a heading of this page
        if anchor and linked.suffix == ".md" and linked.is_file() and unquote(anchor) not in anchors(linked):
            problems.append(f"{where} names no heading of {linked.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    assert broken_links(page) == []


def test_readme_is_a_landing_page_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_checker_finds_what_it_should(tmp_path: Path):
    """The checker itself: a missing file, a missing anchor and a missing image are found; code, external links and
    existing targets are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page: the (first) one\n\n## Other CPUs (issue 29, `make x`)\n")
    (tmp_path / "plot.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md#a-page-the-first-one) [ok](docs/page.md#other-cpus-issue-29-make-x) ![ok](plot.png)\n"
        "[web](https://example.com/x.md#nothing) [mail](mailto:a@b.c) `[code](missing.md)` [self](#title)\n"
        "```\n[in a fence](missing.md)\n```\n# Title\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#no-such-heading) ![gone](missing.png) [self](#nope)\n"
    )
    problems = broken_links(readme, root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "(docs/missing.md) points at a missing file",
        "(docs/page.md#no-such-heading) names no heading of docs/page.md",
        "(missing.png) points at a missing file",
        "(#nope) names no heading of README.md",
    ]
