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
import stat
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError
from pipeline.layout import MANIFEST

# What a path is, where it is not a regular file.
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


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
    manifest, _ = check_manifest(folder, verify)
    return manifest


def check_manifest(folder: Path, verify: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(the manifest, "") if the folder is whole, else (None, why not).

    Nothing outside the folder is read and nothing that may never end: the manifest and
    every file it lists must be regular files inside the folder (a link may point within
    it), listed sizes are compared before any byte is read, so a FIFO, /dev/zero or a link
    to /etc/passwd is refused unopened.
    """
    why = confined(folder, MANIFEST)
    if why:
        return None, why
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for entry in manifest["files"]:
            why = confined(folder, entry["path"], entry["bytes"])
            if why:
                return None, why
            if verify and file_digest(folder / entry["path"]) != entry["sha256"]:
                return None, f"{entry['path']} does not match its sha256"
        return manifest, ""
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST} cannot be read ({type(err).__name__})"


def confined(folder: Path, name: Any, size: Any = None, missing_ok: bool = False) -> str:
    """Why `folder / name` may not be read (outside the folder, not a regular file, not `size` bytes), or "".

    missing_ok: a name that is not there is fine (it is only a name until something reads it).
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return f"it names {name!r}, a path outside the folder"
    path = folder / name
    try:
        if not path.resolve().is_relative_to(folder.resolve()):
            return f"{name} is a link to {path.resolve()}, a path outside the folder"
        st = path.stat()  # follows a link, which stays inside (checked above)
    except FileNotFoundError:
        return "" if missing_ok and not os.path.lexists(path) else f"{name} is missing"
    except (OSError, RuntimeError) as err:
        return f"{name} cannot be read ({type(err).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return f"{name} is not a regular file ({KINDS.get(stat.S_IFMT(st.st_mode), 'not a file')})"
    if size is not None and st.st_size != size:
        return f"{name} has {st.st_size} bytes, its manifest says {size}"
    return ""


def require_manifest(folder: Path, what: str) -> dict[str, Any]:
    manifest, why = check_manifest(folder)
    if manifest is None:
        raise ArtifactError(
            f"{what} at {folder} is missing, unreadable or corrupt: {why}.",
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
