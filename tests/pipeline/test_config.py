"""The typed schema behind conf/: every shipped option composes, mistakes fail at compose time."""

from __future__ import annotations

import importlib
import shutil

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from testkit import CONF, compose

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TARGETS = sorted(p.stem for p in (CONF / "target").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_conf_has_the_documented_options():
    assert {"tiny_cnn", "custom_op_net", "resnet18", "resnet50", "mobilenet_v3_small",
            "efficientnet_b0", "vit_b_16", "bert_tiny", "bert_base", "data_dependent_net"} <= set(MODELS)
    assert {"auto", "onnxruntime", "eager", "tensorrt", "torch_tensorrt", "inductor"} <= set(TARGETS)
    assert {"image_224", "image_64", "image_dynamic_batch", "text_dynamic"} <= {
        p.stem for p in (CONF / "input").glob("*.yaml")}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(tmp_path, model):
    cfg = compose(tmp_path, f"model={model}")
    assert cfg.model.name == model
    module, _, attr = cfg.model._target_.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr))  # resolvable, not built
    assert cfg.model.weights is None  # seeded random weights: no download in tests or CI
    kwargs = OmegaConf.to_container(cfg.model.kwargs)
    assert "weights" not in kwargs and "pretrained" not in kwargs


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_composes(tmp_path, target):
    cfg = compose(tmp_path, f"target={target}")
    assert cfg.target.name == target


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, experiment):
    cfg = compose(tmp_path, f"experiment={experiment}", raw=True)
    assert cfg.model.name and cfg.input.tensors[0].shape


def test_experiments_pin_their_combination(tmp_path):
    smoke = compose(tmp_path, "experiment=smoke", raw=True)
    assert (smoke.model.name, list(smoke.input.tensors[0].shape), smoke.validate.iterations) == (
        "tiny_cnn", [1, 3, 64, 64], 10)
    r50 = compose(tmp_path, "experiment=resnet50_onnxruntime", raw=True)
    assert (r50.model.name, r50.target.name, list(r50.input.tensors[0].shape)) == (
        "resnet50", "onnxruntime", [1, 3, 224, 224])


def test_defaults_and_typed_values(tmp_path):
    cfg = compose(tmp_path, raw=True)
    assert cfg.model.name == "resnet18" and cfg.target.name == "auto"
    assert list(cfg.input.tensors[0].shape) == [1, 3, 224, 224] and dict(cfg.input.dims) == {}
    assert cfg.compile.min_block_size == 5 and list(cfg.compile.torch_executed_ops) == []
    assert cfg.compile.require_full_compilation is False
    assert cfg.validate.tolerances.fp32.rel_l2_err == pytest.approx(1e-3)
    typed = compose(tmp_path, "compile.min_block_size=7", "compile.precision=fp16",
                    "input.tensors.0.shape=[batch,3,32,32]", "+input.dims.batch={min:1,opt:2,max:4}")
    assert typed.compile.min_block_size == 7 and isinstance(typed.compile.min_block_size, int)
    assert str(typed.compile.precision.value) == "fp16"
    assert list(typed.input.tensors[0].shape) == ["batch", 3, 32, 32]
    assert (typed.input.dims.batch.min, typed.input.dims.batch.opt, typed.input.dims.batch.max) == (1, 2, 4)


def test_everything_written_follows_paths_outputs(tmp_path):
    cfg = compose(tmp_path)
    assert cfg.paths.outputs == str(tmp_path)
    assert cfg.paths.cache == f"{tmp_path}/cache"
    assert cfg.tracking.store == f"{tmp_path}/mlflow.db"
    assert cfg.tracking.artifacts == f"{tmp_path}/mlartifacts"


def test_shrunk_config(tmp_path):
    cfg = compose(tmp_path)
    assert (cfg.model.name, list(cfg.input.tensors[0].shape), cfg.validate.num_samples) == (
        "tiny_cnn", [1, 3, 64, 64], 2)


@pytest.mark.parametrize("override", [
    "compile.min_block_sise=3",          # misspelled key
    "compile.min_block_size=abc",        # wrong type
    "validate.iterations=1.5",           # float for an int
    "compile.precision=fp64",            # not a Precision
    "compile.torch_executed_ops=aten.add.Tensor",  # a string for a list
    "input.tensors.0.shape=abc",
    "input.dims.batch.min=x",
    "model=nope",                        # unknown config group option
    "target=nope",
])
def test_schema_rejects_mistakes_at_compose_time(tmp_path, override):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose(tmp_path, override)


def test_target_fields_are_checked_per_target(tmp_path):
    assert compose(tmp_path, "target=onnxruntime", "target.intra_op_num_threads=2").target.intra_op_num_threads == 2
    with pytest.raises(ConfigCompositionException, match="providers"):
        compose(tmp_path, "target=eager", "target.providers=[CPUExecutionProvider]")


def test_schema_rejects_a_typo_in_a_yaml_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "compile" / "typo.yaml").write_text("min_block_sise: 3\n")
    import pipeline.config  # noqa: F401

    with hydra.initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert hydra.compose(config_name="config", overrides=["compile=default"]).compile.min_block_size == 5
        with pytest.raises((ConfigCompositionException, OmegaConfBaseException), match="min_block_sise"):
            hydra.compose(config_name="config", overrides=["compile=typo"])


@pytest.mark.parametrize("override", ["+compile.min_block_sise=3", "+target.intra_op_threads=2"])
def test_plus_override_cannot_smuggle_an_unknown_key_past_the_schema(tmp_path, override):
    from testkit import make_runner

    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown setting"):
        make_runner(tmp_path, "target=onnxruntime", override)


def test_plus_override_may_add_model_kwargs(tmp_path):
    from testkit import make_runner

    runner, _, _ = make_runner(tmp_path, "+model.kwargs.num_classes=5")
    assert runner.config["model"]["kwargs"] == {"num_classes": 5}
