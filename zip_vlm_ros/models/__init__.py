"""Model families the engine serves, one adapter module each.

``zip_vlm_ros.models.llava``       LLaVA-1.5 (``LlavaForConditionalGeneration``): one 336 px image.
``zip_vlm_ros.models.llava_next``  LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes crops.

``load_family`` reads a checkpoint's config, picks the adapter by its ``model_type``, lets it check
the config, and loads weights and processor. A new family is a new module plus an entry in FAMILIES.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

import torch

from zip_vlm_ros.errors import ModelLoadError, first_line
from zip_vlm_ros.models.base import FamilyAdapter, VisualTokens, load_weights_and_processor
from zip_vlm_ros.models.llava import LlavaAdapter
from zip_vlm_ros.models.llava_next import LlavaNextAdapter

__all__ = ["FAMILIES", "FamilyAdapter", "VisualTokens", "load_family"]

FAMILIES: dict[str, type[FamilyAdapter]] = {adapter.model_type: adapter for adapter in (LlavaAdapter, LlavaNextAdapter)}


def load_family(name: str, dtype: torch.dtype, device: torch.device, contextual_ratio: float,
                clock: Callable[[], float]) -> FamilyAdapter:
    """The adapter for checkpoint `name` (a directory or hub id) with its model and processor loaded.

    Raises ModelLoadError (one line) for a missing path, an unsupported model type or broken files.
    """
    hf_config = _read_config(name)
    adapter_class = FAMILIES[hf_config.model_type]
    adapter_class.check_config(name, hf_config)
    model, processor = load_weights_and_processor(name, adapter_class.model_class(), dtype, device)
    return adapter_class(name, hf_config, model, processor, contextual_ratio, clock)


def _looks_like_local_path(model: str) -> bool:
    """True for paths (absolute, ./ ../ ~, or more than one '/'); hub ids are 'name' or 'org/name'."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model)


def _read_config(model: str):
    """The checkpoint's config of a supported family, or a ModelLoadError saying what was found instead."""
    from transformers import AutoConfig

    path = pathlib.Path(model).expanduser()
    if path.exists() or _looks_like_local_path(model):
        if not path.exists():
            raise ModelLoadError(f"model path {model!r} does not exist; give a LLaVA checkpoint directory or a "
                                 f"hub id such as llava-hf/llava-1.5-7b-hf")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {model!r} is not a transformers checkpoint (no config.json); give a "
                                 f"LLaVA checkpoint directory")
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{model}/config.json cannot be read ({error}); re-download the checkpoint") from None
        _check_model_type(model, raw.get("model_type"), raw.get("architectures"))
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as error:
        raise ModelLoadError(f"cannot load model {model!r}: {first_line(error)}") from error
    _check_model_type(model, config.model_type, getattr(config, "architectures", None))
    return config


def _check_model_type(model: str, model_type, architectures) -> None:
    if model_type not in FAMILIES:
        supported = ", ".join(f"{adapter.model_class().__name__} ({adapter.label})" for adapter in FAMILIES.values())
        raise ModelLoadError(
            f"{model} is not a LLaVA checkpoint: its config has model_type {model_type!r} "
            f"(architectures {architectures!r}); use one of {supported}, e.g. llava-hf/llava-1.5-7b-hf or "
            f"llava-hf/llava-v1.6-vicuna-7b-hf")
