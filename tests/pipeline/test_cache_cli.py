"""`python -m pipeline.cache`: list and prune a real cache built by one tiny job."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
from testkit import REPO, cache_entries, clean_env, half_written

from pipeline.cache import MARKER, StageCache
from pipeline.files import read_manifest
from pipeline.layout import MANIFEST

CACHED = ("build", "convert", "export", "lower", "partition")  # validate is not cached by default


def cache_cli(*args: str, cwd=REPO, wait: bool = True):
    cmd = [sys.executable, "-m", "pipeline.cache", *args]
    env = clean_env(COLUMNS="200", PYTHONPATH=str(REPO))
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def rows(output: str) -> dict[str, list[str]]:
    """Table rows of rich's output, by their first cell."""
    out = {}
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            out.setdefault(cells[0], cells)
    return out


@pytest.fixture
def cache(tiny_cache_as_built, tmp_path):
    """A private copy of the session's tiny_cnn cache as its one job built it: prune is destructive."""
    copy = tmp_path / "outputs" / "cache"
    shutil.copytree(tiny_cache_as_built, copy)
    return copy


def test_list_counts_entries_per_stage(cache):
    proc = cache_cli("list", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    for stage in CACHED:
        assert table[stage][1] == "1", proc.stdout
    assert table["total"][1] == str(len(CACHED)) and table["total"][-1] == "0"
    entries = cache_cli("list", "--entries", "--cache", str(cache)).stdout
    keys = {stage: cache_entries(cache, stage)[0].name[:12] for stage in CACHED}
    assert all(f"│ {stage:<9} │ {key} │" in entries for stage, key in keys.items()), entries


def test_default_cache_is_the_pipelines(cache):
    proc = cache_cli("list", cwd=cache.parents[1])  # outputs/cache relative to the current folder
    assert proc.returncode == 0, proc.stderr
    assert str(cache) in proc.stdout and rows(proc.stdout)["total"][1] == str(len(CACHED))


def test_prune_dry_run_removes_nothing(cache):
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    proc = cache_cli("prune", "--max-size", "0", "--dry-run", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert f"would remove {len(CACHED)} folder(s)" in proc.stdout
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


def test_prune_keeps_recently_used_entries(cache):
    proc = cache_cli("prune", "--older-than", "1d", "--max-size", "5GB", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "removed 0 folder(s)" in proc.stdout
    assert all(len(cache_entries(cache, stage)) == 1 for stage in CACHED)


def test_prune_max_size_zero_removes_everything(cache):
    proc = cache_cli("prune", "--max-size", "0", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert f"removed {len(CACHED)} folder(s)" in proc.stdout
    assert not any(cache_entries(cache, stage) for stage in CACHED)
    assert half_written(cache) == []
    assert "empty" in cache_cli("list", "--cache", str(cache)).stdout


def test_prune_removes_corrupt_entries_and_publish_leftovers(cache):
    build = cache_entries(cache, "build")[0]
    engine = next(p for p in build.iterdir() if p.name.endswith(".ort.onnx"))
    engine.chmod(0o644)  # published read-only: only root could damage it without this
    engine.write_bytes(b"truncated")
    (cache_entries(cache, "lower")[0] / MANIFEST).unlink()
    staging = cache / "convert" / ".tmp-0123456789abcdef01234567-999999-deadbeef"
    staging.mkdir()
    (staging / "accel_0.onnx").write_bytes(b"half")
    trash = cache / "export" / ".trash-0123456789abcdef01234567-cafebabe"
    trash.mkdir()

    listed = rows(cache_cli("list", "--cache", str(cache)).stdout)
    assert listed["build"][1] == "0" and listed["build"][-1] == "1"
    assert listed["total"][-1] == "4"

    proc = cache_cli("prune", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "removed 4 folder(s)" in proc.stdout
    assert not cache_entries(cache, "build") and not cache_entries(cache, "lower")
    assert half_written(cache) == []
    for stage in ("convert", "export", "partition"):  # whole entries are kept
        assert read_manifest(cache_entries(cache, stage)[0]) is not None


def test_prune_waits_for_a_job_holding_the_key(cache):
    entry = cache_entries(cache, "partition")[0]
    held = threading.Event()
    release = threading.Event()

    def builder():
        with StageCache(cache).lock("partition", entry.name):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=builder)
    thread.start()
    held.wait(10)
    proc = cache_cli("prune", "--max-size", "0", "--stage", "partition", "--cache", str(cache), wait=False)
    try:
        time.sleep(3)
        assert proc.poll() is None and entry.exists()  # blocked on the lock, nothing removed yet
    finally:
        release.set()
        thread.join()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not entry.exists() and "removed 1 folder(s)" in out
    assert all(len(cache_entries(cache, stage)) == 1 for stage in CACHED if stage != "partition")


@pytest.mark.parametrize("args", [("prune", "--older-than", "7x"), ("prune", "--max-size", "5XB"),
                                  ("lst",), ("prune", "--stage", "../x"), ("list", "--stage", "runs")])
def test_bad_arguments_give_one_error_line(args, tmp_path):
    proc = cache_cli(*args, "--cache", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# --- prune touches only what it can prove is the cache's own ------------------------------------

def tree(folder) -> dict[str, bytes | None]:
    """Every path under `folder`, with the bytes of files: what 'nothing changed' compares."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_a_job_marks_its_cache(cache):
    assert (cache / MARKER).is_file()


@pytest.mark.parametrize("command", [("prune", "--max-size", "0"), ("prune",), ("list",)])
def test_a_folder_that_is_not_a_cache_is_refused_and_nothing_is_deleted(cache, command):
    """`--cache outputs`, one level too high: run folders, the MLflow store and the cache beside them."""
    outputs = cache.parent
    run = outputs / "runs" / "2026-11-26" / "10-00-00"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (outputs / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    before = tree(outputs)
    proc = cache_cli(*command, "--cache", str(outputs))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not a pipeline cache" in lines[0], proc.stderr
    assert "cache, mlflow.db, runs" in lines[0] and "nothing was removed" in lines[0]
    assert tree(outputs) == before


def test_a_cache_made_before_the_marker_is_still_recognised(cache):
    """Stage folders of key-shaped entries only: a cache; prune adopts it (writes the marker)."""
    (cache / MARKER).unlink()
    assert rows(cache_cli("list", "--cache", str(cache)).stdout)["total"][1] == str(len(CACHED))
    proc = cache_cli("prune", "--max-size", "0", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert f"removed {len(CACHED)} folder(s)" in proc.stdout and (cache / MARKER).is_file()


def test_an_unmarked_folder_with_anything_else_is_refused(cache):
    (cache / MARKER).unlink()
    (cache / "export" / "notes").mkdir()
    before = tree(cache)
    proc = cache_cli("prune", "--max-size", "0", "--cache", str(cache))
    assert proc.returncode == 2 and "export/notes" in proc.stderr and tree(cache) == before


def test_prune_leaves_alone_what_the_cache_did_not_write(cache, tmp_path):
    """Other stage names, other entry names, and links out of the cache are never touched."""
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    (cache / "scratch").mkdir()
    (cache / "scratch" / "0123456789abcdef01234567").mkdir()
    (cache / "export" / "my-notes").mkdir()
    (cache / "export" / "abcdefabcdefabcdefabcdef").symlink_to(keep, target_is_directory=True)
    proc = cache_cli("prune", "--max-size", "0", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert f"removed {len(CACHED)} folder(s)" in proc.stdout
    assert (cache / "scratch" / "0123456789abcdef01234567").is_dir() and (cache / "export" / "my-notes").is_dir()
    assert (keep / "precious.txt").read_text() == "mine"
    assert (cache / "export" / "abcdefabcdefabcdefabcdef").is_symlink()
