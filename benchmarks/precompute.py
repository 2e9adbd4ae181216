"""Precompute benchmark: ratios measured side by side in one run (`make bench`).

P1 = pipeline rows/s / bare teacher-forward rows/s on the same pre-decoded images (goal >= 0.90)
P2 = one three-teacher job's time / the sum of three one-teacher jobs' times   (goal <= 0.75)
P5 = stored bytes per row / raw float16 bytes per row, per storage option, with its relative L2 error

Two teacher sets: the tiny demo teachers, and random-initialised teachers of the smallest REAL sizes
(Depth-Anything-V2-Small, OneFormer Swin-Tiny, CLIP ViT-B/16 with projection) at the paper's input sizes, so
that teacher compute dominates as in real runs. Everything is built offline; nothing is downloaded.

    python benchmarks/precompute.py [--rows 24] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

TEACHERS = ("depth", "seg", "gen")


def build_small_real_teachers(root: Path) -> Path:
    """Random-init checkpoints with the real small architectures; returns a teacher manifest for them."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        SwinConfig,
    )

    from pipeline.demo_assets import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder

    torch.manual_seed(0)
    # The tiny builders write the processor files; the models are then replaced by the real small sizes.
    depth = build_tiny_depth_anything(root / "depth")
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                            image_size=518, out_features=["stage3", "stage6", "stage9", "stage12"],
                            reshape_hidden_states=False, apply_layernorm=True)
    DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64,
        reassemble_factors=[4, 2, 1, 0.5])).save_pretrained(depth)

    seg = build_tiny_oneformer(root / "seg", image_size=768)
    config = OneFormerConfig.from_pretrained(seg)
    config.backbone_config = SwinConfig(image_size=768, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                        window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    OneFormerForUniversalSegmentation(config).save_pretrained(seg)

    gen = build_tiny_unclip_image_encoder(root / "gen")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=16, projection_dim=512)).save_pretrained(gen / "image_encoder")

    manifest = {"teachers": {
        "depth": {"kind": "depth_anything_v2", "model": str(depth), "layers": [2, 5, 8, 11], "image_size": 336,
                  "batch_size": 4},
        "seg": {"kind": "oneformer", "model": str(seg), "image_size": 768, "grid": 24, "batch_size": 2},
        "gen": {"kind": "unclip_image_encoder", "model": str(gen), "batch_size": 8},
    }}
    path = root / "teachers.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def subset_manifest(manifest: Path, names, out: Path, **storage) -> Path:
    data = yaml.safe_load(manifest.read_text())
    data["teachers"] = {k: {**v, **storage} for k, v in data["teachers"].items() if k in names}
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def decoded_images(shards: str) -> list:
    """Every image of the shards decoded once, the way precompute decodes them."""
    import fsspec

    from pipeline.images import decode_rgb
    from pipeline.index import build_index
    from pipeline.shards import read_member_bytes

    index = build_index(shards, progress=False)
    urls = {Path(u).name: u for u in index.urls}
    images = []
    for row in index.table.to_pylist():
        with fsspec.open(urls[row["shard"]], "rb") as f:
            images.append(decode_rgb(read_member_bytes(f, row["image_offset"], row["image_size"])))
    return images


def bare_forward(manifest: Path, images: list) -> tuple[float, dict]:
    """Seconds for preprocess + forward of every image by every teacher, in this process; and the float32 outputs."""
    import torch

    import teachers

    torch.set_num_threads(os.cpu_count() or 1)
    seconds, outputs = 0.0, {}
    for name, spec in teachers.load_manifest(manifest).teachers.items():
        teacher = teachers.create(spec)
        teacher(teacher.preprocess(images[:1]))  # warm-up, as the pipeline's first batch is also a warm-up
        started = time.perf_counter()
        outs = [teacher(teacher.preprocess(images[i:i + spec.batch_size])) for i in range(0, len(images),
                                                                                      spec.batch_size)]
        seconds += time.perf_counter() - started
        outputs[name] = torch.cat(outs).float().numpy()
        del teacher
    return seconds, outputs


def run_job(shards: str, manifest: Path, store: Path, **kw):
    from pipeline.precompute import run_precompute

    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    summary = run_precompute(shards, str(manifest), str(store), progress=False, **kw)
    return time.perf_counter() - started, summary


