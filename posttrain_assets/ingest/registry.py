"""The source registry: which files feed the platform, in which format, under which license.

A YAML file with a top-level ``sources:`` list. Each entry::

    - name: demo_sft_messages      # unique, [a-z0-9_]+; also the bronze partition key
      path: sft/messages.jsonl      # file or glob, relative to the registry file and inside its folder
      format: messages              # adapter name (posttrain_assets.records.formats.ADAPTERS)
      regime: sft                   # optional; default is the format's first regime
      license: Apache-2.0           # SPDX-like id
      origin: "https://... @ rev"   # URL or dataset id + revision
      kind: synthetic               # human | ai | synthetic
      role: eval                    # optional: train (default) | eval, never trained on
      answer_format: "..."          # optional, RL only: the answer-format instruction the verl export appends to
                                    # prompts (default: the verifier's; "" for none)

The order of entries is the source priority used when duplicates are resolved.
A malformed registry raises :class:`RegistryError` naming the entry and field.

A relative path (or glob) must stay inside the registry file's folder: ``..`` may not climb out of it, so a
typo or a copied registry never reads files elsewhere without a word. To read files outside it, write an
absolute path, which says so explicitly. (Symbolic links inside the folder are followed: whoever put them there
chose their targets.)
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain_assets.records.formats import ADAPTERS
from posttrain_assets.records.schema import SOURCE_KINDS

NAME_PATTERN = re.compile(r"^[a-z0-9_]+$")
ROLES = ("train", "eval")
REQUIRED_FIELDS = ("name", "path", "format", "license", "origin", "kind")
KNOWN_FIELDS = {*REQUIRED_FIELDS, "regime", "role", "answer_format"}


class RegistryError(ValueError):
    """The registry file is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class Source:
    """One registered source, with its path resolved against the registry's folder."""

    name: str
    path: str
    format: str
    regime: str
    license: str
    origin: str
    kind: str
    role: str
    base_dir: Path
    # RL only: the answer-format instruction the verl export appends to this source's prompts; None: the
    # verifier's default (publish.exports.ANSWER_FORMAT_DEFAULTS), "": none.
    answer_format: str | None = None

    @property
    def pattern(self) -> Path:
        """Absolute file path or glob pattern."""
        return (self.base_dir / self.path).resolve()

    def files(self) -> list[Path]:
        """The files this source matches today, sorted so row order is stable."""
        matched = sorted(Path(p) for p in glob.glob(str(self.pattern), recursive=True))
        return [p for p in matched if p.is_file()]


@dataclass(frozen=True)
class Registry:
    """All sources of one registry file, in priority order."""

    path: Path
    sources: tuple[Source, ...]

    def get(self, name: str) -> Source:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(f"source {name!r} is not in the registry {self.path}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def priority(self, name: str) -> int:
        """0 for the first source in the file, 1 for the next, ..."""
        return self.names.index(name)


def render_registry(entries: Iterable[Mapping[str, str | None]], comments: Sequence[str] = ()) -> str:
    """A registry file's text: ``comments`` as ``#`` lines, then one entry per mapping, fields in the documented
    order (None values left out). Written by hand rather than by yaml.dump so generated files read like the README.
    """
    lines = [f"# {c}" for c in comments] + ["sources:"]
    for entry in entries:
        keys = ("name", "path", "format", "regime", "license", "origin", "kind", "role", "answer_format")
        fields = [(k, entry.get(k)) for k in keys]
        present = [(k, v) for k, v in fields if v is not None]
        for i, (key, value) in enumerate(present):
            text = json.dumps(value) if key == "answer_format" else f'"{value}"' if key == "origin" else value
            lines.append(f"  {'- ' if i == 0 else '  '}{key}: {text}")
    return "\n".join(lines) + "\n"


def load_registry(path: str | Path) -> Registry:
    """Parse and validate a registry file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RegistryError(f"{path}: source registry file not found (set POSTTRAIN_SOURCES)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list):
        raise RegistryError(f"{path}: expected a top-level 'sources:' list")
    sources: list[Source] = []
    seen: set[str] = set()
    for index, entry in enumerate(doc["sources"]):
        source = _parse_entry(path, index, entry)
        if source.name in seen:
            raise RegistryError(f"{path}: sources[{index}] ({source.name}): field 'name': duplicate source name")
        seen.add(source.name)
        sources.append(source)
    return Registry(path=path, sources=tuple(sources))


def _parse_entry(path: Path, index: int, entry: object) -> Source:
    label = f"sources[{index}]"
    if not isinstance(entry, dict):
        raise RegistryError(f"{path}: {label}: expected a mapping with {', '.join(REQUIRED_FIELDS)}")
    if isinstance(entry.get("name"), str):
        label = f"{label} ({entry['name']})"

    def fail(field: str, problem: str) -> RegistryError:
        return RegistryError(f"{path}: {label}: field '{field}': {problem}")

    for field in REQUIRED_FIELDS:
        value = entry.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise fail(field, "is required")
        if not isinstance(value, str):
            raise fail(field, f"must be a string, got {type(value).__name__}")
    unknown = sorted(set(entry) - KNOWN_FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})")
    if not NAME_PATTERN.match(entry["name"]):
        raise fail("name", "must match [a-z0-9_]+")
    adapter = ADAPTERS.get(entry["format"])
    if adapter is None:
        raise fail("format", f"unknown format {entry['format']!r} (known: {', '.join(sorted(ADAPTERS))})")
    regime = entry.get("regime") or adapter.regimes[0]
    if regime not in adapter.regimes:
        raise fail("regime", f"format {adapter.name!r} serves {', '.join(adapter.regimes)}, not {regime!r}")
    if entry["kind"] not in SOURCE_KINDS:
        raise fail("kind", f"must be one of {', '.join(SOURCE_KINDS)}, got {entry['kind']!r}")
    role = entry.get("role") or "train"
    if role not in ROLES:
        raise fail("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    if not Path(entry["path"]).is_absolute():
        target = Path(os.path.normpath(path.parent / entry["path"]))  # lexically: a glob matches no one file
        if not target.is_relative_to(path.parent):
            raise fail(
                "path",
                f"{entry['path']!r} leads outside the registry's folder {path.parent} (to {target}); "
                "write an absolute path to read files elsewhere",
            )
    answer_format = entry.get("answer_format")
    if answer_format is not None:
        if not isinstance(answer_format, str):
            raise fail("answer_format", f"must be a string, got {type(answer_format).__name__}")
        if regime != "rl":
            raise fail("answer_format", f"only RL sources take an answer format, this one is {regime}")
    return Source(
        name=entry["name"],
        path=entry["path"],
        format=adapter.name,
        regime=regime,
        license=entry["license"].strip(),
        origin=entry["origin"].strip(),
        kind=entry["kind"],
        role=role,
        base_dir=path.parent,
        answer_format=None if answer_format is None else answer_format.strip(),
    )
