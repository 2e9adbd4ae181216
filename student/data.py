"""Turning loader samples into student batches: pixels, chat tokens with assistant-only labels, targets."""

from __future__ import annotations

import torch

from pipeline.loader import stack_targets
from student.conversation import messages_from_sample, tokenize_messages


class SampleEncoder:
    """Per-sample work done in DataLoader workers: image processor and chat template."""

    def __init__(self, image_processor, tokenizer, max_length: int, *, keep_image: bool = False):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        # Online teachers take the decoded image itself, not the student's pixels (other size and normalisation).
        self.keep_image = keep_image

    def __call__(self, sample: dict) -> dict:
        pixel_values = self.image_processor(images=sample["image"], return_tensors="pt")["pixel_values"][0]
        messages = messages_from_sample(sample["caption"], sample["conversations"])
        input_ids, labels = tokenize_messages(self.tokenizer, messages, self.max_length)
        encoded = {
            "row": sample["row"],
            "pixel_values": pixel_values,
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "targets": sample["targets"],
            "valid": sample["valid"],
            "stream": sample.get("stream"),
            "skipped": sample.get("skipped", {}),
        }
        if self.keep_image:
            encoded["image"] = sample["image"]
        return encoded


class BatchCollator:
    """Right-pads token sequences and stacks pixels and targets into one batch.

    A batch comes from one loader worker, so its last sample's stream position (and skip counts) are the batch's.
    With `SampleEncoder(keep_image=True)` the batch also carries `images`, the decoded RGB PIL images.
    """

    def __init__(self, pad_token_id: int, teachers: list[str]):
        self.pad_token_id = pad_token_id
        self.teachers = list(teachers)

    def __call__(self, samples: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
            attention_mask[i, :n] = 1
        targets, valid = stack_targets(samples, self.teachers)
        extra = {"images": [s["image"] for s in samples]} if "image" in samples[0] else {}
        return {
            **extra,
            "rows": torch.tensor([s["row"] for s in samples], dtype=torch.long),
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "targets": targets,
            "valid": valid,
            "stream": samples[-1].get("stream"),
            "skipped": samples[-1].get("skipped", {}),
        }
