"""Saved views of the MLflow runs table: the columns that decide, sorted by the objective.

Out of the box MLflow's runs table shows Run Name, Created, Dataset, Duration, Source and
Models: no latency, no speedup, no accuracy, and columns chosen by hand live in one
browser's local storage. MLflow 3 also restores a view from the experiment tag
`mlflow.sharedViewState.<key>` when the page's address carries `viewStateShareKey=<key>`
(its "share view" button writes such tags; plain JSON is read). The links a run or a
sweep prints carry such a key, so whoever opens them sees p50, speedup, accuracy, trust
and the winner's mark first, sorted by latency, on any browser.

No mlflow import here: the client comes from the caller (pipeline.tracking).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.ranking import speedup_trusted

VIEW_TAG = "mlflow.sharedViewState."
# The experiment-wide view (`make ui`, single runs) and a sweep's own view.
EXPERIMENT_VIEW = "pipeline-runs"


def column(kind: str, name: str) -> str:
    """A runs-table column as the UI names it: metrics.`latency_p50_ms`, tags.`best`, attributes.`Duration`."""
    return f"{kind}.`{name}`"


# The table scrolls sideways and draws only what fits, and it puts metric columns (in
# alphabetical order) before tag columns: trust is shown as the 0/1 metric latency_trusted.
COLUMNS = [column("metrics", "latency_p50_ms"), column("metrics", "speedup"), column("metrics", "latency_trusted"),
           column("metrics", "cosine_similarity"), column("metrics", "rel_l2_err"), column("tags", "target"),
           column("tags", "model")]


def sweep_key(sweep_id: str) -> str:
    return f"sweep-{sweep_id}"


def state(search_filter: str = "", order_by: str = column("metrics", "latency_p50_ms"),
          ascending: bool = True) -> dict[str, Any]:
    """The view: search facets (filter, order) and the UI's column choice, as the UI's share button writes it."""
    return {"searchFilter": search_filter, "orderByKey": order_by, "orderByAsc": ascending,
            "selectedColumns": COLUMNS, "runListHidden": False}


def sweep_state(sweep_id: str) -> dict[str, Any]:
    """A sweep's jobs (not its parent, which would fold them away), fastest first."""
    return state(f"tags.`sweep.id` = '{sweep_id}' and tags.`sweep.job` LIKE '%'")


def experiment_state() -> dict[str, Any]:
    """Every run of the experiment, newest first, with the deciding columns."""
    return state(order_by=column("attributes", "start_time"), ascending=False)


def save(client, experiment_id: str, key: str, view: dict[str, Any]) -> None:
    client.set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(view, separators=(",", ":")))


def path(experiment_id: str, key: str) -> str:
    """The runs table in the saved view `key`, relative to wherever the UI is served.

    No filter or order in the address itself: the UI ignores a saved view when the address
    has its own search facets.
    """
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"


def run_description(result) -> str:
    """A job run's description: what the terminal's summary says, figures rounded for reading.

    MLflow shows a run's description above its ~40 tags and its metrics in alphabetical
    order; this puts the verdict (status, latency, speedup, accuracy, trust) on its first lines.
    """
    m, error = result.metrics, result.error  # a JobResult, or sync's record of run.json with the same fields
    noisy = " ~" if m.get("latency_trusted") == 0 else ""
    noisy_speedup = "" if speedup_trusted(m) else " ~"
    target = result.target or "its target"
    lines = [f"**{result.status.lower()}** on {target}" + (f": {error}" if error else "")]
    if m.get("validated") and "latency_p50_ms" in m:
        lines.append(f"latency p50 **{m['latency_p50_ms']:.3g} ms**{noisy} (p99 {m.get('latency_p99_ms', 0):.3g}), "
                     f"eager {m.get('eager/latency_p50_ms', 0):.3g} ms: speedup **{m.get('speedup', 0):.3g}x**{noisy_speedup}")
        accuracy = f"accuracy vs eager: rel L2 {m.get('rel_l2_err', 0):.1e}, cosine {m.get('cosine_similarity', 0):.6f}"
        if "top1_agreement" in m:
            accuracy += f", top-1 agreement {m['top1_agreement']:.0%}"
        lines.append(accuracy + (" (passed)" if m.get("accuracy_passed") else " (failed)"))
        if noisy or noisy_speedup:
            lines.append("~: a latency behind it varies too much to trust (latency.trusted, eager.latency.trusted)")
    elif "validated" in m:
        lines.append("not validated: the engines cannot run on this machine")
    if "accelerated_op_fraction" in m:
        stages = ", ".join(f"{s.name} " + ("hit" if s.hit else f"{s.seconds:.1f}s") for s in result.stages)
        lines.append(f"{m['accelerated_op_fraction']:.0%} of ops in {m.get('num_engines', 0):.0f} engine(s); {stages}")
    return "\n\n".join(lines)
