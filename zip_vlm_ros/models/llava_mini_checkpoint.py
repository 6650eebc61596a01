"""Reading a LLaVA-Mini checkpoint in its published layout, with no download at run time.

A checkpoint directory (``ICTNLP/llava-mini-llama-3.1-8b``, or ``vlm_tiny_model --preset tiny-mini``)
holds a Llama ``config.json`` with ``model_type: llava_mini_llama`` and LLaVA-Mini's fields
(``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``, ``compressor_size``,
``prefusion_layer_num``, ...), safetensors with the reference implementation's parameter names, and the
Llama-3 tokenizer with its chat template:

  ``model.embed_tokens / model.layers.* / model.norm / lm_head``  the Llama LLM
  ``model.mm_projector.{0,2}.*``                                   the two-layer GELU projector
  ``model.compressor.*``                                           queries, sin-cos table, LayerNorms, attention
  ``model.prefusion_layers.{i}.*``                                 the pre-fusion Llama decoder layers
  ``model.vision_tower.vision_tower.vision_model.*``               CLIP, when the checkpoint holds it

The CLIP tower's config and image preprocessing come from a CLIP directory: the ``vision_tower`` the
caller gives, else ``mm_vision_tower`` as a local path (absolute, or relative to the checkpoint), else
``mm_vision_tower`` as a hub id already in the local Hugging Face cache (``local_files_only``). Its
weights come from the checkpoint when it holds them, else from that directory.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from dataclasses import dataclass

import torch

from zip_vlm_ros.errors import ModelLoadError, first_line
from zip_vlm_ros.models.base import read_config_json

__all__ = ["LlavaMiniConfig", "LlavaMiniParts", "load_llava_mini", "published_tower_state", "read_llava_mini_config"]

MODEL_TYPE = "llava_mini_llama"
PROJECTOR_PREFIX = "model.mm_projector."
COMPRESSOR_PREFIX = "model.compressor."
PREFUSION_PREFIX = "model.prefusion_layers."
VISION_TOWER_PREFIX = "model.vision_tower.vision_tower."
# CLIPVisionModel's own names sit under "vision_model." in checkpoints (transformers 4.x); transformers 5
# drops that level from the module's names and adds it back when saving.
CLIP_PREFIX = "vision_model."
# LLaVA-Mini's fields of a checkpoint config that the Llama LLM does not read.
_NON_LLM_KEYS = ("model_type", "architectures", "auto_map")


@dataclass(frozen=True)
class LlavaMiniConfig:
    """The LLaVA-Mini fields of a checkpoint's config.json, checked, with the reference's defaults."""

    llm: object                         # transformers LlamaConfig of the LLM (and the pre-fusion layers)
    vision_tower: str                   # mm_vision_tower: a path or hub id of the CLIP tower
    vision_hidden: int                  # mm_hidden_size: CLIP's width (the compressor's too)
    feature_layer: int                  # mm_vision_select_layer (-2)
    compressor_size: int                # C: C x C compressed tokens per image
    prefusion_layers: int
    pad_to_square: bool                 # image_aspect_ratio "pad": pad with the mean colour, else resize + crop

    @property
    def tokens_per_image(self) -> int:
        return self.compressor_size ** 2


def read_llava_mini_config(name: str) -> LlavaMiniConfig:
    """The config of the LLaVA-Mini checkpoint directory `name`; ModelLoadError for anything this code
    does not serve (it names the field and the supported value)."""
    from transformers import LlamaConfig

    path = pathlib.Path(name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{name}: LLaVA-Mini checkpoints load from a local directory; download one first "
                             f"(e.g. huggingface-cli download ICTNLP/llava-mini-llama-3.1-8b --local-dir DIR)")
    raw = read_config_json(path, name)
    expected = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch",
                "resolution_ratio": 1, "mm_use_im_start_end": False}
    defaults = {"resolution_ratio": 1, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch"}
    for field, value in expected.items():
        found = raw.get(field, defaults.get(field))
        if found != value:
            raise ModelLoadError(f"{name}: LLaVA-Mini support needs {field} = {value!r} (the released image model); "
                                 f"this checkpoint has {found!r}")
    aspect = raw.get("image_aspect_ratio") or "square"
    if aspect not in ("square", "pad") or "unpad" in (raw.get("mm_patch_merge_type") or ""):
        raise ModelLoadError(f"{name}: LLaVA-Mini support needs image_aspect_ratio 'square' or 'pad' and no "
                             f"'unpad' merge; this checkpoint has {aspect!r}, {raw.get('mm_patch_merge_type')!r}")
    if not raw.get("mm_vision_tower"):
        raise ModelLoadError(f"{name}: config.json names no mm_vision_tower; a LLaVA-Mini checkpoint names its CLIP tower")
    try:
        llm = LlamaConfig(**{key: value for key, value in raw.items() if key not in _NON_LLM_KEYS})
    except Exception as error:
        raise ModelLoadError(f"{name}/config.json is not a Llama config: {first_line(error)}") from error
    return LlavaMiniConfig(
        llm=llm, vision_tower=str(raw["mm_vision_tower"]), vision_hidden=int(raw.get("mm_hidden_size", 1024)),
        feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        compressor_size=int(raw.get("compressor_size", 2)),  # the reference's default when absent
        prefusion_layers=int(raw.get("prefusion_layer_num", 4)), pad_to_square=aspect == "pad")


@dataclass
class LlavaMiniParts:
    """A loaded LLaVA-Mini checkpoint (modules on the device, eval mode, in the requested dtype)."""

    llm: torch.nn.Module                # LlamaForCausalLM
    vision_tower: torch.nn.Module       # CLIPVisionModel
    projector: torch.nn.Module
    compressor: torch.nn.Module
    prefusion: torch.nn.Module
    tokenizer: object
    image_processor: object
    vision_source: str                  # where CLIP's weights came from (for messages)


def load_llava_mini(name: str, config: LlavaMiniConfig, dtype: torch.dtype, device: torch.device,
                    vision_tower: str = "") -> LlavaMiniParts:
    """Every module of the checkpoint `name` by its published parameter names; ModelLoadError in one line."""
    from zip_vlm_ros.models.base import move_to_device
    from zip_vlm_ros.models.llava_mini_modules import Compressor, PreFusion, build_projector

    checkpoint = pathlib.Path(name).expanduser()
    clip_dir = _clip_directory(checkpoint, config.vision_tower, vision_tower)
    tensors = _read_tensors(checkpoint, (PROJECTOR_PREFIX, COMPRESSOR_PREFIX, PREFUSION_PREFIX, VISION_TOWER_PREFIX))
    tokenizer = _load_tokenizer(name, checkpoint)
    image_processor = _image_processor(name, clip_dir, checkpoint)
    llm = _load_llm(name, config, dtype)
    hidden = config.llm.hidden_size
    projector = build_projector(config.vision_hidden, hidden)
    compressor = Compressor(config.compressor_size, config.vision_hidden)
    # The pre-fusion layers share the LLM's config, attention implementation included.
    prefusion = PreFusion(llm.config, config.prefusion_layers)
    for module, prefix in ((projector, PROJECTOR_PREFIX), (compressor, COMPRESSOR_PREFIX),
                           (prefusion.layers, PREFUSION_PREFIX)):
        _load_state(name, module, prefix, tensors)
    tower, vision_source = _load_vision_tower(name, clip_dir, tensors)
    parts = [move_to_device(module.to(dtype).eval(), name, dtype, device)
             for module in (llm, tower, projector, compressor, prefusion)]
    return LlavaMiniParts(*parts, tokenizer=tokenizer, image_processor=image_processor, vision_source=vision_source)


def _load_tokenizer(name: str, checkpoint: pathlib.Path):
    """The tokenizer of the class its tokenizer_config.json names (PreTrainedTokenizerFast for Llama-3).

    Not AutoTokenizer: it parses config.json as a generic config, which fails on fields of the released
    Llama-3.1 config (its ``llama3`` rope_scaling); the tokenizer's own files say everything it needs."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    settings_path = checkpoint / "tokenizer_config.json"
    try:
        settings = json.loads(settings_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{name}: cannot read tokenizer_config.json ({error}); a LLaVA-Mini checkpoint holds "
                             f"its Llama-3 tokenizer (tokenizer_config.json, tokenizer.json)") from None
    class_name = settings.get("tokenizer_class") or "PreTrainedTokenizerFast"
    tokenizer_class = tokenizer_class_from_name(class_name)
    if tokenizer_class is None:
        raise ModelLoadError(f"{name}: tokenizer_config.json names tokenizer_class {class_name!r}, which this "
                             f"transformers does not have")
    try:
        with _transformers_errors_only():
            return tokenizer_class.from_pretrained(str(checkpoint))
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {first_line(error)}") from error


