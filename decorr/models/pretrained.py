"""Pretrained weights as their publishers ship them, with the preprocessing they were trained with.

- ``torchvision.NAME=ENUM`` (``DEFAULT``, ``IMAGENET1K_V2``, ...): the weights file in torch hub's cache
  (``$TORCH_HOME/hub/checkpoints``; downloaded there with its hash checked when missing), read with
  ``weights_only=True``, and the weights' own ``transforms()`` (resize, centre crop, interpolation,
  antialias, mean/std) as a :class:`~decorr.models.foreign.Preprocessed` module in front of the model;
- ``timm.NAME=pretrained`` (timm's own loader, from the Hugging Face cache or a download) and
  ``timm.NAME=FILE``: mean, std, input size, crop fraction and interpolation of timm's
  ``resolve_data_config`` (the model's ``pretrained_cfg``), applied as timm's eval transform applies them;
- ``robustbench.NAME`` (:mod:`decorr.models.robustbench`).

Each returns its results record (weights' identity, file, sha256, preprocessing) beside the module.
With the spec option ``transforms=normalize`` only the weights' mean/std go in front (protocols such as
TransferAttack's feed images already at the model's size); ``transforms=none`` puts nothing in front.
"""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch.nn as nn

from decorr.errors import DecorrError, short_reason
from decorr.models.weights import read_state_dict, sha256_of

__all__ = ["TRANSFORM_MODES", "names_pretrained", "timm_pretrained", "timm_preprocess", "torchvision_preprocess",
           "torchvision_weights"]

TRANSFORM_MODES = ("weights", "normalize", "none")
_WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_HASH = re.compile(r"-([a-f0-9]*)\.")


def names_pretrained(arch: str | None, weights: str | None) -> bool:
    """Whether ``ARCH=WEIGHTS`` names published weights (``torchvision.NAME=DEFAULT``, ``timm.NAME=pretrained``)
    rather than a file (a file of that name wins)."""
    arch, weights = arch or "", weights or ""
    if Path(weights).exists():
        return False
    return (arch.startswith("torchvision.") and bool(_WEIGHTS_NAME.fullmatch(weights))) or \
        (arch.startswith("timm.") and weights == "pretrained")


# ------------------------------------------------------------------------------------------------
# torchvision


def torchvision_weights(arch: str, name: str) -> tuple[dict[str, Any], Any, Path]:
    """The state dict, the weights enum and the cached file of torchvision's weights ``name`` for ``arch``."""
    import torch.hub
    import torchvision

    model = arch[len("torchvision."):]
    try:
        weights = torchvision.models.get_model_weights(model)[name]
    except (KeyError, ValueError):
        raise DecorrError(f"torchvision has no weights {name!r} for {model}; use DEFAULT or one of its "
                          "*_Weights names (e.g. IMAGENET1K_V1), or a weights file") from None
    filename = os.path.basename(urlparse(weights.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        _download(weights.url, path, model, str(weights))
    return read_state_dict(path), weights, path


def _download(url: str, path: Path, model: str, what: str) -> None:
    import torch.hub

    found = _HASH.search(path.name)
    previous = socket.getdefaulttimeout()
    try:
        if previous is None:
            socket.setdefaulttimeout(20.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), found.group(1) if found else None, progress=False)
    except Exception as err:  # noqa: BLE001 - URLError, timeouts, hash mismatch: all "no weights"
        raise DecorrError(f"cannot download torchvision weights {what} for {model} ({type(err).__name__}: "
                          f"{short_reason(err, 160)}); this needs internet once (cached in {path.parent}), or give "
                          "a weights file") from None
    finally:
        socket.setdefaulttimeout(previous)


def torchvision_preprocess(weights: Any, mode: str = "weights") -> dict[str, Any]:
    """The preprocessing of ``weights.transforms()`` as a :class:`Preprocessed` entry (``mode`` normalize:
    mean and std only)."""
    if mode == "none":
        return {}
    transform = weights.transforms()
    record: dict[str, Any] = {"mean": [float(v) for v in transform.mean], "std": [float(v) for v in transform.std]}
    if mode == "normalize":
        return record
    return {"resize": [int(v) for v in transform.resize_size], "crop": [int(v) for v in transform.crop_size],
            "interpolation": transform.interpolation.value, "antialias": bool(transform.antialias), **record}


# ------------------------------------------------------------------------------------------------
# timm


def timm_pretrained(arch: str, kwargs: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(NAME, pretrained=True)`` and the record of the weights it loaded."""
    import timm

    name = arch[len("timm."):]
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    if not timm.is_model(name):
        raise DecorrError(f"timm has no model {name!r}; see timm.list_models() for the names")
    source = None if cfg is None else (cfg.hf_hub_id or cfg.url or cfg.file)
    if not source:
        raise DecorrError(f"timm has no pretrained config with weights for {name!r}; name a tagged model with "
                          "weights (timm.list_models(pretrained=True)) or give a weights file: timm.NAME=FILE")
    try:
        net = timm.create_model(name, pretrained=True, **dict(kwargs))
    except Exception as err:  # noqa: BLE001 - download, cache and build failures: all "no weights"
        raise DecorrError(f"timm cannot load the pretrained weights of {name!r} ({type(err).__name__}: "
                          f"{short_reason(err, 160)}); this needs internet once (Hugging Face cache), or give a "
                          "weights file: timm.NAME=FILE") from None
    path = _timm_file(cfg)
    record = {"weights": f"timm:{name}", "pretrained_source": source, "weights_file": str(path) if path else None,
              "sha256": sha256_of(path) if path else None}
    return net, record


def _timm_file(cfg: Any) -> Path | None:
    """The file timm read the weights from (the Hugging Face or torch hub cache), when it can be found."""
    if cfg.file:
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if filename:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str):
                    return Path(found)
    if cfg.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        return path if path.is_file() else None
    return None


def timm_preprocess(net: nn.Module, mode: str = "weights") -> tuple[dict[str, Any], dict[str, Any]]:
    """timm's eval preprocessing of ``net`` (``resolve_data_config``: input size, crop_pct, crop_mode,
    interpolation, mean, std) as a :class:`Preprocessed` entry, as ``transforms_imagenet_eval`` applies it,
    and the data config itself (for the results)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=net)
    resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    if mode == "none":
        return {}, resolved
    record: dict[str, Any] = {"mean": [float(v) for v in config["mean"]], "std": [float(v) for v in config["std"]]}
    if mode == "normalize":
        return record, resolved
    size = [int(v) for v in config["input_size"][-2:]]
    crop_pct = config.get("crop_pct") or 0.875
    mode_ = config.get("crop_mode") or "center"
    scale = [math.floor(v / crop_pct) for v in size]
    if mode_ == "center" and scale[0] == scale[1]:
        resize: list[int] = [scale[0]]  # the shorter side, as torchvision's Resize(int)
    elif mode_ == "squash":
        resize = scale
    else:
        raise DecorrError(f"timm's crop_mode {mode_!r} with input size {size} is not supported; give "
                          "transforms=normalize,input_size=HxW instead")
    interpolation = config.get("interpolation") or "bilinear"
    return {"resize": resize, "crop": size, "interpolation": interpolation, "antialias": True, **record}, resolved
