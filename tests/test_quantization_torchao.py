"""target=inductor on CUDA quantizes with torchao (pipeline.quantize.torchao_gpu): what this CPU can check.

The fp8/int8 engines themselves are built on a GPU (tests/test_gpu.py); here: the refusals
before any stage, the bf16 program with its linears made modules and quantized (torchao's int8
weight-only runs on the CPU too, and fp8 with torchao's GPU check lifted, as
bench/fp8_accuracy.py runs it), the fractions, the kernel count, and the build key.
"""

from __future__ import annotations

import copy

import pytest
import torch
from testkit import STAGES, cache_entries, compose, linear_net, run_cli

from pipeline.quantize import torchao_gpu

pytest.importorskip("torchao")


def test_fp8_on_the_cpu_is_refused_in_one_line_before_any_stage(tmp_path):
    proc = run_cli(tmp_path, "target=inductor", "compile.precision=fp8", "tracking.enabled=false",
                   cache=tmp_path / "cache")
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-2000:]
    assert "compute capability 8.9 or newer" in errors[0]
    assert all(cache_entries(tmp_path / "cache", stage) == [] for stage in STAGES)


@pytest.mark.parametrize(("extra", "needle"), [
    (("target=inductor", "target.device=cuda", "quantize.mode=weight_only", "compile.precision=fp8"),
     "quantize.mode=weight_only (int8 weights"),
    (("target=onnxruntime", "quantize.mode=weight_only", "compile.precision=int8"),
     "quantize.mode=weight_only (int8 weights"),
])
def test_quantize_modes_the_route_cannot_serve_are_refused(tmp_path, extra, needle):
    from omegaconf import OmegaConf

    from pipeline import targets
    from pipeline.checks import check_quantization
    from pipeline.errors import ConfigError

    config = OmegaConf.to_container(compose(tmp_path, *extra), resolve=True, enum_to_str=True)
    with pytest.raises(ConfigError) as err:  # the made target answers, as in the runner
        check_quantization(config, targets.make(config["target"]["name"], config["target"]))
    assert needle in err.value.one_line() and "\n" not in err.value.one_line()


def exported():
    model = linear_net(width=64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    return copy.deepcopy(torch.export.export(model, (x,)).module()), x, ref


def test_linears_become_modules_and_quantize_in_bf16_with_int8_weights():
    gm, x, ref = exported()
    spec = {"precision": "int8", "mode": "weight_only", "exclude": ["mlp.2"]}
    assert sorted(torchao_gpu.linear_paths(gm).values()) == ["head", "mlp.0", "mlp.2", "mlp.4"]
    counted = torchao_gpu.fractions(gm, spec)
    assert counted["compute_ops"] == 5 and counted["int8_ops"] == 3  # the patch conv and mlp.2 stay bf16
    assert 0 < counted["int8_mac_fraction"] < 1 and "mlp.2" in counted["kept_layers"]
    quantized = torchao_gpu.prepare(gm, spec)
    weights = {name: type(m.weight).__name__ for name, m in quantized.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert len(weights) == 3 and all(kind != "Parameter" for kind in weights.values())
    assert quantized.patch.weight.dtype == torch.bfloat16
    y = quantized(x)
    assert y.dtype == torch.float32  # the engine's contract: float32 out
    assert float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)) > 0.99


def test_fp8_keeps_linears_whose_sizes_fp8_gemms_cannot_take():
    gm, _, _ = exported()
    chosen, kept = torchao_gpu.eligible(gm, {"precision": "fp8", "mode": "static", "exclude": []})
    assert set(chosen.values()) == {"mlp.0", "mlp.2", "mlp.4", "head"}
    gm = torchao_gpu.to_bfloat16(gm)
    assert not kept and all(p.dtype == torch.bfloat16 for p in gm.parameters())


def test_fp8_arithmetic_runs_on_the_cpu_for_the_accuracy_benchmark(monkeypatch):
    """bench/fp8_accuracy.py judges the CUDA fp8 route's accuracy here: torchao's GPU check lifted, the
    program prepared as build does it, per-row fp8 weights, and `_scaled_mm` computing on the CPU."""
    import torchao.float8.inference as inference
    import torchao.quantization.quant_api as quant_api

    for module in (inference, quant_api):  # the names bench/fp8_accuracy.allow_fp8_on_cpu replaces
        monkeypatch.setattr(module, "_check_hardware_support", lambda *args, **kwargs: None)
    gm, x, ref = exported()
    plain = torchao_gpu.to_bfloat16(copy.deepcopy(gm))
    quantized = torchao_gpu.prepare(gm, {"precision": "fp8", "mode": "static", "exclude": ["head"]})
    kinds = sorted(type(m.weight).__name__ for m in quantized.modules() if isinstance(m, torch.nn.Linear))
    assert kinds == ["Float8Tensor"] * 3  # mlp.0, mlp.2, mlp.4; the excluded head stays an aten.linear in bf16
    cosine = float(torch.nn.functional.cosine_similarity(quantized(x).flatten(), ref.flatten(), dim=0))
    bf16 = float(torch.nn.functional.cosine_similarity(plain(x).flatten(), ref.flatten(), dim=0))
    assert 0.98 < cosine < bf16  # e4m3 costs more than bf16 alone, and nothing breaks


def test_dynamic_int8_keeps_linears_with_too_few_rows_for_int_mm():
    """`_int_mm` on CUDA takes more than 16 rows: the head (one row per image) stays bf16, the rest go int8."""
    gm, _, _ = exported()
    spec = {"precision": "int8", "mode": "dynamic", "exclude": []}
    gm = torchao_gpu.to_bfloat16(gm)  # what prepare does first: the casts it inserts carry no shapes
    chosen, kept = torchao_gpu.eligible(gm, spec)
    rows = exported()[1].shape[0]
    assert set(chosen.values()) == {"mlp.0", "mlp.2", "mlp.4"}
    assert kept == {"head": f"int8 GEMMs (`_int_mm`) need more than 16 rows, and this layer gets {rows}"}
    assert torchao_gpu.eligible(gm, {**spec, "mode": "weight_only"})[1] == {}


def test_kernel_count_reads_calls_not_comments():
    code = "\n".join(["# Topologically Sorted Source Nodes: [_scaled_mm]",
                      "        extern_kernels._scaled_mm(buf1, arg2_1, buf2, buf3, out_dtype=torch.bfloat16, out=buf4)",
                      "def triton_tem_fused__scaled_mm_0(arg_A, arg_B):",
                      "        triton_tem_fused__scaled_mm_1.run(buf5, arg7_1, buf6, stream=stream0)",
                      "        buf9 = torch.ops.aten._int_mm.default(buf7, arg8_1)",
                      "        triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_12.run(buf0, buf1, 64, 768)"])
    assert torchao_gpu.kernel_count(code, "fp8") == 2 and torchao_gpu.kernel_count(code, "int8") == 1


def test_build_key_holds_torchao_and_the_compute_capability(tmp_path):
    import stages
    from pipeline import env, targets
    from pipeline.cache import environment

    spec = stages.BY_NAME["build"]
    keyed = environment(spec.libraries + targets.target_class("inductor")(
        {"device": "cpu"}).libraries_for(spec.asks))
    assert keyed["libraries"]["torchao"] == env.library_version("torchao")
    assert keyed["compute_capability"] == env.device_info()["compute_capability"]
