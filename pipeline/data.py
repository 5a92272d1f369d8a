"""Real inputs with labels where they exist: the `data` group, split for calibration and validation.

Agreement with eager PyTorch on noise says little about a trained model: noise does not
exercise its activation ranges and has no labels, so an int8 engine can agree on noise and
lose points on the task. The `data` group names real data in one of three forms:

- `source=images`: a folder in ImageFolder layout (one sub-folder of images per class, the
  class index is the sorted folder order), preprocessed by a named transform
  (`resize_crop_normalize`, `resize_normalize`) to the input spec's size with the model's
  mean and std;
- `source=tensors`: samples in a .npy or .pt file ([N, ...]) and optional integer labels
  in another ([N]); loaded as data (numpy without pickles, torch's weights-only loader);
- `source=factory`: an importable callable by `_target_` returning an iterable of batches,
  each `(inputs, label)` (a tuple one longer than the model's inputs, or a dict with a
  `label` key) or inputs alone.

Items are shuffled with `shuffle_seed`; the first `calibration_items` are the calibration
split (`calibration=data` reads it), the rest the validation split (at most
`validation_items`): the two never share a sample. Samples of images and tensors are
stacked into batches of the input spec's opt batch size (an incomplete last batch is
dropped). The data's sha256 (`data.digest`, set before any stage) keys validate, and the
calibration split's own digest keys the int8 build (pipeline.calibration).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline import shapes
from pipeline.batches import call_factory, to_sample
from pipeline.errors import ConfigError, first_line

Batch = tuple[shapes.Sample, Any]  # (inputs, labels [batch] or None)
TRANSFORMS = ("resize_crop_normalize", "resize_normalize")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def present(data_cfg) -> bool:
    return data_cfg is not None and data_cfg.source != "none"


def split(data_cfg, input_cfg, which: str) -> list[Batch]:
    """The `calibration` or `validation` split as batches of the input spec, labels alongside."""
    items = _items(data_cfg, input_cfg)
    order = list(range(len(items)))
    random.Random(int(data_cfg.shuffle_seed)).shuffle(order)
    cut = int(data_cfg.calibration_items)
    chosen = order[:cut] if which == "calibration" else order[cut:]
    if which == "validation" and data_cfg.validation_items is not None:
        chosen = chosen[: int(data_cfg.validation_items)]
    picked = [items[i] for i in chosen]
    batches = picked if data_cfg.source == "factory" else _stack(picked, input_cfg)
    if not batches:
        raise ConfigError(f"data {data_cfg.name}: its {which} split is empty ({len(items)} item(s), "
                          f"calibration_items={cut}).",
                          "give more data, or move data.calibration_items so both splits hold a batch.")
    source = f"data {data_cfg.name} ({which} split)"
    return [(to_sample(x, input_cfg, f"{source}, batch {i}"), y) for i, (x, y) in enumerate(batches)]


def digest(data_cfg, input_cfg) -> str:
    """sha256 of both splits (inputs and labels), in order: the data's identity, not its path."""
    batches = split(data_cfg, input_cfg, "calibration") + split(data_cfg, input_cfg, "validation")
    label_batches = [shapes.Sample((y,), {}, {}) for _, y in batches if y is not None]
    return shapes.digest([s for s, _ in batches] + label_batches)


def check(config: dict[str, Any]) -> None:
    """Loads the data once before any stage (each mistake one ConfigError line) and records its digest."""
    data = config.get("data")
    if not present(_node(data)):
        return
    from omegaconf import OmegaConf

    if int(data["calibration_items"]) < 0:
        raise ConfigError(f"data.calibration_items={data['calibration_items']} is out of range: it must be >= 0.",
                          "set data.calibration_items to 0 or more.")
    config["data"]["digest"] = digest(OmegaConf.create(data), OmegaConf.create(config["input"]))


def _node(data):
    from omegaconf import OmegaConf

    return OmegaConf.create(data) if isinstance(data, dict) else data


def _items(data_cfg, input_cfg) -> list[tuple[Any, Any]]:
    source = data_cfg.source
    if source == "images":
        return _images(data_cfg, input_cfg)
    if source == "tensors":
        return _tensors(data_cfg)
    return _factory(data_cfg, input_cfg)


def _stack(items: list[tuple[Any, Any]], input_cfg) -> list[tuple[Any, Any]]:
    """Samples grouped into batches of the input spec's opt batch size (first dimension)."""
    import torch

    size = shapes.batch_size(input_cfg, shapes.corners(input_cfg)["opt"])
    out = []
    for start in range(0, len(items) - size + 1, size):
        chunk = items[start:start + size]
        labels = None if chunk[0][1] is None else torch.as_tensor([int(y) for _, y in chunk], dtype=torch.long)
        out.append((torch.stack([torch.as_tensor(x) for x, _ in chunk]), labels))
    return out


