"""Small replicas of published checkpoints: ``vlm_published_replica PUBLISHED_DIR OUT_DIR``.

A published checkpoint's own files (``config.json``, ``generation_config.json``, ``tokenizer_config.json``
with its special tokens, chat template, processor and preprocessor configs, the list of its safetensors
weight names) are copied field for field, except that the model gets narrower and shallower:

* widths and depths shrink (``REPLICA_SIZES``: LLM hidden/intermediate/layers/heads, key/value heads in the
  published grouping, CLIP hidden/intermediate/layers/heads, LLaVA-Mini's ``mm_hidden_size``, Qwen2.5-VL's
  vision tower); every other field is unchanged: rope scaling, ``image_grid_pinpoints``, feature layer and
  select strategy, special-token ids, vocabulary size, templates, stop tokens, image sizes, Qwen2.5-VL's
  window size and tied embeddings. Two Qwen2.5-VL fields follow the shrunk sizes by a stated rule
  (``shrink_mrope_section``, ``shrink_window_layout``);
* the tokenizer is a BPE trained in a second on a few KB of text (``train_bpe``; byte-level with Qwen2's
  pipeline, ``train_qwen2_bpe``, for a ``Qwen2Tokenizer``) whose special tokens sit at the published ids;
  ids between the trained vocabulary and the special tokens are filler words (``▁w<id>``, byte-level
  ``Ġw<id>``), so the vocabulary is small where it is learnt and the ids the configs name stay valid;
* the weights are random (seeded) and written as safetensors under the published names, in the
  published shards when the published index is known (``model.safetensors.index.json``), else in as
  many shards as transformers' 5 GB default gives the published model.

LLaVA-Mini (``model_type: llava_mini_llama``) names its CLIP tower by hub id (``mm_vision_tower``);
``build_clip_replica`` shrinks a CLIP directory the same way (vision half only), to pass as the node's
``vision_tower``. The replicas check loading and prompt formats offline; their answers are meaningless.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import shutil
import sys
from dataclasses import dataclass

__all__ = ["REPLICA_SIZES", "ReplicaSizes", "build_clip_replica", "build_replica", "published_weight_names",
           "replica_tokenizer", "shrink_config", "shrink_mrope_section", "shrink_window_layout"]

# Rewritten, not copied: the shrunk config and the index of the shards actually written.
REWRITTEN_FILES = ("config.json", "model.safetensors.index.json")
# transformers' default max_shard_size, which the published llava-hf shards follow (3 x ~5 GB for 7B).
PUBLISHED_SHARD_BYTES = 5 * 10**9
FILLER_PREFIX = "\u2581w"
# Tokenizer classes transformers rebuilds as byte-level BPE with their own pipeline, reading only the
# vocabulary and merges from tokenizer.json: their vocabulary is learnt through that pipeline.
BYTE_LEVEL_TOKENIZERS = ("Qwen2Tokenizer",)
BYTE_LEVEL_FILLER_PREFIX = "\u0120w"  # "Ġ" is the byte-level space: " w<id>" when decoded


@dataclass(frozen=True)
class ReplicaSizes:
    """The shrunk widths and depths (heads divide widths; CLIP keeps the 2 layers feature layer -2 needs)."""

    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vision_hidden: int = 32           # also LLaVA-Mini's compressor width: a multiple of 4 x its 8 heads
    vision_intermediate: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    window_run: int = 1               # Qwen2.5-VL: window-attention layers kept of each published run
    tied_init_std: float = 0.2        # weight init std when the embeddings are tied (the tiny presets' LLM 0.2)
    tokenizer_vocab: int = 600        # learnt tokens before the filler


REPLICA_SIZES = ReplicaSizes()


def shrink_config(published: dict, sizes: ReplicaSizes = REPLICA_SIZES) -> dict:
    """A copy of the published config.json dict with only widths and depths replaced."""
    config = copy.deepcopy(published)
    if config.get("model_type") in ("llava", "llava_next"):
        config["text_config"] = _shrink_text(config.get("text_config", {}), sizes)
        config["vision_config"] = _shrink_vision(config["vision_config"], sizes)
    elif config.get("model_type") == "llava_mini_llama":
        config = _shrink_text(config, sizes)
        config["mm_hidden_size"] = sizes.vision_hidden
    elif config.get("model_type") == "qwen2_5_vl":
        config = _shrink_qwen(config, sizes)
    else:
        raise ValueError(f"no replica for model_type {config.get('model_type')!r}; supported: llava, llava_next, "
                         f"llava_mini_llama, qwen2_5_vl")
    return config


def _shrink_text(text: dict, sizes: ReplicaSizes) -> dict:
    """Llama/Mistral widths and depths; key/value heads keep the published heads-per-group ratio."""
    heads = text.get("num_attention_heads", 32)  # LlamaConfig's and MistralConfig's default
    shrunk = {**text, "hidden_size": sizes.text_hidden, "intermediate_size": sizes.text_intermediate,
              "num_hidden_layers": sizes.text_layers, "num_attention_heads": sizes.text_heads}
    if "num_key_value_heads" in text:
        shrunk["num_key_value_heads"] = max(1, sizes.text_heads * text["num_key_value_heads"] // heads)
    shrunk.pop("head_dim", None)  # follows the width
    return shrunk


def _shrink_qwen(published: dict, sizes: ReplicaSizes) -> dict:
    """Qwen2.5-VL's config as published: the LLM's fields at the top level (the layout before
    ``text_config``), M-RoPE under the old ``"type": "mrope"`` key, the vision tower in ``vision_config``."""
    config = _shrink_text(published, sizes)
    head_dim = published["hidden_size"] // published["num_attention_heads"]
    rope = published["rope_scaling"]
    config["rope_scaling"] = {**rope, "mrope_section": shrink_mrope_section(
        rope["mrope_section"], head_dim, sizes.text_hidden // sizes.text_heads)}
    vision = published["vision_config"]
    depth, full_attention = shrink_window_layout(vision["depth"], vision["fullatt_block_indexes"], sizes.window_run)
    config["vision_config"] = {**vision, "depth": depth, "fullatt_block_indexes": full_attention,
                               "hidden_size": sizes.vision_hidden, "intermediate_size": sizes.vision_intermediate,
                               "num_heads": sizes.vision_heads, "out_hidden_size": sizes.text_hidden}
    return config


def shrink_mrope_section(section: list[int], head_dim: int, replica_head_dim: int) -> list[int]:
    """M-RoPE's (t, h, w) split of a head's rotary frequency pairs, for a narrower head.

    ``mrope_section`` counts frequency pairs (it sums to ``head_dim / 2``: [16, 24, 24] for 128). Frequency
    ``i`` is ``rope_theta ** (-2 i / head_dim)``, so it depends on ``i / head_dim`` alone: scaling every entry
    by ``replica_head_dim / head_dim`` gives t, h and w the same bands of the spectrum in the narrower head
    ([2, 3, 3] for 16). ValueError when an entry does not scale to a whole number of pairs.
    """
    if sum(section) * 2 != head_dim:
        raise ValueError(f"mrope_section {section} sums to {sum(section)}, not head_dim / 2 = {head_dim // 2}")
    scaled = [entry * replica_head_dim // head_dim for entry in section]
    if [entry * head_dim // replica_head_dim for entry in scaled] != list(section) or not all(scaled):
        raise ValueError(f"mrope_section {section} (head dim {head_dim}) does not scale to whole frequency pairs "
                         f"for head dim {replica_head_dim}; choose replica sizes whose head dim divides it evenly")
    return scaled


def shrink_window_layout(depth: int, full_attention: list[int], window_run: int = 1) -> tuple[int, list[int]]:
    """``(depth, fullatt_block_indexes)`` of a shallower Qwen2.5-VL tower with the published pattern.

    Every full-attention layer is kept, in order; every run of window-attention layers (before each
    full-attention layer and after the last) keeps at most `window_run` layers. So the tower still
    alternates window and full attention, the last full-attention layer keeps its place relative to the
    end (the 3B's [7, 15, 23, 31] of 32: the last layer, whose output the merger reads), and windows still
    attend within ``window_size`` pixels: 3B's 32 layers become 8 with full attention at [1, 3, 5, 7].
    """
    if sorted(set(full_attention)) != list(full_attention) or not all(0 <= index < depth for index in full_attention):
        raise ValueError(f"fullatt_block_indexes {full_attention} are not ascending layer indexes below depth {depth}")
    layout, previous = [], -1
    for index in list(full_attention) + [depth]:
        layout += ["window"] * min(window_run, index - previous - 1) + (["full"] if index < depth else [])
        previous = index
    return len(layout), [position for position, kind in enumerate(layout) if kind == "full"]


def _shrink_vision(vision: dict, sizes: ReplicaSizes) -> dict:
    return {**vision, "hidden_size": sizes.vision_hidden, "intermediate_size": sizes.vision_intermediate,
            "num_hidden_layers": sizes.vision_layers, "num_attention_heads": sizes.vision_heads}


def replica_tokenizer(tokenizer_config: dict, sizes: ReplicaSizes = REPLICA_SIZES):
    """A ``tokenizers.Tokenizer`` with the published special tokens at their published ids.

    A vocabulary whose ids start with special tokens (Llama-2's ``<unk> <s> </s>``) is sentencepiece-like:
    its first word gets a word mark. One that does not (Llama-3's byte-level BPE, specials from 128000) is
    not, and gets ``<unk>`` at id 0 for characters outside the training text (a deviation: Llama-3 has none).
    A ``Qwen2Tokenizer`` (``BYTE_LEVEL_TOKENIZERS``) gets a byte-level BPE learnt through its own pipeline,
    which covers every byte and so needs no ``<unk>``, as Qwen's.
    """
    from tokenizers import Tokenizer, processors

    from zip_vlm_ros.tools.tokenizer import train_bpe, train_qwen2_bpe

    added = tokenizer_config["added_tokens_decoder"]
    specials = {int(index): entry["content"] for index, entry in added.items()}
    leading = []
    while len(leading) in specials:
        leading.append(specials[len(leading)])
    filler = FILLER_PREFIX
    if tokenizer_config.get("tokenizer_class") in BYTE_LEVEL_TOKENIZERS:
        trained, filler = train_qwen2_bpe(sizes.tokenizer_vocab, tuple(leading)), BYTE_LEVEL_FILLER_PREFIX
    else:
        trained = train_bpe(sizes.tokenizer_vocab, tuple(leading) or ("<unk>",),
                            prepend_scheme="first" if leading else "never")
    raw = json.loads(trained.to_str())
    vocab = raw["model"]["vocab"]
    for index in range(len(vocab), max(specials) + 1):
        token = specials.get(index, f"{filler}{index}")
        if token in vocab:
            raise ValueError(f"the trained vocabulary already has {token!r}; cannot place it at id {index}")
        vocab[token] = index
    # Special as published: Qwen's <tool_call> and <|fim_*|> are added tokens that decoding keeps.
    raw["added_tokens"] = [{"id": index, "content": content, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": added[str(index)].get("special", True)}
                           for index, content in sorted(specials.items())]
    tokenizer = Tokenizer.from_str(json.dumps(raw))
    bos = tokenizer_config.get("bos_token")
    if isinstance(bos, dict):
        bos = bos["content"]
    if bos and tokenizer_config.get("add_bos_token", True):
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tokenizer


# transformers 5 name prefix -> published prefix, per model type.
LLAVA_HF_RENAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                    ("model.vision_tower.", "vision_tower.vision_model."),
                    ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline"))
PUBLISHED_RENAMES = {
    "llava": LLAVA_HF_RENAMES,
    "llava_next": LLAVA_HF_RENAMES,
    # Qwen/Qwen2.5-VL-*-Instruct: the LLM under model.*, the tower under visual.* (saved before transformers
    # moved them to model.language_model / model.visual; it still loads these names)
    "qwen2_5_vl": (("model.language_model.", "model."), ("model.visual.", "visual."), ("lm_head.", "lm_head.")),
}


def published_weight_names(state_names, model_type: str = "llava") -> dict[str, str]:
    """``{published name: transformers 5 name}`` for a model's state dict in its published layout: for LLaVA
    and LLaVA-NeXT the llava-hf one (``language_model.model.*``, ``language_model.lm_head.*``,
    ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``), for Qwen2.5-VL
    ``model.*``, ``visual.*`` and ``lm_head.*``."""
    renames = PUBLISHED_RENAMES[model_type]
    names = {}
    for name in state_names:
        old, new = next((old, new) for old, new in renames if name.startswith(old))
        names[new + name[len(old):]] = name
    return names


def build_replica(published_dir, out_dir, seed: int = 0, sizes: ReplicaSizes = REPLICA_SIZES) -> pathlib.Path:
    """Write the replica of the published checkpoint files in `published_dir` into `out_dir` (new or
    empty) and return its path. Raises ValueError for an unsupported model type or a used `out_dir`."""
    published_dir = pathlib.Path(published_dir)
    out_dir = _empty_directory(out_dir)
    published = json.loads((published_dir / "config.json").read_text())
    config = shrink_config(published, sizes)
    for source in sorted(published_dir.iterdir()):
        if source.is_file() and source.name not in REWRITTEN_FILES:
            shutil.copyfile(source, out_dir / source.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads((published_dir / "tokenizer_config.json").read_text())
    replica_tokenizer(tokenizer_config, sizes).save(str(out_dir / "tokenizer.json"))
    if config["model_type"] == "llava_mini_llama":
        tensors, published_bytes = _mini_tensors(published, config, seed)
    else:
        tensors, published_bytes = _model_class_tensors(out_dir, published, seed, sizes)
    dtype = published.get("torch_dtype", "float32")
    _write_shards(out_dir, tensors, dtype, _published_shards(published_dir, tensors, published_bytes))
    return out_dir


def build_clip_replica(published_dir, out_dir, seed: int = 0, sizes: ReplicaSizes = REPLICA_SIZES) -> pathlib.Path:
    """A CLIP tower directory (e.g. ``openai/clip-vit-large-patch14-336``): its vision config shrunk, its
    preprocessor config unchanged, random ``CLIPVisionModel`` weights."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    published_dir = pathlib.Path(published_dir)
    out_dir = _empty_directory(out_dir)
    vision = _shrink_vision(json.loads((published_dir / "config.json").read_text()), sizes)
    shutil.copyfile(published_dir / "preprocessor_config.json", out_dir / "preprocessor_config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = CLIPVisionModel(CLIPVisionConfig.from_dict(vision))
    tower.save_pretrained(out_dir)
    (out_dir / "config.json").write_text(json.dumps(vision, indent=2, sort_keys=True) + "\n")
    return out_dir


def _empty_directory(out_dir) -> pathlib.Path:
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; give a new or empty directory for the replica")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _model_class_tensors(out_dir: pathlib.Path, published: dict, seed: int, sizes: ReplicaSizes):
    """``({published name: tensor}, published model bytes)`` for the shrunk config in `out_dir`, built by
    its family's transformers class. Tied output embeddings (Qwen2.5-VL-3B's ``tie_word_embeddings``) are
    left out: the published shards do not hold them, and transformers ties them at load."""
    import torch
    from transformers import AutoConfig

    from zip_vlm_ros.models import FAMILIES

    model_class = FAMILIES[published["model_type"]].model_class()
    config = AutoConfig.from_pretrained(out_dir)
    if config.tie_word_embeddings:
        # At the published 0.02 a random LLM's last hidden state is its input embedding, and with tied
        # embeddings every answer repeats the prompt's last token ("\n"). Only the drawn weights change;
        # config.json keeps the published initializer_range.
        for part in (config, config.get_text_config()):
            part.initializer_range = sizes.tied_init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    state = model.state_dict()
    output = model.get_output_embeddings()
    if output.weight is model.get_input_embeddings().weight:
        del state[next(name for name, module in model.named_modules() if module is output) + ".weight"]
    names = published_weight_names(state, published["model_type"])
    tensors = {published_name: state[name] for published_name, name in names.items()}
    with torch.device("meta"):
        full = model_class(AutoConfig.for_model(**published))
    return tensors, _dtype_bytes(published) * sum(parameter.numel() for parameter in full.parameters())


def _mini_tensors(published: dict, config: dict, seed: int):
    """``({published name: tensor}, published model bytes)`` of a LLaVA-Mini config (no CLIP tower: the
    reference loads it from ``mm_vision_tower``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zip_vlm_ros.models.llava_mini_modules import PreFusion
    from zip_vlm_ros.tools.tiny_model_mini import mini_tensors

    def llm_config(fields: dict):
        return LlamaConfig(**{key: value for key, value in fields.items()
                              if key not in ("model_type", "architectures")})

    # The reference's defaults when the fields are absent.
    layout = dict(compressor_size=config.get("compressor_size", 2),
                  prefusion_layers=config.get("prefusion_layer_num", 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensors = mini_tensors(llm_config(config), config["mm_hidden_size"], **layout)
    full = llm_config(published)
    with torch.device("meta"):
        modules = (LlamaForCausalLM(full), PreFusion(full, layout["prefusion_layers"]))
    return tensors, _dtype_bytes(published) * sum(p.numel() for module in modules for p in module.parameters())


def _dtype_bytes(published: dict) -> int:
    return {"float32": 4}.get(published.get("torch_dtype", "float16"), 2)


def _published_shards(published_dir: pathlib.Path, tensors: dict, published_bytes: int) -> dict[str, str]:
    """``{name: shard file}``: the published index's assignment when there is one (it must list every
    name the replica has), else names in order over as many shards as the published size needs."""
    index_path = published_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        unknown = sorted(set(tensors) - set(weight_map))
        if unknown:
            raise ValueError(f"{index_path} does not list {unknown[0]} ({len(unknown)} replica names unlisted)")
        return {name: weight_map[name] for name in tensors}
    count = max(1, math.ceil(published_bytes / PUBLISHED_SHARD_BYTES))
    names = sorted(tensors)
    return {name: f"model-{position * count // len(names) + 1:05d}-of-{count:05d}.safetensors"
            for position, name in enumerate(names)}


def _write_shards(out_dir: pathlib.Path, tensors: dict, dtype: str, shards: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    for shard in sorted(set(shards.values())):
        save_file({name: tensors[name].to(torch_dtype).contiguous() for name, file in shards.items() if file == shard},
                  str(out_dir / shard), metadata={"format": "pt"})
    total = sum(tensors[name].numel() * torch.finfo(torch_dtype).bits // 8 for name in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shards.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm_published_replica",
        description="Write a small random-weight replica of a published checkpoint from its config files "
                    "(widths, depths and the learnt vocabulary shrunk; every other field as published).")
    parser.add_argument("published_dir", metavar="PUBLISHED_DIR",
                        help="the published files, e.g. test/fixtures/published/llava-hf__llava-1.5-7b-hf")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (empty or new)")
    parser.add_argument("--clip", action="store_true",
                        help="PUBLISHED_DIR is a CLIP tower directory (LLaVA-Mini's mm_vision_tower)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    args = parser.parse_args(argv)
    build = build_clip_replica if args.clip else build_replica
    try:
        path = build(args.published_dir, args.out_dir, seed=args.seed)
    except (OSError, ValueError) as error:
        print(f"vlm_published_replica: {error}", file=sys.stderr)
        return 2
    print(f"{path}: replica of {args.published_dir} with random weights (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
