"""What identifies a model's weights, as a record and a lineage card keep it: not the spelling the user
gave (a relative path means another model from another directory) but a resolved path with a fingerprint
of its files, a Hub id with its revision, a preset with its seed, or the embedded package's file.

The fingerprint (fingerprint.py) samples each weight file: seconds for a 26 GB checkpoint; a check against a
different model under the same name, not a cryptographic digest.
"""
from __future__ import annotations

from pathlib import Path

from .fingerprint import directory_fingerprint, file_fingerprint

def model_identity(spec: str, seed: int = 0) -> dict:
    """{"model": as given, "kind", and what pins it down: "path" and "fingerprint", "revision", or "seed"}."""
    from .embedded import EMBEDDED
    from .loading import check_model_spec

    kind = check_model_spec(spec)
    identity = {"model": spec, "kind": kind}
    if kind == "random":
        identity["seed"] = seed
    elif kind == "alias":
        from importlib import metadata

        embedded = EMBEDDED[spec]
        path = embedded.path()
        identity.update(path=str(path), fingerprint=file_fingerprint(path),
                        package=f"{embedded.package} {metadata.version(embedded.package)}")
    elif kind == "gguf":
        path = Path(spec).expanduser().resolve()
        identity.update(path=str(path), fingerprint=file_fingerprint(path))
    elif kind == "local":
        path = Path(spec).expanduser().resolve()
        identity.update(path=str(path), fingerprint=directory_fingerprint(path))
    else:  # the Hub: the revision the local cache holds, when it holds one
        identity["revision"] = _cached_revision(spec)
    return identity


def _cached_revision(repo: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached, or no hub library: the revision is unknown
        return None


def loadable(identity: dict) -> str:
    """What load_model takes to load the model `identity` names (a path where there is one)."""
    if identity.get("kind") in ("local", "gguf"):
        return identity["path"]
    return identity["model"]


def changed_since(identity: dict) -> str | None:
    """Why the model `identity` names is no longer the one it fingerprinted (moved, changed), or None."""
    kind = identity.get("kind")
    if kind not in ("local", "gguf", "alias"):
        return None
    path = Path(identity["path"])
    if not path.exists():
        return f"{path} no longer exists"
    now = file_fingerprint(path) if path.is_file() else directory_fingerprint(path)
    if now != identity.get("fingerprint"):
        return f"{path} holds different weights now (fingerprint {now}, recorded {identity.get('fingerprint')})"
    return None


def base_identity(spec: str, seed: int, lineage: dict | None) -> dict:
    """The dense model a run's model comes from: the input's own base when the input was saved by oneshot
    (its lineage card), so a second stage (quantising a structured model, say) keeps naming the original;
    else the input itself. A card written before bases were recorded gives its `model` as it was spelled."""
    if lineage is None:
        return model_identity(spec, seed)
    if isinstance(lineage.get("base"), dict):
        return lineage["base"]
    return {"model": lineage.get("model"), "kind": "as spelled", "seed": lineage.get("seed", seed)}
