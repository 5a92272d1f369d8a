"""target=torch_tensorrt: the settings translation everywhere, the real compile where it can run.

Torch-TensorRT needs a CUDA GPU and NVIDIA's TensorRT wheels. The translation of our
config into its settings, and the refusals, are pure and tested on every machine; the
end-to-end run is skipped (with the reason) where the target cannot run.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from testkit import compose, run_cli, run_job

from pipeline import targets
from pipeline.errors import ConfigError, TargetUnavailable
from pipeline.targets.torch_tensorrt import TorchTensorRTTarget, parse_version, translate

UNAVAILABLE = TorchTensorRTTarget.unavailable_reason()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return compose(tmp_path_factory.mktemp("conf"), "target=torch_tensorrt")


def plain(cfg, **target_changes):
    target = {**OmegaConf.to_container(cfg.target), **target_changes}
    return OmegaConf.to_container(cfg.compile, enum_to_str=True), target  # as the runner resolves it


def test_config_composes_with_every_documented_setting(cfg):
    t = cfg.target
    assert t.name == "torch_tensorrt" and targets.target_class("torch_tensorrt") is TorchTensorRTTarget
    for key in ("use_explicit_typing", "enable_autocast", "autocast_low_precision_type", "autocast_excluded_nodes",
                "autocast_excluded_ops", "immutable_weights", "engine_cache_dir", "timing_cache_path"):
        assert key in t
    for key in ("min_block_size", "torch_executed_ops", "require_full_compilation", "truncate_long_and_double",
                "optimization_level", "workspace_size"):
        assert key in cfg.compile


def test_translation_for_strongly_typed_releases(cfg):
    compile_cfg, target_cfg = plain(cfg)
    compile_cfg.update(min_block_size=3, torch_executed_ops=["aten.relu.default"], truncate_long_and_double=True,
                       workspace_size=1 << 30, optimization_level=5)
    out = translate(compile_cfg, target_cfg, (2, 14))
    assert out["min_block_size"] == 3 and out["torch_executed_ops"] == ["aten.relu.default"]
    assert out["truncate_double"] is True and "truncate_long_and_double" not in out
    assert out["workspace_size"] == 1 << 30 and out["optimization_level"] == 5
    assert out["immutable_weights"] is True and out["pass_through_build_failures"] is True
    assert "enabled_precisions" not in out and "use_explicit_typing" not in out
    assert "timing_cache_path" not in out and "cache_built_engines" not in out


def test_translation_for_older_releases_names_precisions(cfg):
    compile_cfg, target_cfg = plain(cfg)
    compile_cfg["precision"] = "fp16"
    out = translate(compile_cfg, target_cfg, (2, 12))
    assert out["use_explicit_typing"] is True
    assert out["enabled_precisions"] == ["float16", "float32"]
    out = translate(compile_cfg, {**target_cfg, "enabled_precisions": ["float32"], "use_explicit_typing": False},
                    (2, 11))
    assert out["enabled_precisions"] == ["float32"] and out["use_explicit_typing"] is False


@pytest.mark.parametrize("version", [(2, 13), (2, 14)])
def test_settings_the_version_ignores_are_rejected(cfg, version):
    compile_cfg, target_cfg = plain(cfg, enabled_precisions=["float16"])
    with pytest.raises(ConfigError) as err:
        translate(compile_cfg, target_cfg, version)
    line = err.value.one_line()
    assert "enabled_precisions" in line and "strongly typed" in line
    assert "compile.precision=fp16" in line and "target.enable_autocast=true" in line
    with pytest.raises(ConfigError, match="use_explicit_typing"):
        translate(*plain(cfg, use_explicit_typing=False), version)


def test_autocast(cfg):
    compile_cfg, target_cfg = plain(cfg, enable_autocast=True, autocast_low_precision_type="float16",
                                    autocast_excluded_ops=["aten.softmax.int"], autocast_excluded_nodes=["^head"])
    out = translate(compile_cfg, target_cfg, (2, 14))
    assert out["enable_autocast"] and out["autocast_low_precision_type"] == "float16"
    assert out["autocast_excluded_ops"] == ["aten.softmax.int"] and out["autocast_excluded_nodes"] == ["^head"]
    with pytest.raises(ConfigError, match="autocast_low_precision_type"):
        translate(*plain(cfg, enable_autocast=True), (2, 14))
    with pytest.raises(ConfigError, match="enable_autocast is false"):
        translate(*plain(cfg, autocast_low_precision_type="float16"), (2, 14))
    compile_cfg["precision"] = "fp16"
    with pytest.raises(ConfigError, match="lowers an fp32 model"):
        translate(compile_cfg, target_cfg, (2, 14))


def test_caches_and_library_specific_settings(cfg, tmp_path):
    compile_cfg, target_cfg = plain(cfg, engine_cache_dir=str(tmp_path), timing_cache_path=str(tmp_path / "t.bin"))
    out = translate(compile_cfg, target_cfg, (2, 14))
    assert out["cache_built_engines"] and out["reuse_cached_engines"] and out["engine_cache_dir"] == str(tmp_path)
    assert out["timing_cache_path"] == str(tmp_path / "t.bin")
    with pytest.raises(ConfigError, match="TensorRT-RTX"):
        translate(compile_cfg, target_cfg, (2, 14), rtx=True)
    with pytest.raises(ConfigError, match="older than"):
        translate(*plain(cfg), (2, 9))
    assert parse_version("2.14.0+cu130") == (2, 14) and parse_version("2.13.0.dev20260101") == (2, 13)


@pytest.mark.skipif(UNAVAILABLE is None, reason="torch_tensorrt can run here")
def test_unavailable_target_fails_in_one_line_with_the_install_command(tmp_path):
    with pytest.raises(TargetUnavailable) as err:
        targets.make("torch_tensorrt", {})
    assert "\n" not in err.value.one_line() and "torch_tensorrt" in err.value.one_line()
    proc = run_cli(tmp_path, "target=torch_tensorrt")
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output
    assert "pip install" in lines[0] or "CUDA" in lines[0]


def test_auto_never_picks_it_where_it_cannot_run(cfg):
    name, _, why = targets.resolve({"name": "auto", "prefer": ["torch_tensorrt", "onnxruntime"]})
    if UNAVAILABLE is None:
        assert name == "torch_tensorrt"
    else:
        assert name == "onnxruntime" and f"not torch_tensorrt: {UNAVAILABLE}" in why


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"target torch_tensorrt cannot run here: {UNAVAILABLE}")
def test_real_compile_runs_and_reloads(tmp_path):
    import torch

    from pipeline import hybrid

    job = run_job(tmp_path, "target=torch_tensorrt", "compile.min_block_size=1")
    assert job.result.status == "FINISHED" and job.result.tags["precision.achieved"] == "fp32"
    report = job.json("partition/report.json")
    assert report["totals"]["accelerated_segments"] >= 1
    engines = job.json("build/engines.json")
    assert engines["package"] == "program.ep" and (job.run_dir / "build" / "program.ep").is_file()
    for seg in engines["segments"]:
        assert (job.run_dir / "build" / seg["engine"]).stat().st_size > 0
    example = torch.load(job.run_dir / "export" / "example_inputs.pt")
    reloaded = hybrid.load(job.run_dir)
    with torch.no_grad():
        got = reloaded(*[a.cuda() for a in example])
    assert torch.isfinite(got[0] if isinstance(got, (tuple, list)) else got).all()


# --- what changes its cache keys (pure: no torch_tensorrt needed) -------------------------

def configured(cfg, compile_changes=None, **target_changes) -> TorchTensorRTTarget:
    compile_cfg, target_cfg = plain(cfg, **target_changes)
    compile_cfg.update(compile_changes or {})
    target = TorchTensorRTTarget(target_cfg)
    target.configure(compile_cfg, release=((2, 14), False))
    return target


def partition_key(cfg, target, tmp_path) -> str:
    import stages
    from pipeline.cache import StageCache

    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    spec = stages.BY_NAME["partition"]
    return StageCache(tmp_path).material(spec, config, target, tmp_path, {"lower": "lowered"}).key


def test_its_partitioner_settings_are_in_the_partition_key(cfg, tmp_path):
    base = configured(cfg)
    key = partition_key(cfg, base, tmp_path)
    # Its partitioner reads use_fast_partitioner (and the settings its converters' validators read).
    slow = configured(cfg, use_fast_partitioner=False)
    assert partition_key(cfg, slow, tmp_path) != key
    # Builder-only settings change engines, not the split.
    tuned = configured(cfg, {"optimization_level": 5}, immutable_weights=False)
    assert partition_key(cfg, tuned, tmp_path) == key
    from pipeline.targets import BUILDING

    assert tuned.key_material(BUILDING) != base.key_material(BUILDING)


def test_autocast_asks_the_engines_for_the_low_precision(cfg):
    from stages.validate import achieved_precision

    target = configured(cfg, enable_autocast=True, autocast_low_precision_type="float16")
    assert target.precision_asked("fp32") == "fp16"
    assert configured(cfg).precision_asked("fp32") == "fp32"
    fp32_engines = {"segments": [{"name": "accel_0", "precision": ["float32"]}]}
    achieved, failures = achieved_precision(fp32_engines, target.precision_asked("fp32"))
    assert achieved == "fp32" and "asked for fp16" in failures[0]


def test_a_min_block_size_sweep_with_equal_splits_shares_convert_and_build(tmp_path):
    """Partition-only settings key partition, never convert or build: equal recipes share the engines.

    The keys are computed as the runner computes them (StageCache.material over the composed
    config and the configured target), with one partition recipe for every min_block_size.
    """
    import stages
    from pipeline import layout
    from pipeline.cache import StageCache
    from pipeline.files import write_json

    run_dir = tmp_path / "run"
    (run_dir / "partition").mkdir(parents=True)
    write_json(run_dir / "partition" / layout.MANIFEST,
               {"files": [{"path": layout.PARTITION.recipe, "sha256": "the same split", "bytes": 1}]})
    upstream = {"export": "exported", "lower": "lowered", "partition": "partitioned", "convert": "converted"}
    keys = {}
    for size in (1, 5, 10):
        cfg = compose(tmp_path, "target=torch_tensorrt", f"compile.min_block_size={size}")
        target = configured(cfg, {"min_block_size": size})
        assert target.values["min_block_size"] == size
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        keys[size] = {name: StageCache(tmp_path / "cache").material(stages.BY_NAME[name], config, target, run_dir,
                                                                     upstream).key
                      for name in ("partition", "convert", "build")}
    assert len({k["partition"] for k in keys.values()}) == 3  # the split may change: partition runs again
    assert len({k["convert"] for k in keys.values()}) == 1 and len({k["build"] for k in keys.values()}) == 1
    fast = configured(compose(tmp_path, "target=torch_tensorrt"), use_fast_partitioner=False)
    from pipeline.targets import BUILDING, CONVERTING

    assert "min_block_size" not in fast.key_material(CONVERTING)["translated"]
    assert fast.key_material(BUILDING) == configured(compose(tmp_path, "target=torch_tensorrt")).key_material(BUILDING)
