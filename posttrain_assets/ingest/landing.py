"""Fingerprints of the landing files behind each registry source, for the file sensor.

A source's fingerprint is the sha256 over its files' paths and content hashes, so a
new, removed or changed file changes it. Content hashes are cached by (size, mtime)
so an unchanged file is not re-read on every sensor tick.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from posttrain_assets.ingest.files import file_sha256

# path -> [size, mtime_ns, sha256]
HashCache = dict[str, list]


def file_hash(path: Path, cache: HashCache) -> str:
    stat = path.stat()
    cached = cache.get(str(path))
    if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
        return cached[2]
    sha = file_sha256(path)
    cache[str(path)] = [stat.st_size, stat.st_mtime_ns, sha]
    return sha


def files_fingerprint(files: list[Path], cache: HashCache) -> str | None:
    """sha256 over (path, content hash) of every file a source matches; None when it matches none."""
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path}\0{file_hash(path, cache)}\n".encode())
    return digest.hexdigest()
