"""The README fits on a screen or two and links every page of docs/, and each page links back.

The README is the first thing a user reads; detail lives in docs/. These checks keep it
that way: a new docs page nobody links is lost, and a README that grows past 250 lines
stops being read.
"""

from __future__ import annotations

import re

from testkit import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


def links(path) -> set[str]:
    return set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()))


def test_the_readme_fits_on_two_screens():
    assert len(README.read_text().splitlines()) <= 250


def test_the_readme_links_every_docs_page_and_each_links_back():
    assert len(DOCS) >= 7
    linked = links(README)
    for page in DOCS:
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"
        assert "../README.md" in links(page), f"docs/{page.name} does not link back to the README"


def test_every_relative_link_resolves():
    for page in [README, *DOCS]:
        for target in links(page):
            if "://" in target:
                continue
            assert (page.parent / target).resolve().exists(), f"{page.name} links {target}, which does not exist"
