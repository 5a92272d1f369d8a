"""The stage cache: the one owner of keys, locks, lookup, staging, publish and linking.

An entry is `<cache>/<stage>/<key>/` holding a stage's files and a `manifest.json`
written last. Its key hashes exactly what changes the bytes the stage writes (DVC's
run-cache idea): the stage and its version, the config keys it reads, the target's own
key material for that stage, the identities of its inputs (upstream keys, or the
hashes of the few upstream files it reads), and the versions of the libraries that
stage and target use, with the Python version and the device. Labels (model.name) and
run-time session settings (thread counts, spinning) are in no build key.

Keys chain, so a sweep over `compile.min_block_size` exports and lowers once. An entry
is only created by renaming a finished staging folder into place, so readers see a
whole entry or none; an entry whose manifest is missing or disagrees with its files is
a miss and is rebuilt. A per-key file lock keeps concurrent jobs from building one key
twice; readers hold it shared while they link, so `prune` never removes an entry
between a job finding it and linking it. Stages that are not reusable (validate, by
default) are staged and published in the run folder by the same code.

Published files are read-only (0444, as DVC protects its cache): run folders hard-link
them, so a run folder whose engine is edited in place would otherwise change the entry
and every other run linked to it. Root ignores file modes; an entry changed anyway no
longer matches its manifest's hashes, and lookup treats it as a miss and rebuilds it.
The cache root holds a marker file (`.pipeline-cache`) written the first time a job
uses it, so `prune` can tell a cache from any other folder it is pointed at.

`python -m pipeline.cache list|prune` is the command line (pipeline/cache/cli.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import env, provenance
from pipeline.files import describe_files, link_or_copy, load_json, read_manifest, write_json
from pipeline.layout import MANIFEST
from pipeline.stage import Metrics, StageSpec

# Prefixes of folders that are not entries: staging folders and entries moved aside.
STAGING_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"
# The file that marks a folder as a stage cache, and the shape of an entry's name (a key).
MARKER = ".pipeline-cache"
KEY = re.compile(r"[0-9a-f]{24}")
READ_ONLY = 0o444


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]


def select(config: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """The nested subset of `config` at the dotted `paths` a stage declares it reads."""
    subset: dict[str, Any] = {}
    for path in paths:
        *parents, leaf = path.split(".")
        src, dst = config, subset
        for part in parents:
            src = src[part]
            dst = dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    return subset


def environment(libraries: tuple[str, ...]) -> dict[str, Any]:
    """Python, the device, and the installed versions of `libraries` only."""
    versions = env.libraries()
    return {"python": platform.python_version(), **env.device_info(),
            "libraries": {name: versions[name] for name in sorted(set(libraries)) if name in versions}}


@dataclass
class Material:
    """Everything a stage's output depends on; its hash is the cache key."""

    stage: str
    version: int
    config: dict[str, Any]
    target: dict[str, Any]
    inputs: dict[str, Any]
    env: dict[str, Any]

    @property
    def key(self) -> str:
        return cache_key(self.__dict__)


@dataclass
class Outcome:
    key: str
    hit: bool
    seconds: float
    manifest: dict[str, Any]


