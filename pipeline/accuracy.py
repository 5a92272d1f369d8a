"""The one comparator: compiled outputs against reference outputs, and the gates they must pass.

Validate (the compiled program against eager PyTorch on held-out inputs) and the int8/fp8
rounds (each round's program against the fp32 program on calibration batches) ask the same
question, so they get the same figures and the same verdicts from here. The cases where
the plain formulas say nothing useful are decided once:

- all-zero outputs on both sides are equal: cosine 1 (torch, dividing by a clamped norm,
  would say 0 and fail a model whose head is zero), relative L2 error 0;
- constant reference outputs (one value over every sample, all zero included) are compared
  as they are and flagged (`constant`): agreement with them proves little, validate warns;
- compiled outputs with NaN or Inf are flagged (`finite` false) and get the worst figures
  (errors inf, cosine -1), so a gate fails on them and the rounds never prefer them.
"""

from __future__ import annotations

import math
from typing import Any

GATES = (("max_abs_err", "max_abs_err", "<="), ("rel_l2_err", "rel_l2_err", "<="),
         ("cosine_similarity", "min_cosine_similarity", ">="), ("top1_agreement", "min_top1_agreement", ">="))
# Verdicts compare() returns beside the figures: true/false, never logged as metrics.
FLAGS = ("finite", "constant")
NOT_FINITE = "the compiled output has NaN or Inf values"


def compare(ref: list[list], got: list[list], classifier: bool) -> dict[str, Any]:
    """Max abs error, relative L2 error, cosine similarity over all samples; top-1 agreement for logits.

    `ref` and `got` hold, per sample, the flat list of output tensors (pipeline.models.flat_outputs).
    """
    import torch

    r = torch.cat([t.detach().double().cpu().flatten() for sample in ref for t in sample])
    g = torch.cat([t.detach().double().cpu().flatten() for sample in got for t in sample])
    finite = bool(torch.isfinite(g).all())
    out: dict[str, Any] = {"finite": finite, "constant": is_constant(ref)}
    if not finite:
        out.update(max_abs_err=math.inf, rel_l2_err=math.inf, cosine_similarity=-1.0)
    else:
        diff = g - r
        both_zero = not bool(r.any()) and not bool(g.any())
        out.update(max_abs_err=float(diff.abs().max()) if diff.numel() else 0.0,
                   rel_l2_err=float(diff.norm() / r.norm().clamp_min(1e-30)),
                   cosine_similarity=1.0 if both_zero else float(torch.nn.functional.cosine_similarity(g, r, dim=0)))
    if classifier and all(s[0].dim() == 2 for s in ref):
        agree = [(a[0].argmax(-1) == b[0].float().cpu().argmax(-1)).float() for a, b in zip(ref, got, strict=False)]
        out["top1_agreement"] = float(torch.cat(agree).mean())
    return out


def is_constant(outputs: list[list]) -> bool:
    """Each output holds one value over every sample (all zero, e.g.): agreement then proves little."""
    import torch

    count = min((len(sample) for sample in outputs), default=0)
    columns = [torch.cat([sample[i].detach().cpu().flatten() for sample in outputs]) for i in range(count)]
    columns = [c for c in columns if c.numel()]
    return sum(c.numel() for c in columns) > 1 and all(bool((c == c[0]).all()) for c in columns)


def figures(acc: dict[str, Any]) -> dict[str, float]:
    """The numbers of a comparison, without its verdict flags: what is logged as metrics."""
    return {k: v for k, v in acc.items() if k not in FLAGS}


def failures(acc: dict[str, Any], tolerance: dict[str, Any]) -> list[str]:
    """The gates of `tolerance` (validate.tolerances.<precision>) that the comparison fails, as text."""
    found = [] if acc.get("finite", True) else [NOT_FINITE]
    for metric, key, op in GATES:
        limit = tolerance.get(key)
        if limit is None or metric not in acc:
            continue
        if not (acc[metric] <= limit if op == "<=" else acc[metric] >= limit):
            found.append(f"{metric}={acc[metric]:.3g} (must be {op} {limit:g})")
    return found
