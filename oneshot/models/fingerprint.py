"""Fingerprints of model files: each weight file's size, its first and last MiB and 8 evenly spaced 64 KiB
pieces (config.json whole). Seconds for a 26 GB checkpoint, and different for any two checkpoints that
differ in their headers, shapes or values at those places: a check against a different model under the same
name (identity.py) and a cache key (gguf_cache.py), not a cryptographic digest of every byte.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
_EDGE, _PIECE, _PIECES = 2**20, 2**16, 8


def file_fingerprint(path: Path, digest=None) -> str:
    digest = digest or hashlib.sha256()
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        if size <= 2 * _EDGE + _PIECES * _PIECE:
            digest.update(handle.read())
        else:
            for offset in [0, size - _EDGE]:
                handle.seek(offset)
                digest.update(handle.read(_EDGE))
            for k in range(1, _PIECES + 1):
                handle.seek(k * size // (_PIECES + 1))
                digest.update(handle.read(_PIECE))
    return digest.hexdigest()[:16]


def directory_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES:
            file_fingerprint(path, digest)
    return digest.hexdigest()[:16]
