"""Session fixtures: the expensive real jobs, run once and shared.

Every job writes under pytest's tmp folders (paths.outputs), including its MLflow SQLite
store and artifacts (tracking.store / tracking.artifacts follow paths.outputs). Jobs of
one model share a content-addressed cache (paths.cache) so later jobs get export/lower
hits; the first job of each cache runs on an empty one.
"""

from __future__ import annotations

import shutil

import pytest
from testkit import ENV_VARS, ORT_1_THREAD, RESNET18, inductor_job_or_skip, run_job
from tiers import tiers_of


def pytest_collection_modifyitems(config, items):
    """Each test's tier markers, from the one table in tests/tiers.py (`make test-fast` deselects them)."""
    for item in items:
        for tier in sorted(tiers_of(item.path, getattr(item, "originalname", item.name))):
            item.add_marker(tier)


@pytest.fixture(scope="session", autouse=True)
def _session_env():
    """No MLflow / Hydra / debug variables from the caller's shell leak into session fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_VARS:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _provenance_key(tmp_path_factory):
    """Jobs sign their builds with a key of this test session, never the user's (pipeline.provenance)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(autouse=True)
def _test_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# --- tiny_cnn -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """tiny_cnn on ONNX Runtime, the first job on a fresh cache (every stage is built)."""
    root = tmp_path_factory.mktemp("tiny")
    job = run_job(root / "out", "target=onnxruntime", cache=root / "cache")
    shutil.copytree(job.cache, root / "cache-as-built")  # before other tests' jobs add to the cache
    return job


@pytest.fixture(scope="session")
def tiny_cache_as_built(tiny_job):
    """A copy of tiny_job's cache as its one job left it: one entry per cached stage."""
    return tiny_job.cache.parent / "cache-as-built"


@pytest.fixture(scope="session")
def custom_op_job(tiny_job, tmp_path_factory):
    """custom_op_net: its custom op pipeline_zoo.soft_clip must stay in PyTorch."""
    return run_job(tmp_path_factory.mktemp("custom_op"), "model=custom_op_net", "target=onnxruntime",
                   cache=tiny_job.cache)


@pytest.fixture(scope="session")
def inductor_tiny(tmp_path_factory):
    """tiny_cnn on target=inductor: an AOTInductor package (compiled code) built on this CPU, tracked in MLflow."""
    return inductor_job_or_skip(tmp_path_factory, "inductor-tiny", tracked=True)


# --- resnet18: every job shares one cache -------------------------------------------------

@pytest.fixture(scope="session")
def resnet18_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resnet18-cache")


@pytest.fixture(scope="session")
def resnet18_hybrid(resnet18_cache, tmp_path_factory):
    """Every residual add kept in PyTorch: several engines with PyTorch ops between them."""
    return run_job(tmp_path_factory.mktemp("r18-hybrid"), *RESNET18, *ORT_1_THREAD,
                   "compile.torch_executed_ops=[aten.add.Tensor]", cache=resnet18_cache)


@pytest.fixture(scope="session")
def resnet18_no_blocks(resnet18_cache, resnet18_hybrid, tmp_path_factory):
    """min_block_size larger than any block: nothing is accelerated."""
    return run_job(tmp_path_factory.mktemp("r18-no-blocks"), *RESNET18, *ORT_1_THREAD,
                   "compile.min_block_size=100000",
                   "tracking.enabled=false", cache=resnet18_cache)


@pytest.fixture(scope="session")
def resnet18_eager(resnet18_cache, resnet18_hybrid, tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("r18-eager"), *RESNET18, "target=eager",
                   "tracking.enabled=false", cache=resnet18_cache)
