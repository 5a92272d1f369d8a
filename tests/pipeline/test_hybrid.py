"""pipeline.load: a run folder back into a callable module, in a fresh process; corrupt runs refuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from testkit import REPO, clean_env, run_job

import pipeline
from pipeline.errors import ArtifactError
from pipeline.files import read_manifest
from pipeline.hybrid import EngineModule
from pipeline.models import build_model
from pipeline.targets.onnxruntime_session import OrtSession

# Runs in a fresh interpreter: nothing of the test process (modules, registered custom ops).
RELOAD = r"""
import sys
import torch

assert "pipeline.zoo" not in sys.modules
import pipeline
from pipeline.hybrid import EngineModule

data = torch.load(sys.argv[1])
out = {}
for name in data["order"]:
    item = data[name]
    zoo_before = "pipeline.zoo" in sys.modules
    module = pipeline.load(item["run_dir"])
    engines = {n: s.runner.path for n, s in module.named_modules() if isinstance(s, EngineModule)}
    with torch.no_grad():
        y = module(item["x"])
    if isinstance(y, (tuple, list)):
        y = y[0]
    out[name] = {"y": y, "engines": engines, "zoo_before": zoo_before,
                 "zoo_after": "pipeline.zoo" in sys.modules}
torch.save(out, sys.argv[2])
"""


def reference(run_dir, seed: int):
    """A seeded input and the eager model's output, built from the run's own config.yaml."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    x = torch.randn(list(cfg.input.tensors[0].shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, build_model(cfg.model)(x)


