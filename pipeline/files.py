"""Files on disk: JSON written atomically, digests, and the manifests that prove a folder whole.

Every stage folder (a cache entry, or a run's uncached validate folder) ends with a
`manifest.json` written last, listing each file with its size and sha256; a folder
whose manifest is missing, unreadable or disagrees with its files is not whole. Folders
are published by renaming a finished staging folder into place, so a reader sees a
whole folder or none. The stage cache itself (keys, locks, reuse) is pipeline.cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError
from pipeline.layout import MANIFEST


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe_files(folder: Path) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files.append({"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size,
                      "sha256": file_digest(path)})
    return files


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link (no second copy of weights on disk; cache entries are read-only), a copy across devices."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json(path: Path, obj: Any) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any] | None:
    """The manifest if the entry is whole: every listed file present with its size (and hash)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for entry in manifest["files"]:
            path = folder / entry["path"]
            if path.stat().st_size != entry["bytes"]:
                return None
            if verify and file_digest(path) != entry["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def require_manifest(folder: Path, what: str) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(
            f"{what} at {folder} is missing, unreadable or corrupt (its files do not match manifest.json).",
            "rebuild it: run the same pipeline command again (corrupt cache entries are rebuilt).",
        )
    return manifest


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(
            f"{what} {path} cannot be read ({err.__class__.__name__}: {err}).",
            "rebuild it: run the same pipeline command again.",
        ) from None
