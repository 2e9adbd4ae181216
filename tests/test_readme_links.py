"""Every link and picture in the README and the docs/ pages resolves inside the repository.

Relative targets must exist relative to the document's folder, none may point into the git-ignored `runs/`, and
`#anchor` links must name a heading of the file they point at (GitHub's slugs).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every page, so a page added to docs/ is checked without anyone remembering to list it here.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The document without code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except '-' and '_', spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))  # http:, https:, mailto:, ...


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve_in_repository(doc):
    assert doc.is_file(), f"{doc} is missing"
    links = _links(doc)
    assert links, f"no links found in {doc.name}; the parser is broken"
    broken = []
    for target in links:
        if _is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part:
            if anchor not in _anchors(doc):
                broken.append(f"{target}: no such heading in {doc.name}")
            continue
        resolved = (doc.parent / path_part).resolve()
        try:
            rel = resolved.relative_to(ROOT)
        except ValueError:
            broken.append(f"{target}: outside the repository")
            continue
        if rel.parts and rel.parts[0] == "runs":
            broken.append(f"{target}: under the git-ignored runs/")
        elif not resolved.exists():
            broken.append(f"{target}: {rel.as_posix()} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no such heading in {rel.as_posix()}")
    assert not broken, "broken links in " + doc.name + ":\n" + "\n".join(broken)


def test_readme_pictures_are_committed_under_docs():
    images = [t for t in LINK.findall(_prose((ROOT / "README.md").read_text(encoding="utf-8")))
              if t.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".svg"))]
    assert images, "the README shows no pictures"
    for target in images:
        assert target.startswith("docs/"), target
        assert (ROOT / target).stat().st_size < 400_000, f"{target} is too large to commit"


def test_slug_rule():
    assert _slug("The paper's data: from the LLaVA downloads to a PT run") == (
        "the-papers-data-from-the-llava-downloads-to-a-pt-run")
    assert _slug("What is faithful to the paper, and what is an option") == (
        "what-is-faithful-to-the-paper-and-what-is-an-option")
    assert _slug("The target store (format version 1)") == "the-target-store-format-version-1"


def _layout_rows() -> dict[str, str]:
    """The README's Layout table: folder -> its row's description."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+/)` \| (.*) \|$", section, re.M)}


def test_readme_layout_table_names_every_module_of_its_folders():
    rows = _layout_rows()
    code_folders = {p.parent.relative_to(ROOT).as_posix() + "/" for package in ("pipeline", "teachers", "student",
                    "benchmarks") for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(code_folders - set(rows)) == [], "folders of code with no row in the README's Layout table"
    assert sorted(f for f in rows if not (ROOT / f).is_dir()) == [], "Layout rows for folders that do not exist"
    for folder in sorted(code_folders):
        named = set(re.findall(r"`(\w+\.py)`", rows[folder]))
        present = {p.name for p in (ROOT / folder).glob("*.py")} - {"__init__.py", "__main__.py"}
        assert named == present, (f"README Layout row {folder}: names missing files {sorted(named - present)}, "
                                  f"leaves out {sorted(present - named)}")


def _cited_tests() -> set[str]:
    """`test_name` names one test, `test_prefix...` the tests whose names start so, `test_file.py` a test file."""
    return {name for doc in DOCS
            for name in re.findall(r"`(test_[a-z0-9_]+(?:\.\.\.|\.py)?)`", doc.read_text(encoding="utf-8"))}


def test_every_test_the_readme_cites_for_a_promise_exists():
    cited = _cited_tests()
    assert cited, "neither the README nor a docs/ page cites a test"
    files = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    tests = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text(encoding="utf-8") for p in
                                                          (ROOT / "tests").rglob("test_*.py")), re.M))
    missing = [name for name in sorted(cited)
               if name not in files and not (name.endswith("...") and any(t.startswith(name[:-3]) for t in tests))
               and name not in tests]
    assert missing == [], f"the README or docs/ pages cite tests that do not exist: {missing}"
