"""Shared pytest fixtures. Tests write only under pytest's tmp directories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from posttrain_assets.sft.tokenizer import build_smollm2_tokenizer, load_tokenizer

# ---------------------------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tokenizer cache directory (the default tokenizer is built here once)."""
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tokenizer_cache_dir: Path) -> Path:
    """The ``save_pretrained`` directory of the default SmolLM2 tokenizer, built once per session from the GGUF."""
    return build_smollm2_tokenizer(tokenizer_cache_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tokenizer_cache_dir: Path, smollm2_tokenizer_dir: Path) -> Any:
    """The default tokenizer as ``load_tokenizer(None, ...)`` returns it. Shared: do not mutate it."""
    return load_tokenizer(None, tokenizer_cache_dir)


@pytest.fixture(scope="session")
def make_tokenizer(smollm2_tokenizer_dir: Path) -> Callable[..., Any]:
    """Factory for copies of the default tokenizer with another chat template and extra added tokens.

    ``make_tokenizer(template, special_tokens=(...), tokens=(...))``; results are cached per arguments, so do not
    mutate them.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    cache: dict[tuple[str, tuple[str, ...], tuple[str, ...]], Any] = {}

    def make(template: str, special_tokens: Sequence[str] = (), tokens: Sequence[str] = ()) -> Any:
        key = (template, tuple(special_tokens), tuple(tokens))
        if key not in cache:
            tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
            if special_tokens:
                tok.add_tokens(
                    [AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True
                )
            if tokens:
                tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
            tok.chat_template = template
            cache[key] = tok
        return cache[key]

    return make
