"""Messages from captions/LLaVA conversations, and assistant-only labels through real chat templates."""

from __future__ import annotations

import copy

import pytest

from student.conversation import (
    DEFAULT_CAPTION_PROMPT,
    IGNORE_INDEX,
    LLAVA_SYSTEM_PROMPT,
    messages_from_sample,
    tokenize_messages,
)
from tests.student.tiny_parts import CHATML_TEMPLATE

LLAVA = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "Two birds on a wire."},
    {"from": "human", "value": "Describe the image briefly"},
    {"from": "gpt", "value": "a cat sits on the mat"},
]


def labelled_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_caption_becomes_a_user_prompt_and_an_assistant_answer():
    msgs = messages_from_sample("  A cat on a mat. ", None)
    assert msgs == [
        {"role": "user", "content": f"<image>\n{DEFAULT_CAPTION_PROMPT}"},
        {"role": "assistant", "content": "A cat on a mat."},
    ]
    with_system = messages_from_sample("x", [], prompt="Caption it.", system=LLAVA_SYSTEM_PROMPT)
    assert with_system[0] == {"role": "system", "content": LLAVA_SYSTEM_PROMPT}
    assert with_system[1]["content"] == "<image>\nCaption it."


def test_llava_conversations_map_roles_and_move_the_placeholder_to_the_front():
    source = copy.deepcopy(LLAVA)
    msgs = messages_from_sample("ignored caption", source)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "<image>\nWhat is in the picture?"
    assert source == LLAVA  # the caller's sample is not modified


def test_missing_placeholder_goes_to_the_first_user_turn_and_duplicates_are_refused():
    msgs = messages_from_sample(None, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])
    assert msgs[0]["content"] == "<image>\nHi"
    assert sum(m["content"].count("<image>") for m in msgs) == 1
    with pytest.raises(ValueError, match="2 <image> placeholders"):
        messages_from_sample(None, [{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "<image>"}])
    with pytest.raises(ValueError, match="neither"):
        messages_from_sample(None, None)
    with pytest.raises(ValueError, match="alternate"):
        messages_from_sample(None, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


def test_a_leading_assistant_turn_is_dropped_as_llava_does():
    msgs = messages_from_sample(None, [{"from": "gpt", "value": "stray"}, *LLAVA[:2]])
    assert msgs[0]["role"] == "user" and len(msgs) == 2


def test_labels_cover_exactly_the_assistant_text_and_its_end_of_turn(tokenizer):
    msgs = messages_from_sample(None, copy.deepcopy(LLAVA))
    ids, labels = tokenize_messages(tokenizer, msgs, max_length=512)
    assert len(ids) == len(labels)
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1
    assert ids[0] == tokenizer.bos_token_id  # written once, by the template
    assert ids[1] != tokenizer.bos_token_id
    assert labelled_text(tokenizer, ids, labels) == "Two birds on a wire.<|eot|>a cat sits on the mat<|eot|>"
    # Every labelled token is the id itself (no shift here; the model shifts).
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    # The labelled runs are exactly the two assistant turns, each ending in the end-of-turn token.
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    runs, current = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(i)
    runs.append(current) if current else None
    assert len(runs) == 2 and all(r[-1] == eot for r in runs)


def test_labels_with_another_template(tokenizer):
    chatml = copy.copy(tokenizer)
    chatml.chat_template = CHATML_TEMPLATE
    msgs = messages_from_sample("a dog runs in the park", None)
    ids, labels = tokenize_messages(chatml, msgs, max_length=512)
    # ChatML closes a turn with "<|eot|>\n": the newline belongs to the assistant turn's rendering.
    assert labelled_text(chatml, ids, labels) == "a dog runs in the park<|eot|>\n"


def test_truncation_keeps_the_image_token_or_refuses(tokenizer):
    msgs = messages_from_sample(None, copy.deepcopy(LLAVA))
    full, _ = tokenize_messages(tokenizer, msgs, max_length=512)
    image_at = full.index(tokenizer.convert_tokens_to_ids("<image>"))
    ids, labels = tokenize_messages(tokenizer, msgs, max_length=image_at + 3)
    assert len(ids) == len(labels) == image_at + 3 and ids == full[: image_at + 3]
    with pytest.raises(ValueError, match="cut the image token"):
        tokenize_messages(tokenizer, msgs, max_length=image_at)


def test_a_template_without_the_prefix_property_is_a_clear_error(tokenizer):
    odd = copy.copy(tokenizer)
    # The generation prompt says "bot" but the rendered assistant turn says "assistant": no prefix relation.
    odd.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}[bot] {% endif %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        tokenize_messages(odd, messages_from_sample("a cat", None), max_length=128)


def test_the_demo_tokenizer_and_the_student_work_together(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from pipeline.demo.tokenizer import train_demo_tokenizer
    from tests.student.tiny_parts import IMAGE_SIZE, build_student

    caption = "a small red boat on a calm lake"
    tok = AutoTokenizer.from_pretrained(train_demo_tokenizer([caption, "two dogs play"], tmp_path / "tok"))
    ids, labels = tokenize_messages(tok, messages_from_sample(caption, None), max_length=256)
    assert labelled_text(tok, ids, labels) == caption + tok.eos_token

    image_id = tok.convert_tokens_to_ids("<image>")
    model = build_student(image_token_id=image_id)
    model.llm.resize_token_embeddings(len(tok))
    batch = {"pixel_values": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), "input_ids": torch.tensor([ids]),
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long), "labels": torch.tensor([labels])}
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    kept = out.labels[out.labels != IGNORE_INDEX].tolist()
    assert kept == [l for l in labels if l != IGNORE_INDEX]
