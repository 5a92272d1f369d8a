"""One int8 round's verdict: the program with its new engines against the fp32 program.

The reference is the fused fp32 program itself (the model after lowering, every segment
in PyTorch), on calibration batches: the same figures and gates as validate
(validate.tolerances.int8), so a round that passes here is expected to pass there, where
held-out inputs decide.
"""

from __future__ import annotations

from typing import Any

from pipeline.models import flat_outputs

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


class Evaluation:
    """The fp32 program's outputs on a few batches, and the check of each round's engines against them."""

    def __init__(self, gm, batches, tolerance: dict[str, Any], classifier: bool, latency_iterations: int,
                 batch_size: int, task=None):
        import torch

        # task: a pipeline.task_metrics.RoundGate; with labels the task's drop gates, not the tolerances.
        self.gm, self.batches, self.tolerance, self.classifier, self.task = gm, batches, tolerance, classifier, task
        self.latency_iterations, self.batch_size = latency_iterations, batch_size
        with torch.no_grad():
            self.reference = [flat_outputs(b(gm)) for b in batches]

    def check(self, target, engines: list[dict[str, Any]], build_dir) -> dict[str, Any]:
        """Swap the segments for this round's engines, then accuracy (and latency) of the program."""
        import torch

        from pipeline.hybrid import EngineModule

        options = {**target.runtime_options(self.gm), "trusted": True}
        for entry in engines:
            setattr(self.gm, entry["name"], EngineModule(target.load_engine(entry, build_dir, options)))
        with torch.no_grad():
            got = [flat_outputs(b(self.gm)) for b in self.batches]
        acc = compare(self.reference, got, self.classifier)
        found = failures(acc, self.tolerance)
        if self.task is not None:
            task, found = self.task.check(self.reference, got)
            acc.update(task)
        record: dict[str, Any] = {**acc, "passed": not found, "failures": found}
        if self.latency_iterations:
            record["latency_p50_ms"] = self._latency()
        return record

    def _latency(self) -> float:
        import torch

        from pipeline.timing import measure

        sample = self.batches[0]

        def call():
            with torch.no_grad():
                sample(self.gm)

        stats = measure({"int8": call}, warmup=min(3, self.latency_iterations), iterations=self.latency_iterations,
                        rounds=1, min_seconds=0.0, batch_size=self.batch_size, cuda=False)
        return stats["int8"].p50_ms
