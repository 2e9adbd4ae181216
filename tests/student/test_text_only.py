"""Text-only samples (about 40K of LLaVA's IFT mix) train as LLaVA trains them: no image, no task tokens, the
next-token loss as usual, in batches that mix them with image samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student.conversation import messages_from_sample, tokenize_messages
from tests.student.tiny_parts import IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS, TASKS, build_student

TEXT_ONLY = [{"from": "human", "value": "what is a cat?"}, {"from": "gpt", "value": "a cat sits on the mat"}]


def _lm_loss_alone(llm, ids: list[int]) -> torch.Tensor:
    """The LLM by itself on a token sequence: what a text-only sample's loss must be."""
    x = torch.tensor([ids])
    logits = llm(input_ids=x).logits
    return F.cross_entropy(logits[0, :-1], x[0, 1:])


def test_a_text_only_row_gets_no_image_or_task_tokens_and_the_plain_next_token_loss():
    student = build_student(tasks=[])
    text = [5, 6, 7, 8, 9, 10]
    with_image = [5, IMAGE_TOKEN_ID, 6, 7, 8]
    ids = torch.zeros(2, len(text), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, : len(text)], mask[0, : len(text)] = torch.tensor(text), 1
    ids[1, : len(with_image)], mask[1, : len(with_image)] = torch.tensor(with_image), 1
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), -100)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        mixed = student(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels,
                        compute_predictions=False)
        assert mixed.attention_mask[0].sum() == len(text)  # nothing spliced in
        assert mixed.attention_mask[1].sum() == len(with_image) - 1 + NUM_IMAGE_TOKENS
        alone = student(pixel_values=pixels[:1], input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1],
                        compute_predictions=False)
        # Its pixels (zeros in real batches) are never looked at: other pixels give the same loss.
        other = student(pixel_values=torch.zeros_like(pixels[:1]), input_ids=ids[:1], attention_mask=mask[:1],
                        labels=labels[:1], compute_predictions=False)
        assert torch.allclose(alone.loss, _lm_loss_alone(student.llm, text), atol=1e-5)
        assert torch.equal(alone.loss, other.loss)


def test_a_batch_of_only_text_still_gives_the_projector_a_gradient():
    """DDP and FSDP need every trainable parameter in the graph at every step, as in LLaVA's empty-slice trick."""
    student = build_student(tasks=[]).train()
    student.set_trainable(["llm", "projector"])
    ids = torch.tensor([[5, 6, 7, 8]])
    out = student(pixel_values=torch.zeros(1, 3, 56, 56), input_ids=ids, labels=ids, compute_predictions=False)
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in student.projector.parameters())
    assert student.llm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_embedding_predictions_refuse_a_text_only_row():
    student = build_student(tasks=TASKS)
    ids = torch.tensor([[5, 6, 7, 8], [5, IMAGE_TOKEN_ID, 6, 7]])
    with pytest.raises(ValueError, match=r"rows \[0\] have no image"):
        student(pixel_values=torch.zeros(2, 3, 56, 56), input_ids=ids)


def test_a_text_only_conversation_tokenizes_without_an_image_token(tokenizer):
    messages = messages_from_sample(None, TEXT_ONLY, image=False)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    ids, labels = tokenize_messages(tokenizer, messages, 128, images=0)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id not in ids
    assert tokenizer.decode([t for t in labels if t != -100]).startswith("a cat sits on the mat")
    with pytest.raises(ValueError, match="no image but its conversation holds <image>"):
        messages_from_sample(None, [{"from": "human", "value": "<image>\nwhat is it?"}, TEXT_ONLY[1]], image=False)
