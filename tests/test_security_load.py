"""Loading a run folder executes nothing and reads nothing outside it (issue 28, docs/security.md).

Every attack carries a payload that leaves a marker when it works: Python in a shape
expression, a shared library whose constructor writes a file, a FIFO whose opening a
watcher thread sees, a module that writes a file when imported. Loads that could hang
run in a subprocess with a timeout, so a hang fails the test instead of the suite.
Tampered copies re-seal their manifests as an attacker would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from testkit import REPO, clean_env, edit_json, reseal, rewrite_archive

import pipeline
from pipeline import programs, provenance, symbolic
from pipeline.errors import ArtifactError
from pipeline.files import check_manifest, describe_files, write_json
from pipeline.layout import MANIFEST

LOAD = "import sys, pipeline; pipeline.load(sys.argv[1], trusted=len(sys.argv) > 2)"


@pytest.fixture
def run(tiny_job, tmp_path):
    """A copy of a real ONNX Runtime run folder that hard-links the cache's files, as run folders do."""
    dst = tmp_path / "outputs" / "run"
    shutil.copytree(tiny_job.run_dir, dst, copy_function=os.link)
    return dst


def load_elsewhere(run_dir: Path, cwd: Path, *args: str, timeout: float = 120, **env: str):
    """pipeline.load in a fresh process; a load that hangs fails the test."""
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run([sys.executable, "-c", LOAD, str(run_dir), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=clean_env(**env))
    except subprocess.TimeoutExpired:
        pytest.fail(f"pipeline.load({run_dir}) did not return within {timeout} s")


def refusal(proc) -> str:
    """The one line a refused load prints last (no traceback of ours: PipelineError's line)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.errors.ArtifactError"), proc.stderr[-3000:]
    return last


@contextlib.contextmanager
def fifo_watch(path: Path, marker: Path):
    """A FIFO at `path`; the marker is written the moment anything opens it for reading."""
    os.mkfifo(path)
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
            except OSError:
                time.sleep(0.01)
                continue
            marker.write_text("opened")
            os.close(fd)  # the reader sees end of file
            return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join(5)


# --- 1. shape expressions are parsed, never evaluated ----------------------------------------

PAYLOADS = {"loud": "open({marker!r}, 'w')",  # sympy returns a file object: torch fails afterwards
            "silent": "(open({marker!r}, 'w').close() or {size})"}  # evaluates to the real size: loads


def with_expression(template: str, marker: Path):
    """The program's first tensor size written as an expression string, as torch writes dynamic sizes."""

    def change(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        model = json.loads(data)
        meta = next(iter(model["graph_module"]["graph"]["tensor_values"].values()))
        size = meta["sizes"][0]["as_int"]
        meta["sizes"][0] = {"as_expr": {"expr_str": template.format(marker=str(marker), size=size),
                                        "hint": {"as_int": size}}}
        return json.dumps(model).encode()
    return change


@pytest.mark.parametrize("variant", sorted(PAYLOADS))
def test_a_shape_expression_never_runs(run, tmp_path, variant):
    marker = tmp_path / "evaluated"
    program = run / "lower" / "program.pt2"
    rewrite_archive(program, with_expression(PAYLOADS[variant], marker))
    reseal(run / "lower")

    with pytest.raises(ArtifactError, match="shape expression") as caught:
        pipeline.load(run)
    assert not marker.exists()
    line = caught.value.one_line()
    assert "\n" not in line and str(program) in line and "open(" in line and "models/model.json" in line

    # The payload is live: plain torch.export.load, in another process, runs it.
    proc = subprocess.run([sys.executable, "-c", "import sys, torch\ntry:\n torch.export.load(sys.argv[1])\n"
                           "except Exception:\n pass", str(program)], env=clean_env(), capture_output=True,
                          timeout=120)
    assert marker.exists(), proc.stderr.decode()[-2000:]


def test_the_shapes_torch_writes_pass_the_grammar(tmp_path):
    """Dynamic sizes through reshape, cat, slicing, a square and floor division: every one loads."""

    class Shapes(torch.nn.Module):
        def forward(self, x, y):
            b, n = x.shape
            z = torch.cat([x, y], 1)
            return x.reshape(b * n // 2, 2).sum() + z[:, : n // 3].sum(), z.view(-1), x.new_zeros(n * n)

    dims = {0: torch.export.Dim("b", min=2, max=64), 1: 2 * torch.export.Dim("n", min=4, max=512)}
    program = torch.export.export(Shapes(), (torch.randn(4, 8), torch.randn(4, 3)),
                                  dynamic_shapes=(dims, {0: dims[0], 1: torch.export.Dim("m", max=9)}))
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    with zipfile.ZipFile(path) as archive:
        model = json.loads(archive.read("program/models/model.json"))
    assert "Pow(" in json.dumps(model) and "FloorDiv(" in json.dumps(model)  # as srepr writes them
    assert list(symbolic.refused_expressions(model)) == []
    loaded = programs.load_program(path)
    assert len(loaded.range_constraints) == len(program.range_constraints)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "Symbol('s0').__class__", "Integer('1')", "Symbol('os', integer=True)",
    "lambda: 1", "s0 if s1 else 2", "Add(s0, Integer(1), evaluate=False)", "s0**2", "Pow(s0, Integer(10**9))",
    "Pow(Integer(2), Integer(100000))", "x0", "Min", "Function('f')(s0)", "s0 + 1.5", "[s0]", "s0; s1", "s" * 30000,
])
def test_anything_else_is_refused(text):
    assert not symbolic.is_shape_expression(text)


def test_range_constraints_must_name_expressions_and_integer_bounds():
    assert list(symbolic.refused_expressions({"range_constraints": {"2*s69": {"min_val": 2, "max_val": None}}})) == []
    bad = {"range_constraints": {"__import__('os')": {"min_val": 2}, "s1": {"min_val": "2+2", "max_val": 4}}}
    assert len(list(symbolic.refused_expressions(bad))) == 2


# --- 2. trust comes from provenance, not from ownership ----------------------------------------

PAYLOAD_C = '#include <stdio.h>\n__attribute__((constructor)) static void payload(void) ' \
            '{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'


def payload_library(tmp_path: Path, marker: Path) -> bytes:
    """A shared library whose constructor writes the marker the moment it is loaded."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the payload library")
    source, library = tmp_path / "payload.c", tmp_path / "payload.so"
    source.write_text(PAYLOAD_C.format(marker=marker))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    return library.read_bytes()


def attackers_tree(job, root: Path, library: bytes) -> Path:
    """On the attacker's machine: a run folder and a marked cache beside it, the build folder hard links
    into the cache as jobs make them, the package's library swapped, manifests resealed and signed with
    the attacker's own key, config.yaml pointing at the cache beside the run."""
    shutil.copytree(job.run_dir, root / "run")
    shutil.copytree(job.cache, root / "cache")
    entry = root / "cache" / "build" / json.loads((job.run_dir / "build" / MANIFEST).read_text())["key"]
    for package in entry.glob("*.pt2"):
        rewrite_archive(package, lambda name, data: library if name.endswith(".so") else data)
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["files"] = describe_files(entry)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(provenance.ENV, str(root / "attackers-key"))
        provenance.sign(manifest)
    write_json(entry / MANIFEST, manifest)
    shutil.rmtree(root / "run" / "build")
    shutil.copytree(entry, root / "run" / "build", copy_function=os.link)
    config = OmegaConf.load(root / "run" / "config.yaml")
    config.paths.cache = "cache"  # relative: the folder the victim extracts into and loads from
    OmegaConf.save(config, root / "run" / "config.yaml")
    return root


def test_a_run_shipped_with_its_own_cache_is_not_yours(inductor_tiny, tmp_path):
    marker = tmp_path / "constructor-ran"
    attacker = attackers_tree(inductor_tiny, tmp_path / "attacker", payload_library(tmp_path, marker))
    archive, victim = tmp_path / "run.tar", tmp_path / "victim"
    victim.mkdir()
    subprocess.run(["tar", "-cf", str(archive), "-C", str(attacker), "run", "cache"], check=True, timeout=60)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(victim)], check=True, timeout=60)
    build = victim / "run" / "build"
    package = next(build.glob("*.pt2"))
    assert package.stat().st_nlink == 2 and package.stat().st_uid == os.geteuid()  # hard links kept, yours

    last = refusal(load_elsewhere(victim / "run", victim))
    assert "compiled code" in last and "provenance" in last and not marker.exists()
    load_elsewhere(victim / "run", victim, "trusted")  # the payload is live: trusting the folder runs it
    assert marker.exists()


