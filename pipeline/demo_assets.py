"""Build the offline demo: WebDataset shards of real photographs and tiny random-initialised checkpoints.

Everything here runs without a network and without the model hub: the images are the sample photographs that
scikit-image ships inside its wheel, and every checkpoint is a real `transformers` architecture (the same classes
the hub teachers and the student use) shrunk to a few hundred thousand parameters and saved with
`save_pretrained`, so the rest of the pipeline exercises exactly the code paths it uses on real weights.

The demo data takes the path real data takes: the photographs are written as a LLaVA-format dataset (a JSON and
its image files, like LLaVA-558K's), which `pipeline shards llava` (pipeline/llava_shards.py) turns into shards.

The whole build is seeded: the same `seed` gives byte-identical shards (and identical weights), so a demo store
built twice has the same dataset fingerprint.

    from pipeline.demo_assets import build_demo_assets
    assets = build_demo_assets("runs/demo")        # under 10 s on 2 CPU cores

Layout under OUT::

    llava/demo.json                    the demo data in LLaVA format, one record per sample (see write_demo_llava)
    llava/images/PHOTO/ID.jpg          its JPEG files
    shards/demo-00000.tar ...          `pipeline shards llava` of llava/: KEY.jpg, KEY.txt (a caption for every
                                       sample) and KEY.json (the record: for every third sample an instruction
                                       conversation, for the others a LLaVA-558K-style caption conversation)
    shards/sharding.json, demo-00000_stats.json ..., failures.parquet    the sharder's records of its run
    assets/teachers/depth/             DepthAnythingForDepthEstimation (DINOv2 backbone) + DPT image processor
    assets/teachers/seg/               OneFormerForUniversalSegmentation (Swin backbone) + OneFormerProcessor
    assets/teachers/gen/image_encoder/     CLIPVisionModelWithProjection (the unCLIP image encoder layout)
    assets/teachers/gen/feature_extractor/ CLIPImageProcessor
    assets/student/vision/             CLIPVisionModel + CLIPImageProcessor (336 px, patch 14: 576 patch tokens)
    assets/student/llm/                LlamaForCausalLM
    assets/student/tokenizer/          byte-level BPE PreTrainedTokenizerFast with a chat template
    demo_assets.json                   what was built, from which seed, with which library versions
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

_SHARD_PREFIX = "demo"

# --- student tokenizer -------------------------------------------------------------------------------------------
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# The BPE trainer assigns ids in this order, so pad=0, bos=1, eos=2, image=3 in every demo tokenizer.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. You look at images and answer questions about them."

# Every turn closes with the eos token and nothing after it, so the assistant-only labels a student derives by
# rendering messages[:i] (with the generation prompt) and messages[:i+1] end exactly on eos. No newline follows
# a turn: byte-level BPE could merge it with the next role's text and break the token-prefix property.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
    "{{- '<|system|>\\n" + DEFAULT_SYSTEM_PROMPT + "' + eos_token -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# --- demo data ---------------------------------------------------------------------------------------------------
# (skimage.data loader, what the photograph shows, stored greyscale). lily, kidney and skin are left out on
# purpose: skimage fetches them with pooch, i.e. from the network.
_SOURCES: tuple[tuple[str, str, bool], ...] = (
    ("astronaut", "a smiling astronaut posing in front of an American flag", False),
    ("coffee", "a cup of coffee on a saucer", False),
    ("chelsea", "a tabby cat named Chelsea looking at the camera", False),
    ("cat", "a ginger tabby cat sitting by a wall", False),
    ("rocket", "a rocket standing on its launch pad", False),
    ("hubble_deep_field", "a deep field of distant galaxies seen by the Hubble telescope", False),
    ("immunohistochemistry", "a stained tissue sample under a microscope", False),
    ("retina", "a photograph of a human retina with its blood vessels", False),
    ("colorwheel", "a colour wheel showing a rainbow of hues", False),
    ("stereo_motorcycle", "a motorcycle parked in a cluttered workshop", False),
    ("logo", "the scikit-image logo on a white background", False),
    ("camera", "a man standing behind a camera on a tripod", True),
    ("horse", "the black silhouette of a horse", True),
    ("coins", "rows of old coins on a dark background", True),
    ("page", "a scanned page of printed text", True),
    ("text", "a few lines of text in different fonts", True),
    ("moon", "the cratered surface of the moon", True),
    ("brick", "the texture of a brick wall", True),
    ("grass", "a close view of a patch of grass", True),
    ("gravel", "a bed of grey gravel", True),
)

_QUESTIONS = (
    "What is shown in this image?",
    "Describe the image in one sentence.",
    "What can you see here?",
    "Give a short caption for this picture.",
    "What is the subject of this photo?",
    "Briefly describe what the picture shows.",
)
_ANSWERS = (
    "The image is {caption}.",
    "It is {caption}.",
    "I can see {caption}.",
    "This looks like {caption}.",
)
# Follow-up turns make some conversations multi-turn, which is what the assistant-only label masking must handle.
# (question, answer when the property holds, answer when it does not); the property is decided in `_conversation`.
_FOLLOW_UPS = (
    ("Is the image mirrored?", "Yes, it is flipped left to right.", "No, it is not mirrored."),
    ("Is this a colour image?", "Yes, it is in colour.", "No, it is in black and white."),
    ("How large is the image?", "It is {width} by {height} pixels.", "It is {width} by {height} pixels."),
)
# The instruction of the caption records. It is student.conversation.DEFAULT_CAPTION_PROMPT, the one the student
# pairs with a bare caption, so a caption record trains on exactly the tokens its caption alone would.
CAPTION_PROMPT = "Describe the image briefly."

# Texts that the tokenizer should know whatever the number of demo samples.
PROMPT_TEXTS: tuple[str, ...] = (
    DEFAULT_SYSTEM_PROMPT,
    *_QUESTIONS,
    *(a.format(caption="") for a in _ANSWERS),
    *(text for follow_up in _FOLLOW_UPS for text in follow_up),
    *(description for _, description, _ in _SOURCES),
    "system user assistant",
    "0 1 2 3 4 5 6 7 8 9 by pixels wide tall small large close crop view mirrored greyscale",
)


@dataclass(frozen=True)
class DemoAssets:
    """Where `build_demo_assets` put everything, and how much data it wrote."""

    root: Path
    source_json: Path  # the LLaVA-format JSON the shards were made from
    shards_dir: Path
    shards: tuple[Path, ...]
    num_samples: int
    num_shards: int
    num_conversations: int  # samples with an instruction conversation; the others hold a caption record
    depth: Path
    seg: Path
    gen: Path  # holds image_encoder/ and feature_extractor/, like the unCLIP hub repo
    student_vision: Path
    student_llm: Path
    student_tokenizer: Path
    vocab_size: int
    seed: int


@dataclass(frozen=True)
class _Sample:
    jpeg: bytes
    caption: str
    turns: list[dict] | None  # an instruction conversation, for every third sample


@dataclass(frozen=True)
class DemoSource:
    """The demo data as `write_demo_llava` wrote it, and the texts the demo tokenizer learns from."""

    json_path: Path
    images: Path
    texts: list[str]  # per sample: its caption, then its instruction conversation's turns if it has one
    num_conversations: int


# --- helpers -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_and_seeded(seed: int) -> Iterator[None]:
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


def _prepare_dir(out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- teachers ----------------------------------------------------------------------------------------------------
def build_tiny_depth_anything(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random-initialised `DepthAnythingForDepthEstimation` (DINOv2 backbone) and its image processor.

    Backbone: hidden 32, 4 blocks, 2 heads, patch 14, image 336, so a [B, 3, 336, 336] float32 input gives
    577 tokens per block ([CLS] + 24x24 patches); the depth teacher's target is therefore [576, 32].
    `out_features` are the 4 blocks (the real Large model taps blocks 4, 11, 17, 23 of 24).
    Returns `out_dir`.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    out = _prepare_dir(out_dir)
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
    with _quiet_and_seeded(seed):
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


def _build_clip_task_tokenizer():
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

    out = _prepare_dir(out_dir)
    tokenizer = _build_clip_task_tokenizer()
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
    with _quiet_and_seeded(seed):
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


def _clip_image_processor(size: int):
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


def build_tiny_unclip_image_encoder(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write `out_dir/image_encoder` (CLIPVisionModelWithProjection) and `out_dir/feature_extractor`.

    Laid out like `stabilityai/stable-diffusion-2-1-unclip`, so the gen teacher loads it with
    `subfolder="image_encoder"` / `"feature_extractor"`. Hidden 32, 2 layers, 2 heads, image 224, patch 32,
    projection 32: `image_embeds` is [B, 32] float32 for a [B, 3, 224, 224] input, i.e. a gen target of [1, 32].
    Returns `out_dir`.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = _prepare_dir(out_dir)
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
    with _quiet_and_seeded(seed):
        CLIPVisionModelWithProjection(config).eval().save_pretrained(out / "image_encoder")
    _clip_image_processor(224).save_pretrained(out / "feature_extractor")
    return out


# --- student -----------------------------------------------------------------------------------------------------
def build_tiny_student_vision(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random-initialised `CLIPVisionModel` and `CLIPImageProcessor` shaped like clip-vit-large-patch14-336.

    Hidden 32, 3 layers (the student reads the second-to-last), 2 heads, image 336, patch 14: a [B, 3, 336, 336]
    input gives hidden states [B, 577, 32] float32, i.e. 576 patch tokens after dropping [CLS].
    Returns `out_dir`.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out = _prepare_dir(out_dir)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",  # as the OpenAI CLIP checkpoints
    )
    with _quiet_and_seeded(seed):
        CLIPVisionModel(config).eval().save_pretrained(out)
    _clip_image_processor(336).save_pretrained(out)
    return out


def train_demo_tokenizer(captions: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 800) -> Path:
    """Train a byte-level BPE tokenizer on `captions` plus `PROMPT_TEXTS` and save it as a `PreTrainedTokenizerFast`.

    Special tokens (ids 0..6): `<|pad|>`, `<|bos|>`, `<|end|>` (eos, closes every chat turn), `<image>` (one id,
    where the student splices the image features), `<|system|>`, `<|user|>`, `<|assistant|>`. The saved
    `chat_template` is `CHAT_TEMPLATE`. Encoding adds no special tokens by itself; the chat template writes bos.
    `vocab_size` is an upper bound: a small corpus runs out of merges earlier. Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = _prepare_dir(out_dir)
    texts = [text.replace(IMAGE_TOKEN, " ") for text in (*captions, *PROMPT_TEXTS)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, *ROLE_TOKENS],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def build_tiny_llm(
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    pad_token_id: int = SPECIAL_TOKENS.index(PAD_TOKEN),
    bos_token_id: int = SPECIAL_TOKENS.index(BOS_TOKEN),
    eos_token_id: int = SPECIAL_TOKENS.index(EOS_TOKEN),
    seed: int = 0,
) -> Path:
    """Write a random-initialised `LlamaForCausalLM`; `vocab_size` must equal `len(tokenizer)`.

    Defaults: hidden 64, MLP 128, 4 layers, 4 query heads, 2 key/value heads (grouped-query attention like
    Llama-3), 2048 positions (576 image tokens + 24 task tokens + text fit). `output_hidden_states=True` gives
    5 tensors [B, L, 64] float32 (embeddings + one per layer). The token ids default to the demo tokenizer's.
    Returns `out_dir`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = _prepare_dir(out_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    with _quiet_and_seeded(seed):
        LlamaForCausalLM(config).eval().save_pretrained(out)
    return out


# --- shards ------------------------------------------------------------------------------------------------------
def _load_source(name: str) -> np.ndarray:
    """One skimage sample photograph as uint8 [H, W, 3] (colour) or [H, W] (greyscale)."""
    from skimage import data

    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity)
    if image.dtype == bool:  # horse is a boolean silhouette mask
        image = image.astype(np.uint8) * 255
    if image.ndim == 3 and image.shape[2] == 4:  # logo: flatten RGBA onto white, JPEG has no alpha
        rgb, alpha = image[..., :3].astype(np.float32), image[..., 3:].astype(np.float32) / 255.0
        image = np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(image)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng: np.random.Generator, subject: str, area: float, mirrored: bool, short_side: int, grey: bool) -> str:
    if area < 0.4:
        view = "close crop"
    elif area < 0.8:
        view = str(rng.choice(["crop", "partial view", "cropped photo"]))
    else:
        view = str(rng.choice(["wide view", "full view", "photo"]))
    size = "small " if short_side < 224 else ("large " if short_side > 400 else "")
    flip = "mirrored " if mirrored else ""
    tone = "greyscale " if grey and rng.random() < 0.5 else ""
    template = int(rng.integers(4))
    if template == 0:
        return f"{_with_article(size + flip + tone + view)} of {subject}"
    if template == 1:
        flipped = ", flipped left to right" if mirrored else ""
        return f"{subject}, seen in {_with_article(size + tone + view)}{flipped}"
    if template == 2:
        return f"{_with_article(tone + flip + view)} showing {subject}"
    return f"{subject} in {_with_article(size + flip + view)}"


def _conversation(
    rng: np.random.Generator, caption: str, mirrored: bool, grey: bool, width: int, height: int
) -> list[dict]:
    question = str(rng.choice(_QUESTIONS))
    answer = str(rng.choice(_ANSWERS)).format(caption=caption)
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
    if rng.random() < 0.4:
        index = int(rng.integers(len(_FOLLOW_UPS)))
        follow_up, if_true, if_false = _FOLLOW_UPS[index]
        holds = (mirrored, not grey, True)[index]
        reply = (if_true if holds else if_false).format(width=width, height=height)
        turns += [{"from": "human", "value": follow_up}, {"from": "gpt", "value": reply}]
    return turns


def _make_sample(seed: int, global_index: int, source_index: int, cache: dict[str, np.ndarray]) -> _Sample:
    from PIL import Image

    # One generator per sample, keyed by (seed, global index): a sample does not depend on how many came before it.
    rng = np.random.default_rng([seed, global_index])
    name, subject, greyscale = _SOURCES[source_index]
    if name not in cache:
        cache[name] = _load_source(name)
    pixels = cache[name]
    height, width = pixels.shape[:2]

    frac_w = rng.uniform(0.45, 1.0)
    frac_h = float(np.clip(frac_w * rng.uniform(0.75, 1.33), 0.45, 1.0))
    crop_w, crop_h = max(16, round(width * frac_w)), max(16, round(height * frac_h))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = Image.fromarray(pixels[top : top + crop_h, left : left + crop_w])
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    short_side = int(rng.integers(160, 481))
    scale = short_side / min(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    # Half of the greyscale photographs stay single-channel JPEGs: readers must convert them to RGB themselves.
    keep_grey = greyscale and bool(rng.random() < 0.5)
    image = image.convert("L" if keep_grey else "RGB")

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
    caption = _caption(rng, subject, frac_w * frac_h, mirrored, short_side, greyscale)
    turns = None
    if global_index % 3 == 0:
        turns = _conversation(rng, caption, mirrored, greyscale, *image.size)
    return _Sample(jpeg=buffer.getvalue(), caption=caption, turns=turns)


def _record(sample_id: str, image: str, sample: _Sample) -> dict:
    """The sample's LLaVA record. A caption record is shaped like LLaVA-558K's, whose gpt answer the sharder takes
    as the caption; an instruction record has no such turn, so it names its caption itself."""
    if sample.turns is None:
        turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                 {"from": "gpt", "value": sample.caption}]
        return {"id": sample_id, "image": image, "conversations": turns}
    return {"id": sample_id, "image": image, "conversations": sample.turns, "caption": sample.caption}


def write_demo_llava(
    out_dir: str | os.PathLike, num_samples: int = 200, seed: int = 0, *, progress: bool = True
) -> DemoSource:
    """Write `num_samples` demo photographs as a LLaVA-format dataset: `out_dir/images/PHOTO/ID.jpg` (RGB or
    greyscale JPEG crops of the bundled photos, shorter side 160-480 px) and `out_dir/demo.json`.

    Record i has id `f"{i:06d}"`. Every third record (i % 3 == 0) is an instruction conversation whose first human
    turn starts with `<image>\\n` (some have a follow-up question), with its caption in a `caption` field; the
    others are LLaVA-558K-style caption records (`<image>\\n` + CAPTION_PROMPT, answered by the caption).
    Same arguments, same bytes.
    """
    from tqdm.auto import tqdm

    out = _prepare_dir(out_dir)
    images = out / "images"
    # Cycle through the photographs in a seeded order so that even a handful of samples covers several subjects.
    order = np.random.default_rng(seed).permutation(len(_SOURCES))
    cache: dict[str, np.ndarray] = {}
    records, texts = [], []
    for global_index in tqdm(range(num_samples), desc="demo photos", unit="img", disable=not progress):
        source_index = int(order[global_index % len(_SOURCES)])
        sample = _make_sample(seed, global_index, source_index, cache)
        sample_id = f"{global_index:06d}"
        relative = f"{_SOURCES[source_index][0]}/{sample_id}.jpg"
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        (images / relative).write_bytes(sample.jpeg)
        records.append(_record(sample_id, relative, sample))
        texts += [sample.caption, *(turn["value"] for turn in sample.turns or ())]
    json_path = out / "demo.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return DemoSource(json_path=json_path, images=images, texts=texts,
                      num_conversations=sum(1 for r in records if "caption" in r))


def shard_demo_llava(source: DemoSource, out_dir: str | os.PathLike, num_shards: int, *,
                     progress: bool = True) -> list[Path]:
    """`pipeline shards llava` of the demo data: `num_shards` shards `demo-00000.tar`... of near-equal size (earlier
    shards first) under `out_dir`, keys `f"{shard:05d}{i:04d}"`. A rerun of the same build resumes; the shards of
    a different earlier build there are replaced. Returns the shard paths in order."""
    from pipeline.llava_shards import write_llava_shards

    summary = write_llava_shards(source.json_path, source.images, out_dir, prefix=_SHARD_PREFIX,
                                 num_shards=num_shards, workers=1, overwrite=True, progress=progress)
    return list(summary.shards)


def write_demo_shards(
    out_dir: str | os.PathLike, num_samples: int = 200, num_shards: int = 4, seed: int = 0, *, progress: bool = True
) -> list[Path]:
    """Write `num_shards` demo shards holding `num_samples` samples under `out_dir`, through a LLaVA-format copy of
    the data in a temporary directory (`write_demo_llava`, then `shard_demo_llava`: see both for the content).
    Same arguments, same bytes. Returns the shard paths in order."""
    with tempfile.TemporaryDirectory(prefix="demo-llava-") as source_dir:
        source = write_demo_llava(source_dir, num_samples, seed, progress=progress)
        return shard_demo_llava(source, out_dir, num_shards, progress=progress)


# --- everything --------------------------------------------------------------------------------------------------
def build_demo_assets(
    out_dir: str | os.PathLike, *, num_samples: int = 200, num_shards: int = 4, seed: int = 0, progress: bool = True
) -> DemoAssets:
    """Build the whole offline demo under `out_dir` (layout in the module docstring) and describe it.

    Deterministic in `seed`; writes `out_dir/demo_assets.json` recording the arguments, the library versions and the
    target shapes the demo teachers produce: depth [576, 32], seg [576, 128], gen [1, 32] (float32 before storage).
    """
    import importlib.metadata

    start = time.perf_counter()
    root = _prepare_dir(out_dir)
    assets_dir = root / "assets"

    def say(message: str) -> None:
        if progress:
            print(f"[demo-assets {time.perf_counter() - start:5.1f}s] {message}", flush=True)

    say(f"writing {num_samples} samples as LLaVA-format data, then into {num_shards} shards")
    source = write_demo_llava(root / "llava", num_samples, seed, progress=progress)
    shards = shard_demo_llava(source, root / "shards", num_shards, progress=progress)

    say("depth teacher (Depth Anything, DINOv2 backbone)")
    depth = build_tiny_depth_anything(assets_dir / "teachers" / "depth", seed=seed)
    say("seg teacher (OneFormer, Swin backbone)")
    seg = build_tiny_oneformer(assets_dir / "teachers" / "seg", seed=seed + 1)
    say("gen teacher (unCLIP CLIP image encoder)")
    gen = build_tiny_unclip_image_encoder(assets_dir / "teachers" / "gen", seed=seed + 2)
    say("student vision encoder (CLIP ViT, 336 px, patch 14)")
    vision = build_tiny_student_vision(assets_dir / "student" / "vision", seed=seed + 3)
    say("student tokenizer (byte-level BPE)")
    tokenizer_dir = train_demo_tokenizer(source.texts, assets_dir / "student" / "tokenizer")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = len(tokenizer)
    say(f"student LLM (Llama, vocab {vocab_size})")
    llm = build_tiny_llm(
        assets_dir / "student" / "llm",
        vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed + 4,
    )

    assets = DemoAssets(
        root=root,
        source_json=source.json_path,
        shards_dir=root / "shards",
        shards=tuple(shards),
        num_samples=num_samples,
        num_shards=num_shards,
        num_conversations=source.num_conversations,
        depth=depth,
        seg=seg,
        gen=gen,
        student_vision=vision,
        student_llm=llm,
        student_tokenizer=tokenizer_dir,
        vocab_size=vocab_size,
        seed=seed,
    )
    record = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(assets).items() if k != "shards"},
        "shards": [p.name for p in shards],
        "target_shapes": {"depth": [576, 32], "seg": [576, 128], "gen": [1, 32]},
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "tokenizers", "pillow", "scikit-image", "numpy")
        },
    }
    (root / "demo_assets.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    say(f"done: {num_samples} samples ({source.num_conversations} with instruction conversations), checkpoints "
        f"under {assets_dir}")
    return assets
