"""`student.generate`: greedy answers from a demo-trained checkpoint, consistent with the training forward pass."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.errors import UsageError
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def checkpoint(demo_store, demo_dir, tmp_path_factory):
    from tests.conftest import train_from_config

    out = tmp_path_factory.mktemp("generate") / "pt"
    train_from_config(str(REPO / "manifests" / "experiments" / "demo_pt.yaml"),
                      [f"output_dir={out}", "train.max_steps=2", "data.num_workers=0", "train.trackers=[]"],
                      progress=False)
    return out


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    import skimage.data
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    return path


def test_generate_answers_with_a_deterministic_string(checkpoint, image_path):
    from student.generate import generate

    first = generate(str(checkpoint), str(image_path), "What is in the picture?", max_new_tokens=6)
    assert isinstance(first, str) and first
    assert generate(str(checkpoint), str(image_path), "What is in the picture?", max_new_tokens=6) == first


def test_the_first_generated_token_is_the_forward_pass_argmax(checkpoint, image_path):
    from PIL import Image

    from student.conversation import messages_from_sample
    from student.checkpoint import load_frozen_student

    model, tokenizer, image_processor = load_frozen_student(str(checkpoint))
    messages = messages_from_sample(None, [{"from": "human", "value": "Describe the image."}])
    enc = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt")
    pixels = image_processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       compute_predictions=False).logits
    new = model.generate(pixels, enc["input_ids"], enc["attention_mask"], max_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert new[0, 0] == logits[0, -1].argmax()


def test_generate_refuses_a_directory_without_a_student(tmp_path, image_path):
    from student.generate import generate

    with pytest.raises(UsageError, match="no trained student"):
        generate(str(tmp_path), str(image_path), "hi")