def test_your_own_runs_load_without_trust_in_place_and_from_mlflow(inductor_tiny, monkeypatch):
    x = torch.randn(list(OmegaConf.load(inductor_tiny.run_dir / "config.yaml").input.tensors[0].shape))
    with torch.no_grad():
        expected = pipeline.load(inductor_tiny.run_dir)(x)
        monkeypatch.chdir(inductor_tiny.outputs)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{inductor_tiny.outputs / 'mlflow.db'}")
        downloaded = pipeline.load(f"runs:/{inductor_tiny.result.tracking['run_id']}")(x)
    torch.testing.assert_close(downloaded, expected)


def test_provenance_records_verify_only_under_your_key(tmp_path, monkeypatch):
    monkeypatch.setenv(provenance.ENV, str(tmp_path / "me"))
    manifest = {"stage": "build", "key": "0" * 24, "files": [{"path": "a.so", "bytes": 3, "sha256": "ab"}]}
    provenance.sign(manifest)
    assert provenance.verify(json.loads(json.dumps(manifest)))  # as written and read back
    key = provenance.key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert not provenance.verify({**manifest, "files": [{**manifest["files"][0], "sha256": "cd"}]})
    monkeypatch.setenv(provenance.ENV, str(tmp_path / "someone-else"))
    provenance.make_key()
    assert not provenance.verify(manifest)
    monkeypatch.setenv(provenance.ENV, str(tmp_path / "me"))
    key.chmod(0o644)  # a key others can read is no secret: not used
    assert not provenance.verify(manifest)


