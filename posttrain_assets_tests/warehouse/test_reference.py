"""The docs' reference sections are generated from the code; this fails when they are stale or missing."""

import re
from pathlib import Path

import pytest

from posttrain_assets.warehouse.reference import (
    PROJECT_ROOT,
    SECTION_FILES,
    SECTIONS,
    files_with_sections,
    main,
    render,
)

FIX = "run: python -m posttrain_assets.warehouse.reference"


@pytest.mark.parametrize("relative", sorted(files_with_sections()))
def test_docs_reference_sections_are_current(relative: str) -> None:
    names = files_with_sections()[relative]
    text = (PROJECT_ROOT / relative).read_text(encoding="utf-8")
    for name in names:
        assert f"<!-- {name}:begin -->" in text and f"<!-- {name}:end -->" in text, f"{relative} lost section {name!r}"
    assert render(text, names, where=relative) == text, f"{relative} is stale; {FIX}"


def test_every_section_has_a_file() -> None:
    assert set(SECTION_FILES) == set(SECTIONS)


def test_generated_sections_live_only_in_their_file() -> None:
    """A copy of a section elsewhere (say, left in the README) would never be regenerated."""
    markdown = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    for path in markdown:
        relative = path.relative_to(PROJECT_ROOT).as_posix()
        for name in re.findall(r"<!-- (\w+):begin -->", path.read_text(encoding="utf-8")):
            assert SECTION_FILES.get(name) == relative, f"{relative} holds section {name!r}"


def test_content_is_where_readers_look() -> None:
    tables = (PROJECT_ROOT / SECTION_FILES["tables"]).read_text(encoding="utf-8")
    reasons = (PROJECT_ROOT / SECTION_FILES["reasons"]).read_text(encoding="utf-8")
    formats = (PROJECT_ROOT / SECTION_FILES["formats"]).read_text(encoding="utf-8")
    assert "| `bad_json` | silver.quarantine | the row is not valid JSON |" in reasons
    assert "### `gold.sft`" in tables
    assert "| `gsm8k` | rl |" in formats


def test_a_missing_marker_fails() -> None:
    with pytest.raises(ValueError, match="no generated section 'tables'"):
        render("# docs\n\n<!-- formats:begin -->\n<!-- formats:end -->\n", ["formats", "tables"], where="docs/x.md")


def test_main_rewrites_every_file(tmp_path: Path) -> None:
    for relative, names in files_with_sections().items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"<!-- {n}:begin -->\nstale\n<!-- {n}:end -->\n" for n in names), encoding="utf-8")
    assert main([str(tmp_path)]) == 0
    for relative, names in files_with_sections().items():
        text = (tmp_path / relative).read_text(encoding="utf-8")
        assert "stale" not in text
        assert render(text, names) == text
