"""The device as a setting, on a machine without a GPU: what runs here of the GPU path, run for real.

torch.compile's cache artifact (the CUDA default of target=inductor) is built, validated and
hot-loaded in a fresh process with empty compiler caches; ONNX Runtime's IO binding (the
CUDA path's way of calling a session) runs with CPU tensors; target=auto walks its GPU
preferences and says why it passed over each; bad device settings fail in one line.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from testkit import clean_env, inductor_job_or_skip, reload_in_fresh_process, run_cli, run_job

from pipeline import targets
from pipeline.errors import ConfigError
from pipeline.targets.inductor import choose_artifact, choose_mode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-side checks; tests/test_gpu.py covers GPUs")

RELOAD = r"""
import sys
import torch

import pipeline

module = pipeline.load(sys.argv[1], trusted=True)
runners = [repr(m.runner) for m in module.modules() if hasattr(m, "runner")]
with torch.no_grad():
    y = module(torch.load(sys.argv[2]))
torch.save({"runners": runners, "y": y[0] if isinstance(y, (tuple, list)) else y}, sys.argv[3])
"""


def settings(**kw):
    return {"artifact": "auto", "device": "cpu", "mode": "default", "memory_format": "contiguous", **kw}


def test_artifact_rule():
    assert choose_artifact(settings()) == "aoti"
    assert choose_artifact(settings(device="cuda")) == "compile_cache"
    assert choose_artifact(settings(device="cuda", mode="max-autotune-no-cudagraphs", artifact="aoti")) == "aoti"
    with pytest.raises(ConfigError, match="replays CUDA graphs, which an AOTInductor"):
        choose_artifact(settings(device="cuda", mode="max-autotune", artifact="aoti"))
    with pytest.raises(ConfigError, match="channels_last is applied by torch.compile"):
        choose_artifact(settings(memory_format="channels_last"))
    # A mode outside its choices is refused by the Settings schema before any stage (test_settings_walk).


def test_mode_rule_gives_static_cuda_shapes_cuda_graphs_and_says_why():
    """target.mode=auto: CUDA graphs for static shapes on CUDA; default where they cannot help."""
    mode, why = choose_mode(settings(device="cuda", mode="auto", artifact="compile_cache"), [])
    assert mode == "reduce-overhead" and "static shapes" in why and "max-autotune stays explicit" in why
    mode, why = choose_mode(settings(device="cuda", mode="auto", artifact="compile_cache"), ["batch"])
    assert mode == "default" and "batch are dynamic" in why
    assert choose_mode(settings(device="cuda", mode="auto", artifact="aoti"), [])[0] == "default"
    assert choose_mode(settings(device="cpu", mode="auto", artifact="aoti"), []) == (
        "default", "target.mode=auto: on the CPU there are no CUDA graphs to replay")
    assert choose_mode(settings(device="cuda", mode="max-autotune"), []) == (
        "max-autotune", "target.mode=max-autotune was asked for")


@pytest.fixture(scope="module")
def cache_job(tmp_path_factory):
    return inductor_job_or_skip(tmp_path_factory, "compile_cache", "target.artifact=compile_cache")


def test_compile_cache_builds_validates_and_reports(cache_job):
    assert cache_job.result.status == "FINISHED", cache_job.log[-2000:]
    (segment,) = cache_job.json("build/engines.json")["segments"]
    assert segment["artifact"] == "compile_cache" and segment["device"] == "cpu"
    assert segment["artifacts"].get("inductor", 0) >= 1  # the compiled graph is in the blob
    for key in ("engine", "program", "args"):
        assert (cache_job.run_dir / "build" / segment[key]).is_file()
    report = cache_job.json("validate/report.json")
    assert report["passed"] and report["device"] == "cpu" and report["precision_achieved"] == "fp32"
    assert report["engine_load_seconds"] > 0 and report["gpu_memory_mb"] is None
    assert cache_job.result.tags["device"] == "cpu" and cache_job.result.tags["precision.achieved"] == "fp32"
    saved = OmegaConf.load(cache_job.run_dir / "config.yaml").target
    assert saved.device == "cpu" and saved.mode == "default"  # both auto, resolved
    assert "on the CPU" in saved.mode_reason and cache_job.result.tags["target.mode.reason"] == saved.mode_reason
    assert "target.mode: default (target.mode=auto: on the CPU" in cache_job.log


def test_compile_cache_loads_hot_in_a_fresh_process_with_empty_caches(cache_job, tmp_path):
    env = clean_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "empty-inductor-cache"))
    ref, got = reload_in_fresh_process(cache_job.run_dir, RELOAD, tmp_path, env=env)
    assert len(got["runners"]) == 1 and got["runners"][0].startswith("CompiledRunner(")
    torch.testing.assert_close(got["y"], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_onnxruntime_io_binding_runs_and_agrees(tmp_path):
    job = run_job(tmp_path / "out", "target=onnxruntime", "target.io_binding=true", "tracking.enabled=false")
    assert job.result.status == "FINISHED", job.log[-2000:]
    assert job.json("validate/report.json")["accuracy"]["rel_l2_err"] < 1e-5
    from pipeline.targets.onnxruntime_session import OrtSession

    (segment,) = job.json("build/engines.json")["segments"]
    import onnxruntime as ort

    session = OrtSession(job.run_dir / "build" / segment["engine"], ort.SessionOptions(),
                         ["CPUExecutionProvider"], io_binding=True)
    x = torch.randn(segment["inputs"][0]["shape"])
    (bound,), (plain,) = session.bound(x), session.plain(x)
    assert isinstance(bound, torch.Tensor) and bound.device.type == "cpu"
    torch.testing.assert_close(bound, plain)
    # Fixed buffers, what the CUDA provider's graphs replay from: bound once, inputs copied in, outputs cloned out.
    fixed = OrtSession(job.run_dir / "build" / segment["engine"], ort.SessionOptions(),
                       ["CPUExecutionProvider"], io_binding=True, fixed=True)
    assert fixed.fixed and not fixed.cuda_graph and fixed.note is None  # no graph without CUDA
    (first,) = fixed(x)
    (second,) = fixed(2 * x + 1)
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(second, session.plain(2 * x + 1)[0])
    assert not torch.equal(first, second)  # the first call's output was not overwritten by the second
    inputs, outputs = fixed.buffers
    assert first.data_ptr() != outputs[0].data_ptr()
    with pytest.raises(ValueError, match="was built for"):
        fixed(torch.randn([2 * segment["inputs"][0]["shape"][0], *segment["inputs"][0]["shape"][1:]]))


def test_onnxruntime_cuda_graph_rule_says_why():
    """target.cuda_graph: auto is on for static shapes on the CUDA provider; true where it cannot be is refused."""
    def choose(varying, **kw):
        return targets.make("onnxruntime", {**targets.default_settings("onnxruntime"), **kw}).choose_cuda_graph(varying)

    on, why = choose([], device="cuda")
    assert on and "static shapes on the CUDA provider" in why and "fixed buffers" in why
    on, why = choose(["batch"], device="cuda")
    assert not on and "the input's dims batch are dynamic" in why
    on, why = choose([], device="cuda", providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert not on and "trt_cuda_graph_enable" in why
    assert choose([], device="cuda", cuda_graph=False) == (False, "target.cuda_graph=false was asked for")
    assert choose([], device="cpu") == (False, "not on CUDA")
    with pytest.raises(ConfigError, match="dims seq are dynamic"):
        choose(["seq"], device="cuda", cuda_graph=True)
    with pytest.raises(ConfigError, match="needs target.device=cuda"):
        choose([], device="cpu", cuda_graph=True)


def test_auto_walks_the_gpu_preferences_and_says_why():
    prefer = ["inductor@cuda", "onnxruntime@tensorrt", "onnxruntime@cuda", "onnxruntime@warp", "onnxruntime@cpu"]
    name, chosen, why = targets.resolve({"name": "auto", "prefer": prefer})
    assert name == "onnxruntime" and chosen["device"] == "cpu" and chosen["providers"] == ["CPUExecutionProvider"]
    assert why.startswith("target=auto chose onnxruntime@cpu (")
    assert "not inductor@cuda: no CUDA GPU here" in why
    # Without a GPU device node the GPU's absence is the reason given, before the providers are asked.
    assert ("not onnxruntime@tensorrt: onnxruntime here has no TensorrtExecutionProvider" in why
            or "not onnxruntime@tensorrt: no CUDA GPU here" in why)
    assert "not onnxruntime@warp: onnxruntime has no variant 'warp'" in why
    default = OmegaConf.structured(targets.AutoSettings).prefer
    assert default.index("onnxruntime@tensorrt") < default.index("inductor@cuda") < default.index("onnxruntime@cuda")


def test_device_auto_resolves_and_keys_export_by_device():
    ort = targets.make("onnxruntime", targets.default_settings("onnxruntime"))
    assert ort.device() == "cpu" and ort.settings["providers"] == ["CPUExecutionProvider"]
    assert ort.key_material(targets.PLACING) == {"device": "cpu"}
    assert ort.libraries_for(targets.PLACING) == ()  # export stays shared between targets of one device
    cuda = targets.make("inductor", {"name": "inductor", "device": "cuda"})
    assert cuda.device() == "cuda" and cuda.trace_device() == "cpu"  # no GPU here: traces on the CPU
    assert "no CUDA GPU here" in cuda.can_execute()


@pytest.mark.parametrize(("overrides", "message"), [
    (("target=inductor", "target.device=gpu"), "target.device=gpu is not allowed: it must be one of auto, cpu, cuda"),
    (("target=onnxruntime", "target.providers=[CUDAExecutionProvider]"),
     "onnxruntime here has no CUDAExecutionProvider"),
    (("target=onnxruntime", "target.device=cpu", "target.providers=[CUDAExecutionProvider]"),
     "target.device=cpu but target.providers=['CUDAExecutionProvider'] run on cuda"),
])
def test_bad_device_settings_fail_in_one_line(tmp_path, overrides, message):
    proc = run_cli(tmp_path, *overrides, "tracking.enabled=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in text