def publish_folder(staging: Path, final: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last (signed: pipeline.provenance), then rename the whole folder into place."""
    manifest["files"] = describe_files(staging)
    provenance.sign(manifest)  # this user built it: what lets pipeline.load trust engines that are code
    write_json(staging / MANIFEST, manifest)
    protect(staging)
    if final.exists():
        # A corrupt entry, or a twin published meanwhile: move it aside, never edit in place.
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, final)
    return final


def protect(folder: Path) -> None:
    """Every file read-only (readable by all, for link_tree's copies); folders stay writable for prune."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(READ_ONLY)


def link_tree(src: Path, dst: Path) -> None:
    """Give a run folder its own view of a cache entry: hard links, copies across devices."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp, copy_function=link_or_copy)
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)


# What a stage's run does in a staging folder: its metrics and notes.
Execute = Callable[[Path], tuple[Metrics, list[str]]]


class StageCache:
    """Stage entries under one cache folder."""

    def __init__(self, root: Path):
        self.root = root

    def mark(self) -> None:
        """Say, once, that this folder is a stage cache (prune refuses folders that do not say so)."""
        if not (self.root / MARKER).is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(self.root / MARKER, {"format": 1})

    def is_marked(self) -> bool:
        return (self.root / MARKER).is_file()

    # --- keys -------------------------------------------------------------------------

    def material(self, spec: StageSpec, config: dict[str, Any], target, run_dir: Path,
                 upstream: dict[str, str], reads: tuple[str, ...] | None = None) -> Material:
        """What `spec` depends on in this job: config subset, target material, inputs, environment.

        `reads`: the keys the stage reads in this job (spec.reads_for), where the caller has them.
        """
        aspect = spec.asks
        reads = spec.reads_for(config, target) if reads is None else reads
        return Material(
            stage=spec.name, version=spec.version, config=select(config, reads),
            target=target.key_material(aspect) if aspect else {},
            inputs=self.input_identities(spec, run_dir, upstream),
            env=environment(spec.libraries + (target.libraries_for(aspect) if aspect else ())),
        )

    @staticmethod
    def input_identities(spec: StageSpec, run_dir: Path, upstream: dict[str, str]) -> dict[str, Any]:
        """Upstream keys, or for inputs read only in part (spec.content) those files' hashes."""
        identities: dict[str, Any] = {}
        for up in spec.inputs:
            files = spec.content.get(up)
            if files is None:
                identities[up] = upstream[up]
                continue
            manifest = load_json(run_dir / up / MANIFEST, f"the {up} manifest")
            digests = {f["path"]: f["sha256"] for f in manifest["files"]}
            identities[up] = {name: digests[name] for name in files}
        return identities

    # --- entries ----------------------------------------------------------------------

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        folder = self.entry(stage, key)
        return read_manifest(folder) if folder.exists() else None

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
        """Serialise builders (and pruners) of one key; readers share it; other keys proceed in parallel.

        Yields whether the lock is held (always, unless blocking=False found it taken).
        """
        self.mark()
        lock_dir = self.root / stage
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f".{key}.lock", "w") as handle:
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def staging(self, stage: str, key: str) -> Path:
        """A folder named by key, host and pid, so a later job can tell that its builder died."""
        name = f"{STAGING_PREFIX}{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder = self.root / stage / name
        folder.mkdir(parents=True)
        return folder

    def remove_dead_staging(self) -> list[Path]:
        """Staging folders whose builder on this host is gone (SIGKILL, a crash): removed under the key's lock.

        A live builder holds its key's lock, so a folder whose lock can be taken at once and
        whose pid is not running here was left by a dead process.
        """
        removed = []
        host = socket.gethostname()
        for folder in sorted(self.root.glob(f"*/{STAGING_PREFIX}*")):
            key, _, rest = folder.name.removeprefix(STAGING_PREFIX).partition("-")
            owner, _, pid = rest.rpartition("-")[0].rpartition("-")
            if owner != host or not pid.isdigit() or env.pid_alive(int(pid)):
                continue
            with self.lock(folder.parent.name, key, blocking=False) as held:
                if held and folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    # --- running a stage --------------------------------------------------------------

    def obtain(self, spec: StageSpec, material: Material, run_dir: Path, execute: Execute,
               cached: bool = True, extra: dict[str, Any] | None = None) -> Outcome:
        """The stage's output in `run_dir/<stage>`: linked from the cache, or built (and published)."""
        key = material.key
        started = time.perf_counter()
        if not cached:  # measurements of this moment on this machine: built in the run folder
            staging = run_dir / f".{spec.name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            manifest = self._build(spec, material, execute, staging, run_dir / spec.name, extra)
            return Outcome(key, False, manifest["wall_seconds"], manifest)
        with self.lock(spec.name, key, shared=True):
            manifest = self.lookup(spec.name, key)
            if manifest is not None:
                link_tree(self.entry(spec.name, key), run_dir / spec.name)
                return Outcome(key, True, time.perf_counter() - started, manifest)
        with self.lock(spec.name, key):
            manifest = self.lookup(spec.name, key)  # a parallel job may have built it meanwhile
            hit = manifest is not None
            if not hit:
                manifest = self._build(spec, material, execute, self.staging(spec.name, key),
                                       self.entry(spec.name, key), extra)
            link_tree(self.entry(spec.name, key), run_dir / spec.name)
        seconds = time.perf_counter() - started if hit else manifest["wall_seconds"]
        return Outcome(key, hit, seconds, manifest)

    @staticmethod
    def _build(spec: StageSpec, material: Material, execute: Execute, staging: Path, final: Path,
               extra: dict[str, Any] | None) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            metrics, notes = execute(staging)
            missing = [f for f in spec.written_files() if not (staging / f).is_file()]
            if missing:
                raise RuntimeError(f"stage {spec.name} did not write {', '.join(missing)}, which its spec declares")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = {**material.__dict__, "key": material.key, **(extra or {}),
                    "wall_seconds": time.perf_counter() - started,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics, "notes": notes}
        publish_folder(staging, final, manifest)
        return manifest
