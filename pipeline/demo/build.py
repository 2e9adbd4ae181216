"""`pipeline demo-assets`: the whole offline demo, from the LLaVA-format data and its shards to every tiny
checkpoint, described in `demo_assets.json` (layout: the package docstring)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.demo.common import prepare_dir
from pipeline.demo.llava import shard_demo_llava, write_demo_llava
from pipeline.demo.student_parts import build_tiny_llm, build_tiny_student_vision
from pipeline.demo.teachers import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder
from pipeline.demo.unclip_pipeline import build_tiny_unclip_pipeline
from pipeline.demo.tokenizer import train_demo_tokenizer


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
    gen: Path  # the whole unCLIP pipeline, like the hub repo; the gen teacher reads image_encoder/, feature_extractor/
    student_vision: Path
    student_llm: Path
    student_tokenizer: Path
    vocab_size: int
    seed: int


def build_demo_assets(
    out_dir: str | os.PathLike, *, num_samples: int = 200, num_shards: int = 4, seed: int = 0, progress: bool = True
) -> DemoAssets:
    """Build the whole offline demo under `out_dir` (layout in the `pipeline.demo` docstring) and describe it.

    Deterministic in `seed`; writes `out_dir/demo_assets.json` recording the arguments, the library versions and the
    target shapes the demo teachers produce: depth [576, 32], seg [576, 128], gen [1, 32] (float32 before storage).
    """
    start = time.perf_counter()
    root = prepare_dir(out_dir)
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
    say("gen decoder (the rest of the unCLIP pipeline: UNet, VAE, text encoder, image noising)")
    # Its own seed, after the encoder: the gen teacher's files and so its fingerprint stay what they were.
    build_tiny_unclip_pipeline(gen, seed=seed + 5)
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
            for name in ("torch", "transformers", "diffusers", "tokenizers", "pillow", "scikit-image", "numpy")
        },
    }
    (root / "demo_assets.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    say(f"done: {num_samples} samples ({source.num_conversations} with instruction conversations), checkpoints "
        f"under {assets_dir}")
    return assets
