"""Int8 calibration data: loaded, checked against the input spec and hashed before any stage runs.

Calibration batches come from the `calibration` group: `random` draws them from the input
spec (its own seed, so they are never validation's inputs), `folder` reads .npy/.pt files
(one batch each: a tensor, a tuple in input order, or a dict by input name) and `factory`
calls a user's importable callable that yields such batches, the way one feeds real images
or token ids. Every way of getting it wrong (a missing folder, a wrong shape, too few
batches, a factory that raises) is one ConfigError line before export spends a second.

The data's sha256 goes into the config (`calibration.digest`) and so into build's cache
key: a folder whose files change gives a new key even though its path did not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import shapes
from pipeline.batches import call_factory, to_sample
from pipeline.dtypes import is_quantized
from pipeline.errors import ArtifactError, ConfigError, typed_line

SUFFIXES = (".npy", ".pt")
# Loop settings -> lowest allowed value (a ConfigError names the setting otherwise).
LOWEST = {"calibration.num_samples": 1, "quantize.max_rounds": 0, "quantize.layers_per_round": 1,
          "quantize.eval_samples": 1, "quantize.latency_iterations": 0}


def check(config: dict[str, Any]) -> None:
    """compile.precision=int8/fp8: the loop settings and the data fit; records its digest in the config.

    Whether the target can quantize is the target's to say (pipeline.checks.check_quantization, first).
    """
    if not is_quantized(config["compile"]["precision"]):
        return
    from omegaconf import OmegaConf

    for key, low in LOWEST.items():
        group, field = key.split(".")
        value = config[group][field]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{key}={value} is out of range: it must be an integer >= {low}.",
                              f"set {key} to {low} or more.")
    input_cfg = OmegaConf.create(config["input"])
    shapes.check(input_cfg)
    batches = load(OmegaConf.create(config["calibration"]), input_cfg, OmegaConf.create(config.get("data") or {}))
    config["calibration"]["digest"] = shapes.digest(batches)


def load(cal, input_cfg, data_cfg=None) -> list[shapes.Sample]:
    """The first calibration.num_samples batches of the configured source, each checked against the spec."""
    count = int(cal.num_samples)
    source = cal.source
    if source == "random":
        return _random(input_cfg, count, int(cal.seed))
    if source == "data":
        return [sample for sample, _ in data_batches(data_cfg, input_cfg, count)]
    if source == "folder":
        items = _folder_items(cal.folder, count)
    else:
        items = _factory_items(cal._target_, dict(cal.kwargs or {}), count)
    return [to_sample(obj, input_cfg, where) for where, obj in items]


def _random(input_cfg, count: int, seed: int) -> list[shapes.Sample]:
    """Seeded batches from the spec; dynamic inputs cycle opt, min, max and random sizes between,
    so ranges cover every size the engine will see (a sequence of 8 is not one of 64)."""
    if not shapes.is_dynamic(input_cfg):
        return shapes.make(input_cfg, shapes.corners(input_cfg)["opt"], count, seed_offset=seed)
    corners = shapes.corners(input_cfg)
    sizes = [corners["opt"], corners["min"], corners["max"], *shapes.random_dims(input_cfg, count, seed)]
    return [shapes.make(input_cfg, sizes[i], 1, seed_offset=seed + i)[0] for i in range(count)]


def data_batches(data_cfg, input_cfg, count: int) -> list:
    """The first `count` (batch, labels) of the data group's calibration split (calibration.source=data)."""
    from pipeline import data

    if not data.present(data_cfg):
        raise ConfigError("calibration.source=data but no data is configured (data=none).",
                          "pick real data, e.g. data=tensors data.path=... data.labels=..., or calibration=default.")
    batches = data.split(data_cfg, input_cfg, "calibration")
    if len(batches) < count:
        raise ConfigError(f"data {data_cfg.name}'s calibration split holds {len(batches)} batch(es), fewer than "
                          f"calibration.num_samples={count}.",
                          f"raise data.calibration_items, or lower calibration.num_samples to {len(batches)}.")
    return batches[:count]


def _folder_items(folder: str | None, count: int) -> list[tuple[str, Any]]:
    fix = "point calibration.folder at a folder of .npy or .pt files (one batch each)."
    if not folder:
        raise ConfigError("calibration.source=folder but calibration.folder is not set.", fix)
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"calibration.folder={folder} is not a folder.", fix)
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if len(files) < count:
        raise ConfigError(f"calibration.folder={folder} holds {len(files)} .npy/.pt file(s), fewer than "
                          f"calibration.num_samples={count}.",
                          f"add batches, or lower calibration.num_samples to {max(len(files), 1)}.")
    return [(f"calibration file {p.name}", _read(p)) for p in files[:count]]


def _read(path: Path):
    """A .npy without pickles, or a .pt through torch's weights-only unpickler: data, never code."""
    import numpy as np
    import torch

    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # numpy and torch raise many types for a bad file
        raise ConfigError(f"calibration file {path} cannot be read: {typed_line(err)}.",
                          "save batches with numpy.save (no pickles) or torch.save of tensors.") from None


def _factory_items(target: str | None, kwargs: dict[str, Any], count: int) -> list[tuple[str, Any]]:
    fix = ("give calibration._target_ an importable callable returning an iterable of batches "
           "(fix it in Python first: calling it shows the traceback).")
    items = call_factory("calibration", target, kwargs, count, fix)
    if len(items) < count:
        raise ConfigError(f"calibration factory {target} yielded {len(items)} batch(es), fewer than "
                          f"calibration.num_samples={count}.",
                          f"yield more batches, or lower calibration.num_samples to {max(len(items), 1)}.")
    return [(f"batch {i} of calibration factory {target}", item) for i, item in enumerate(items)]


def load_checked(cal, input_cfg, data_cfg=None) -> tuple[list[shapes.Sample], str]:
    """The batches again (in a stage's process) and their sha256, refused if they changed since the job was keyed."""
    batches = load(cal, input_cfg, data_cfg)
    found = shapes.digest(batches)
    if cal.digest and found != cal.digest:
        raise ArtifactError("the calibration data changed while the job ran (its sha256 differs from the "
                            "one the build was keyed by).", "run the job again once the data is final.")
    return batches, found


def segment_inputs(gm, batches: list[shapes.Sample]) -> dict[str, list[tuple]]:
    """Each accelerated segment's inputs for every batch, from the fp32 program (hooks on its submodules).

    A segment is calibrated with what really reaches it: the PyTorch ops before it included.
    """
    from pipeline import segments

    found: dict[str, list[tuple]] = {}
    for sample in batches:
        for name, args in segments.capture_inputs(gm, sample).items():
            found.setdefault(name, []).append(tuple(a.cpu().numpy() if hasattr(a, "numpy") else a for a in args))
    return found
