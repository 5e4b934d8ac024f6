"""Reference sections of the README, generated from the code so they cannot drift.

    python -m posttrain_assets.warehouse.reference README.md     # rewrite the generated sections in place

A test fails when the README's generated sections differ from what this prints.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from posttrain_assets.records.formats import ADAPTERS
from posttrain_assets.records.schema import REASONS
from posttrain_assets.sft.masking import MASK_REASONS
from posttrain_assets.warehouse.catalogue import ALL_TABLES


def markdown_reference() -> str:
    """The table reference in the README, generated from the declarations above."""
    parts = []
    for table in ALL_TABLES:
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
    lines += [f"| `{code}` | silver.sft_quarantine | {meaning} |" for code, meaning in MASK_REASONS.items()]
    return "\n".join(lines)


SECTIONS = {"formats": formats_section, "reasons": reasons_section, "tables": markdown_reference}


def render(readme: str) -> str:
    """``readme`` with every ``<!-- NAME:begin -->...<!-- NAME:end -->`` block regenerated."""
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise ValueError(f"README has no generated section {name!r}")
        readme = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), readme)
    return readme


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
