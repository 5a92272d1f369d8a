"""Which stage outputs this user's own jobs published: an HMAC under a per-user key kept outside outputs/.

Engines that are code (AOTInductor libraries, Torch-TensorRT pickles) load without
`trusted=True` only when the user built them. Who owns a file, how it is linked or whether
its cache folder carries a marker proves nothing: a tar of a run folder and a "cache" beside
it, extracted by the victim, gives files the victim owns, hard-linked, in a marked cache.
What a tar cannot carry is a secret of the user's: every manifest a job publishes gets a
`provenance` field, HMAC-SHA256 under a random per-user key, over the sha256 of the rest of
the manifest (which lists every file's size and sha256). `pipeline.load` recomputes it: only
a manifest this user's jobs wrote verifies, and only files matching it are read.

The key is 32 random bytes in `$PIPELINE_STATE_DIR/provenance.key` (default
`$XDG_STATE_HOME/pipeline/`, else `~/.local/state/pipeline/`), created 0600 in a 0700
folder on first publish, and used only while it is a regular file of this user that no one
else can read. Jobs on other machines that share the home folder share the key: they are
the same user's builds. Deleting the key revokes every earlier build (load them with
trusted=True, or rebuild).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

ENV = "PIPELINE_STATE_DIR"
KEY_FILE = "provenance.key"
FIELD = "provenance"
CONTEXT = b"pipeline provenance v1\n"


def state_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "pipeline"


def key_path() -> Path:
    return state_dir() / KEY_FILE


def read_key() -> bytes | None:
    """The key, if it exists and is a regular file of this user that no one else can read or write."""
    try:
        fd = os.open(key_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        text = handle.read(65).strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return key if len(key) == 32 else None


def make_key() -> bytes:
    """The key, created on first use (two jobs at once: the first link wins, both read it)."""
    key = read_key()
    if key is not None:
        return key
    path = key_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    key = read_key()
    if key is None:
        raise PermissionError(f"{path} is not a private regular file of this user: remove it, and run again.")
    return key


def _tag(key: bytes, manifest: dict[str, Any]) -> str:
    # The manifest as written and read back (JSON types only), without the field itself.
    body = {k: v for k, v in json.loads(json.dumps(manifest, default=str)).items() if k != FIELD}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()
    return hmac.new(key, CONTEXT + digest, hashlib.sha256).hexdigest()


def sign(manifest: dict[str, Any]) -> None:
    """Add this user's provenance record to a manifest about to be published."""
    manifest[FIELD] = _tag(make_key(), manifest)


def verify(manifest: dict[str, Any]) -> bool:
    """True if this user's key signed exactly this manifest."""
    key, tag = read_key(), manifest.get(FIELD)
    return key is not None and isinstance(tag, str) and hmac.compare_digest(tag, _tag(key, manifest))
