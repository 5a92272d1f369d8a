"""Task metrics: what users judge an engine by, for eager fp32 and the engine on the same samples.

A classifier with labels gets top-1 and top-5 accuracy (in percent) and their drop in points
against eager fp32; a model without labels (an embedding model) gets the per-sample cosine
of the engine's output against eager's (min and mean: eager's own is 1, so the drop in points
is 100 x (1 - cosine)); any function named by `data.metric` (dotted path) is called with
(outputs, labels) and returns {name: value}, higher being better. The first figure is the
primary one: `validate.max_drop` gates its drop, the comparison tables and the Pareto plot
put it on the accuracy axis, and the int8 rounds (pipeline.quantized_build) gate on it
when the calibration split has labels.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.errors import ConfigError, first_line

# Metric keys (MLflow) read by the tables and the Pareto plot, best first.
PRIMARY_KEYS = ("task/top1", "task/cosine_mean")


def scores(outputs, labels, metric: str, classifier: bool) -> dict[str, float]:
    """{name: value} of one model's outputs (first output of each batch, concatenated) against labels."""
    if metric != "auto":
        return _custom(metric, outputs, labels)
    if labels is None or not classifier or outputs.dim() != 2:
        return {}
    ranked = outputs.float().topk(min(5, outputs.shape[-1]), dim=-1).indices
    hits = ranked == labels.reshape(-1, 1)
    out = {"top1": 100.0 * float(hits[:, 0].float().mean())}
    if ranked.shape[-1] >= 5:
        out["top5"] = 100.0 * float(hits.any(dim=-1).float().mean())
    return out


def cosines(reference, got) -> dict[str, float]:
    """Per-sample cosine of the engine's output against eager's (rows of the first output)."""
    import torch

    r = reference.double().reshape(len(reference), -1)
    g = got.double().reshape(len(got), -1)
    cos = torch.nn.functional.cosine_similarity(g, r, dim=-1)
    same = (r == g).all(dim=-1)  # two equal rows (all-zero ones too) agree fully
    cos = torch.where(same, torch.ones_like(cos), cos)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def _custom(metric: str, outputs, labels) -> dict[str, float]:
    module_name, _, attr = metric.rpartition(".")
    fix = "give data.metric an importable function (outputs, labels) -> {name: value}, or data.metric=auto."
    try:
        value = getattr(importlib.import_module(module_name), attr)(outputs, labels)
    except Exception as err:  # the user's code: any failure means the same thing
        raise ConfigError(f"data.metric={metric} failed: {first_line(err)}.", fix) from None
    if isinstance(value, (int, float)):
        value = {attr: value}
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise ConfigError(f"data.metric={metric} returned {type(value).__name__}, not {{name: number}}.", fix)
    return {str(k): float(v) for k, v in value.items()}


def compare(reference, got, labels, metric: str, classifier: bool) -> dict[str, Any]:
    """Eager and engine figures, drops in points and the primary figure's name."""
    eager = scores(reference, labels, metric, classifier)
    engine = scores(got, labels, metric, classifier)
    drop = {k: eager[k] - engine[k] for k in engine if k in eager}
    if not engine:  # no labels or not a classifier: agreement per sample is the task figure
        engine = cosines(reference, got)
        eager = {k: 1.0 for k in engine}
        drop = {k: 100.0 * (1.0 - v) for k, v in engine.items()}
    primary = "cosine_mean" if "cosine_mean" in engine else next(iter(engine), None)
    return {"metric": metric, "primary": primary, "samples": len(got), "engine": engine, "eager": eager,
            "drop": drop}


def gate(task: dict[str, Any], max_drop: float | None) -> list[str]:
    """The primary figure's drop within validate.max_drop (points)."""
    primary = task.get("primary")
    if max_drop is None or primary is None or primary not in task["drop"]:
        return []
    drop = task["drop"][primary]
    if drop <= max_drop:
        return []
    return [f"task {primary} drop {drop:.2f} points ({task['eager'][primary]:.4g} eager -> "
            f"{task['engine'][primary]:.4g}) exceeds validate.max_drop={max_drop:g}"]


def metrics(task: dict[str, Any]) -> dict[str, float]:
    """task/<name>, eager/task/<name> and task/<name>_drop, as MLflow metric keys."""
    out = {f"task/{k}": v for k, v in task["engine"].items()}
    out.update({f"eager/task/{k}": v for k, v in task["eager"].items()})
    out.update({f"task/{k}_drop": v for k, v in task["drop"].items()})
    out["task/samples"] = float(task["samples"])
    return out


def describe(task: dict[str, Any]) -> str:
    """One line for the console: engine vs eager on the primary figure."""
    p = task["primary"]
    return (f"task {p}: {task['engine'][p]:.4g} (eager fp32 {task['eager'][p]:.4g}, drop {task['drop'][p]:.2f} "
            f"points) on {task['samples']} held-out samples")


