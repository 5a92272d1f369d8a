"""target=inductor on CUDA, compile.precision=fp8/int8: torchao's quantized linear layers, compiled by Inductor.

PyTorch's own low-precision route for GPUs without TensorRT. The segment's exported
program is brought to bf16 (weights, float inputs and the dtypes written into the graph;
outputs go back to float32, the engines' contract), each `aten.linear` whose weight is a
parameter becomes an `nn.Linear` again, and torchao's `quantize_` swaps the chosen ones'
weights for its quantized tensors:

- fp8: `Float8DynamicActivationFloat8WeightConfig` with per-row scales (weights scaled per
  output channel once, activations per row at run time): Inductor calls `_scaled_mm`,
  Hopper's fp8 tensor-core GEMM, which needs compute capability 8.9 or newer.
- int8, quantize.mode=dynamic: `Int8DynamicActivationInt8WeightConfig` (`_int_mm`).
- int8, quantize.mode=weight_only: `Int8WeightOnlyConfig` (int8 weights, bf16 compute).

Convolutions stay in bf16: torchao's configs quantize `nn.Linear` only. bf16 rather than
fp16 because `_scaled_mm` with row-wise scales writes bf16 only, and bf16 keeps fp32's
range for the constants a model bakes in (attention masks of finfo(float32).min).

Nothing of this is stored as code: the engine is the float program, torch.compile's
caches and the quantization's settings (`spec`); loading applies the same deterministic
quantization again and finds every kernel in the caches. "Is it fp8?" is answered on
Inductor's generated code: the `_scaled_mm`/`_int_mm` calls it makes.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

# (precision, quantize.mode) -> torchao's config class.
CONFIGS = {("fp8", "static"): "Float8DynamicActivationFloat8WeightConfig",
           ("int8", "dynamic"): "Int8DynamicActivationInt8WeightConfig",
           ("int8", "weight_only"): "Int8WeightOnlyConfig"}
# Lowest compute capability per precision: fp8 tensor cores (Ada, Hopper); int8 `_int_mm` (Ampere).
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (8, 0)}
QUANTIZER = ("torchao on the linear layers, compiled by Inductor on CUDA (fp8: per-row dynamic activation "
             "and weight scales; the rest in bf16)")
INT8_QUANTIZER = "torchao's int8 dynamic activation + int8 weight linears, compiled by Inductor on CUDA"
WEIGHT_ONLY_QUANTIZER = "torchao's int8 weight-only linears (bf16 compute), compiled by Inductor on CUDA"
CONV_REASON = "torchao's float8 and int8 configs quantize nn.Linear only, so convolutions run in bf16"
INSTALL = "pip install torchao (0.17 with torch 2.11; tools/gpu-machine.sh carries it)"
# Calls of the quantized GEMMs in Inductor's generated code: extern calls and aten ops
# (`extern_kernels._scaled_mm(`, `aten._int_mm.default(`) and GEMM templates (`triton_tem_..._scaled_mm_0.run(`).
# Pointwise and reduction kernels named after the GEMM they feed (`triton_red_fused__scaled_mm_..._abs_amax`,
# the activation's row-wise scale on an H200) are quantize kernels, not GEMMs.
KERNELS = {precision: re.compile(rf"(?<!\w){op}(?:\.default)?\(|triton_tem_\w*{op}\w*\.run\(")
           for precision, op in (("fp8", "_scaled_mm"), ("int8", "_int_mm"))}
DTYPE = "bfloat16"
# torch._int_mm on CUDA takes more than 16 rows only (torchao's dynamic int8 linears call it as is).
INT_MM_MIN_ROWS = 16


def capability() -> tuple[int, int] | None:
    """The CUDA GPU's compute capability, None without one."""
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def refusal(precision: str, mode: str, device: str) -> tuple[str, str] | None:
    """(why not, the fix) for target=inductor on CUDA quantizing to `precision`; None when it can. Config only."""
    if (precision, mode) not in CONFIGS:
        modes = [m for p, m in CONFIGS if p == precision]
        return (f"its CUDA {precision} route (torchao) has no quantize.mode={mode}",
                f"set quantize.mode to {' or '.join(modes)}")
    if importlib.util.find_spec("torchao") is None:
        return f"its CUDA {precision} route needs torchao, which is not installed", INSTALL
    wanted, have = MIN_CAPABILITY[precision], capability()
    need = f"compute capability {wanted[0]}.{wanted[1]} or newer"
    fix = "run it on such a GPU with target.device=cuda, or use target=onnxruntime" + (
        " with int8" if precision == "fp8" else "")
    if have is None:
        return f"its {precision} route runs on a CUDA GPU of {need}, and this machine has no CUDA GPU", fix
    if device != "cuda":
        return f"its {precision} route runs on a CUDA GPU of {need}, not on target.device={device}", fix
    if have < wanted:
        return (f"{precision} GEMMs need {need}, and this GPU has {have[0]}.{have[1]}",
                "use a newer GPU (Ada or Hopper for fp8), or compile.precision=fp16")
    return None


