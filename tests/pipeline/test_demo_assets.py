"""The offline demo builder: real shards, real tiny checkpoints, a tokenizer whose chat template masks cleanly."""

import os

# huggingface_hub reads this when it is first imported; the demo must never need the hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.demo import build_demo_assets
from pipeline.demo.llava import write_demo_shards
from pipeline.demo.photos import IMAGE_TOKEN
from pipeline.demo.teachers import SEG_CLASS_INFO_FILE
from pipeline.demo.tokenizer import DEFAULT_SYSTEM_PROMPT
from pipeline.data.errors import UsageError
from tests.conftest import REPO

NUM_SAMPLES = 12
NUM_SHARDS = 3
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(
        tmp_path_factory.mktemp("demo"), num_samples=NUM_SAMPLES, num_shards=NUM_SHARDS, seed=0, progress=False
    )


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.student_tokenizer)


def _read_samples(shards):
    import webdataset as wds

    # No decoder: webdataset's "pil" decoding converts to RGB, and the test wants to see the stored mode.
    samples = []
    for sample in wds.WebDataset([str(p) for p in shards], shardshuffle=False):
        decoded = {"__key__": sample["__key__"], "jpg": Image.open(io.BytesIO(sample["jpg"]))}
        decoded["txt"] = sample["txt"].decode("utf-8")
        if "json" in sample:
            decoded["json"] = json.loads(sample["json"])
        samples.append(decoded)
    return samples


def _conversations(shards):
    found = []
    for sample in _read_samples(shards):
        if "json" in sample:
            found.append(sample["json"])
    return found


def _as_messages(conversation):
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in conversation["conversations"]]


