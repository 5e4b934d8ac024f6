"""The embedding model: WordLlama's ``l2_supercat_256`` static token embeddings, read from inside its PyPI wheel.

Why this model (docs/curation.md has the measurements): its 16 MB of weights and its tokenizer ship inside the
``wordllama`` wheel (MIT), so nothing is downloaded at run time and no torch is needed (numpy, ``tokenizers`` and
``safetensors``, which the core install already has). A static model embeds a text as the mean of its tokens'
vectors, so one text's vector never depends on the other texts of its batch: the result is the same whatever the
batch size or the number of processes. It embeds about 130x faster than MiniLM-L6 on one core (ONNX int8 or torch
fp32) and keeps 94% of nearest neighbours within their source on the vendored real data (MiniLM: 96%).

Only the wheel's data files are read: the ``wordllama`` package itself is never imported (importing it configures
the root logger, and its loader looks for the tokenizer in the wrong folder and then goes to the network).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_PACKAGE = "wordllama"
MODEL_NAME = "wordllama/l2_supercat_256"
WEIGHTS_FILE = Path("weights") / "l2_supercat_256.safetensors"
TOKENIZER_FILE = Path("tokenizers") / "l2_supercat_tokenizer_config.json"
WEIGHTS_TENSOR = "embedding.weight"
# Texts per tokenizer call: bounds the Python lists one call builds; any value gives the same vectors.
EMBED_BATCH_ROWS = 1024


class EmbedderUnavailable(RuntimeError):
    """The embedding model's package is not installed (``pip install -e '.[curation]'``)."""


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_dir() -> Path:
    """The installed ``wordllama`` package folder (located without importing it)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(
            f"the embedding model ships in the {MODEL_PACKAGE!r} package, which is not installed: "
            "pip install -e '.[curation]' (the curation extra)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class EmbedderIdentity:
    """What every embedding row records about the model, as ``tokenizer_identity`` does for the tokenizer."""

    name: str
    version: str
    weights_sha256: str
    tokenizer_sha256: str

    @property
    def model_sha256(self) -> str:
        """One hash of the weights and the tokenizer: equal hashes, equal vectors for equal texts."""
        return hashlib.sha256(f"{self.weights_sha256}\x00{self.tokenizer_sha256}".encode()).hexdigest()

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "model_sha256": self.model_sha256,
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
        }


class Embedder:
    """Unit-length text vectors: the mean of the text's token vectors, L2-normalised (cosine = dot product).

    A text with no token (empty) gets the zero vector: similarity 0 to everything, so it is nobody's duplicate.
    """

    def __init__(self, weights: np.ndarray, tokenizer: object, identity: EmbedderIdentity) -> None:
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.tokenizer = tokenizer
        self.identity = identity

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def embed(self, texts: Sequence[str], batch_rows: int = EMBED_BATCH_ROWS) -> np.ndarray:
        """``len(texts) x dim`` float32 unit vectors, in the order of ``texts``; independent of ``batch_rows``."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_rows):
            batch = list(texts[start : start + batch_rows])
            encodings = self.tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(batch))
            ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
            np.clip(ids, 0, self.weights.shape[0] - 1, out=ids)
            present = np.flatnonzero(lengths)
            if not present.size:
                continue
            # reduceat sums each text's own token rows, left to right: no padding, nothing shared between texts.
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[present]
            sums = np.add.reduceat(self.weights[ids], starts, axis=0)
            means = sums / lengths[present, None].astype(np.float32)
            norms = np.linalg.norm(means, axis=1, keepdims=True)
            out[start + present] = means / np.where(norms > 0, norms, 1.0)
        return out


def load_embedder() -> Embedder:
    """The bundled model, from the installed wheel's files; :class:`EmbedderUnavailable` when it is missing."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    root = model_dir()
    weights_path, tokenizer_path = root / WEIGHTS_FILE, root / TOKENIZER_FILE
    for path in (weights_path, tokenizer_path):
        if not path.is_file():
            raise EmbedderUnavailable(f"{path} is missing from the installed {MODEL_PACKAGE} package")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    identity = EmbedderIdentity(
        name=MODEL_NAME,
        version=importlib.metadata.version(MODEL_PACKAGE),
        weights_sha256=_file_sha256(weights_path),
        tokenizer_sha256=_file_sha256(tokenizer_path),
    )
    return Embedder(load_file(str(weights_path))[WEIGHTS_TENSOR], tokenizer, identity)
