"""Tokenizers for the offline checkpoints: a BPE trained in a second on the words a robot's camera questions
and answers use, wrapped as a transformers fast tokenizer (``vlm_tiny_model`` writes it next to the weights)."""

from __future__ import annotations

__all__ = ["IMAGE_TOKEN", "SPECIAL_TOKENS", "TOKENIZER_CORPUS", "train_bpe", "train_qwen2_bpe", "train_tokenizer"]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

# Training text for the tokenizer: the words a robot's camera questions and answers use.
TOKENIZER_CORPUS = """\
USER: What is in the image? ASSISTANT: The image shows a person standing in front of a wall.
Describe the scene. The scene shows a kitchen with a table, two chairs and a coffee cup.
Is there a person in front of the robot? Yes, there is a person about two meters ahead.
What color is the cup? The cup is white and sits on a wooden table next to a plate.
How many people are in the room? There are three people in the room near the door.
Is the path clear? No, a box is blocking the path on the left side of the corridor.
A cat is sitting on the floor and looking at the camera.
A rocket stands on the launch pad under a blue sky with a few clouds.
An astronaut in a white suit holds a helmet and smiles at the camera.
The street is busy with cars, a bus, bicycles and people crossing at the light.
There is a door on the right, and the hallway turns left after the stairs.
The shelf holds books, a plant, a clock and a small red box.
A dog runs across the grass toward a ball near the fence.
Where is the nearest exit? The nearest exit is behind the robot, past the elevator.
Can the robot pass between the chairs? Yes, the gap between the chairs is wide enough.
Is the floor wet? The floor looks dry, but there is a cable on the ground.
What is the person holding? The person is holding a phone in the right hand.
Count the objects on the table: one laptop, two mugs, a notebook and a pen.
The light is on, the window is open and the curtains move in the wind.
A forklift carries a pallet through the warehouse between tall racks.
The camera sees a parking lot with five cars and a truck near the gate.
A child rides a bike on the sidewalk while an adult walks beside her.
The motorcycle is parked in front of a brick building with large windows.
Is anything on fire? No smoke or fire is visible in the image.
Read the sign. The sign says stop, and an arrow points to the left.
The robot arm is above the bin; the green object is closest to the gripper.
What changed since the last frame? A person walked in from the left and sat down.
Answer briefly. Yes. No. Left. Right. Up. Down. Near. Far. Open. Closed.
one two three four five six seven eight nine ten zero meters seconds degrees
red orange yellow green blue purple black white gray brown pink
"""


def train_tokenizer(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS, bos: str = "<s>",
                    eos: str = "</s>", pad: str | None = "<pad>", corpus: str = TOKENIZER_CORPUS,
                    prepend_scheme: str = "first"):
    """BPE (sentencepiece-style "▁" word marks, as Llama) trained on `corpus`, wrapped as a transformers
    fast tokenizer; `special_tokens` first (``<unk>`` among them), `bos` before every encoded text.
    `prepend_scheme` "first" marks a text's first word as Llama-2 does; "never" does not (as Llama-3's
    byte-level tokenizer, where text tokenized in pieces equals the text tokenized at once).

    The alphabet is the corpus's characters plus newline, so every token decodes to printable text
    (a random model emits arbitrary tokens, and ROS strings should not carry control bytes); other
    characters encode as <unk>. "<image>" is a special added token, so the text on either side of it
    is tokenized independently (as in real LLaVA tokenizers).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(vocab_size, special_tokens, corpus, prepend_scheme)
    bos_id = tokenizer.token_to_id(bos)
    # Llama-style: every encoded text starts with the BOS token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>", bos_token=bos, eos_token=eos, pad_token=pad,
        padding_side="left",
    )


def train_bpe(vocab_size: int, special_tokens: tuple[str, ...], corpus: str = TOKENIZER_CORPUS,
              prepend_scheme: str = "first"):
    """The bare ``tokenizers.Tokenizer`` of ``train_tokenizer`` (no post-processor, no transformers wrapper):
    BPE with "\u2581" word marks trained on `corpus`, `special_tokens` first, ``<unk>`` for characters
    outside the corpus's alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=["\n"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tokenizer


def train_qwen2_bpe(vocab_size: int, special_tokens: tuple[str, ...] = (), corpus: str = TOKENIZER_CORPUS):
    """Byte-level BPE trained on `corpus` with Qwen2's own text pipeline (NFC, its split regex, bytes as
    characters), `special_tokens` first; every byte has a token, so there is no ``<unk>`` (as in Qwen's).

    A checkpoint whose ``tokenizer_config.json`` names ``Qwen2Tokenizer`` is loaded by transformers with that
    class's pipeline whatever ``tokenizer.json`` says (only the vocabulary and merges are read from it), so
    its vocabulary has to be learnt through the same pipeline: the one a fresh ``Qwen2Tokenizer`` builds.
    Unlike ``train_bpe``'s, its tokens can decode to any byte, control characters included, as a real
    Qwen tokenizer's can.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    pipeline = Qwen2Tokenizer().backend_tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = pipeline.normalizer
    tokenizer.pre_tokenizer = pipeline.pre_tokenizer
    tokenizer.decoder = pipeline.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    return tokenizer
