"""Precompute benchmark: ratios measured side by side in one run (`make bench`).

P1 = pipeline rows/s / bare teacher-forward rows/s on the same pre-decoded images, one worker (goal >= 0.90)
P2 = one three-teacher job's time / the sum of three one-teacher jobs' times           (goal <= 0.75)
P5 = stored bytes per row / raw float16 bytes per row, per storage option, with its relative L2 error

Two teacher sets: the tiny demo teachers, and random-initialised teachers of the smallest REAL sizes
(Depth-Anything-V2-Small, OneFormer Swin-Tiny, CLIP ViT-B/16 with projection) at the paper's input sizes, so
that teacher compute dominates as in real runs. Everything is built offline; nothing is downloaded.

P1 and P2 are medians of `--repeats` interleaved rounds (benchmarks/measure.py) with the min-max over rounds.
A round of a teacher set runs, in turn (forwards in even rounds, backwards in odd ones):

    bare      preprocess + forward of every image by every teacher in this process (teachers loaded once,
              warm), torch on every core: rows / seconds
    pipeline  `run_precompute` with `PrecomputeConfig(workers=1, feed="inline")`: one worker with every core
              reads, checks, decodes, preprocesses, forwards, encodes, compresses and writes:
              rows / summary.compute_seconds
    three     a three-teacher job, wall time of run_precompute with Ray already running
    depth, seg, gen   the three one-teacher jobs, likewise

so each round gives one P1 (pipeline / bare) and one P2 (three / (depth + seg + gen)). P5 is deterministic and
measured once, after the rounds, in one job that holds a copy of each teacher per storage option (its float16
row reads the last round's three-teacher store, the same job).

Defaults take about 19 minutes on 2 CPU cores (see benchmarks/RESULTS.md):

    python benchmarks/precompute.py [--demo-rows 384] [--rows 8] [--repeats 5] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import Spread, interleave, ratio  # noqa: E402

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

    from pipeline.demo.teachers import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder

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


def subset_manifest(manifest: Path, names, out: Path) -> Path:
    data = yaml.safe_load(manifest.read_text())
    data["teachers"] = {k: v for k, v in data["teachers"].items() if k in names}
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def decoded_images(shards: str) -> list:
    """Every image of the shards decoded once, the way precompute decodes them."""
    import fsspec

    from pipeline.data.images import decode_rgb
    from pipeline.data.index import build_index
    from pipeline.data.shards import read_member_bytes

    index = build_index(shards, progress=False)
    urls = {Path(u).name: u for u in index.urls}
    images = []
    for row in index.table.to_pylist():
        with fsspec.open(urls[row["shard"]], "rb") as f:
            images.append(decode_rgb(read_member_bytes(f, row["image_offset"], row["image_size"])))
    return images


class BareForward:
    """Every teacher of a manifest loaded once in this process and warmed up, as the pipeline's worker holds them;
    `run()` times preprocess + forward of `images` by each in turn, in the batches of the teacher's spec."""

    def __init__(self, manifest: Path, images: list):
        import torch

        import teachers

        torch.set_num_threads(os.cpu_count() or 1)  # the pipeline's one worker gets every core too
        self.images = images
        specs = teachers.load_manifest(manifest).teachers
        self.teachers = {name: teachers.create(spec) for name, spec in specs.items()}
        for teacher in self.teachers.values():
            teacher(teacher.preprocess(images[:1]))  # first-call allocations, outside every round
        self.outputs: dict[str, np.ndarray] = {}  # float32 [rows, T, C] per teacher, from the first run

    def run(self) -> float:
        """rows/s of the three teachers together (each row through every teacher)."""
        import torch

        seconds = 0.0
        for name, teacher in self.teachers.items():
            size = teacher.spec.batch_size
            started = time.perf_counter()
            outs = [teacher(teacher.preprocess(self.images[i:i + size])) for i in range(0, len(self.images), size)]
            seconds += time.perf_counter() - started
            if name not in self.outputs:
                self.outputs[name] = torch.cat(outs).float().numpy()
        return len(self.images) / seconds


def run_job(shards: str, manifest: Path, store: Path, **kw):
    from pipeline.precompute import PrecomputeConfig, run_precompute

    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    summary = run_precompute(shards, str(manifest), str(store), PrecomputeConfig(**kw), progress=False)
    return time.perf_counter() - started, summary