def measure(label: str, shards: str, manifest: Path, work: Path, rows: int) -> dict:
    from pipeline.store import TargetStore

    images = decoded_images(shards)
    bare_s, reference = bare_forward(manifest, images)
    block = 8 * max(1, rows // 32)  # a few blocks per job, each a multiple of the 4-row chunks
    _, one_worker = run_job(shards, manifest, work / "p1", workers=1, rows_per_block=block, rows_per_chunk=4)
    three_s, _ = run_job(shards, manifest, work / "p2-all", rows_per_block=block, rows_per_chunk=4)
    singles = []
    for name in TEACHERS:
        seconds, _ = run_job(shards, subset_manifest(manifest, [name], work / f"{name}.yaml"), work / f"p2-{name}",
                             rows_per_block=block, rows_per_chunk=4)
        singles.append(seconds)

    p5 = []
    options = {"float16 (default)": {}, "bfloat16": {"storage_dtype": "bfloat16"}, "int8": {"quantize": "int8"},
               "pool 2": {"pool": 2}, "int8 + pool 2": {"quantize": "int8", "pool": 2}}
    for option, storage in options.items():
        names = [n for n in TEACHERS if not storage.get("pool") or n != "gen"]  # a [1, C] target has no grid
        path = subset_manifest(manifest, names, work / "p5.yaml", **storage)
        _, _ = run_job(shards, path, work / "p5", rows_per_block=block, rows_per_chunk=4)
        store = TargetStore(str(work / "p5"))
        for name in names:
            tokens, channels = store.teacher_attrs(name)["target_shape"]
            decoded, _ = store.read_rows(name, 0, store.num_rows)
            ref = reference[name]
            p5.append({"option": option, "teacher": name,
                       "ratio": store.nbytes(name) / store.num_rows / (tokens * channels * 2),
                       "rel_l2": float(np.linalg.norm(decoded - ref) / np.linalg.norm(ref))})
    return {"label": label, "rows": rows, "bare_s": bare_s, "pipeline_s": one_worker.compute_seconds,
            "P1": bare_s / one_worker.compute_seconds, "three_s": three_s, "singles_s": singles,
            "P2": three_s / sum(singles), "P5": p5}


def report(results: list[dict]) -> str:
    import platform

    import torch

    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"torch {torch.__version__}, no GPU" if not torch.cuda.is_available() else
             f"machine: {torch.cuda.get_device_name()}", ""]
    for r in results:
        lines += [f"## {r['label']} ({r['rows']} rows)", "",
                  f"P1 = {r['P1']:.3f}  (bare forward {r['rows'] * 3 / r['bare_s']:.2f} teacher-rows/s, pipeline "
                  f"{r['rows'] * 3 / r['pipeline_s']:.2f} teacher-rows/s, one worker; goal >= 0.90)",
                  f"P2 = {r['P2']:.3f}  (three-teacher job {r['three_s']:.1f}s vs one-teacher jobs "
                  + " + ".join(f"{s:.1f}s" for s in r["singles_s"]) + "; goal <= 0.75)", "",
                  "| P5 storage option | teacher | stored bytes / raw float16 bytes | relative L2 error |",
                  "|---|---|---|---|"]
        lines += [f"| {p['option']} | {p['teacher']} | {p['ratio']:.3f} | {p['rel_l2']:.2e} |" for p in r["P5"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24, help="images for the small-real teachers (default 24)")
    parser.add_argument("--demo-rows", type=int, default=200, help="images for the tiny demo teachers")
    parser.add_argument("--out", default="runs/bench", help="scratch directory")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.demo_assets import write_demo_shards

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        from pipeline.demo_assets import build_demo_assets

        demo = build_demo_assets(out / "demo", num_samples=args.demo_rows, num_shards=4)
        os.environ["DEMO_DIR"] = str(demo.root)
        tiny_manifest = Path(__file__).resolve().parents[1] / "manifests" / "teachers" / "demo.yaml"
        results = [measure("tiny demo teachers", str(demo.shards_dir), tiny_manifest, out / "tiny", args.demo_rows)]
        write_demo_shards(out / "small-shards", num_samples=args.rows, num_shards=2)
        small = build_small_real_teachers(out / "small-teachers")
        results.append(measure("small real teachers (DA-V2-S, OneFormer Swin-T, CLIP ViT-B/16)",
                               str(out / "small-shards"), small, out / "small", args.rows))
    finally:
        ray.shutdown()
    print(report(results))


if __name__ == "__main__":
    main()
