"""pipeline.store: keys, manifests that prove an entry whole, publish by rename, hard links."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from pipeline.errors import ArtifactError
from pipeline.store import (
    MANIFEST,
    Store,
    cache_key,
    describe_files,
    link_tree,
    publish_folder,
    read_manifest,
    require_manifest,
    write_json,
)


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


def test_read_manifest_rejects_a_same_size_file_with_another_hash(entry):
    (entry / "a.txt").write_bytes(b"HELLO")  # same 5 bytes, other content
    assert read_manifest(entry) is None
    assert read_manifest(entry, verify=False) is not None  # only the hash tells them apart
    with pytest.raises(ArtifactError, match="corrupt"):
        require_manifest(entry, "test entry")


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest_garbage", "manifest_missing",
                                    "manifest_no_files"])
def test_read_manifest_rejects_damaged_entries(entry, damage):
    if damage == "truncate":
        (entry / "sub" / "b.bin").write_bytes(b"\x00")
    elif damage == "delete":
        (entry / "a.txt").unlink()
    elif damage == "manifest_garbage":
        (entry / MANIFEST).write_text("{not json")
    elif damage == "manifest_missing":
        (entry / MANIFEST).unlink()
    else:
        (entry / MANIFEST).write_text(json.dumps({"stage": "test"}))
    assert read_manifest(entry) is None
    assert read_manifest(entry, verify=False) is None


def test_store_staging_publish_lookup(tmp_path):
    store = Store(tmp_path / "cache")
    assert store.lookup("export", "abc") is None
    staging = store.staging("export", "abc")
    assert staging.parent == tmp_path / "cache" / "export" and staging.name.startswith(".tmp-abc-")
    (staging / "program.pt2").write_bytes(b"x" * 10)
    assert store.lookup("export", "abc") is None  # nothing visible before publish
    final = store.publish(staging, "export", "abc", {"stage": "export", "key": "abc"})
    assert final == store.entry("export", "abc") == tmp_path / "cache" / "export" / "abc"
    assert store.lookup("export", "abc")["files"] == [
        {"path": "program.pt2", "bytes": 10, "sha256": sha(b"x" * 10)}]
    assert not staging.exists()


def test_store_lock_serialises_one_key(tmp_path):
    store = Store(tmp_path / "cache")
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
