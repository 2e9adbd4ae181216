"""What the demo builders share: an output directory, a seeded and quiet model initialisation, and the OpenAI
CLIP image preprocessing (the gen teacher's and the student vision encoder's)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def quiet_and_seeded(seed: int) -> Iterator[None]:
    """Seed torch for one model's initialisation without touching the caller's RNG, and mute HF progress bars."""
    import torch
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def prepare_dir(out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def clip_image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )

