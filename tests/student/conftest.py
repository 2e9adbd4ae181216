"""Fixtures for the student tests: a shared tiny student, a batch maker and a tiny real tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tests.student.tiny_parts import (  # noqa: E402
    CHAT_TEMPLATE,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    SPECIAL_TOKENS,
    build_student,
)


@pytest.fixture(scope="session")
def student():
    """A shared tiny student in eval mode. Tests must not change its weights (build their own to train)."""
    return build_student()


@pytest.fixture
def make_batch():
    """Right-padded batch from token rows (each with one IMAGE_TOKEN_ID) and deterministic pixels."""

    def make(rows: list[list[int]], seed: int = 0, with_labels: bool = True):
        gen = torch.Generator().manual_seed(seed)
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), -100) if with_labels else None
        pixels = torch.randn(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "labels": labels}

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """A fast byte-level BPE tokenizer trained here on a few sentences, with `<image>` as one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["a cat sits on the mat", "a dog runs in the park", "describe the image briefly",
              "what is in the picture? two birds on a wire", "user assistant system"] * 20
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|eot|>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)
