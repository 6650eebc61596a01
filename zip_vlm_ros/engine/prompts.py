"""Prompt text and token ids: the checkpoint's chat template with the image's visual-token placeholders.

No ROS, no torch: ``PromptFormat`` needs the processor (for its chat template) and the tokenizer.
"""

from __future__ import annotations

from zip_vlm_ros.errors import ModelLoadError, RequestError

__all__ = ["DEFAULT_DESCRIBE_PROMPT", "LLAVA_1_5_PROMPT", "PromptFormat"]

# Used when a checkpoint's processor has no chat template.
LLAVA_1_5_PROMPT = "USER: {image}\n{prompt} ASSISTANT:"
# The scene-description prompt: the node's `describe_prompt` default and vlm_replay's, so that offline
# replay reports describe exactly what the node answers.
DEFAULT_DESCRIBE_PROMPT = "Describe the scene in one sentence."


class PromptFormat:
    """One checkpoint's prompts: ``render`` a question about one image, ``tokenize`` it with the image's
    visual tokens in place of the placeholder.

    Raises ModelLoadError when the tokenizer's image token is not the model's, or when the chat template
    cannot hold one image followed by the question.
    """

    def __init__(self, processor, image_token_id: int, model_name: str, image_slot: str = "{image}"):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        # the template's text around one image's placeholder, which several images' text replaces whole
        self.image_slot = image_slot.format(image=self.image_token)
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != image_token_id:
            raise ModelLoadError(
                f"{model_name}: the tokenizer's {self.image_token!r} token is not the model's image token id "
                f"{image_token_id}; the processor and model files come from different checkpoints")
        probe = "Describe the scene."
        text = self.render(probe)
        if text.count(self.image_slot) != 1 or probe not in text.split(self.image_token, 1)[1]:
            raise ModelLoadError(
                f"{model_name}: its chat template renders {text!r}, which does not place one "
                f"{self.image_token!r} before the question; use a LLaVA-1.5 style template")

    def render(self, prompt: str) -> str:
        """The model's prompt text for one image + `prompt`, with a single image placeholder."""
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return LLAVA_1_5_PROMPT.format(image=self.image_token, prompt=prompt)

    def tokenize(self, prompt: str, visual_tokens: int,
                 image_text: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of the prompt, split after the last visual token: ``(prefix, suffix)``.

        `image_text` replaces the template's image placeholder (several labelled images hold
        `visual_tokens` placeholders in all); None: `visual_tokens` placeholders.

        The text is tokenized in one piece with the placeholder repeated `visual_tokens` times, as the
        LLaVA processor does, so the ids equal the stock processor's; the image token is special, so
        the prefix ids do not depend on the question that follows.
        """
        if image_text is None:
            text = self.render(prompt).replace(self.image_token, self.image_token * visual_tokens)
        else:
            text = self.render(prompt).replace(self.image_slot, image_text)
        # A template that writes <s> itself must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        image_positions = [index for index, token in enumerate(ids) if token == self.image_token_id]
        if len(image_positions) != visual_tokens:
            raise RequestError(f"the prompt produced {len(image_positions)} image tokens instead of {visual_tokens}; "
                               f"remove special tokens from {prompt!r}")
        split = image_positions[-1] + 1
        return tuple(ids[:split]), tuple(ids[split:])
