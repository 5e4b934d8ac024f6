"""The README's reference sections are generated from the code; this fails when they are stale."""

from pathlib import Path

from posttrain_assets.warehouse.reference import render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_sections_are_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert render(text) == text, "run: python -m posttrain_assets.warehouse.reference README.md"
    assert "| `bad_json` | silver.quarantine | the row is not valid JSON |" in text
    assert "### `gold.sft`" in text