def test_shards_have_img2dataset_layout(assets):
    assert [p.name for p in assets.shards] == [f"demo-{i:05d}.tar" for i in range(NUM_SHARDS)]
    assert sorted(assets.shards_dir.glob("*.tar")) == list(assets.shards)
    for shard_index, path in enumerate(assets.shards):
        with tarfile.open(path) as tar:
            names = tar.getnames()
        keys = list(dict.fromkeys(name.split(".")[0] for name in names))
        assert keys == [f"{shard_index:05d}{i:04d}" for i in range(NUM_SAMPLES // NUM_SHARDS)]
        expected = [f"{key}.{ext}" for key in keys for ext in ("jpg", "txt", "json")]
        assert names == expected, "members must come in the order jpg, txt, json per sample"


def test_webdataset_reads_every_sample(assets):
    samples = _read_samples(assets.shards)
    assert len(samples) == NUM_SAMPLES == assets.num_samples
    modes = set()
    for sample in samples:
        image = sample["jpg"]
        assert image.format == "JPEG"
        image.load()
        modes.add(image.mode)
        assert 160 <= min(image.size) <= 480, image.size
        assert image.convert("RGB").size == image.size
        assert isinstance(sample["txt"], str) and len(sample["txt"].split()) >= 4
    # Single-channel JPEGs are in the demo on purpose (the pipeline must convert them); seed 0 has some.
    assert modes == {"RGB", "L"}
    conversations = _conversations(assets.shards)
    assert len(conversations) == NUM_SAMPLES
    # Every third sample holds an instruction conversation; the others a LLaVA-558K-style caption record.
    instructions = [c for c in conversations if "caption" in c]
    assert len(instructions) == assets.num_conversations == NUM_SAMPLES // 3
    images = assets.source_json.parent / "images"
    for conversation in conversations:
        assert (images / conversation["image"]).is_file()
        turns = conversation["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)


def test_caption_records_train_as_their_bare_captions(assets):
    """The PT stage sees the same chat for a caption record as for its caption alone (as before the demo was
    LLaVA-format data): the record's instruction is the student's caption prompt."""
    from student.conversation import messages_from_sample

    captions = [s for s in _read_samples(assets.shards) if "caption" not in s["json"]]
    assert len(captions) == NUM_SAMPLES - NUM_SAMPLES // 3
    for sample in captions:
        assert messages_from_sample(None, sample["json"]["conversations"]) == messages_from_sample(sample["txt"], None)


def test_the_demo_shards_are_what_the_cli_makes_of_the_demo_json(assets, tmp_path):
    images = assets.source_json.parent / "images"
    command = ["shards", "llava", str(assets.source_json), "--images", str(images), "--out", str(tmp_path),
               "--shards", str(NUM_SHARDS), "--workers", "1", "--quiet"]
    result = subprocess.run([sys.executable, "-m", "pipeline", *command], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [p.read_bytes() for p in sorted(tmp_path.glob("*.tar"))] == [p.read_bytes() for p in assets.shards]


def test_two_builds_are_byte_identical(assets, tmp_path):
    again = write_demo_shards(tmp_path / "again", NUM_SAMPLES, NUM_SHARDS, 0, progress=False)
    for first, second in zip(assets.shards, again):
        assert first.read_bytes() == second.read_bytes(), f"{first.name} differs between two builds"
    other_seed = write_demo_shards(tmp_path / "other", NUM_SAMPLES, NUM_SHARDS, 1, progress=False)
    assert other_seed[0].read_bytes() != assets.shards[0].read_bytes()


def test_fewer_shards_than_before_removes_stale_ones(tmp_path):
    write_demo_shards(tmp_path, 4, 4, 0, progress=False)
    paths = write_demo_shards(tmp_path, 4, 2, 0, progress=False)
    assert sorted(tmp_path.glob("demo-*.tar")) == paths


def test_bad_shard_counts_are_refused(tmp_path):
    with pytest.raises(UsageError, match="num_shards"):
        write_demo_shards(tmp_path, 2, 3, 0, progress=False)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_depth_teacher_loads_offline(assets):
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    assert _dir_bytes(assets.depth) < MAX_CHECKPOINT_BYTES
    model = DepthAnythingForDepthEstimation.from_pretrained(assets.depth).eval()
    processor = AutoImageProcessor.from_pretrained(assets.depth)
    pixels = processor(images=Image.new("RGB", (336, 336), (90, 140, 30)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 5  # embeddings + 4 blocks
    assert out.hidden_states[-1].shape == (1, 1 + 576, 32)
    assert out.predicted_depth.shape[-2:] == (336, 336)


def test_seg_teacher_loads_offline_even_after_a_move(assets, tmp_path):
    from transformers import OneFormerForUniversalSegmentation, OneFormerImageProcessor, OneFormerProcessor

    assert _dir_bytes(assets.seg) < MAX_CHECKPOINT_BYTES
    assert (assets.seg / SEG_CLASS_INFO_FILE).is_file()
    moved = shutil.copytree(assets.seg, tmp_path / "seg")
    processor = OneFormerProcessor.from_pretrained(moved)
    assert processor.image_processor.metadata["thing_ids"] == [0, 1]
    assert isinstance(OneFormerImageProcessor.from_pretrained(moved), OneFormerImageProcessor)
    model = OneFormerForUniversalSegmentation.from_pretrained(moved).eval()
    square = Image.new("RGB", (256, 256), (10, 20, 30))
    batch = processor(images=[square], task_inputs=["panoptic"], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 256, 256)
    assert int(batch["task_inputs"].max()) < model.config.text_encoder_vocab_size
    with torch.no_grad():
        features = model.model.pixel_level_module.encoder(batch["pixel_values"]).feature_maps
        model(pixel_values=batch["pixel_values"], task_inputs=batch["task_inputs"])
    assert [tuple(f.shape[1:]) for f in features] == [(16, 64, 64), (32, 32, 32), (64, 16, 16), (128, 8, 8)]


def test_gen_teacher_has_the_unclip_layout(assets):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    assert _dir_bytes(assets.gen) < MAX_CHECKPOINT_BYTES
    model = CLIPVisionModelWithProjection.from_pretrained(assets.gen, subfolder="image_encoder").eval()
    processor = CLIPImageProcessor.from_pretrained(assets.gen, subfolder="feature_extractor")
    pixels = processor(images=Image.new("RGB", (300, 200), (200, 0, 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert model(pixel_values=pixels).image_embeds.shape == (1, 32)


def test_student_vision_gives_576_patch_tokens(assets):
    from transformers import AutoImageProcessor, CLIPVisionModel

    assert _dir_bytes(assets.student_vision) < MAX_CHECKPOINT_BYTES
    model = CLIPVisionModel.from_pretrained(assets.student_vision).eval()
    processor = AutoImageProcessor.from_pretrained(assets.student_vision)
    pixels = processor(images=Image.new("L", (500, 400), 128), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) >= 3, "the student reads the second-to-last layer, so it needs at least 2 layers"
    assert hidden[-2].shape == (1, 1 + 576, 32)


def test_student_llm_matches_the_tokenizer(assets, tokenizer):
    from transformers import LlamaForCausalLM

    assert _dir_bytes(assets.student_llm) < MAX_CHECKPOINT_BYTES
    model = LlamaForCausalLM.from_pretrained(assets.student_llm).eval()
    assert model.config.vocab_size == len(tokenizer) == assets.vocab_size
    assert model.config.max_position_embeddings >= 1024
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_tokenizer_special_tokens(tokenizer):
    assert 500 <= len(tokenizer) <= 1000
    for token in (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, IMAGE_TOKEN):
        assert token is not None
    ids = tokenizer(f"{IMAGE_TOKEN}\nWhat is shown in this image?", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(ids[0]) == 1
    assert tokenizer.decode(ids) == f"{IMAGE_TOKEN}\nWhat is shown in this image?"
    assert tokenizer.tokenize(f"x{IMAGE_TOKEN}y").count(IMAGE_TOKEN) == 1


def test_chat_template_renders_prefixes(assets, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text.startswith(tokenizer.bos_token + "<|system|>\n" + DEFAULT_SYSTEM_PROMPT)
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert DEFAULT_SYSTEM_PROMPT not in tokenizer.apply_chat_template(custom, tokenize=False)

    conversations = [_as_messages(c) for c in _conversations(assets.shards)]
    conversations.append(custom + [{"role": "assistant", "content": " leading space and\n\nnewlines "}])
    assert any(len(messages) == 4 for messages in conversations), "want a multi-turn conversation in the demo"
    for messages in conversations:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)["input_ids"]
            full = tokenizer.apply_chat_template(messages[: i + 1])["input_ids"]
            assert full[: len(prompt)] == prompt, f"generation prompt is not a token prefix in {messages}"
            answer = full[len(prompt) :]
            assert answer[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(answer[:-1]) == message["content"]


def test_demo_record_explains_itself(assets):
    record = json.loads((assets.root / "demo_assets.json").read_text())
    assert record["seed"] == 0 and record["num_samples"] == NUM_SAMPLES
    assert record["target_shapes"] == {"depth": [576, 32], "seg": [576, 128], "gen": [1, 32]}


def test_jpegs_are_real_photographs(assets):
    for sample in _read_samples(assets.shards):
        # A photograph, not a flat synthetic fill.
        assert sum(1 for count in sample["jpg"].convert("L").histogram() if count) > 32, sample["__key__"]