VARIANTS = ("bare", "pipeline", "three", *TEACHERS)
P1_GOAL, P2_GOAL = 0.90, 0.75
# P5: {option: (tag of its teacher copies, storage fields)}
P5_OPTIONS = {"float16 (default)": ("float16", {}), "bfloat16": ("bfloat16", {"storage_dtype": "bfloat16"}),
              "int8": ("int8", {"quantize": "int8"}), "pool 2": ("pool2", {"pool": 2}),
              "int8 + pool 2": ("int8-pool2", {"quantize": "int8", "pool": 2})}


def measure(label: str, shards: str, manifest: Path, work: Path, rows: int, repeats: int) -> dict:
    from pipeline.data.store import TargetStore

    print(f"{label}: {rows} rows, {repeats} interleaved rounds of {' '.join(VARIANTS)}", flush=True)
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    bare = BareForward(manifest, decoded_images(shards))
    # About four blocks per job (at least two, so that the default two workers on 2 cores both have one), each a
    # multiple of the 4-row chunks.
    block = 4 * max(1, math.ceil(rows / 16))
    jobs = {"three": manifest, **{n: subset_manifest(manifest, [n], work / f"{n}.yaml") for n in TEACHERS}}

    def run(variant: str) -> float:
        """bare, pipeline: rows/s; a job: seconds."""
        if variant == "bare":
            return bare.run()
        if variant == "pipeline":
            _, summary = run_job(shards, manifest, work / "p1", workers=1, feed="inline", rows_per_block=block,
                                 rows_per_chunk=4)
            return summary.num_rows / summary.compute_seconds
        seconds, _ = run_job(shards, jobs[variant], work / f"p2-{variant}", rows_per_block=block, rows_per_chunk=4)
        return seconds

    rounds = interleave(VARIANTS, run, repeats, report=lambda line: print(line, flush=True))
    singles = [sum(values) for values in zip(*(rounds[n] for n in TEACHERS))]

    # P5: each storage option but the default as its own copy of each teacher, all in one job (the same targets,
    # encodings and chunks as one job per option, without four more jobs' start-up); the default's groups are the
    # last round's three-teacher job's.
    data = yaml.safe_load(manifest.read_text())
    specs, copies, groups = data["teachers"], {}, {}  # groups: (option, teacher) -> (store, group)
    for option, (tag, storage) in P5_OPTIONS.items():
        for name in TEACHERS:
            if storage.get("pool") and name == "gen":
                continue  # a [1, C] target has no grid to pool
            if storage:
                copies[f"{name}-{tag}"] = {**specs[name], **storage}
                groups[option, name] = (work / "p5", f"{name}-{tag}")
            else:
                groups[option, name] = (work / "p2-three", name)
    data["teachers"] = copies
    (work / "p5.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    run_job(shards, work / "p5.yaml", work / "p5", rows_per_block=block, rows_per_chunk=4)
    p5 = []
    for (option, name), (path, group) in groups.items():
        store = TargetStore(str(path))
        tokens, channels = store.teacher_attrs(group)["target_shape"]
        decoded, _ = store.read_rows(group, 0, store.num_rows)
        ref = bare.outputs[name]
        p5.append({"option": option, "teacher": name,
                   "ratio": store.nbytes(group) / store.num_rows / (tokens * channels * 2),
                   "rel_l2": float(np.linalg.norm(decoded - ref) / np.linalg.norm(ref))})
    return {"label": label, "rows": rows, "repeats": repeats, "bare": Spread.of(rounds["bare"]),
            "pipeline": Spread.of(rounds["pipeline"]), "P1": ratio(rounds["pipeline"], rounds["bare"]),
            "p1_met": sum(p / b >= P1_GOAL for p, b in zip(rounds["pipeline"], rounds["bare"])),
            "three": Spread.of(rounds["three"]), "singles": {n: Spread.of(rounds[n]) for n in TEACHERS},
            "singles_sum": Spread.of(singles), "P2": ratio(rounds["three"], singles),
            "p2_met": sum(t / s <= P2_GOAL for t, s in zip(rounds["three"], singles)), "P5": p5,
            "seconds": time.perf_counter() - started}


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch "
            f"{torch.__version__}")


