"""pipeline.cache and pipeline.files on their own: keys, manifests, publish by rename, locks, reuse, links."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass

import pytest

from pipeline.cache import (
    MARKER,
    READ_ONLY,
    Material,
    StageCache,
    cache_key,
    link_tree,
    publish_folder,
)
from pipeline.errors import ArtifactError
from pipeline.files import describe_files, read_manifest, require_manifest, write_json
from pipeline.layout import MANIFEST
from pipeline.stage import StageSpec
from pipeline.targets import BUILDING, Target


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def entry(tmp_path):
    """A published entry with a nested file."""
    staging = tmp_path / "stage" / ".tmp-k"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.txt").write_bytes(b"hello")
    (staging / "sub" / "b.bin").write_bytes(b"\x00\x01\x02")
    final = tmp_path / "stage" / "k"
    publish_folder(staging, final, {"stage": "test", "key": "k"})
    return final


def test_cache_key_is_canonical():
    a = cache_key({"stage": "export", "config": {"x": 1, "y": [1, 2]}})
    b = cache_key({"config": {"y": [1, 2], "x": 1}, "stage": "export"})
    assert a == b and len(a) == 24 and int(a, 16) >= 0
    assert cache_key({"stage": "export", "config": {"x": 2, "y": [1, 2]}}) != a
    assert cache_key({"stage": "export", "config": {"x": 1, "y": [2, 1]}}) != a


def test_publish_renames_the_staging_folder(tmp_path):
    staging = tmp_path / "stage" / ".tmp-key"
    staging.mkdir(parents=True)
    (staging / "a.txt").write_bytes(b"hello")
    inode = staging.stat().st_ino
    final = tmp_path / "stage" / "key"
    out = publish_folder(staging, final, {"stage": "test"})
    assert out == final and final.is_dir()
    assert not staging.exists()
    assert final.stat().st_ino == inode  # the same folder, renamed: never a partial copy
    assert sorted(p.name for p in final.iterdir()) == ["a.txt", MANIFEST]


def test_manifest_lists_files_with_size_and_hash(entry):
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["stage"] == "test" and manifest["key"] == "k"
    assert manifest["files"] == [
        {"path": "a.txt", "bytes": 5, "sha256": sha(b"hello")},
        {"path": "sub/b.bin", "bytes": 3, "sha256": sha(b"\x00\x01\x02")},
    ]
    assert read_manifest(entry) == manifest
    assert require_manifest(entry, "test entry") == manifest


def test_publish_replaces_an_existing_entry_whole(entry):
    staging = entry.parent / ".tmp-k2"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish_folder(staging, entry, {"stage": "test"})
    assert sorted(p.name for p in entry.iterdir()) == [MANIFEST, "new.txt"]
    assert read_manifest(entry)["files"][0]["path"] == "new.txt"
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(".")] == []  # no trash left


def writable(path):
    """A published file is read-only: tests that damage one make it writable first (as root need not)."""
    path.chmod(0o644)
    return path


def test_read_manifest_rejects_a_same_size_file_with_another_hash(entry):
    writable(entry / "a.txt").write_bytes(b"HELLO")  # same 5 bytes, other content
    assert read_manifest(entry) is None
    assert read_manifest(entry, verify=False) is not None  # only the hash tells them apart
    with pytest.raises(ArtifactError, match="corrupt"):
        require_manifest(entry, "test entry")


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest_garbage", "manifest_missing",
                                    "manifest_no_files"])
def test_read_manifest_rejects_damaged_entries(entry, damage):
    if damage == "truncate":
        writable(entry / "sub" / "b.bin").write_bytes(b"\x00")
    elif damage == "delete":
        (entry / "a.txt").unlink()
    elif damage == "manifest_garbage":
        writable(entry / MANIFEST).write_text("{not json")
    elif damage == "manifest_missing":
        (entry / MANIFEST).unlink()
    else:
        writable(entry / MANIFEST).write_text(json.dumps({"stage": "test"}))
    assert read_manifest(entry) is None
    assert read_manifest(entry, verify=False) is None


class FakeTarget(Target):
    """A real Target subclass with one build setting and one run-time setting."""

    name = "fake"
    runtime_settings = ("threads",)


def spec(name: str = "build", **changes) -> StageSpec:
    def run(ctx):
        raise AssertionError("the cache never runs a stage itself")

    base = dict(name=name, version=1, run=run, inputs=("lower",), reads=("compile.level",), asks=BUILDING,
                libraries=("torch",))
    return StageSpec(**{**base, **changes})


def material(tmp_path, target=None, config=None, **changes) -> Material:
    config = config or {"compile": {"level": 3, "other": 1}, "model": {"name": "a"}}
    target = target or FakeTarget({"name": "fake", "opt": 1, "threads": 4})
    return StageCache(tmp_path / "cache").material(spec(**changes), config, target, tmp_path, {"lower": "L"})


def test_a_key_is_exactly_what_changes_the_output(tmp_path):
    key = material(tmp_path).key
    # Unread config, labels and run-time settings are not in it ...
    assert material(tmp_path, config={"compile": {"level": 3, "other": 2}, "model": {"name": "b"}}).key == key
    assert material(tmp_path, FakeTarget({"name": "fake", "opt": 1, "threads": 1})).key == key
    # ... what the stage reads, what it asks of the target, its version and inputs are.
    assert material(tmp_path, config={"compile": {"level": 4, "other": 1}}).key != key
    assert material(tmp_path, FakeTarget({"name": "fake", "opt": 2, "threads": 4})).key != key
    assert material(tmp_path, version=2).key != key
    m = material(tmp_path)
    assert m.inputs == {"lower": "L"} and m.config == {"compile": {"level": 3}}
    assert m.target == {"name": "fake", "opt": 1}
    assert set(m.env["libraries"]) <= {"torch"}  # only the libraries the stage and target use


def test_content_inputs_are_keyed_by_the_files_they_read(tmp_path):
    """Two upstream entries with different keys but the same recipe give one key downstream."""
    cache = StageCache(tmp_path / "cache")
    reader = spec(inputs=("partition",), content={"partition": ("recipe.json",)})
    keys = []
    for report in ("one", "two"):
        run_dir = tmp_path / report
        staging = run_dir / "partition"
        staging.mkdir(parents=True)
        (staging / "recipe.json").write_text("[1, 2]")
        (staging / "report.json").write_text(report)
        publish_folder(staging, run_dir / ".p", {"stage": "partition"})
        os.rename(run_dir / ".p", staging)
        keys.append(cache.material(reader, {"compile": {"level": 3}}, FakeTarget({}), run_dir,
                                   {"partition": report}).key)
    assert keys[0] == keys[1]


def test_obtain_builds_publishes_then_hits(tmp_path):
    cache, m = StageCache(tmp_path / "cache"), material(tmp_path)
    calls = []

    def execute(staging):
        calls.append(staging)
        (staging / "engine.bin").write_bytes(b"x" * 10)
        return {"engine_bytes": 10}, ["a note"]

    first = cache.obtain(spec(), m, tmp_path / "run1", execute)
    assert not first.hit and first.key == m.key and len(calls) == 1
    assert not calls[0].exists()  # the staging folder became the entry
    entry = cache.entry("build", m.key)
    manifest = read_manifest(entry)
    assert manifest["metrics"] == {"engine_bytes": 10} and manifest["notes"] == ["a note"]
    assert manifest["config"] == m.config and manifest["target"] == m.target and manifest["key"] == m.key
    second = cache.obtain(spec(), m, tmp_path / "run2", execute)
    assert second.hit and len(calls) == 1 and second.manifest == manifest
    assert os.path.samefile(tmp_path / "run2" / "build" / "engine.bin", entry / "engine.bin")


def test_a_failed_stage_leaves_nothing(tmp_path):
    cache, m = StageCache(tmp_path / "cache"), material(tmp_path)

    def fails(staging):
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.obtain(spec(), m, tmp_path / "run", fails)
    assert cache.lookup("build", m.key) is None
    assert [p.name for p in (tmp_path / "cache" / "build").iterdir() if not p.name.endswith(".lock")] == []


def test_a_stage_that_misses_a_declared_file_is_not_published(tmp_path):
    @dataclass(frozen=True)
    class Files:
        engines: str = "engines.json"

    cache, m = StageCache(tmp_path / "cache"), material(tmp_path)
    with pytest.raises(RuntimeError, match="did not write engines.json"):
        cache.obtain(spec(writes=Files()), m, tmp_path / "run", lambda staging: ({}, []))
    assert cache.lookup("build", m.key) is None


def test_uncached_stages_are_built_in_the_run_folder_every_time(tmp_path):
    cache, m = StageCache(tmp_path / "cache"), material(tmp_path)
    runs = []

    def execute(staging):
        runs.append(1)
        (staging / "report.json").write_text("{}")
        return {}, []

    for _ in range(2):
        outcome = cache.obtain(spec("validate"), m, tmp_path / "run", execute, cached=False)
        assert not outcome.hit
    assert len(runs) == 2 and read_manifest(tmp_path / "run" / "validate") is not None
    assert not (tmp_path / "cache" / "validate").exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["validate"]


def test_concurrent_builders_of_one_key_build_once(tmp_path):
    cache, m = StageCache(tmp_path / "cache"), material(tmp_path)
    builds = []

    def execute(staging):
        builds.append(1)
        time.sleep(0.3)
        (staging / "engine.bin").write_bytes(b"x")
        return {}, []

    outcomes = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(cache.obtain(spec(), m, tmp_path / f"r{i}", execute)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and sorted(o.hit for o in outcomes) == [False, True, True]


def test_lock_serialises_one_key(tmp_path):
    store = StageCache(tmp_path / "cache")
    events: list[str] = []
    held = threading.Event()

    def other():
        held.wait()
        with store.lock("build", "k"):
            events.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    with store.lock("build", "k"):
        held.set()
        time.sleep(0.2)
        events.append("first")
        with store.lock("build", "other-key"):  # another key is not blocked
            events.append("other-key")
    thread.join(5)
    assert events == ["first", "other-key", "other"]


def test_write_json_leaves_no_temporary_files(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    write_json(tmp_path / "a.json", {"x": 3})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_describe_files_skips_the_manifest(entry):
    assert [f["path"] for f in describe_files(entry)] == ["a.txt", "sub/b.bin"]


def test_link_tree_gives_hard_links_and_replaces(entry, tmp_path):
    dst = tmp_path / "run" / "export"
    dst.mkdir(parents=True)
    (dst / "stale.txt").write_text("old")
    link_tree(entry, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt", MANIFEST, "sub"]
    assert os.path.samefile(dst / "a.txt", entry / "a.txt")
    assert os.path.samefile(dst / "sub" / "b.bin", entry / "sub" / "b.bin")
    assert read_manifest(dst) == read_manifest(entry)
    assert [p.name for p in dst.parent.iterdir()] == ["export"]


def test_published_files_are_read_only_and_folders_stay_writable(entry, tmp_path):
    """Run folders hard-link these files: no one but root can change an entry through them."""
    for path in (entry / "a.txt", entry / "sub" / "b.bin", entry / MANIFEST):
        assert path.stat().st_mode & 0o777 == READ_ONLY
    assert entry.stat().st_mode & 0o200 and (entry / "sub").stat().st_mode & 0o200  # prune renames, removes
    dst = tmp_path / "run" / "export"
    link_tree(entry, dst)
    assert (dst / "a.txt").stat().st_mode & 0o777 == READ_ONLY and (dst / "a.txt").read_bytes() == b"hello"
    shutil.rmtree(entry)  # read-only files in writable folders are removed like any other
    assert not entry.exists() and (dst / "a.txt").read_bytes() == b"hello"


def test_the_cache_marks_its_root_the_first_time_it_is_used(tmp_path):
    cache = StageCache(tmp_path / "cache")
    assert not cache.is_marked() and not (tmp_path / "cache").exists()  # computing keys writes nothing
    material(tmp_path)
    assert not (tmp_path / "cache").exists()
    with cache.lock("build", "0" * 24, shared=True):
        pass
    assert cache.is_marked() and json.loads((tmp_path / "cache" / MARKER).read_text()) == {"format": 1}


def test_staging_left_by_a_dead_builder_is_removed_by_the_next_job(tmp_path):
    import socket
    import subprocess
    import sys

    cache = StageCache(tmp_path / "cache")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key = "a" * 24
    host = socket.gethostname()
    left = tmp_path / "cache" / "build" / f".tmp-{key}-{host}-{dead.stdout.strip()}-0123abcd"
    live = cache.staging("build", "b" * 24)  # this process: alive
    other_host = tmp_path / "cache" / "build" / f".tmp-{key}-another.host-1-0123abcd"
    for folder in (left, other_host):
        folder.mkdir(parents=True)
        (folder / "half.bin").write_bytes(b"x")
    assert cache.remove_dead_staging() == [left]
    assert not left.exists() and live.exists() and other_host.exists()
    with cache.lock("build", "c" * 24):  # a folder whose key is being built is never touched
        busy = tmp_path / "cache" / "build" / f".tmp-{'c' * 24}-{host}-{dead.stdout.strip()}-0123abcd"
        busy.mkdir()
        import threading

        found = []
        thread = threading.Thread(target=lambda: found.extend(cache.remove_dead_staging()))
        thread.start()
        thread.join(10)
    assert busy.exists() and found == []
