"""Turning loader samples into student batches: pixels, chat tokens with assistant-only labels, targets."""

from __future__ import annotations

import torch

from pipeline.loader import stack_targets
from student.conversation import messages_from_sample, tokenize_messages


class SampleEncoder:
    """Per-sample work done in DataLoader workers: image processor and chat template."""

    def __init__(self, image_processor, tokenizer, max_length: int):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, sample: dict) -> dict:
        pixel_values = self.image_processor(images=sample["image"], return_tensors="pt")["pixel_values"][0]
        messages = messages_from_sample(sample["caption"], sample["conversations"])
        input_ids, labels = tokenize_messages(self.tokenizer, messages, self.max_length)
        return {
            "row": sample["row"],
            "pixel_values": pixel_values,
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "targets": sample["targets"],
            "valid": sample["valid"],
            "stream": sample.get("stream"),
        }


class BatchCollator:
    """Right-pads token sequences and stacks pixels and targets into one batch.

    A batch comes from one loader worker, so its last sample's stream position is the batch's position.
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
        return {
            "rows": torch.tensor([s["row"] for s in samples], dtype=torch.long),
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "targets": targets,
            "valid": valid,
            "stream": samples[-1].get("stream"),
        }
