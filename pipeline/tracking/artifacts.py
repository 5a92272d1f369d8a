"""A run's files in MLflow: enough to rebuild its program anywhere, each heavy file stored once.

Reports, manifests, configs and the log go with every run. The stage files that
`pipeline.load` needs (export's and lower's programs, build's engines) are stored once
per stage key in an experiment: a job whose stage came from the cache holds the very
same bytes as the run that stored them first, so it records a reference
(`files.<stage>` = that run) instead of another copy, and the first run is tagged
`stored.<stage>` = the key. `download_run` follows those references, so
`pipeline.load("runs:/<run_id>")` works for either run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import layout

# Small files every run carries (JSON reports and manifests, configs, the log).
ALWAYS = ("*/manifest.json", "partition/*.json", "validate/report.json", "validate/*.png", "lower/ops.json", "export/model.json",
          "convert/segments.json", "build/*.json", "payoff/report.json",
          layout.RUN_CONFIG, layout.RUN_JSON, layout.CONSOLE_LOG)
# Stages whose files pipeline.load needs, stored once per stage key.
STORED = ("export", "lower", "build")


def log_run(client, experiment_id: str, run_id: str, run_dir: Path, keys: dict[str, str], log_engines: bool) -> None:
    """Upload a run folder's artifacts; stage files only where no earlier run of the experiment holds them."""
    from mlflow.entities import RunTag

    sent: set[Path] = set()
    for pattern in ALWAYS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file() and path not in sent:
                sent.add(path)
                _upload(client, run_id, run_dir, path)
    tags = []
    local = _local_root(client, run_id)
    for stage in STORED:
        if stage not in keys or (stage == "build" and not log_engines):
            continue
        owner = _owner(client, experiment_id, stage, keys[stage])
        if owner is not None:
            tags.append(RunTag(f"files.{stage}", owner))
            continue
        for path in sorted((run_dir / stage).rglob("*")):
            if path.is_file() and path not in sent:
                if local is not None:
                    _link(path, local / path.relative_to(run_dir))
                _upload(client, run_id, run_dir, path)
        tags.append(RunTag(f"stored.{stage}", keys[stage]))
    if tags:
        client.log_batch(run_id, tags=tags)


def _local_root(client, run_id: str) -> Path | None:
    """The run's artifact folder where it is a local folder (the default store's mlartifacts), else None."""
    from urllib.parse import urlparse

    uri = urlparse(client.get_run(run_id).info.artifact_uri)
    return Path(uri.path) if uri.scheme in ("", "file") else None


def _link(path: Path, dst: Path) -> None:
    """A hard link of a stage file where MLflow would copy it (MLflow skips a destination that is
    the same file): programs and engines of hundreds of MB cost no copy. The files are cache
    entries, read-only and never edited in place (pipeline.cache). Where linking fails, MLflow copies."""
    import os

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dst)
    except OSError:
        pass


def _upload(client, run_id: str, run_dir: Path, path: Path) -> None:
    rel = path.relative_to(run_dir).parent.as_posix()
    client.log_artifact(run_id, str(path), None if rel == "." else rel)


def _owner(client, experiment_id: str, stage: str, key: str) -> str | None:
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.`stored.{stage}` = '{key}'")
    return runs[0].info.run_id if runs else None


def download_run(client, run_id: str, dst: Path) -> Path:
    """The run's files as a run folder, the stage files fetched from the runs that store them."""
    dst.mkdir(parents=True, exist_ok=True)
    client.download_artifacts(run_id, "", str(dst))
    tags: dict[str, Any] = client.get_run(run_id).data.tags
    for stage in STORED:
        owner = tags.get(f"files.{stage}")
        if owner:
            client.download_artifacts(owner, stage, str(dst))
    return dst
