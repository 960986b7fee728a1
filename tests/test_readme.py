"""The README is a door, not the house: short, its links and the docs' links resolve, and the
Quickstart's two commands name Makefile targets that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _quickstart_commands() -> list[str]:
    """The commands of the first code block under '## Quickstart', comments stripped."""
    text = README.read_text()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the Quickstart has no ```bash block"
    return [ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_readme_is_at_most_300_lines() -> None:
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/"


def test_every_relative_link_resolves() -> None:
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken, seen = [], 0
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, in-page anchors
            seen += 1
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert seen > 30
    assert broken == []


def test_readme_links_every_docs_page() -> None:
    text = README.read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"(docs/{p.name})" not in text]
    assert missing == []


def test_quickstart_is_the_two_make_commands() -> None:
    commands = _quickstart_commands()
    assert commands == ["make demo", "make test"]
    targets = set(re.findall(r"^([A-Za-z_][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for cmd in commands:
        assert cmd.split()[1] in targets, f"{cmd!r}: no such Makefile target"