def _path(data_cfg, key: str, kind: str) -> Path:
    value = data_cfg[key]
    fix = f"point data.{key} at {kind}."
    if not value:
        raise ConfigError(f"data.source={data_cfg.source} but data.{key} is not set.", fix)
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"data.{key}={value} does not exist.", fix)
    return path


def read_array(path: Path, what: str):
    """A .npy without pickles, or a .pt (tensor) through torch's weights-only loader: data, never code."""
    import numpy as np
    import torch

    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.ascontiguousarray(np.load(path, allow_pickle=False)))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            return tensors[sorted(tensors)[0]]
        value = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # numpy, torch and safetensors raise many types for a bad file
        raise ConfigError(f"{what} {path} cannot be read: {first_line(err)}.",
                          "save arrays with numpy.save (no pickles) or torch.save of a tensor.") from None
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{what} {path} holds a {type(value).__name__}, not a tensor.",
                          "save one tensor (or array) per file.")
    return value


def _tensors(data_cfg) -> list[tuple[Any, Any]]:
    inputs = read_array(_path(data_cfg, "path", "a .npy or .pt file of samples [N, ...]"), "data.path")
    if data_cfg.labels is None:
        return [(x, None) for x in inputs]
    labels = read_array(_path(data_cfg, "labels", "a .npy or .pt file of integer labels [N]"), "data.labels")
    if labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(inputs):
        raise ConfigError(f"data.labels={data_cfg.labels} holds {list(labels.shape)} {labels.dtype} values, "
                          f"not {len(inputs)} integer labels (one per sample of data.path).",
                          "save the labels as a 1-d integer array as long as the samples.")
    return list(zip(inputs, labels.tolist(), strict=True))


def _images(data_cfg, input_cfg) -> list[tuple[Any, Any]]:
    """ImageFolder layout: class sub-folders (sorted: the label), image files inside, transformed."""
    from PIL import Image

    root = _path(data_cfg, "path", "a folder with one sub-folder of images per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    transform = _transform(data_cfg, input_cfg)
    items = []
    for index, folder in enumerate(classes):
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as image:
                    items.append((transform(image), index))
            except OSError as err:
                raise ConfigError(f"data image {file} cannot be read: {first_line(err)}.",
                                  "remove the file or replace it with a valid image.") from None
    if not items:
        raise ConfigError(f"data.path={data_cfg.path} holds no images in class sub-folders.",
                          "lay the images out as data.path/<class>/<image>.png (ImageFolder).")
    return items


def _transform(data_cfg, input_cfg):
    """The named preprocessing: to the spec's channels and size, normalized with data.mean/std."""
    from torchvision import transforms

    name = data_cfg.transform
    if name not in TRANSFORMS:
        raise ConfigError(f"data.transform={name} is not a transform this pipeline knows.",
                          f"use one of {', '.join(TRANSFORMS)}.")
    spec = input_cfg.tensors[0]
    channels, height, width = shapes.shape_of(spec, shapes.corners(input_cfg)["opt"])[-3:]
    steps = [transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB"))]
    if name == "resize_crop_normalize":
        steps += [transforms.Resize(int(data_cfg.resize or round(min(height, width) * 256 / 224))),
                  transforms.CenterCrop((height, width))]
    else:
        steps.append(transforms.Resize((height, width)))
    mean, std = list(data_cfg.mean)[:channels], list(data_cfg.std)[:channels]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def _factory(data_cfg, input_cfg) -> list[tuple[Any, Any]]:
    """A user's callable's batches, each split into (inputs, label or None)."""
    fix = ("give data._target_ an importable callable returning an iterable of batches, each (inputs, label) "
           "or inputs (calling it in Python shows the traceback).")
    items = call_factory("data", data_cfg._target_, dict(data_cfg.kwargs or {}), None, fix)
    count = len(input_cfg.tensors)
    out = []
    for item in items:
        if isinstance(item, dict) and "label" in item:
            out.append(({k: v for k, v in item.items() if k != "label"}, item["label"]))
        elif isinstance(item, (tuple, list)) and len(item) == count + 1:
            out.append((tuple(item[:-1]) if count > 1 else item[0], item[-1]))
        else:
            out.append((item, None))
    return out


def labels_tensor(labels):
    """A batch's labels as a 1-d long tensor (an int, a list or a tensor), or None."""
    import torch

    if labels is None:
        return None
    return torch.as_tensor(labels, dtype=torch.long).reshape(-1)
