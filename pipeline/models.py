"""Model construction, precision casting and output flattening, shared by export and validate.

Both stages rebuild the model from its config rather than passing it in memory: the same
factory, kwargs and seed give the same weights, which export records as a hash so that
validate can prove it compares against the very model that was compiled.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.dtypes import model_dtype
from pipeline.errors import ConfigError, PipelineError, typed_line


def caster(precision: str):
    """Floating inputs follow the model's precision; integer inputs (token ids) never do."""
    import torch

    dtype = getattr(torch, model_dtype(precision))
    return lambda t: t.to(dtype) if t.is_floating_point() else t


def cast_model(model, precision: str):
    """fp16/bf16 cast the model; fp32 and int8 leave it as built (a float64 model stays so)."""
    import torch

    dtype = model_dtype(precision)
    return model if dtype == "float32" else model.to(getattr(torch, dtype))


def _factory(target: str):
    """The factory named by model._target_; any failure to import it is the user's to fix, in one line.

    A module can fail at import with any exception (a syntax error, a missing dependency, a
    RuntimeError at module level), and each one means the same thing: this factory cannot be used.
    """
    module_name, _, attr = target.rpartition(".")
    fix = ("pick a model from conf/model/ (model=resnet50) or give an importable "
           "factory: model._target_=package.module.function.")
    if not module_name:
        raise ConfigError(f"model._target_={target!r} is not a dotted path to a factory.", fix)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # sys.exit() at import: a broken module like any other
        missing = isinstance(err, ModuleNotFoundError) and (module_name + ".").startswith(f"{err.name}.")
        why = "is not found" if missing else f"fails at import: {typed_line(err)}"
        raise ConfigError(f"model._target_={target!r} cannot be imported: module {module_name!r} {why.rstrip('.')}.",
                          fix) from err
    if not hasattr(module, attr):
        raise ConfigError(f"model._target_={target!r} cannot be imported: module {module_name!r} "
                          f"has no attribute {attr!r}.", fix)
    return getattr(module, attr)




def build_model(model_cfg: DictConfig):
    """Instantiate the model in eval mode, with seeded random weights unless asked otherwise."""
    import torch

    factory = _factory(model_cfg._target_)
    kwargs: dict[str, Any] = OmegaConf.to_container(model_cfg.kwargs, resolve=True)  # type: ignore[assignment]
    local = weights_file(model_cfg.weights)
    if model_cfg.weights is not None and local is None:
        kwargs["weights"] = model_cfg.weights
    torch.manual_seed(model_cfg.seed)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(
            f"model {model_cfg.name}: {err}.", "check model.kwargs against the factory's signature."
        ) from None
    except (OSError, RuntimeError) as err:
        if model_cfg.weights is not None:
            raise PipelineError(
                f"model {model_cfg.name}: could not load weights {model_cfg.weights!r} ({err}).",
                "use model.weights=null for random weights, or run where the weights can be downloaded.",
            ) from None
        raise _factory_failed(model_cfg, err) from err
    except (Exception, SystemExit) as err:  # the factory's own failure (sys.exit() too): the user's code to fix
        raise _factory_failed(model_cfg, err) from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model._target_={model_cfg._target_!r} returned {type(model).__name__}, not an nn.Module.",
            "point model._target_ at a function or class that returns a torch.nn.Module.",
        )
    if local is not None:
        load_weights(model, local, model_cfg.name)
    return model.eval()


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def weights_file(weights: str | None):
    """model.weights as a local weights file (a path ending in .safetensors/.pt/.pth), else None:
    other values (torchvision's "DEFAULT") go to the factory as its `weights` argument."""
    from pathlib import Path

    if weights is None or not str(weights).endswith(WEIGHT_SUFFIXES):
        return None
    return Path(weights).expanduser()


def load_weights(model, path, name: str) -> None:
    """A state dict from safetensors or torch's weights-only loader (data, never code), strictly."""
    import torch

    fix = "save the model's state_dict with safetensors.torch.save_file or torch.save, for this factory."
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as err:  # a missing file, a pickle, a mismatched key: the weights are the user's to fix
        raise ConfigError(f"model {name}: model.weights={path} cannot be loaded: {typed_line(err)}.", fix) from None


def check_weights(config: dict[str, Any]) -> None:
    """A local weights file exists; its sha256 goes into the config (model.weights_sha256), so every
    stage's key follows its content, not its path."""
    from pathlib import Path

    model = config["model"]
    path = weights_file(model.get("weights"))
    if path is None:
        return
    if not Path(path).is_file():
        raise ConfigError(f"model.weights={model['weights']} is not a file.",
                          "point model.weights at a .safetensors/.pt state dict, or null for random weights.")
    model["weights_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _factory_failed(model_cfg: DictConfig, err: BaseException) -> ConfigError:
    return ConfigError(
        f"model {model_cfg.name}: the factory model._target_={model_cfg._target_!r} raised {typed_line(err).rstrip('.')}.",
        f"fix the factory or model.kwargs (calling {model_cfg._target_}(...) in Python shows the traceback).",
    )


def weights_digest(model) -> str:
    """A hash of every parameter and buffer: proves two builds hold the same weights."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def flat_outputs(out) -> list:
    """Every tensor of a model's output (tensor, tuple, list or dict, nested), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flat_outputs(item)]
    return []
