"""target=inductor: tiny_cnn compiled whole by AOTInductor, validated, and reloaded in a fresh process."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from testkit import compose, inductor_job_or_skip, reload_in_fresh_process

from pipeline import targets
from pipeline.errors import TargetUnavailable
from pipeline.targets.inductor import InductorTarget

RELOAD = r"""
import sys
import torch

import pipeline
from pipeline.hybrid import EngineModule
from pipeline.targets.inductor_runtime import AotiRunner

module = pipeline.load(sys.argv[1])
engines = [name for name, m in module.named_modules()
           if isinstance(m, EngineModule) and isinstance(m.runner, AotiRunner)]
with torch.no_grad():
    y = module(torch.load(sys.argv[2]))
torch.save({"engines": engines, "y": y[0] if isinstance(y, (tuple, list)) else y}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def inductor_job(tmp_path_factory):
    return inductor_job_or_skip(tmp_path_factory, "inductor")


def test_config_composes_and_registers(tmp_path):
    settings = OmegaConf.to_container(compose(tmp_path, "target=inductor").target)
    assert settings == {"name": "inductor", "device": "auto", "mode": "auto", "mode_reason": "",
                        "memory_format": "contiguous", "artifact": "auto", "freezing": None}
    assert targets.target_class("inductor") is InductorTarget
    assert compose(tmp_path, "target=inductor", "target.mode=max-autotune").target.mode == "max-autotune"


def test_whole_graph_is_one_segment_that_validates(inductor_job):
    assert inductor_job.result.status == "FINISHED"
    totals = inductor_job.json("partition/report.json")["totals"]
    assert totals["accelerated_segments"] == 1 and totals["torch_ops"] == 0
    engines = inductor_job.json("build/engines.json")
    assert engines["target"] == "inductor"
    (segment,) = engines["segments"]
    engine = inductor_job.run_dir / "build" / segment["engine"]
    assert segment["engine"] == "accel_0.pt2" and engine.stat().st_size == segment["bytes"] > 0
    assert segment["build_seconds"] > 0
    # CPU packages are frozen (oneDNN prepacked weights) unless target.freezing says otherwise.
    assert segment["freezing"] is (segment["device"] == "cpu")
    assert (inductor_job.run_dir / "convert" / segment["program"]).is_file()
    report = inductor_job.json("validate/report.json")
    assert report["passed"] and report["accuracy"]["rel_l2_err"] < 1e-4


def test_reload_in_a_fresh_process(inductor_job, tmp_path):
    ref, got = reload_in_fresh_process(inductor_job.run_dir, RELOAD, tmp_path)
    assert got["engines"] == ["accel_0"]
    torch.testing.assert_close(got["y"], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_freezing_off_builds_an_unfrozen_package_that_validates(tmp_path_factory):
    """target.freezing=false overrides the CPU default: an unfrozen package, as accurate."""
    job = inductor_job_or_skip(tmp_path_factory, "unfrozen", "target.freezing=false", "target.device=cpu")
    (segment,) = job.json("build/engines.json")["segments"]
    assert segment["freezing"] is False and job.json("validate/report.json")["passed"]


def test_freezing_is_refused_for_a_compile_cache(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.targets.inductor import choose_artifact

    settings = {**OmegaConf.to_container(compose(tmp_path, "target=inductor").target), "device": "cpu"}
    assert choose_artifact({**settings, "freezing": True}) == "aoti"
    with pytest.raises(ConfigError, match="target.freezing is an AOTInductor setting"):
        choose_artifact({**settings, "artifact": "compile_cache", "freezing": True})


def test_without_a_compiler_the_target_says_what_to_install(tmp_path):
    from torch._inductor import config

    with config.patch({"cpp.cxx": (str(tmp_path / "no-such-compiler"),)}):
        with pytest.raises(TargetUnavailable, match="needs a C.. compiler.*apt-get install g"):
            targets.make("inductor", {"name": "inductor"})


def test_cached_coordinate_descent_result_is_kept_by_loaded_kernels(tmp_path, monkeypatch):
    """pytorch/pytorch#172819: a kernel loaded from the cache must not re-tune what the build tuned."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from torch._inductor.runtime import triton_heuristics as th
    from torch._inductor.runtime.autotune_cache import AutotuneCache

    from pipeline.targets.inductor_runtime import recheck_autotune_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    meta = {"autotune_local_cache": True, "coordinate_descent_tuning": True}
    kernel = tmp_path / "ab" / "kernel.py"
    kernel.parent.mkdir()
    compiled = th.Config({"XBLOCK": 64}, num_warps=4, num_stages=1)
    cache = AutotuneCache.create(meta, str(kernel), th.hash_configs([compiled]))
    cache.save(th.Config({"XBLOCK": 64}, num_warps=4, num_stages=1), 0, found_by_coordesc=True)

    loaded = SimpleNamespace(compile_results=[SimpleNamespace(config=compiled)], filename=str(kernel),
                             inductor_meta=meta)
    recheck_autotune_cache(loaded, reload_kernel_from_src=None)
    assert loaded.autotune_cache_info["autotune_cache_state"] == "hit"
    assert loaded.compile_results[0].config.found_by_coordesc is True  # run() will not tune it again
