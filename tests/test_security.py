"""The trust model for artifacts: a tampered run folder is refused without running what it holds.

Every attack here is real: a pickle whose loading creates a marker file (shown live by
plain torch.export.load in a subprocess), a module planted beside the run, engine paths
pointing out of the folder, engines that are code. The tampered copies re-seal their
manifests as an attacker would (a manifest is a checksum, not a signature), and never
write into a file the cache shares (they replace files, which breaks the hard link).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from testkit import clean_env, edit_json, reseal, rewrite_archive, run_job

import pipeline
from pipeline import programs
from pipeline.cache import READ_ONLY, StageCache
from pipeline.errors import ArtifactError
from pipeline.files import read_manifest
from pipeline.stage import StageSpec


class Payload:
    """Unpickling this creates the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


@pytest.fixture
def run(tiny_job, tmp_path):
    """A copy of a real run folder that hard-links the cache's files, as run folders do."""
    dst = tmp_path / "outputs" / "run"
    shutil.copytree(tiny_job.run_dir, dst, copy_function=os.link)
    return dst


# --- pickles --------------------------------------------------------------------------------

def poison_weight(marker: Path):
    """A weight marked use_pickle (as torch.export.save marks tensor subclasses), its bytes a payload."""

    def change(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            fqn = next(iter(config["config"]))
            config["config"][fqn]["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return pickled(marker)
        return data
    return change


def poison_samples(marker: Path):
    """The sample inputs, a pickle in every .pt2, replaced: torch retries it with weights_only=False."""
    return lambda name, data: pickled(marker) if name.startswith("data/sample_inputs/") else data


@pytest.mark.parametrize("poison, refusal", [(poison_weight, "marks .* as pickled"),
                                             (poison_samples, "without unpickling")],
                         ids=["use_pickle-weight", "sample-inputs"])
def test_a_pickle_in_a_program_is_refused_and_never_runs(run, tmp_path, poison, refusal):
    marker = tmp_path / "unpickled"
    program = run / "lower" / "program.pt2"
    weight_names = [n for n in zipfile.ZipFile(program).namelist() if n.endswith("/data/weights/weight_0")]
    assert weight_names, "the tiny model's program has weights"
    rewrite_archive(program, poison(marker))
    reseal(run / "lower")

    with pytest.raises(ArtifactError, match=refusal) as caught:
        pipeline.load(run)
    assert not marker.exists()
    assert "\n" not in caught.value.one_line() and str(program) in caught.value.one_line()

    # The payload is live: plain torch.export.load, in another process, runs it.
    proc = subprocess.run([sys.executable, "-c", "import sys, torch\ntry:\n torch.export.load(sys.argv[1])\n"
                           "except Exception:\n pass", str(program)], env=clean_env(), capture_output=True,
                          timeout=120)
    assert marker.exists(), proc.stderr.decode()[-2000:]


def test_a_job_never_unpickles_a_poisoned_cache_entry(tiny_job, tmp_path):
    """A cache entry is no more trusted with pickles than a run folder: the job fails in one line."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_job.cache, cache)  # a copy: the session's cache stays whole
    entry = cache / "export" / tiny_job.record("export").key
    marker = tmp_path / "unpickled"
    rewrite_archive(entry / "program.pt2", poison_samples(marker))
    reseal(entry)
    assert read_manifest(entry) is not None  # the entry looks whole: a hit
    with pytest.raises(ArtifactError, match="without unpickling"):
        run_job(tmp_path / "out", "target=eager", "tracking.enabled=false", cache=cache)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["data/aotinductor/model/model.so", "data/constants/custom_obj_0",
                                   "data/constants/opaque_obj_0", "data/weights/model.pt", "data/mtia/x"])
def test_archives_with_code_or_pickled_objects_are_refused_before_torch_reads_them(tmp_path, entry):
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    with zipfile.ZipFile(path, "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/{entry}", b"\x80\x04N.")
    with pytest.raises(ArtifactError, match="is refused"):
        programs.load_program(path)


def test_samples_that_hold_more_than_tensors_are_refused(tmp_path):
    from pipeline.shapes import load_samples

    marker = tmp_path / "unpickled"
    (tmp_path / "example_inputs.pt").write_bytes(pickled(marker))
    with pytest.raises(ArtifactError, match="holds more than tensors"):
        load_samples(tmp_path / "example_inputs.pt")
    assert not marker.exists()


# --- modules ----------------------------------------------------------------------------------

def plant(folder: Path, marker: Path) -> str:
    name = f"planted_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    return name


@pytest.mark.parametrize("where", ["in the run folder", "beside it"])
def test_a_planted_module_is_not_imported(run, tmp_path, where):
    """imports.json names a module planted where the current folder puts it on sys.path."""
    marker = tmp_path / "imported"
    cwd = run if where == "in the run folder" else run.parent
    module = plant(cwd, marker)
    edit_json(run / "lower" / "imports.json", lambda names: names.append(module))
    proc = subprocess.run([sys.executable, "-c", "import sys, pipeline; pipeline.load(sys.argv[1])", str(run)],
                          cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert "ArtifactError" in last and f"import module {module!r}" in last, proc.stderr[-2000:]
    assert "did not name it" in last


def test_modules_the_caller_names_are_imported(run, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    module = plant(run, marker)
    monkeypatch.syspath_prepend(str(run))
    monkeypatch.chdir(run)
    edit_json(run / "lower" / "imports.json", lambda names: names.append(module))
    with pytest.raises(ArtifactError, match=module):
        pipeline.load(run)
    assert not marker.exists()
    try:
        pipeline.load(run, imports=[module])  # the user named it: their decision
        assert marker.exists()
    finally:
        sys.modules.pop(module, None)


@pytest.mark.parametrize("name", ["os.__main__", "venv.__main__", "a-b", "antigravity"])
def test_recorded_modules_that_are_programs_or_stdlib_are_refused(run, name):
    edit_json(run / "lower" / "imports.json", lambda names: names.append(name))
    with pytest.raises(ArtifactError, match="asks to import module"):
        pipeline.load(run)
    assert "antigravity" not in sys.modules


# --- paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "package"])
def test_paths_outside_the_run_folder_are_refused(run, tiny_job, how):
    outside = tiny_job.run_dir / "build" / "accel_0.ort.onnx"  # a real engine: it would load
    engines = run / "build" / "engines.json"
    if how == "symlink":
        (run / "build" / "accel_0.ort.onnx").unlink()
        (run / "build" / "accel_0.ort.onnx").symlink_to(outside)
        reseal(run / "build")
    elif how == "package":
        edit_json(engines, lambda e: e.update(package=str(outside)))
    else:
        name = str(outside) if how == "absolute" else os.path.relpath(outside, run / "build")
        edit_json(engines, lambda e: e["segments"][0].update(engine=name))
    with pytest.raises(ArtifactError, match="a path outside"):
        pipeline.load(run)


# --- engines that are code ------------------------------------------------------------------

def test_engines_that_are_code_need_trust_unless_you_built_them(run):
    """A target whose engines are shared libraries: a build your key did not sign is refused."""
    edit_json(run / "build" / "engines.json", lambda e: e.update(target="inductor"))
    with pytest.raises(ArtifactError, match="compiled code") as caught:
        pipeline.load(run)
    assert "trusted=True" in caught.value.one_line()


def test_shared_libraries_load_from_your_own_builds_or_when_trusted(inductor_tiny, tmp_path, monkeypatch):
    shape = list(OmegaConf.load(inductor_tiny.run_dir / "config.yaml").input.tensors[0].shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    own = pipeline.load(inductor_tiny.run_dir)  # its build's manifest carries your provenance record
    copy = tmp_path / "copy"
    shutil.copytree(inductor_tiny.run_dir, copy)  # a copy of your own build: every file hashed, manifest signed
    pipeline.load(copy)
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path / "someone-else"))  # another user's key
    with pytest.raises(ArtifactError, match="compiled code"):
        pipeline.load(copy)
    trusted = pipeline.load(copy, trusted=True)
    with torch.no_grad():
        torch.testing.assert_close(trusted(x), own(x))


@pytest.fixture
def public_tmp():
    """A folder other users can enter (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="pipeline-security-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def publish(cache: StageCache, run_dir: Path, data: bytes = b"engine bytes") -> Path:
    """One build entry with an engine file, linked into `run_dir` as a job does."""
    spec = StageSpec(name="build", version=1, run=lambda ctx: {})
    material = cache.material(spec, {}, None, run_dir, {})

    def execute(staging: Path):
        (staging / "engine.bin").write_bytes(data)
        return {}, []

    cache.obtain(spec, material, run_dir, execute)
    return cache.entry("build", material.key)


# --- the cache is read-only -------------------------------------------------------------------

def as_nobody(*command: str) -> subprocess.CompletedProcess:
    tool = shutil.which("setpriv")
    prefix = [tool, "--reuid=65534", "--regid=65534", "--clear-groups"] if tool else \
        [shutil.which("runuser"), "-u", "nobody", "--"]
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(not (shutil.which("setpriv") or shutil.which("runuser")), reason="needs setpriv or runuser")
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_editing_a_run_folders_engine_cannot_change_the_cache(public_tmp):
    cache = StageCache(public_tmp / "cache")
    entry = publish(cache, public_tmp / "run")
    linked = public_tmp / "run" / "build" / "engine.bin"
    assert os.path.samefile(linked, entry / "engine.bin")
    assert all((p.stat().st_mode & 0o777) == READ_ONLY for p in entry.iterdir())

    edit = as_nobody("/bin/sh", "-c", 'printf tampered >> "$1"', "sh", str(linked))
    assert edit.returncode != 0 and "Permission denied" in edit.stderr
    read = as_nobody("/bin/cat", str(linked))
    assert read.returncode == 0 and read.stdout == "engine bytes"  # readable by all, writable by none
    assert (entry / "engine.bin").read_bytes() == b"engine bytes"
    assert read_manifest(entry) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can write a read-only file in place")
def test_an_entry_edited_anyway_is_rebuilt(public_tmp):
    """Root ignores file modes: an in-place edit is caught by the manifest's hashes, and rebuilt."""
    cache = StageCache(public_tmp / "cache")
    entry = publish(cache, public_tmp / "run")
    with open(public_tmp / "run" / "build" / "engine.bin", "r+b") as f:  # what a careless editor does
        f.write(b"ENGINE")
    assert read_manifest(entry) is None and cache.lookup("build", entry.name) is None
    publish(cache, public_tmp / "run2")
    assert (entry / "engine.bin").read_bytes() == b"engine bytes"
    assert (public_tmp / "run2" / "build" / "engine.bin").read_bytes() == b"engine bytes"


def test_programs_load_in_this_repo_still_work(tiny_job, custom_op_job):
    """The guard changes nothing for honest programs: the zoo's custom op, imported by its rule."""
    for job in (tiny_job, custom_op_job):
        module = pipeline.load(job.run_dir)
        assert isinstance(module, torch.nn.Module)
    assert json.loads((custom_op_job.run_dir / "lower" / "imports.json").read_text()) == ["pipeline.zoo"]
    assert json.loads((tiny_job.run_dir / "export" / "imports.json").read_text()) == []