def linear_paths(gm) -> dict[str, str]:
    """Node name -> module path of each `aten.linear` whose weight is a parameter (what torchao can quantize)."""
    from pipeline.quantize import pt2e_sensitivity

    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "_opname", "") == "linear" \
                and getattr(node.args[1], "op", "") == "get_attr":
            found[node.name] = pt2e_sensitivity.module_path(node) or node.name
    return found


def to_bfloat16(gm):
    """The program in bf16: weights, constants and graph dtypes; float32 inputs cast in, float outputs out."""
    import torch

    low = getattr(torch, DTYPE)
    for tensor in list(gm.parameters()) + list(gm.buffers()):
        if tensor.dtype == torch.float32:
            tensor.data = tensor.data.to(low)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                _set_attr(gm, node.target, value.to(low))
        elif node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, lambda a: low if a is torch.float32 else a)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: low if a is torch.float32 else a)
        elif node.op == "placeholder":
            with graph.inserting_after(node):
                cast = graph.call_function(lower_input, (node,))
            node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
        elif node.op == "output":
            with graph.inserting_before(node):
                node.args = torch.fx.map_arg(node.args, lambda n: graph.call_function(raise_output, (n,)))
    gm.recompile()
    return gm


def lower_input(x):
    import torch

    return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


def raise_output(x):
    import torch

    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(gm, target: str, value) -> None:
    owner, _, name = target.rpartition(".")
    setattr(_attr(gm, owner) if owner else gm, name, value)


def as_modules(gm, chosen: dict[str, str]) -> dict[str, str]:
    """Each chosen `aten.linear` node made a call of an `nn.Linear` holding its weight; new name -> path."""
    import torch

    named, moved = {}, set()
    for index, node in enumerate([n for n in gm.graph.nodes if n.name in chosen]):
        x, weight, bias = (list(node.args) + [None])[:3]
        moved |= {weight.target} | ({bias.target} if bias is not None else set())
        w = _attr(gm, weight.target)
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        layer.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(_attr(gm, bias.target).detach(), requires_grad=False)
        name = f"torchao_linear_{index}"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        named[name] = chosen[node.name]
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm, moved)
    gm.recompile()
    return named


def _drop_unused_attributes(gm, targets: set[str]) -> None:
    """Forget the moved weights' old attributes, so the float copies do not stay on the GPU beside fp8 ones."""
    still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still:
        owner, _, name = target.rpartition(".")
        delattr(_attr(gm, owner) if owner else gm, name)


def config(spec: dict[str, Any]):
    """torchao's config for `spec`, leaving Inductor's process-wide settings alone.

    By default torchao's configs call `recommended_inductor_config_setter()` when they quantize,
    which turns on coordinate-descent tuning of every Triton kernel for the rest of the process:
    on an H200 that was 38 s of BERT-base's 58 s fp8 compile (and ViT-B/16's took 249 s), it
    changes how every later compile in the process is tuned, and a build that set it would
    differ from a load that did not.
    """
    import torchao.quantization as tq

    cls = getattr(tq, CONFIGS[(spec["precision"], spec["mode"])])
    if spec["precision"] == "fp8":
        return cls(granularity=tq.PerRow(), set_inductor_config=False)
    return cls(set_inductor_config=False)


