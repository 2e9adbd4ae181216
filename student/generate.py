"""`pipeline generate`: answer a prompt about one image with a trained student (greedy decoding).

    pipeline generate --checkpoint runs/demo/pt --image photo.jpg --prompt "What is in the picture?"

The checkpoint is an `output_dir` of `pipeline train`: the student (`save_pretrained`), its tokenizer (with the
image token and chat template) and its image processor. `prompt_inputs` builds the student's inputs for a prompt
about an image exactly as training did; `pipeline visualize` feeds the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pipeline.data.errors import UsageError
from pipeline.data.images import ImageDecodeError, decode_rgb
from student.checkpoint import load_frozen_student, training_data_config
from student.conversation import messages_from_sample
from student.data import expand_to_square


def read_image(image_path: str) -> Image.Image:
    """The RGB image at `image_path`, decoded as training decodes shard images; UsageError if it cannot be read."""
    try:
        return decode_rgb(Path(image_path).read_bytes())
    except (OSError, ImageDecodeError) as exc:
        raise UsageError(f"cannot read image {image_path}: {exc}") from None


def prompt_inputs(checkpoint: str, tokenizer, image_processor, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    """`pixel_values`, `input_ids`, `attention_mask` for a user turn `prompt` about `image`, followed by the
    assistant's turn, with the pixels the checkpoint was trained on (`pad`ded to a square when it was)."""
    messages = messages_from_sample(None, [{"from": "human", "value": prompt}])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The chat template already holds the special tokens, as in training (student.conversation).
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    if training_data_config(checkpoint).get("image_aspect_ratio") == "pad":
        image = expand_to_square(image, image_processor.image_mean)
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def generate(checkpoint: str, image_path: str, prompt: str, max_new_tokens: int = 64) -> str:
    """The student's greedy answer to `prompt` about the image at `image_path`, special tokens stripped."""
    model, tokenizer, image_processor = load_frozen_student(checkpoint)
    inputs = prompt_inputs(checkpoint, tokenizer, image_processor, read_image(image_path), prompt)
    new_tokens = model.generate(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(new_tokens[0], skip_special_tokens=True).strip()
