"""Offline LLaVA checkpoints with random weights: ``vlm_tiny_model OUT_DIR --preset PRESET``.

No model weights can be downloaded where this package is tested, so the tests and benchmarks build
their own LLaVA checkpoints: a ``LlavaConfig`` (CLIP vision tower + Llama language model) with
random but seeded weights, a byte-level BPE tokenizer trained on a few KB of scene descriptions, a
``CLIPImageProcessor`` and a ``LlavaProcessor`` with a LLaVA-1.5 chat template, all written with
``save_pretrained``. They load through exactly the code path of a real checkpoint
(``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``).

Presets:
  tiny   56 px images (16 patches + CLS), 3 CLIP layers, a 2-layer 64-wide Llama: builds and runs
         in about a second, and budgets such as 4 or 8 tokens reduce the 16 visual tokens.
  bench  LLaVA-1.5's token geometry (336 px, patch 14, 576 patches + CLS, 24 encoder layers,
         feature layer -2, "default" select strategy) with LLaVA-1.5-7B's cost proportions: a
         narrow vision tower that takes about 5 % of full-token time to first token and an
         8-layer, 2048-wide Llama whose 600-token prefill takes seconds on 2 CPU cores.
  tiny-next   LLaVA-NeXT (AnyRes, ``LlavaNextForConditionalGeneration``) with the tiny preset's
         sizes: 56 px crops (16 patches + CLS) and LLaVA-NeXT's grid pinpoints scaled by 1/6, so a
         wide frame becomes a base image plus a 2x2 grid of crops.
  bench-next  LLaVA-NeXT-7B's geometry (336 px crops, its ``image_grid_pinpoints``, a 1280x720 frame
         = base + 2x2 grid = 1948 full visual tokens) with the bench preset's tower and Llama.
  tiny-mini, bench-mini  LLaVA-Mini (one compressed token per image, 4 pre-fusion layers) with the tiny
         and bench presets' tower and Llama, in the layout of the released LLaVA-Mini checkpoint
         (``zip_vlm_ros.tools.tiny_model_mini``), so they load through the code that loads the real one.
  tiny-qwen2.5-vl  Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, ``zip_vlm_ros.tools.tiny_model_qwen``):
         a 3-layer window-attention tower (full attention in the last), 2x2 merger, a 2-layer M-RoPE LLM,
         images of up to 36 merged tokens (168x168 px).
  bench-qwen2.5-vl  Qwen2.5-VL-3B's vision geometry (patch 14, merge 2, window 112, 32 layers, full
         attention at 7/15/23/31) with a narrow tower and the bench preset's LLM; max_pixels 1280*28*28.

The text they generate is meaningless; they exist to exercise and time the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace

from zip_vlm_ros.tools.tiny_model_qwen import QWEN_PRESETS, write_qwen_checkpoint
from zip_vlm_ros.tools.tokenizer import IMAGE_TOKEN, train_tokenizer

# Written last: its presence means the directory holds a complete checkpoint of that preset.
MARKER_FILE = "zip_vlm_tiny_model.json"
MARKER_FORMAT = 1

# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT:". Images come before the text of a turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper }}: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }} "
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}<image>\n{% endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }} {% endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

@dataclass(frozen=True)
class Preset:
    """Geometry and size of one offline checkpoint."""

    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    text_hidden_size: int
    text_intermediate_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    max_position_embeddings: int
    tokenizer_vocab_size: int
    # Larger than the usual 0.02 so that attention and MLP outputs are not swamped by the residual
    # stream: the random model's next token then depends on the image and the whole prompt.
    text_initializer_range: float
    # AnyRes resolutions (height, width) of a LLaVA-NeXT checkpoint; None builds a LLaVA-1.5 one.
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    # LLaVA-Mini: C (C x C compressed tokens per image) and its pre-fusion layers; None: not LLaVA-Mini.
    compressor_size: int | None = None
    prefusion_layers: int = 4


# LLaVA-NeXT's (llava-v1.6-*) image_grid_pinpoints, in 336 px crops.
NEXT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _scaled_pinpoints(crop_size: int) -> tuple[tuple[int, int], ...]:
    """NEXT_GRID_PINPOINTS for crops of `crop_size` px instead of 336 (same grid shapes)."""
    return tuple((height * crop_size // 336, width * crop_size // 336) for height, width in NEXT_GRID_PINPOINTS)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        image_size=56, patch_size=14,
        vision_hidden_size=32, vision_intermediate_size=64, vision_layers=3, vision_heads=4,
        text_hidden_size=64, text_intermediate_size=128, text_layers=2, text_heads=4, text_kv_heads=2,
        max_position_embeddings=1024, tokenizer_vocab_size=600, text_initializer_range=0.2,
    ),
    "bench": Preset(
        image_size=336, patch_size=14,
        vision_hidden_size=128, vision_intermediate_size=512, vision_layers=24, vision_heads=2,
        text_hidden_size=2048, text_intermediate_size=5504, text_layers=8, text_heads=16, text_kv_heads=16,
        max_position_embeddings=4096, tokenizer_vocab_size=1000, text_initializer_range=0.02,
    ),
}
PRESETS["tiny-next"] = replace(PRESETS["tiny"], grid_pinpoints=_scaled_pinpoints(56))
PRESETS["bench-next"] = replace(PRESETS["bench"], grid_pinpoints=NEXT_GRID_PINPOINTS)
PRESETS["tiny-mini"] = replace(PRESETS["tiny"], compressor_size=1)
PRESETS["bench-mini"] = replace(PRESETS["bench"], compressor_size=1)


def _llava_config(preset: Preset, tokenizer):
    """LlavaConfig (or LlavaNextConfig with AnyRes pinpoints) for `preset`, token ids from `tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision_config = CLIPVisionConfig(
        hidden_size=preset.vision_hidden_size,
        intermediate_size=preset.vision_intermediate_size,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        projection_dim=preset.vision_hidden_size,
        hidden_act="quick_gelu",
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden_size,
        intermediate_size=preset.text_intermediate_size,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.text_initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    num_patches = (preset.image_size // preset.patch_size) ** 2
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if preset.grid_pinpoints is None:
        return LlavaConfig(**common)
    return LlavaNextConfig(**common, image_grid_pinpoints=[list(pinpoint) for pinpoint in preset.grid_pinpoints])


def _processor(preset: Preset, tokenizer):
    """LlavaProcessor (LlavaNextProcessor for AnyRes): CLIP preprocessing at the preset's resolution,
    tokenizer and chat template."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # The PIL backends need no torchvision; OpenAI CLIP's mean/std are their defaults.
    sizes = dict(size={"shortest_edge": preset.image_size},
                 crop_size={"height": preset.image_size, "width": preset.image_size}, do_center_crop=True)
    common = dict(tokenizer=tokenizer, patch_size=preset.patch_size, vision_feature_select_strategy="default",
                  chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    if preset.grid_pinpoints is None:
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**sizes), **common)
    image_processor = LlavaNextImageProcessorPil(
        **sizes, image_grid_pinpoints=[list(pinpoint) for pinpoint in preset.grid_pinpoints])
    return LlavaNextProcessor(image_processor=image_processor, **common)


def _read_marker(out_dir: pathlib.Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: pathlib.Path, preset: str, seed: int) -> bool:
    marker = _read_marker(out_dir)
    return marker is not None and marker.get("format") == MARKER_FORMAT and \
        marker.get("preset") == preset and marker.get("seed") == seed


def build_checkpoint(out_dir, preset: str = "tiny", seed: int = 0) -> pathlib.Path:
    """Write a random-weight LLaVA checkpoint of `preset` into `out_dir` and return its path.

    Idempotent: if `out_dir` already holds a complete checkpoint of this preset and seed it is
    returned as is. The checkpoint is built in a sibling temporary directory and renamed into place,
    so a reader never sees a half-written one and concurrent builders do not collide.
    Raises ValueError for an unknown preset or an `out_dir` that holds something else.
    """
    if preset not in PRESETS and preset not in QWEN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join([*PRESETS, *QWEN_PRESETS])}")
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    if _is_complete(out_dir, preset, seed):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        marker = _read_marker(out_dir)
        found = f"a {marker.get('preset')!r} checkpoint with seed {marker.get('seed')}" if marker else "other files"
        raise ValueError(f"{out_dir} already holds {found}; give an empty or new directory for the "
                         f"{preset!r} checkpoint with seed {seed}")

    spec = PRESETS[preset] if preset in PRESETS else QWEN_PRESETS[preset]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if preset in QWEN_PRESETS:
            write_qwen_checkpoint(staging, spec, seed)
        elif spec.compressor_size is None:
            _write_llava_checkpoint(staging, spec, seed)
        else:
            from zip_vlm_ros.tools.tiny_model_mini import write_mini_checkpoint

            write_mini_checkpoint(staging, spec, seed)
        marker = {"format": MARKER_FORMAT, "preset": preset, "seed": seed, "preset_spec": asdict(spec)}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(staging, 0o755)
        try:
            # rename(2) replaces an empty directory atomically; a non-empty one means another
            # builder won the race.
            os.replace(staging, out_dir)
        except OSError:
            if not _is_complete(out_dir, preset, seed):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_llava_checkpoint(out_dir: pathlib.Path, spec: Preset, seed: int) -> None:
    """A LLaVA-1.5 (or LLaVA-NeXT) checkpoint of `spec` with its processor, written into `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    tokenizer = train_tokenizer(spec.tokenizer_vocab_size)
    config = _llava_config(spec, tokenizer)
    # Weight init draws from torch's global generator: seed it, and leave it as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_class = LlavaForConditionalGeneration if spec.grid_pinpoints is None else \
            LlavaNextForConditionalGeneration
        model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    _processor(spec, tokenizer).save_pretrained(out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm_tiny_model",
        description="Write a random-weight LLaVA checkpoint (CLIP + Llama, tokenizer, processor) "
                    "that loads like a real one. For tests and benchmarks: the text it generates "
                    "is meaningless.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (empty or new)")
    parser.add_argument("--preset", choices=sorted([*PRESETS, *QWEN_PRESETS]), default="tiny",
                        help="tiny: seconds to build and run; bench: LLaVA-1.5 token geometry and "
                             "cost proportions; tiny-next, bench-next: the same as LLaVA-NeXT (AnyRes "
                             "crops) checkpoints; tiny-mini, bench-mini: the same as LLaVA-Mini "
                             "checkpoints; tiny-qwen2.5-vl, bench-qwen2.5-vl: Qwen2.5-VL checkpoints "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = build_checkpoint(args.out_dir, preset=args.preset, seed=args.seed)
    except ValueError as error:
        print(f"vlm_tiny_model: {error}", file=sys.stderr)
        return 2
    if args.preset in QWEN_PRESETS:
        qwen = QWEN_PRESETS[args.preset]
        print(f"{path}: {args.preset} Qwen2.5-VL checkpoint with random weights (seed {args.seed}), up to "
              f"{qwen.max_pixels} px per image ({qwen.max_pixels // (qwen.patch_size * qwen.merge_size) ** 2} merged "
              f"visual tokens), {qwen.vision_layers}-layer vision tower, {qwen.text_layers}-layer "
              f"{qwen.text_hidden_size}-wide LLM")
        return 0
    spec = PRESETS[args.preset]
    patches = (spec.image_size // spec.patch_size) ** 2
    family = "LLaVA" if spec.grid_pinpoints is None else "LLaVA-NeXT (AnyRes)"
    if spec.compressor_size is not None:
        family = f"LLaVA-Mini ({spec.compressor_size ** 2} token(s) per image, {spec.prefusion_layers} pre-fusion layers)"
    images = f"{spec.image_size} px images" if spec.grid_pinpoints is None else \
        f"{spec.image_size} px crops on grids {', '.join(f'{h}x{w}' for h, w in spec.grid_pinpoints)}"
    print(f"{path}: {args.preset} {family} checkpoint with random weights (seed {args.seed}), {images}, "
          f"{patches} visual tokens per crop, {spec.vision_layers}-layer vision tower, "
          f"{spec.text_layers}-layer {spec.text_hidden_size}-wide Llama")
    return 0


if __name__ == "__main__":
    sys.exit(main())