def eligible(gm, spec: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(node -> path of the linears to quantize, path -> why each other linear stays in bf16)."""
    chosen, kept = {}, {}
    for node_name, path in linear_paths(gm).items():
        node = next(n for n in gm.graph.nodes if n.name == node_name)
        out_f, in_f = _attr(gm, node.args[1].target).shape
        if path in spec["exclude"]:
            kept[path] = "quantize.exclude (or an accuracy round)"
        elif spec["precision"] == "fp8" and (in_f % 16 or out_f % 16):
            kept[path] = f"fp8 GEMMs need sizes divisible by 16 ({in_f}x{out_f})"
        elif (spec["precision"], spec["mode"]) == ("int8", "dynamic") and (rows := input_rows(node)) is not None \
                and rows <= INT_MM_MIN_ROWS:
            kept[path] = f"int8 GEMMs (`_int_mm`) need more than {INT_MM_MIN_ROWS} rows, and this layer gets {rows}"
        else:
            chosen[node_name] = path
    return chosen, kept


def input_rows(node) -> int | None:
    """Rows of a linear's input (all dims but the last, multiplied); None where a dim is symbolic."""
    arg = node.args[0]
    while "val" not in getattr(arg, "meta", {}) and getattr(arg, "op", "") == "call_function" and arg.args:
        arg = arg.args[0]  # through the casts to_bfloat16 inserted, which carry no shapes
    val = getattr(arg, "meta", {}).get("val")
    if val is None:
        return None
    rows = 1
    for size in tuple(val.shape)[:-1]:
        if not isinstance(size, int):
            return None
        rows *= size
    return rows


def prepare(gm, spec: dict[str, Any]):
    """The program as the engine runs it, before torch.compile: bf16, its chosen linears quantized."""
    from torchao.quantization import quantize_

    gm = to_bfloat16(gm)
    chosen, _ = eligible(gm, spec)
    named = as_modules(gm, chosen)
    quantize_(gm, config(spec), filter_fn=lambda module, fqn: fqn in named)
    return gm


def fractions(gm, spec: dict[str, Any]) -> dict[str, Any]:
    """Compute ops and MACs of the float program, and how many of them run in the quantized linears."""
    from pipeline.quantize import pt2e

    chosen, kept = eligible(gm, spec)
    precision = spec["precision"]
    ops = macs = q_ops = q_macs = 0
    for node in gm.graph.nodes:
        if pt2e.opname(node) not in pt2e.COMPUTE:
            continue
        count = pt2e._macs(node)
        ops, macs = ops + 1, macs + count
        if node.name in chosen:
            q_ops, q_macs = q_ops + 1, q_macs + count
    return {"compute_ops": ops, f"{precision}_ops": q_ops, f"{precision}_op_fraction": q_ops / ops if ops else 0.0,
            f"{precision}_mac_fraction": q_macs / macs if macs else 0.0, "macs": macs, f"{precision}_macs": q_macs,
            "quantized_layers": sorted(set(chosen.values())), "kept_layers": kept}


def kernel_count(code: str, precision: str) -> int:
    """Calls of `precision`'s GEMMs in Inductor's generated code (comments and kernel definitions skipped)."""
    return sum(1 for line in code.splitlines()
               if not line.lstrip().startswith(("#", "def ")) and KERNELS[precision].search(line))


def facts(gm, spec: dict[str, Any], code: str) -> dict[str, Any]:
    """engines.json facts: the precisions the engine computes in, and the fractions under `precision`."""
    precision = spec["precision"]
    counted = fractions(gm, spec)
    kernels = kernel_count(code, precision)
    weight_only = spec["mode"] == "weight_only"
    shows = kernels > 0 or (weight_only and counted[f"{precision}_ops"] > 0 and "int8" in code)
    computes = (["float8_e4m3fn" if precision == "fp8" else "int8"] if shows else []) + [DTYPE]
    return {"precision": computes, "torchao": spec, "quantizer": QUANTIZER, "convolutions": CONV_REASON,
            precision: {**counted, f"{precision}_kernels": kernels, "weight_only": weight_only}}


def spec_of(request, precision: str) -> dict[str, Any]:
    """What loading needs to quantize the program again: settings and module paths, never code."""
    import torchao

    return {"precision": precision, "mode": request.mode, "exclude": sorted(request.exclude),
            "config": CONFIGS[(precision, request.mode)], "torchao": torchao.__version__}


def rank(program_path: Path, spec: dict[str, Any], sample: list[tuple], device: str) -> list[tuple[str, float]]:
    """(module path, SQNR in dB) of each quantized linear's output against its bf16 output, worst first.

    One eager pass over `sample` with every chosen linear quantized; a forward hook runs the
    same input through the layer's bf16 weight and measures the noise quantization adds.
    """
    import numpy as np
    import torch

    from pipeline import programs

    gm = to_bfloat16(programs.without_input_checks(programs.load_program(program_path).module()).to(device))
    named = as_modules(gm, eligible(gm, spec)[0])
    originals = {name: (gm.get_submodule(name).weight.detach().clone(), gm.get_submodule(name).bias)
                 for name in named}
    from torchao.quantization import quantize_

    quantize_(gm, config(spec), filter_fn=lambda module, fqn: fqn in named)
    noise: dict[str, list[float]] = {name: [0.0, 0.0] for name in named}

    def hook(name):
        def record(module, inputs, output):
            weight, bias = originals[name]
            ref = torch.nn.functional.linear(inputs[0], weight, bias).float()
            noise[name][0] += float(ref.square().sum())
            noise[name][1] += float((ref - output.float()).square().sum())
        return record

    for name in named:
        gm.get_submodule(name).register_forward_hook(hook(name))
    with torch.no_grad():
        for batch in sample:
            gm(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) if isinstance(a, np.ndarray) else a
                 for a in batch))
    ranked = [(named[n], 10 * math.log10(max(s, 1e-30) / max(e, 1e-30))) for n, (s, e) in noise.items()]
    return sorted(ranked, key=lambda item: item[1])
