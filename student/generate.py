"""`pipeline generate`: answer a prompt about one image with a trained student (greedy decoding).

    pipeline generate --checkpoint runs/demo/pt --image photo.jpg --prompt "What is in the picture?"

The checkpoint is an `output_dir` of `pipeline train`: the student (`save_pretrained`), its tokenizer (with the
image token and chat template) and its image processor.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.errors import UsageError
from pipeline.data.images import ImageDecodeError, decode_rgb
from student.checkpoint import load_frozen_student, training_data_config
from student.conversation import messages_from_sample
from student.data import expand_to_square


def generate(checkpoint: str, image_path: str, prompt: str, max_new_tokens: int = 64) -> str:
    """The student's greedy answer to `prompt` about the image at `image_path`, special tokens stripped."""
    model, tokenizer, image_processor = load_frozen_student(checkpoint)
    try:
        image = decode_rgb(Path(image_path).read_bytes())
    except (OSError, ImageDecodeError) as exc:
        raise UsageError(f"cannot read image {image_path}: {exc}") from None
    messages = messages_from_sample(None, [{"from": "human", "value": prompt}])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The chat template already holds the special tokens, as in training (student.conversation).
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    if training_data_config(checkpoint).get("image_aspect_ratio") == "pad":
        image = expand_to_square(image, image_processor.image_mean)  # the pixels the student was trained on
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    new_tokens = model.generate(
        pixel_values, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(new_tokens[0], skip_special_tokens=True).strip()