def report(results: list[dict], load: tuple[float, float], seconds: float) -> str:
    lines = [f"machine: {machine()}",
             f"load average (1 min) at start {load[0]:.2f}, at end {load[1]:.2f}; whole benchmark {seconds:.0f} s", "",
             "P1 = pipeline rows/s (one worker, inline feed, rows / compute_seconds) / bare forward rows/s; a row is "
             "one image through all three teachers. Median [min-max] over the rounds.", "",
             "| teacher set | rows | rounds | bare forward rows/s | pipeline rows/s | P1 | goal | rounds meeting it |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['rows']} | {r['repeats']} | {r['bare']:.2f} | {r['pipeline']:.2f} "
              f"| {r['P1']:.3f} | >= {P1_GOAL:.2f} | {r['p1_met']}/{r['repeats']} |" for r in results]
    lines += ["", "P2 = wall time of one three-teacher job / the sum of the three one-teacher jobs' (default workers, "
              "Ray already running). Median [min-max] over the rounds.", "",
              "| teacher set | rows | three-teacher job s | depth s | seg s | gen s | sum s | P2 | goal "
              "| rounds meeting it |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['rows']} | {r['three']:.1f} | "
              + " | ".join(f"{r['singles'][n]:.1f}" for n in TEACHERS)
              + f" | {r['singles_sum']:.1f} | {r['P2']:.3f} | <= {P2_GOAL:.2f} | {r['p2_met']}/{r['repeats']} |"
              for r in results]
    lines += ["", "P2 depends on the rows per job: a shared job saves two jobs' fixed costs (indexing, workers "
              "starting, teachers loading, first forwards) and the shared decode; fixed costs weigh less as rows grow."]
    for r in results:
        lines += ["", f"P5, {r['label']} ({r['rows']} rows, once): stored bytes / raw float16 bytes, relative L2 "
                  "error against the float32 teacher output", "",
                  "| storage option | teacher | stored bytes / raw float16 bytes | relative L2 error |",
                  "|---|---|---|---|"]
        lines += [f"| {p['option']} | {p['teacher']} | {p['ratio']:.3f} | {p['rel_l2']:.2e} |" for p in r["P5"]]
    lines += ["", "seconds per teacher set (rounds and P5): "
              + ", ".join(f"{r['label']} {r['seconds']:.0f} s" for r in results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="images for the small-real teachers (default 8)")
    parser.add_argument("--demo-rows", type=int, default=384, help="images for the tiny demo teachers (default 384)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per teacher set (default 5)")
    parser.add_argument("--sets", nargs="+", choices=("tiny", "small"), default=["tiny", "small"],
                        help="teacher sets to measure (default both)")
    parser.add_argument("--out", default="runs/bench", help="scratch directory")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from transformers.utils import logging as hf_logging

    from pipeline.demo import build_demo_assets
    from pipeline.demo.llava import write_demo_shards
    from pipeline.local_ray import ray_session

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars of the bare forward's teachers
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    results = []
    # A fresh local Ray that dies with this process, never a cluster someone else started on the machine.
    with ray_session(None, num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False):
        if "tiny" in args.sets:
            demo = build_demo_assets(out / "demo", num_samples=args.demo_rows, num_shards=4, progress=False)
            os.environ["DEMO_DIR"] = str(demo.root)  # the demo manifest's ${DEMO_DIR}, in Ray's workers too
            results.append(measure("tiny demo teachers", str(demo.shards_dir), REPO / "manifests" / "teachers" /
                                   "demo.yaml", out / "tiny", args.demo_rows, args.repeats))
        if "small" in args.sets:
            write_demo_shards(out / "small-shards", num_samples=args.rows, num_shards=2, progress=False)
            small = build_small_real_teachers(out / "small-teachers")
            results.append(measure("small real (DA-V2-S, OneFormer Swin-T, CLIP ViT-B/16)", str(out / "small-shards"),
                                   small, out / "small", args.rows, args.repeats))
    print()
    print(report(results, (load_start, os.getloadavg()[0]), time.perf_counter() - started))


if __name__ == "__main__":
    main()
