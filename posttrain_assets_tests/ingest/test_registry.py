"""The source registry: valid files load in priority order; malformed ones name the entry and field."""

import os
from pathlib import Path

import pytest

from posttrain_assets.ingest.registry import RegistryError, load_registry

VALID = """
sources:
  - name: chats
    path: sft/*.jsonl
    format: sharegpt
    license: Apache-2.0
    origin: https://example.org/chats@v1
    kind: human
  - name: math_bank
    path: rl/gsm8k.jsonl
    format: gsm8k
    license: MIT
    origin: openai/grade-school-math@3101c7d5
    kind: human
    role: eval
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sources.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_registry_resolves_paths_regimes_and_priority(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (tmp_path / "sft" / name).write_text("{}\n")
    registry = load_registry(write(tmp_path, VALID))
    assert registry.names == ["chats", "math_bank"]
    chats, bank = registry.sources
    assert (chats.format, chats.regime, chats.role, chats.kind) == ("sharegpt", "sft", "train", "human")
    assert (bank.regime, bank.role) == ("rl", "eval")
    assert [p.name for p in chats.files()] == ["a.jsonl", "b.jsonl"]
    assert bank.files() == []
    assert registry.priority("math_bank") == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("format: sharegpt", "format: csv"), "sources[0] (chats): field 'format': unknown format 'csv'"),
        (("    license: Apache-2.0\n", ""), "sources[0] (chats): field 'license': is required"),
        (("kind: human\n  - name: math_bank", "kind: robot\n  - name: math_bank"), "field 'kind': must be one of"),
        (("role: eval", "role: test"), "sources[1] (math_bank): field 'role': must be one of train, eval"),
        (("format: gsm8k", "format: gsm8k\n    regime: sft"), "field 'regime': format 'gsm8k' serves rl, not 'sft'"),
        (("name: math_bank", "name: chats"), "sources[1] (chats): field 'name': duplicate source name"),
        (("name: chats", "name: Chats!"), "sources[0] (Chats!): field 'name': must match [a-z0-9_]+"),
        (("    kind: human\n    role", "    kind: human\n    colour: red\n    role"), "field 'colour': unknown field"),
    ],
)
def test_malformed_registry_names_entry_and_field(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in VALID
    with pytest.raises(RegistryError) as err:
        load_registry(write(tmp_path, VALID.replace(old, new, 1)))
    assert expected in str(err.value)
    assert str(tmp_path / "sources.yaml") in str(err.value)


def test_registry_without_sources_list_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="expected a top-level 'sources:' list"):
        load_registry(write(tmp_path, "source: []\n"))
    with pytest.raises(RegistryError, match="source registry file not found"):
        load_registry(tmp_path / "nope.yaml")


def test_rendered_registry_loads_back(tmp_path: Path) -> None:
    from posttrain_assets.ingest.registry import render_registry

    text = render_registry(
        [
            {"name": "a", "path": "a.jsonl", "format": "alpaca", "license": "MIT", "origin": "x: y", "kind": "ai"},
            {
                "name": "b",
                "path": "b.jsonl",
                "format": "gsm8k",
                "regime": "rl",
                "license": "MIT",
                "origin": "z",
                "kind": "human",
                "role": "eval",
                "share": 0.5,
            },
        ],
        ["generated"],
    )
    assert text.startswith("# generated\nsources:\n  - name: a\n    path: a.jsonl\n")
    registry = load_registry(write(tmp_path, text))
    assert [(s.name, s.regime, s.role, s.origin) for s in registry.sources] == [
        ("a", "sft", "train", "x: y"),
        ("b", "rl", "eval", "z"),
    ]


@pytest.mark.parametrize("outside", ["../secret.jsonl", "../*.jsonl", "sft/../../secret.jsonl", "sft/**/../../../*"])
def test_a_relative_path_leading_outside_the_registry_folder_is_an_error(tmp_path: Path, outside: str) -> None:
    folder = tmp_path.resolve() / "registry"  # resolved, as load_registry names it
    (folder / "sft").mkdir(parents=True)
    (tmp_path / "secret.jsonl").write_text('{"messages": []}\n')  # what the path would have read, silently
    registry = write(folder, VALID.replace("path: sft/*.jsonl", f"path: {outside}"))
    with pytest.raises(RegistryError) as err:
        load_registry(registry)
    target = os.path.normpath(folder / outside)
    assert str(err.value) == (
        f"{registry}: sources[0] (chats): field 'path': {outside!r} leads outside the registry's folder {folder} "
        f"(to {target}); write an absolute path to read files elsewhere"
    )


def test_paths_inside_the_folder_and_absolute_paths_load(tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()  # as Source.files() names files
    folder = tmp_path / "registry"
    (folder / "sft").mkdir(parents=True)
    (folder / "sft" / "a.jsonl").write_text("{}\n")
    (tmp_path / "shared.jsonl").write_text("{}\n")
    text = VALID.replace("path: sft/*.jsonl", "path: sft/../sft/./*.jsonl").replace(
        "path: rl/gsm8k.jsonl", f"path: {tmp_path / 'shared.jsonl'}"
    )
    chats, bank = load_registry(write(folder, text)).sources
    assert chats.files() == [folder / "sft" / "a.jsonl"]  # `..` that stays inside is fine
    assert bank.files() == [tmp_path / "shared.jsonl"]  # an absolute path says explicitly where it reads