def evaluate(data_cfg, input_cfg, reference, compiled, device: str, cast, classifier: bool):
    """Eager fp32 (`reference`, on the CPU) and the compiled module on the data's validation split."""
    import torch

    from pipeline import data
    from pipeline.models import flat_outputs

    ref, got, labels = [], [], []
    with torch.no_grad():
        for sample, y in data.split(data_cfg, input_cfg, "validation"):
            ref.append(flat_outputs(sample(reference))[0].detach().float().cpu())
            got.append(flat_outputs(sample.to(device, cast)(compiled))[0].detach().float().cpu())
            labels.append(data.labels_tensor(y))
    has_labels = all(y is not None for y in labels)
    return compare(torch.cat(ref), torch.cat(got), torch.cat(labels) if has_labels else None,
                   str(data_cfg.metric), classifier)


def validate(ctx, reference, compiled, device: str, agreement: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """validate's task step: (the task report or None without data, the failures that gate the job).

    `agreement` are the tolerance gates' failures. For an int8/fp8 job with a task budget
    (validate.max_drop) on real data, the budget decides, as it does in the int8 rounds:
    quantization moves logits (rel L2 0.08 on the digits CNN) while top-1 holds, and that is
    what users judge it by; the tolerances' verdicts stay on record as warnings.
    """
    from pipeline import data
    from pipeline.dtypes import is_quantized
    from pipeline.models import caster

    cfg = ctx.config
    if not data.present(cfg.data):
        return None, agreement
    with ctx.console.status("task metrics on the data's validation split (eager fp32 and compiled)"):
        task = evaluate(cfg.data, cfg.input, reference, compiled, device, caster(cfg.compile.precision),
                        cfg.model.task == "classification")
    task["max_drop"] = cfg.validate.max_drop
    failures = gate(task, cfg.validate.max_drop)
    task["passed"] = not failures
    if task["primary"]:
        ctx.console.print(describe(task), markup=False, highlight=False)
    budget = cfg.validate.max_drop is not None and task["primary"] and is_quantized(cfg.compile.precision)
    for failure in agreement if budget else []:
        ctx.warn(f"{failure} against eager on the data (not gating: validate.max_drop decides for "
                 f"{cfg.compile.precision} on real data)")
    return task, failures if budget else agreement + failures


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The run summary's task lines, from the job's metrics: eager and engine figures, drops."""
    names = [k.removeprefix("task/") for k in m if k.startswith("task/") and not k.endswith(("_drop", "samples"))]
    if not names:
        return []
    parts = [f"{n} {m[f'task/{n}']:.4g} vs eager fp32 {m.get(f'eager/task/{n}', float('nan')):.4g} "
             f"(drop {m.get(f'task/{n}_drop', float('nan')):.2f} points)" for n in names]
    return [f"task on {m.get('task/samples', 0):.0f} held-out samples: " + ", ".join(parts)]


class RoundGate:
    """The int8/fp8 rounds' gate on the task: the drop of each round's program against the fp32
    program on the data's calibration batches, within validate.max_drop (pipeline.quantized_build)."""

    def __init__(self, labels, metric: str, classifier: bool, max_drop: float):
        self.labels, self.metric, self.classifier, self.max_drop = labels, metric, classifier, max_drop

    def check(self, reference: list[list], got: list[list]) -> tuple[dict[str, float], list[str]]:
        import torch

        task = compare(torch.cat([r[0].float().cpu() for r in reference]), torch.cat([g[0].float().cpu() for g in got]),
                       self.labels, self.metric, self.classifier)
        found = gate(task, self.max_drop)
        return {**{f"task/{k}": v for k, v in task["engine"].items()},
                **{f"task/{k}_drop": v for k, v in task["drop"].items()}}, found


def round_gate(cfg, count: int) -> RoundGate | None:
    """A RoundGate where the calibration batches are the data's split and max_drop is set (without labels
    it gates the per-sample cosine's drop)."""
    import torch

    from pipeline import calibration, data

    if (cfg.calibration.source != "data" or cfg.validate.max_drop is None
            or not data.present(cfg.data)):
        return None
    batches = calibration.data_batches(cfg.data, cfg.input, int(cfg.calibration.num_samples))[:count]
    labels = None if any(y is None for _, y in batches) else torch.cat([data.labels_tensor(y) for _, y in batches])
    return RoundGate(labels, str(cfg.data.metric), cfg.model.task == "classification", float(cfg.validate.max_drop))


def real_batches(cfg, shape_name: str) -> list | None:
    """With real data, validate's agreement figures at opt are taken on its validation split, not on noise:
    an int8 engine calibrated on real images is judged on the inputs it was calibrated for."""
    from pipeline import data

    if shape_name != "opt" or not data.present(cfg.data):
        return None
    return [sample for sample, _ in data.split(cfg.data, cfg.input, "validation")]


def round_drop(record: dict[str, Any]) -> float | None:
    """An int8 round's primary task drop (top-1, else per-sample cosine), or None without a task gate."""
    return next((record[k] for k in ("task/top1_drop", "task/cosine_mean_drop") if k in record), None)
