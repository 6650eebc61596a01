"""Model families the engine serves, one adapter module each.

``zip_vlm_ros.models.llava``       LLaVA-1.5 (``LlavaForConditionalGeneration``): one 336 px image.
``zip_vlm_ros.models.llava_next``  LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes crops.
``zip_vlm_ros.models.qwen2_5_vl``  Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): dynamic resolution,
                                   merged 2x2 patches, M-RoPE positions.
``zip_vlm_ros.models.llava_mini``  LLaVA-Mini (``llava_mini_llama`` checkpoints): one compressed token per
                                   image after modality pre-fusion (``llava_mini_modules``,
                                   ``llava_mini_checkpoint``).

Shared by the families: ``base`` (the adapter interface, visual-token records, loading), ``clip_features``
(a CLIP tower run to the feature layer with the attention the reducers read), ``anyres`` (LLaVA-NeXT's
crop geometry), ``provenance`` (which frame patches each visual token stands for), ``kv_cache`` (forking
and sizing transformers key/value caches).

``load_family`` reads a checkpoint's config, picks the adapter by its ``model_type``, lets it check
the config, and loads weights and processor. A new family is a new module plus an entry in FAMILIES.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import torch

from zip_vlm_ros.errors import ModelLoadError
from zip_vlm_ros.models.base import FamilyAdapter, PromptEmbeddings, VisualTokens, read_config_json
from zip_vlm_ros.models.llava import LlavaAdapter
from zip_vlm_ros.models.llava_mini import LlavaMiniAdapter
from zip_vlm_ros.models.llava_next import LlavaNextAdapter
from zip_vlm_ros.models.provenance import CropBox, TokenProvenance
from zip_vlm_ros.models.qwen2_5_vl import QwenVLAdapter

__all__ = ["FAMILIES", "CropBox", "FamilyAdapter", "PromptEmbeddings", "TokenProvenance", "VisualTokens", "load_family"]

FAMILIES: dict[str, type[FamilyAdapter]] = {
    adapter.model_type: adapter for adapter in (LlavaAdapter, LlavaNextAdapter, LlavaMiniAdapter, QwenVLAdapter)}


def load_family(name: str, dtype: torch.dtype, device: torch.device, contextual_ratio: float,
                clock: Callable[[], float], vision_tower: str = "", max_pixels: int = 0) -> FamilyAdapter:
    """The adapter for checkpoint `name` (a directory or hub id) with its model and processor loaded.

    `vision_tower`: a local CLIP directory for LLaVA-Mini checkpoints that do not hold their tower
    (ignored by the other families). `max_pixels` > 0 bounds a dynamic-resolution family's image size
    (Qwen2.5-VL; ModelLoadError for the others); 0 keeps the processor's. Raises ModelLoadError (one line) for a missing path, an
    unsupported model type or broken files.
    """
    model_type, hf_config = _read_config(name)
    adapter_class = FAMILIES[model_type]
    adapter_class.check_config(name, hf_config)
    adapter = adapter_class.load(name, hf_config, dtype, device, contextual_ratio, clock, vision_tower)
    if max_pixels:
        adapter.limit_pixels(max_pixels)
    return adapter


def _looks_like_local_path(model: str) -> bool:
    """True for paths (absolute, ./ ../ ~, or more than one '/'); hub ids are 'name' or 'org/name'."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model)


def _read_config(model: str):
    """``(model_type, config)`` of a supported family's checkpoint, or a ModelLoadError saying what was
    found instead. Each family reads its own config (LLaVA-Mini's model type is not transformers')."""
    path = pathlib.Path(model).expanduser()
    if path.exists() or _looks_like_local_path(model):
        if not path.exists():
            raise ModelLoadError(f"model path {model!r} does not exist; give a LLaVA checkpoint directory or a "
                                 f"hub id such as llava-hf/llava-1.5-7b-hf")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {model!r} is not a transformers checkpoint (no config.json); give a "
                                 f"LLaVA checkpoint directory")
        raw = read_config_json(path, model)
        _check_model_type(model, raw.get("model_type"), raw.get("architectures"))
        return raw["model_type"], FAMILIES[raw["model_type"]].read_config(model)
    config = FamilyAdapter.read_config(model)
    _check_model_type(model, config.model_type, getattr(config, "architectures", None))
    return config.model_type, config


def _check_model_type(model: str, model_type, architectures) -> None:
    if model_type not in FAMILIES:
        supported = ", ".join(f"{adapter.label} (model_type {adapter.model_type!r})" for adapter in FAMILIES.values())
        raise ModelLoadError(
            f"{model} is not a LLaVA checkpoint: its config has model_type {model_type!r} "
            f"(architectures {architectures!r}); use one of {supported}, e.g. llava-hf/llava-1.5-7b-hf, "
            f"llava-hf/llava-v1.6-vicuna-7b-hf or a local copy of ICTNLP/llava-mini-llama-3.1-8b")