@pytest.fixture(scope="module")
def reloaded(tiny_job, custom_op_job, resnet18_hybrid, tmp_path_factory):
    """Load three runs in one fresh process (custom op first, before anything imports it)."""
    tmp = tmp_path_factory.mktemp("reload")
    jobs = {"custom_op": custom_op_job, "resnet18_hybrid": resnet18_hybrid, "tiny": tiny_job}
    data, refs = {"order": list(jobs)}, {}
    for i, (name, job) in enumerate(jobs.items()):
        x, ref = reference(job.run_dir, seed=100 + i)
        data[name] = {"run_dir": str(job.run_dir), "x": x}
        refs[name] = ref
    torch.save(data, tmp / "in.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp / "in.pt"), str(tmp / "out.pt")],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jobs, refs, torch.load(tmp / "out.pt")


def assert_matches(got: torch.Tensor, ref: torch.Tensor):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    rel = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert rel <= 1e-4, rel
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_reload_resnet18_hybrid_in_a_fresh_process(reloaded):
    jobs, refs, out = reloaded
    job, got = jobs["resnet18_hybrid"], out["resnet18_hybrid"]
    n_accel = job.result.metrics["num_accelerated_segments"]
    assert n_accel >= 2
    assert sorted(got["engines"]) == sorted(f"accel_{i}" for i in range(int(n_accel)))
    for path in got["engines"].values():  # sessions over the run's own engine files
        assert os.path.dirname(path) == str(job.run_dir / "build") and path.endswith(".ort.onnx")
    assert_matches(got["y"], refs["resnet18_hybrid"])


def test_reload_imports_the_custom_op_module(reloaded):
    _, refs, out = reloaded
    got = out["custom_op"]
    assert got["zoo_before"] is False and got["zoo_after"] is True  # from export/imports.json
    assert sorted(got["engines"]) == ["accel_0", "accel_1"]
    assert_matches(got["y"], refs["custom_op"])


def test_reload_tiny(reloaded):
    _, refs, out = reloaded
    assert list(out["tiny"]["engines"]) == ["accel_0"]
    assert_matches(out["tiny"]["y"], refs["tiny"])


def test_load_an_eager_run(resnet18_eager):
    module = pipeline.load(resnet18_eager.run_dir)
    assert not any(isinstance(m, EngineModule) for m in module.modules())
    x, ref = reference(resnet18_eager.run_dir, seed=3)
    with torch.no_grad():
        y = module(x)
    assert_matches(y[0] if isinstance(y, (tuple, list)) else y, ref)


def test_load_in_process(tiny_job):
    module = pipeline.load(tiny_job.run_dir)
    assert isinstance(module.get_submodule("accel_0").runner, OrtSession)
    x, ref = reference(tiny_job.run_dir, seed=7)
    with torch.no_grad():
        y = module(x)
    assert_matches(y[0] if isinstance(y, (tuple, list)) else y, ref)


# --- 6b. corrupt or missing runs ----------------------------------------------------------

@pytest.fixture
def linked_run(tiny_job, tmp_path):
    """A run folder that, like a real one, hard-links the cache's files."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_job.run_dir, dst, copy_function=os.link)
    assert os.path.samefile(dst / "build" / "accel_0.ort.onnx", tiny_job.run_dir / "build" / "accel_0.ort.onnx")
    return dst


@pytest.mark.parametrize("garbage", ["short", "same_size"])
def test_load_refuses_a_corrupt_engine(tiny_job, linked_run, garbage):
    pipeline.load(linked_run)  # whole before the damage
    engine = linked_run / "build" / "accel_0.ort.onnx"
    size = engine.stat().st_size
    engine.unlink()  # a new file: the cache's copy behind the hard link stays intact
    engine.write_bytes(b"garbage" if garbage == "short" else b"\x07" * size)
    with pytest.raises(ArtifactError, match="build output"):
        pipeline.load(linked_run)
    key = tiny_job.record("build").key
    assert read_manifest(tiny_job.cache / "build" / key) is not None


def test_load_refuses_a_missing_stage(linked_run):
    shutil.rmtree(linked_run / "partition")
    with pytest.raises(ArtifactError, match="partition"):
        pipeline.load(linked_run)


def test_load_refuses_a_missing_engine_list(linked_run):
    (linked_run / "build" / "engines.json").unlink()
    with pytest.raises(ArtifactError):
        pipeline.load(linked_run)


def test_load_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ArtifactError, match="is not a run folder"):
        pipeline.load(tmp_path / "does-not-exist")
    with pytest.raises(ArtifactError):
        pipeline.load(tmp_path)  # exists, but holds no stage outputs


def test_recorded_config_rebuilds_the_same_model(tiny_job):
    """The reference above is honest: config.yaml rebuilds the weights export hashed."""
    from pipeline.models import weights_digest

    cfg = OmegaConf.load(tiny_job.run_dir / "config.yaml")
    model_json = json.loads((tiny_job.run_dir / "export" / "model.json").read_text())
    assert weights_digest(build_model(cfg.model)) == model_json["weights_sha256"]


# --- 7a. a model that returns a pytree type (transformers' ModelOutput) ------------------------

RAW_BERT = ("model=bert_tiny", "model._target_=testkit.raw_bert", "input=text_dynamic", "input.tensors.0.high=1000",
            "tracking.enabled=false")

RELOAD_BERT = r"""
import sys
import torch

import pipeline

assert "transformers" not in sys.modules
data = torch.load(sys.argv[1])
out = {}
for name, run_dir in data["runs"].items():
    module = pipeline.load(run_dir)  # imports transformers.modeling_outputs, recorded by export
    with torch.no_grad():
        y = module(**data["inputs"])
    out[name] = {"type": f"{type(y).__module__}.{type(y).__name__}",
                 "last_hidden_state": y.last_hidden_state, "pooler_output": y.pooler_output}
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def raw_bert_runs(tmp_path_factory):
    """transformers' BertModel as-is, built twice: the second job takes export from the cache."""
    root = tmp_path_factory.mktemp("raw-bert")
    first = run_job(root / "first", *RAW_BERT, "target=eager", cache=root / "cache")
    # Another target lowers anew: its stage worker, a fresh process, deserialises the cached export.
    second = run_job(root / "second", *RAW_BERT, "target=onnxruntime", "compile.min_block_size=100000",
                     cache=root / "cache")
    return first, second


def test_a_raw_transformers_model_works_from_a_cached_export_and_in_a_fresh_process(raw_bert_runs, tmp_path):
    first, second = raw_bert_runs
    assert first.result.status == second.result.status == "FINISHED", second.result.error
    assert second.record("export").hit and not second.record("lower").hit
    assert second.json("export/imports.json") == second.json("lower/imports.json") == ["transformers.modeling_outputs"]
    cfg = OmegaConf.load(first.run_dir / "config.yaml")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(11))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = build_model(cfg.model)(**inputs)
    torch.save({"runs": {"first": str(first.run_dir), "second": str(second.run_dir)}, "inputs": inputs},
               tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD_BERT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for name in ("first", "second"):
        assert out[name]["type"] == f"{type(ref).__module__}.{type(ref).__name__}"
        assert_matches(out[name]["last_hidden_state"], ref.last_hidden_state)
        assert_matches(out[name]["pooler_output"], ref.pooler_output)
