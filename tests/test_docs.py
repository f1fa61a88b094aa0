"""The front page and the docs pages hold together.

- Every relative link and image in README.md and docs/*.md resolves: the file exists and,
  for `page.md#anchor`, the page has a heading whose GitHub slug is the anchor.
- README.md is a front page: at most 300 lines.
- Each row of the README's results table links to a docs page, and its headline number
  (the bold cell, `**…**`) appears verbatim on that page, so the two cannot drift apart.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*src=\"([^\"]+)\"")
_CODE = re.compile(r"```.*?```", re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    text = _CODE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def broken_links(page: pathlib.Path) -> list[str]:
    """The relative links of `page` that do not resolve, as 'target (why)'."""
    bad = []
    for m in _LINK.finditer(_CODE.sub("", page.read_text())):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    assert not broken_links(page), broken_links(page)


def test_the_checker_reports_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [gone](nope.md) ![x](other.md#b)\n```\n[c](x)\n```\n")
    assert broken_links(page) == [
        "nope.md (no such file)",
        "other.md#b (no heading #b in other.md)",
    ]
    assert slug("Shaped sine: where the `minimum` sits") == "shaped-sine-where-the-minimum-sits"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move detail to docs/"


def results_rows():
    """(headline, page) of each row of the README's results table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "**" in line]
    out = []
    for row in rows:
        headline = re.search(r"\*\*(.+?)\*\*", row).group(1)
        links = re.findall(r"\]\((docs/[^)#]+)", row)
        out.append((headline, links[-1] if links else None))
    return out


def test_each_headline_number_is_the_one_on_its_page():
    rows = results_rows()
    assert len(rows) >= 5, rows
    for headline, page in rows:
        assert page, f"the row of {headline} links to no docs page"
        assert headline in (ROOT / page).read_text(), f"{headline} is not on {page}"