# --- 3. every path the engines read is confined ------------------------------------------------

def external_data(engine: Path, location: str) -> None:
    """The engine's first initializer moved to external data at `location`, as an attacker writes it."""
    import onnx

    model = onnx.load(str(engine))
    tensor = model.graph.initializer[0]
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    engine.unlink()  # a new file: the cache's inode is never written
    engine.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_onnx_external_data_outside_the_folder_is_never_opened(run, tmp_path, how):
    marker, outside = tmp_path / "opened", tmp_path / "outside.bin"
    build = run / "build"
    engine = next(build.glob("*.onnx"))
    location = {"absolute": str(outside), "dotdot": os.path.relpath(outside, build), "symlink": "weights.bin"}[how]
    if how == "symlink":
        (build / "weights.bin").symlink_to(outside)
    external_data(engine, location)
    reseal(build)
    with fifo_watch(outside, marker):
        last = refusal(load_elsewhere(run, tmp_path / "cwd"))
    assert repr(location) in last and "initializer" in last
    assert not marker.exists(), "ONNX Runtime opened a file outside the run folder"


def list_as_empty(stage_dir: Path, name: str) -> None:
    """The manifest lists `name` as an empty file, as an attacker who put a device or FIFO there writes it."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry.update(bytes=0, sha256=hashlib.sha256(b"").hexdigest())
    write_json(stage_dir / MANIFEST, manifest)


@pytest.mark.parametrize("kind", ["dev-zero-link", "dev-zero-node", "fifo"])
def test_devices_and_fifos_in_build_fail_at_once(run, tmp_path, kind):
    marker = tmp_path / "opened"
    build = run / "build"
    engine = next(build.glob("*.onnx"))
    engine.unlink()
    watch = contextlib.nullcontext()
    if kind == "dev-zero-link":
        engine.symlink_to("/dev/zero")
    elif kind == "dev-zero-node":
        try:
            os.mknod(engine, 0o444 | stat.S_IFCHR, os.makedev(1, 5))
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    else:
        watch = fifo_watch(engine, marker)
    list_as_empty(build, engine.name)
    with watch:
        last = refusal(load_elsewhere(run, tmp_path / "cwd"))
    assert engine.name in last and not marker.exists()
    assert "outside the folder" in last if kind == "dev-zero-link" else "not a regular file" in last


def test_manifests_name_only_files_of_their_folder(run):
    manifest = json.loads((run / "partition" / MANIFEST).read_text())
    manifest["files"].append({"path": "../../../../etc/hostname", "bytes": 1, "sha256": "0"})
    write_json(run / "partition" / MANIFEST, manifest)
    assert "outside the folder" in check_manifest(run / "partition")[1]
    with pytest.raises(ArtifactError, match="outside the folder"):
        pipeline.load(run)


# --- 4. imports.json imports only what the caller names or the project registered --------------

def plant(folder: Path, marker: Path, name: str = "elsewhere_on_path") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    return name


def test_a_module_found_elsewhere_on_pythonpath_is_not_imported(run, tmp_path):
    marker = tmp_path / "imported"
    site = tmp_path / "site"
    module = plant(site, marker)
    edit_json(run / "lower" / "imports.json", lambda names: names.append(module))
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    last = refusal(load_elsewhere(run, tmp_path / "cwd", PYTHONPATH=path))
    assert f"import module {module!r}" in last and "did not name it" in last and not marker.exists()


def test_a_registered_module_planted_in_the_current_folder_is_not_imported(run, tmp_path):
    marker, cwd = tmp_path / "imported", tmp_path / "cwd"
    plant(cwd / "transformers", marker, "__init__")
    (cwd / "transformers" / "modeling_outputs.py").write_text("")
    edit_json(run / "lower" / "imports.json", lambda names: names.append("transformers.modeling_outputs"))
    last = refusal(load_elsewhere(run, cwd))
    assert "'transformers.modeling_outputs'" in last and "current folder" in last and not marker.exists()
