"""One int8 round's verdict: the program with its new engines against the fp32 program.

The reference is the fused fp32 program itself (the model after lowering, every segment
in PyTorch), on calibration batches: the same figures and gates as validate
(validate.tolerances.int8), so a round that passes here is expected to pass there, where
held-out inputs decide.
"""

from __future__ import annotations

from typing import Any

GATES = (("max_abs_err", "max_abs_err", "<="), ("rel_l2_err", "rel_l2_err", "<="),
         ("cosine_similarity", "min_cosine_similarity", ">="), ("top1_agreement", "min_top1_agreement", ">="))


def compare(ref: list[list], got: list[list], classifier: bool) -> dict[str, float]:
    """Max abs error, relative L2 error, cosine similarity over all samples; top-1 agreement for logits."""
    import torch

    r = torch.cat([t.detach().double().flatten() for sample in ref for t in sample])
    g = torch.cat([t.detach().double().flatten() for sample in got for t in sample])
    diff = g - r
    out = {"max_abs_err": float(diff.abs().max()), "rel_l2_err": float(diff.norm() / r.norm().clamp_min(1e-30)),
           "cosine_similarity": float(torch.nn.functional.cosine_similarity(g, r, dim=0))}
    if not bool(torch.isfinite(g).all()):
        out["cosine_similarity"] = float("-inf")
    if classifier and all(s[0].dim() == 2 for s in ref):
        agree = [(a[0].argmax(-1) == b[0].argmax(-1)).float() for a, b in zip(ref, got, strict=True)]
        out["top1_agreement"] = float(torch.cat(agree).mean())
    return out


def failures(acc: dict[str, float], tolerance: dict[str, Any]) -> list[str]:
    found = []
    for metric, key, op in GATES:
        limit = tolerance.get(key)
        if limit is None or metric not in acc:
            continue
        if not (acc[metric] <= limit if op == "<=" else acc[metric] >= limit):
            found.append(f"{metric}={acc[metric]:.3g} (must be {op} {limit:g})")
    return found
