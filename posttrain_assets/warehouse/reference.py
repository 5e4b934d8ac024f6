"""Generated reference sections of the docs (input formats, quarantine reasons, tables), from the code so they
cannot drift.

    python -m posttrain_assets.warehouse.reference [ROOT]   # rewrite every generated section under ROOT/docs in place

Each section lives between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in the docs file that
:data:`SECTION_FILES` names (ROOT defaults to this checkout). A test fails when a file's generated sections differ
from what this writes, or when a marker is missing.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from posttrain_assets.cleaning.dedup_tables import (
    BAND_STATE,
    BUCKET_STATE,
    PAIR_CACHE,
    PAIR_STATE,
    SIGNATURE_CACHE,
    SIMILARITY_CACHE,
    SURVIVOR_STATE,
)
from posttrain_assets.cleaning.quality import QUALITY_REASONS
from posttrain_assets.cleaning.silver_pass import DECONTAMINATION_CACHE_TABLES, GATE_CACHE_TABLES
from posttrain_assets.curation.tables import CURATION_TABLES
from posttrain_assets.preference import pairs_stage
from posttrain_assets.records.formats import ADAPTERS
from posttrain_assets.records.schema import REASONS
from posttrain_assets.rl.certification_stage import CERTIFICATION_CACHE
from posttrain_assets.sft import tokenize_stage
from posttrain_assets.sft.masking import MASK_REASONS
from posttrain_assets.sft.proof_cache import SFT_PROOFS
from posttrain_assets.warehouse.bronze import BRONZE_INGESTS
from posttrain_assets.warehouse.catalogue import ALL_TABLES, CHECK_VERDICTS

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The per-row stage caches (schema cache; warehouse.stage_cache, docs/incremental.md), in data-flow order.
CACHE_TABLES = (
    BRONZE_INGESTS,
    *GATE_CACHE_TABLES,
    *DECONTAMINATION_CACHE_TABLES,
    SIGNATURE_CACHE,
    SURVIVOR_STATE,
    BAND_STATE,
    BUCKET_STATE,
    PAIR_STATE,
    PAIR_CACHE,
    SIMILARITY_CACHE,
    *tokenize_stage.CACHE_TABLES,
    SFT_PROOFS,
    *pairs_stage.CACHE_TABLES,
    CERTIFICATION_CACHE,
)


def markdown_reference() -> str:
    """The table reference in docs/tables.md, generated from the table declarations (the opt-in curation tables,
    declared in ``posttrain_assets.curation.tables``, after the default refresh's; then the stage caches)."""
    parts = []
    for table in (*ALL_TABLES, CHECK_VERDICTS, *CURATION_TABLES, *CACHE_TABLES):
        lines = [f"### `{table.qualified}`", "", table.description, "", "| column | type | meaning |", "|---|---|---|"]
        for c in table.columns:
            meaning = ("" if c.nullable else "not null; ") + c.description.replace("|", "/")
            lines.append(f"| `{c.name}` | `{c.type}` | {meaning} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def formats_section() -> str:
    lines = ["| format | regimes | rows look like |", "|---|---|---|"]
    lines += [f"| `{a.name}` | {', '.join(a.regimes)} | {a.description.replace('|', '/')} |" for a in ADAPTERS.values()]
    return "\n".join(lines)


def reasons_section() -> str:
    lines = ["| reason | table | meaning |", "|---|---|---|"]
    lines += [f"| `{code}` | silver.quarantine | {meaning} |" for code, meaning in REASONS.items()]
    lines += [
        f"| `{code}` | silver.quarantine (quality gate) | {meaning} |" for code, meaning in QUALITY_REASONS.items()
    ]
    lines += [f"| `{code}` | silver.sft_quarantine | {meaning} |" for code, meaning in MASK_REASONS.items()]
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[], str]] = {
    "formats": formats_section,
    "reasons": reasons_section,
    "tables": markdown_reference,
}

# Which docs file (relative to the project root) holds each generated section.
SECTION_FILES: dict[str, str] = {
    "formats": "docs/sources.md",
    "reasons": "docs/tables.md",
    "tables": "docs/tables.md",
}


def files_with_sections() -> dict[str, list[str]]:
    """Each docs file that holds generated sections -> the names of its sections."""
    files: dict[str, list[str]] = {}
    for name, path in SECTION_FILES.items():
        files.setdefault(path, []).append(name)
    return files


def render(text: str, names: list[str] | None = None, *, where: str = "document") -> str:
    """``text`` with every ``<!-- NAME:begin -->...<!-- NAME:end -->`` block of ``names`` (default: all sections)
    regenerated; raises ValueError when one of them has no markers."""
    for name in SECTIONS if names is None else names:
        make = SECTIONS[name]
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(
                f"{where} has no generated section {name!r} (<!-- {name}:begin --> ... <!-- {name}:end -->)"
            )
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else PROJECT_ROOT
    for relative, names in files_with_sections().items():
        path = root / relative
        text = path.read_text(encoding="utf-8")
        updated = render(text, names, where=relative)
        if updated != text:
            path.write_text(updated, encoding="utf-8")
            print(f"rewrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
