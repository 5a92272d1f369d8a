"""Content-addressed stage store: keys, manifests, atomic publish.

An entry is `<cache>/<stage>/<key>/` holding the stage's files and a `manifest.json`
written last. A key hashes the stage, its version, the config it reads, the keys of its
inputs and the environment, so keys chain: change `min_block_size` and export and lower
are still hits. An entry is only ever created by renaming a finished temporary folder
into place, so readers see a whole entry or none; an entry whose manifest is missing,
unreadable or disagrees with its files is a miss and is rebuilt. A per-key file lock
keeps concurrent jobs from building the same entry twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]


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


class Store:
    """Stage entries under one cache folder."""

    def __init__(self, root: Path):
        self.root = root

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        folder = self.entry(stage, key)
        return read_manifest(folder) if folder.exists() else None

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, shared: bool = False) -> Iterator[None]:
        """Serialise builders (and pruners) of one key; readers share it; other keys proceed in parallel."""
        lock_dir = self.root / stage
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f".{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def staging(self, stage: str, key: str) -> Path:
        folder = self.root / stage / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def publish(self, staging: Path, stage: str, key: str, manifest: dict[str, Any]) -> Path:
        return publish_folder(staging, self.entry(stage, key), manifest)


def publish_folder(staging: Path, final: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last, then rename the whole folder into place."""
    manifest["files"] = describe_files(staging)
    write_json(staging / MANIFEST, manifest)
    if final.exists():
        # A corrupt entry, or a twin published meanwhile: move it aside, never edit in place.
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, final)
    return final


def link_tree(src: Path, dst: Path) -> None:
    """Give a run folder its own view of a cache entry: hard links, copies across devices."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp, copy_function=link_or_copy)
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)
