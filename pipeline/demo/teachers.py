"""The three tiny teachers of `manifests/teachers/demo.yaml`: depth (Depth Anything), seg (OneFormer) and gen (the
unCLIP CLIP image encoder), each the real `transformers` architecture shrunk and random-initialised."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.demo.common import clip_image_processor, prepare_dir, quiet_and_seeded


def build_tiny_depth_anything(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random-initialised `DepthAnythingForDepthEstimation` (DINOv2 backbone) and its image processor.

    Backbone: hidden 32, 4 blocks, 2 heads, patch 14, image 336, so a [B, 3, 336, 336] float32 input gives
    577 tokens per block ([CLS] + 24x24 patches); the depth teacher's target is therefore [576, 32].
    `out_features` are the 4 blocks (the real Large model taps blocks 4, 11, 17, 23 of 24).
    Returns `out_dir`.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    out = prepare_dir(out_dir)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=336,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        # The DPT-style neck expects token sequences, and the hub configs ship these two values.
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    with quiet_and_seeded(seed):
        model = DepthAnythingForDepthEstimation(config).eval()
        model.save_pretrained(out)
    DPTImageProcessor(
        size={"height": 336, "width": 336},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,  # bicubic, as in the Depth-Anything hub processors
        do_pad=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out)
    return out


# Four COCO-panoptic-like classes are enough for the decoder heads to have their real shapes.
_SEG_CLASSES = {
    "0": {"name": "person", "isthing": 1},
    "1": {"name": "cat", "isthing": 1},
    "2": {"name": "sky", "isthing": 0},
    "3": {"name": "wall", "isthing": 0},
}
SEG_CLASS_INFO_FILE = "demo_class_info.json"
_ONEFORMER_TASK_WORDS = ("the", "task", "is", "panoptic", "semantic", "instance", "a", "an", "photo")


def build_clip_task_tokenizer():
    """A CLIP BPE tokenizer whose vocabulary covers OneFormer's task prompts ("the task is panoptic") in whole words.

    The hub OneFormer processors carry the 49408-token CLIP vocabulary; the task prompt only needs a handful of words,
    so this one holds the 256 byte symbols (plain and word-final), one merge chain per task word, and the two CLIP
    specials: about 560 entries, all below the tiny text encoder's vocabulary size.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _ONEFORMER_TASK_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            merged = merged + piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_tiny_oneformer(out_dir: str | os.PathLike, *, seed: int = 0, image_size: int = 256) -> Path:
    """Write a random-initialised `OneFormerForUniversalSegmentation` (Swin backbone) and its `OneFormerProcessor`.

    Swin: embed dim 16, depths [1, 1, 1, 1], window 8; on a [B, 3, 256, 256] input its four stages give
    [B, 16, 64, 64], [B, 32, 32, 32], [B, 64, 16, 16], [B, 128, 8, 8] float32, so the seg teacher's target (last
    stage resized to 24x24) is [576, 128]. The processor resizes the shorter side to `image_size` (a square
    256x256 image stays 256x256) and tokenises the task prompt with a small offline CLIP tokenizer.

    The class-info file (`SEG_CLASS_INFO_FILE`) is written into `out_dir` and its content is saved inline in the
    processor config, so `OneFormerProcessor.from_pretrained(out_dir)` needs neither the hub nor a fixed path.
    Returns `out_dir`.
    """
    from transformers import (
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
        SwinConfig,
    )

    out = prepare_dir(out_dir)
    tokenizer = build_clip_task_tokenizer()
    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=8,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = {int(k): v["name"] for k, v in _SEG_CLASSES.items()}
    config = OneFormerConfig(
        backbone_config=backbone,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        num_queries=8,
        conv_dim=32,  # GroupNorm in the pixel decoder uses 32 groups
        mask_dim=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        query_dec_layers=1,
        text_encoder_width=32,
        text_encoder_num_layers=1,
        text_encoder_proj_layers=1,
        text_encoder_context_length=16,
        text_encoder_n_ctx=2,
        text_encoder_vocab_size=len(tokenizer),
    )
    with quiet_and_seeded(seed):
        model = OneFormerForUniversalSegmentation(config).eval()
        model.save_pretrained(out)

    (out / SEG_CLASS_INFO_FILE).write_text(json.dumps(_SEG_CLASSES, indent=2, sort_keys=True) + "\n")
    image_processor = OneFormerImageProcessor(
        size={"shortest_edge": image_size, "longest_edge": image_size * 5 // 3},
        repo_path=str(out.resolve()),
        class_info_file=SEG_CLASS_INFO_FILE,
        num_text=config.num_queries - config.text_encoder_n_ctx,
        num_labels=len(_SEG_CLASSES),
        ignore_index=255,
    )
    # The class names were just read from the local file into `metadata`, which the saved config carries inline.
    # Dropping the file reference keeps the directory loadable offline after it is moved or copied (a saved
    # `repo_path` would be an absolute path, or else a hub repo id); the JSON stays beside it for people and for
    # callers that pass `repo_path=<this dir>, class_info_file=SEG_CLASS_INFO_FILE` themselves.
    image_processor.repo_path = None
    image_processor.class_info_file = None
    processor = OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out


def build_tiny_unclip_image_encoder(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write `out_dir/image_encoder` (CLIPVisionModelWithProjection) and `out_dir/feature_extractor`.

    Laid out like `stabilityai/stable-diffusion-2-1-unclip`, so the gen teacher loads it with
    `subfolder="image_encoder"` / `"feature_extractor"`. Hidden 32, 2 layers, 2 heads, image 224, patch 32,
    projection 32: `image_embeds` is [B, 32] float32 for a [B, 3, 224, 224] input, i.e. a gen target of [1, 32].
    Returns `out_dir`.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = prepare_dir(out_dir)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
        projection_dim=32,
        hidden_act="gelu",
    )
    with quiet_and_seeded(seed):
        CLIPVisionModelWithProjection(config).eval().save_pretrained(out / "image_encoder")
    clip_image_processor(224).save_pretrained(out / "feature_extractor")
    return out