def _clip_directory(checkpoint: pathlib.Path, configured: str, override: str) -> str:
    """The CLIP directory (or cached hub id) that gives the tower's config and preprocessing."""
    if override:
        path = pathlib.Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"vision_tower {override!r} is not a CLIP directory (no config.json); give the "
                                 f"local copy of {configured}")
        return str(path)
    for path in (pathlib.Path(configured).expanduser(), checkpoint / configured):
        if (path / "config.json").is_file():
            return str(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(configured, local_files_only=True)
    except Exception:
        raise ModelLoadError(
            f"{checkpoint}: its CLIP tower {configured!r} is neither a local directory nor in the Hugging Face "
            f"cache, and nothing is downloaded at run time; download it (huggingface-cli download {configured}) "
            f"or give its directory as vision_tower") from None


def _read_tensors(checkpoint: pathlib.Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every safetensors tensor of the checkpoint whose name starts with one of `prefixes` (CPU)."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{checkpoint}: no *.safetensors files; LLaVA-Mini loads safetensors checkpoints "
                             f"(convert .bin weights with transformers' save_pretrained)")
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefixes):
                        tensors[key] = handle.get_tensor(key)
        except Exception as error:
            raise ModelLoadError(f"cannot read {file}: {first_line(error)}") from error
    return tensors


def _load_state(name: str, module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load the tensors under `prefix` into `module`; every parameter must be there, nothing else."""
    state = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        problem = f"lacks {prefix}{missing[0]}" if missing else f"has an unexpected {prefix}{unexpected[0]}"
        raise ModelLoadError(f"{name}: the checkpoint {problem} ({len(missing)} missing, {len(unexpected)} "
                             f"unexpected); it is not a LLaVA-Mini checkpoint of this config")


def _load_llm(name: str, config: LlavaMiniConfig, dtype: torch.dtype):
    """The Llama LLM from the checkpoint's ``model.*`` / ``lm_head.*`` tensors (the others are skipped)."""
    from transformers import LlamaForCausalLM

    try:
        with _transformers_errors_only():  # its report would list every non-LLM tensor as unexpected
            llm, info = LlamaForCausalLM.from_pretrained(str(pathlib.Path(name).expanduser()), config=config.llm,
                                                         dtype=dtype, output_loading_info=True)
    except Exception as error:
        raise ModelLoadError(f"cannot load the weights of {name!r}: {first_line(error)}") from error
    missing = [key for key in info["missing_keys"] if not key.endswith("rotary_emb.inv_freq")]
    if missing:
        raise ModelLoadError(f"{name}: the checkpoint lacks the LLM's {missing[0]} ({len(missing)} missing)")
    return llm


@contextlib.contextmanager
def _transformers_errors_only():
    """transformers' logging at error level for the block (warnings meant for its own model types)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load_vision_tower(name: str, clip_dir: str, tensors: dict[str, torch.Tensor]):
    """``(CLIPVisionModel, where its weights came from)``: the checkpoint's copy, else the CLIP directory's."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    inside = {key[len(VISION_TOWER_PREFIX):].removeprefix(CLIP_PREFIX): tensor for key, tensor in tensors.items()
              if key.startswith(VISION_TOWER_PREFIX)}
    try:
        if not inside:
            return CLIPVisionModel.from_pretrained(clip_dir, local_files_only=True), clip_dir
        tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(clip_dir, local_files_only=True))
    except Exception as error:
        raise ModelLoadError(f"cannot load the CLIP tower from {clip_dir!r} for {name!r}: {first_line(error)}; "
                             f"give a CLIP directory with config.json (and weights unless the checkpoint "
                             f"holds them) as vision_tower") from error
    # Older CLIP state dicts carry position_ids, a buffer transformers now rebuilds.
    inside.pop("embeddings.position_ids", None)
    module_prefix = CLIP_PREFIX if any(key.startswith(CLIP_PREFIX) for key in tower.state_dict()) else ""
    _load_state(name, tower, VISION_TOWER_PREFIX,
                {VISION_TOWER_PREFIX + module_prefix + key: value for key, value in inside.items()})
    return tower, name


def published_tower_state(tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPVisionModel's tensors under the names a LLaVA-Mini checkpoint gives them."""
    return {VISION_TOWER_PREFIX + CLIP_PREFIX + key.removeprefix(CLIP_PREFIX): tensor
            for key, tensor in tower.state_dict().items()}


def _image_processor(name: str, clip_dir: str, checkpoint: pathlib.Path):
    """CLIP's preprocessing, as the reference takes it: from the tower's directory (else the checkpoint's)."""
    from transformers import AutoImageProcessor

    for source in (clip_dir, str(checkpoint)):
        if (pathlib.Path(source) / "preprocessor_config.json").is_file():
            try:
                return AutoImageProcessor.from_pretrained(source, local_files_only=True)
            except Exception as error:
                raise ModelLoadError(f"cannot load the image processor of {source!r}: {first_line(error)}") from error
    raise ModelLoadError(f"{name}: no preprocessor_config.json in the CLIP directory {clip_dir!r} or the checkpoint; "
                         f"give a complete CLIP directory as vision_tower")
